"""fork() for a running vLLM engine: a trunk prompt, a snapshot, four children with different suffixes.

    scripts/demo.sh                # sets up .venv-vllm, makes a tiny local model, runs this
    python examples/fork_demo.py --trunk-tokens 4096 --processes

Each child continues the parent's trunk without prefilling it again: vLLM reports the trunk's pages as
cached tokens, and each child's output equals what the parent produces for the same suffix from scratch.
The engine's own log goes to a file (its path is printed); the trunk's snapshot is saved as trunk.thaw, the
file the README's "Use" examples open.

Why some children once took nearly a cold prefill's time (issue 14): not a cache miss (vLLM counted the whole
trunk as cached for every child) and not the batch shape (every child's request has the same shape), but the
first requests of the engine paying one-time costs, on a shared 2-CPU machine whose other load stretches any
row. Two `--no-warmup` runs here at load average 6-9: children took 376, 369, 309, 80 ms (CPU 211, 189, 204, 93)
and 475, 111, 43, 30 ms (CPU 255, 132, 71, 53), each with 2048 cached tokens; the slow ones spent the time
computing, not waiting. So the demo first runs both shapes (a full prefill, and a cached prefix plus 8 new
tokens) untimed, and prints the CPU time beside each wall time and the load average under the table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import time
from pathlib import Path

COLUMNS = """\
  cached    tokens vLLM served from its prefix cache (vLLM's own count): the whole trunk, nothing re-prefilled
  child ms  wall time for the child to prefill its suffix and decode its tokens
  cpu ms    CPU time this process spent meanwhile, all threads (so it may exceed `child ms`); far below
            `child ms`, the CPUs were busy elsewhere
  cold ms   the same prompt (trunk + suffix) prefilled from scratch by the parent, for comparison
  same      the child's tokens equal the cold run's, token for token"""


@contextlib.contextmanager
def engine_output_to(log):
    """Send file descriptors 1 and 2 (Python's and the engine's C++ writes alike) to `log` while inside."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def timed(call):
    """(result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="llama", help="zoo architecture of the tiny random-weight model")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--trunk-tokens", type=int, default=2048)
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--processes", action="store_true", help="children as worker processes (shared memory)")
    parser.add_argument("--no-warmup", action="store_true", help="time the first requests with their one-time costs")
    parser.add_argument("--save", default="trunk.thaw", help="where to save the trunk's snapshot (default trunk.thaw)")
    parser.add_argument("--log", default=".cache/demo/engine.log", help="the engine's log file")
    args = parser.parse_args()

    log_path = Path(args.log).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"engine log: {log_path}")
    with open(log_path, "w") as log, engine_output_to(log):
        rows = run(args)
    for line in rows:
        print(line)


def run(args) -> list[str]:
    """The demo, with the engine's output redirected: returns the lines to print."""
    from thaw_conformance import zoo
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    import thaw_format
    import thaw_vllm

    lines = []
    model = zoo.make_model(args.arch, dtype=args.dtype)
    llm, start_time, _ = timed(lambda: thaw_vllm.LLM(
        model, dtype=args.dtype, block_size=32, enforce_eager=True, skip_tokenizer_init=True,
        max_model_len=args.trunk_tokens + 256, kv_cache_memory_bytes=256 << 20))
    rng = random.Random(0)
    trunk = [rng.randrange(3, 1000) for _ in range(args.trunk_tokens)]
    suffixes = [[rng.randrange(3, 1000) for _ in range(8)] for _ in range(args.children)]
    # logprobs=0, as the children's requests carry (the contract's Generation holds each token's logprob): without
    # it the warm-ups left vLLM's first logprobs request to child 0, which then took 1.4-1.7 s of CPU and 5-17 s
    # of wall time against a 0.5-2 s cold prefill (two runs at load 3.9 and 5.8); with it, 96-127 ms (load 4.7).
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)

    def generate(prompt):
        return llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]

    # One-time costs of the first request of each shape (oneDNN kernel set-up, first-touch of the KV pages) land
    # on whichever request comes first; a warm-up of each shape keeps them out of every timed row below.
    if not args.no_warmup:
        llm.reset_prefix_cache()
        generate(trunk[:-8] + suffixes[0])   # a cold prefill of the full length
        generate(trunk[:-8] + suffixes[1])   # and a cached prefix with an 8-token suffix, the children's shape
    cold = []  # the parent's own answers, each prefilled from scratch
    for suffix in suffixes:
        llm.reset_prefix_cache()
        cold.append(timed(lambda: generate(trunk + suffix)))
    llm.reset_prefix_cache()
    _, trunk_time, _ = timed(lambda: generate(trunk))

    snapshot, capture_time, _ = timed(lambda: llm.snapshot(include_weights=args.processes))
    thaw_format.save(snapshot, args.save)
    kv_bytes = sum(t.nbytes for layer in snapshot.kv.layers for t in layer.tensors.values())
    lines.append(f"model     tiny random-weight {args.arch} ({args.dtype}), vLLM started in {start_time:.0f} s")
    lines.append(f"trunk     {len(trunk)} tokens prefilled in {trunk_time * 1e3:.0f} ms")
    lines.append(f"snapshot  {snapshot.prefix.num_pages} pages, {kv_bytes / 2**20:.1f} MiB of KV, captured in "
                 f"{capture_time * 1e3:.0f} ms, saved to {args.save} (try: thaw inspect {args.save})")
    _, restore_time, _ = timed(lambda: llm.restore(snapshot))  # what a child engine does instead of prefilling
    lines.append(f"restore   {restore_time * 1e3:.0f} ms, against {trunk_time * 1e3:.0f} ms to prefill the trunk "
                 f"again ({trunk_time / restore_time:.0f}x)")
    children, fork_time, _ = timed(lambda: llm.fork(args.children, context=trunk, processes=args.processes))
    lines.append(f"fork      {args.children} {'process' if args.processes else 'in-process'} children in "
                 f"{fork_time * 1e3:.0f} ms")
    lines.append("")
    lines.append(f"{'child':>5} {'cached':>7} {'child ms':>9} {'cpu ms':>7} {'cold ms':>8}  same  output")
    for i, (child, suffix, (cold_out, cold_time, _)) in enumerate(zip(children, suffixes, cold)):
        done, child_time, child_cpu = timed(lambda: child.generate(suffix, params))
        same = done.token_ids == list(cold_out.outputs[0].token_ids)
        lines.append(f"{i:>5} {done.num_cached_tokens:>7} {child_time * 1e3:>9.0f} {'-' if args.processes else f'{child_cpu * 1e3:.0f}':>7} "
                     f"{cold_time * 1e3:>8.0f}  {'yes' if same else 'NO':>4}  {done.token_ids}")
    for child in children:
        child.close()
    load = os.getloadavg()[0]
    lines.append(f"{'':>5} load average {load:.1f} on {os.cpu_count()} CPUs" + (": other work shares the CPUs, so "
                 "times vary from run to run" if load > os.cpu_count() else ""))
    return lines + ["", COLUMNS]


if __name__ == "__main__":
    main()
