"""New-process side of test_tensor_parallel: tensor-parallel (TP=2) engines, which need vLLM's thread binding set
before the process's first engine (vLLM caches its environment then): VLLM_CPU_OMP_THREADS_BIND, one CPU list per
rank, since the automatic binding wants a NUMA node per rank.

argv[1] is JSON: model, engine_kwargs, prompt (token ids), params (SamplingParams fields), suffix (token ids), tp1
(the path of a TP=1 engine's snapshot of the prompt's pages), out (a directory). Steps:
  parent: a TP=2 engine generates the prompt and the prompt + suffix, describes itself and captures the prompt's
          pages with weights (saved as out/tp2.thaw);
  fresh:  a second TP=2 engine restores out/tp2.thaw, then the TP=1 snapshot; after each, its recapture of the
          prompt's pages is saved (out/tp2_in_tp2.thaw, out/tp1_in_tp2.thaw) and the prompt generated again;
  pool:   a ForkPool of one worker started from the parent's launch spec (a TP=2 engine) forks the prompt + suffix.
Prints one line "THAW_RESULT <json>".
"""

import json
import os
import sys


def main() -> None:
    config = json.loads(sys.argv[1])
    import thaw_format
    import thaw_vllm
    from thaw_format.sdk import ForkPool
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params, prompt, suffix, out = SamplingParams(**config["params"]), config["prompt"], config["suffix"], config["out"]

    def generate(llm, tokens):
        result = llm.generate([TokensPrompt(prompt_token_ids=tokens)], params, use_tqdm=False)[0]
        return {"token_ids": list(result.outputs[0].token_ids), "num_cached_tokens": result.num_cached_tokens or 0}

    def recapture(llm, name):
        thaw_format.save(thaw_vllm.capture(llm, include_weights=False, chains=[prompt]), os.path.join(out, name))

    report = {}
    parent = thaw_vllm.LLM(config["model"], **config["engine_kwargs"])
    report["parent"] = {"prompt": generate(parent, prompt), "continued": generate(parent, prompt + suffix)}
    report["describe"] = thaw_vllm.describe(parent)
    thaw_format.save(thaw_vllm.capture(parent, include_weights=True, chains=[prompt]), os.path.join(out, "tp2.thaw"))

    fresh = thaw_vllm.LLM(config["model"], **config["engine_kwargs"])
    report["fresh"] = {}
    for name, path in (("tp2", os.path.join(out, "tp2.thaw")), ("tp1", config["tp1"])):
        thaw_vllm.restore(fresh, thaw_format.load(path))
        recapture(fresh, f"{name}_in_tp2.thaw")
        report["fresh"][name] = generate(fresh, prompt)
    fresh.llm_engine.engine_core.shutdown()
    del fresh

    with ForkPool(thaw_vllm.VLLMEngine(parent), workers=1) as pool:
        round_ = pool.fork(thaw_vllm.VLLMEngine(parent), 1, context=prompt, suffixes=[suffix],
                           params=thaw_format.SamplingParams(**config["params"]))
    child = round_.generations[0]
    report["pool"] = {"token_ids": child.token_ids, "cached_tokens": child.cached_tokens}
    print("THAW_RESULT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
