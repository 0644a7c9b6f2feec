"""fork() for a running vLLM engine: a trunk prompt, a snapshot, four children with different suffixes.

    scripts/demo.sh                # sets up .venv-vllm, makes a tiny local model, runs this
    python examples/fork_demo.py --trunk-tokens 4096 --processes

Each child continues the parent's trunk without prefilling it again: vLLM reports the trunk's pages as
cached tokens, and each child's output equals what the parent produces for the same suffix from scratch.
"""

from __future__ import annotations

import argparse
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", help="zoo architecture of the tiny random-weight model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--trunk-tokens", type=int, default=2048)
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--processes", action="store_true", help="children as worker processes (shared memory)")
    args = parser.parse_args()

    from thaw_conformance import zoo
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    import thaw_vllm

    model = zoo.make_model(args.arch, dtype=args.dtype)
    llm = thaw_vllm.LLM(model, dtype=args.dtype, block_size=32, enforce_eager=True, skip_tokenizer_init=True,
                        max_model_len=args.trunk_tokens + 256, kv_cache_memory_bytes=256 << 20)
    rng = random.Random(0)
    trunk = [rng.randrange(3, 1000) for _ in range(args.trunk_tokens)]
    suffixes = [[rng.randrange(3, 1000) for _ in range(8)] for _ in range(args.children)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    def run(prompt):
        start = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        return out, time.perf_counter() - start

    cold = []  # the parent's own answers, each prefilled from scratch
    for suffix in suffixes:
        llm.reset_prefix_cache()
        cold.append(run(trunk + suffix))
    llm.reset_prefix_cache()
    _, trunk_time = run(trunk)

    start = time.perf_counter()
    snapshot = llm.snapshot(include_weights=args.processes)
    capture_time = time.perf_counter() - start
    kv_bytes = sum(t.nbytes for layer in snapshot.kv.layers for t in layer.tensors.values())
    print(f"trunk: {len(trunk)} tokens, prefill {trunk_time * 1e3:.0f} ms; snapshot: "
          f"{snapshot.prefix.num_pages} pages, {kv_bytes / 2**20:.1f} MiB KV, captured in {capture_time * 1e3:.0f} ms")

    start = time.perf_counter()
    llm.restore(snapshot)  # what a child engine does instead of prefilling the trunk
    restore_time = time.perf_counter() - start
    print(f"restore of the snapshot: {restore_time * 1e3:.0f} ms vs re-prefilling the trunk: {trunk_time * 1e3:.0f} ms "
          f"({trunk_time / restore_time:.0f}x)")

    start = time.perf_counter()
    children = llm.fork(args.children, context=trunk, processes=args.processes)
    fork_time = time.perf_counter() - start
    print(f"fork: {args.children} {'process' if args.processes else 'in-process'} children in {fork_time * 1e3:.0f} ms")
    print(f"{'child':>5} {'cached':>7} {'child ms':>9} {'cold ms':>8}  same  output")
    for i, (child, suffix, (cold_out, cold_time)) in enumerate(zip(children, suffixes, cold)):
        start = time.perf_counter()
        done = child.generate(suffix, params)
        child_time = time.perf_counter() - start
        same = done.token_ids == list(cold_out.outputs[0].token_ids)
        print(f"{i:>5} {done.num_cached_tokens:>7} {child_time * 1e3:>9.0f} {cold_time * 1e3:>8.0f}  {'yes' if same else 'NO':>4}  {done.token_ids}")
    for child in children:
        child.close()


if __name__ == "__main__":
    main()
