"""New-process side of the thaw_vllm tests: start an engine, restore snapshots from files, report as JSON.

argv[1] is JSON: model, dtype, engine_kwargs, weights_from (a snapshot path for load_format="thaw", or null),
steps: a list of {"snapshot": path, "prompts": [[ids]], "params": {...}} or {"snapshot": path, "resume": true}.
Prints one line "THAW_RESULT <json>": per step, the outputs and vLLM's cached-token counts.
"""

import json
import sys


def main() -> None:
    config = json.loads(sys.argv[1])
    import thaw_format
    import thaw_vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(config["engine_kwargs"], dtype=config["dtype"])
    if config.get("weights_from"):
        kwargs.update(load_format="thaw", model_loader_extra_config={"thaw_snapshot": config["weights_from"]})
    llm = thaw_vllm.LLM(config["model"], **kwargs)
    results = []
    for step in config["steps"]:
        resumed = thaw_vllm.restore(llm, thaw_format.load(step["snapshot"]))
        if step.get("resume"):
            done = thaw_vllm.finish(llm, resumed)
            results.append({r: {"token_ids": f.output_token_ids, "num_cached_tokens": f.cached_tokens}
                            for r, f in done.items()})
            continue
        params = SamplingParams(**step["params"])
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in step["prompts"]], params, use_tqdm=False)
        results.append([{"token_ids": list(o.outputs[0].token_ids), "num_cached_tokens": o.num_cached_tokens}
                        for o in outs])
    if config.get("recapture"):
        thaw_format.save(thaw_vllm.capture(llm, include_weights=True), config["recapture"])
    print("THAW_RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
