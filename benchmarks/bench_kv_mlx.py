"""MLX: KV capture and restore against a memory copy, and snapshot files against mlx-lm's prompt-cache files.

    .venv/bin/python benchmarks/bench_kv_mlx.py [--tokens 4096]

A prompt cache of the KV-heavy tiny Llama (8 layers, 8 KV heads x 128, float32: 64 KiB per token; 4,096
tokens = 256 MiB), KV only, model identity computed once. Side by side in one process, best of --repeats (3)
in wall time, with the best CPU time of the process beside it (all threads, user + system: steadier than wall
time on a shared machine, but the ratios are of wall time) and the page faults of the process during the fastest
call (a fault is memory new to the process: a load whose arrays get memory the C allocator kept from an earlier
call faults hardly at all, one whose memory is new faults once per 4 KiB, which on this VM can cost more than
the copy; which one a call gets depends on the allocator's state, not on the loader):
  memcpy:   numpy copy of the KV's bytes into a buffer already touched;
  capture:  thaw_mlx.capture (KV gathered into token-major pages, a new buffer);
  restore:  thaw_mlx.restore, the functional API (pages scattered into new MLX arrays) + mx.eval, as MLX is
            set by default, and with MLX's buffer cache made large enough to keep the arrays of the restore
            before (mx.set_cache_limit);
  engine restore: MLXEngine.restore over an engine holding a cache of the same shape (the steady state of a
            fork pool worker or of restore after restore): the KV written over the arrays of the cache it
            replaces, as vLLM and SGLang write into their KV pools;
  save:     thaw_mlx.save (one pass: pages gathered into the file with their CRCs) and capture +
            thaw_format.save (the generic path), both atomic (temporary file and rename), like with like:
            durable (fsync of file and directory, the default) against mlx-lm's save_prompt_cache followed
            by the same fsyncs, and durable=False (no fsync) against mlx-lm's save as shipped (no fsync);
            the three saves of each kind called in turn, each round starting one further on, after a round not
            timed, each call after an os.sync() outside its time (best of --repeats each: see alternated);
  load:     thaw_mlx.load (one pass: each chunk checked as it is scattered into new MLX arrays) and
            thaw_format.load (every chunk checked) + restore, against mlx-lm's load_prompt_cache + mx.eval of
            every array (its load is lazy: without the eval it reads nothing).
Which load gets memory new to the process is the C allocator's choice (glibc keeps or returns freed memory
by thresholds it adjusts as it goes), so the two loads are also timed, alternating, in child processes whose
allocator is set alike for both (--loads MODE): "kept" (MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ so
high that freed memory is always reused) and "new" (MALLOC_MMAP_THRESHOLD_ 1 MiB: every array is mapped fresh
and faulted in). Files are on local disk, in the page cache (just written). Peak RSS: each operation once in a fresh process
(the same script with --rss OP), after the session is built: the rise of VmHWM (reset through
/proc/self/clear_refs) over VmRSS before the operation, as a multiple of the KV bytes. It counts file pages
mapped by the process (thaw_mlx.load reads through a mapping, each KV tensor's pages let go once scattered).
Writes benchmarks/results/kv_move_mlx.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import command_line, write_results

CONFIG = {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 8, "intermediate_size": 256,
          "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5,
          "vocab_size": 1024, "rope_theta": 10000.0, "tie_word_embeddings": False}
RSS_OPS = ("capture", "restore", "engine_restore", "save", "load")
# glibc tunables (read at process start) that make both loads meet the same memory: reused, or always new
MALLOC_MODES = {"kept": {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**40)},
                "new": {"MALLOC_MMAP_THRESHOLD_": str(2**20)}}
SCRATCH = Path(__file__).resolve().parents[1] / ".cache"


class Session:
    """The model, a filled prompt cache and the operations measured on it."""

    def __init__(self, tokens: int) -> None:
        import mlx.core as mx
        from mlx_lm.models import cache as mlx_cache
        from mlx_lm.models.llama import Model, ModelArgs

        import thaw_mlx
        from thaw_mlx import MLXEngine

        self.mx, self.mlx_cache, self.thaw_mlx = mx, mlx_cache, thaw_mlx
        mx.random.seed(0)
        self.model = Model(ModelArgs.from_dict(CONFIG))
        self.info = thaw_mlx.model_info(self.model)
        self.cache = mlx_cache.make_prompt_cache(self.model)
        shape = (1, CONFIG["num_key_value_heads"], tokens, CONFIG["head_dim"])
        for layer in self.cache:
            layer.update_and_fetch(mx.random.normal(shape), mx.random.normal(shape))
        mx.eval([c.state for c in self.cache])
        self.tokens = list(range(3, 3 + tokens))
        self.kv_bytes = sum(c.keys[..., :tokens, :].nbytes + c.values[..., :tokens, :].nbytes for c in self.cache)
        self.engine = MLXEngine(self.model, self.info)

    def capture(self):
        return self.thaw_mlx.capture(self.model, self.cache, self.tokens, include_weights=False, info=self.info)

    def restore(self, snapshot):
        cache = self.thaw_mlx.restore(self.model, snapshot, info=self.info)
        self.mx.eval([c.state for c in cache])
        return cache

    def engine_restore(self, snapshot):
        """The engine's state replaced by the snapshot's (checks included); its cache, evaluated."""
        self.engine.restore(snapshot)
        (session,) = self.engine.sessions
        self.mx.eval([c.state for c in session.cache])
        return session.cache

    def save(self, path, durable: bool = True):
        return self.thaw_mlx.save(path, self.model, self.cache, self.tokens, include_weights=False, info=self.info,
                                  durable=durable)

    def load(self, path):
        cache, _ = self.thaw_mlx.load(path, self.model, info=self.info)
        self.mx.eval([c.state for c in cache])
        return cache

    def save_mlx_lm(self, path, fsync: bool):
        self.mlx_cache.save_prompt_cache(str(path), self.cache)
        if fsync:  # what thaw's atomic save does beyond writing: the file's and its directory's fsync
            for target in (path, path.parent):
                fd = os.open(target, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)

    def load_mlx_lm(self, path):
        cache = self.mlx_cache.load_prompt_cache(str(path))
        self.mx.eval([c.state for c in cache])  # lazy until evaluated
        return cache


def best_of(fn, repeats: int) -> tuple[float, float, int]:
    """The fastest wall time of `repeats` calls of fn (collected before each), the smallest process CPU time, and
    the page faults (minor and major) of the process during the fastest call."""
    wall, cpu, faults = [], [], []
    for _ in range(repeats):
        gc.collect()
        start_faults = page_faults()
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
        faults.append(page_faults() - start_faults)
    return min(wall), min(cpu), faults[wall.index(min(wall))]


def alternated(calls: dict, repeats: int) -> dict:
    """best_of of each of `calls`, called in turn round after round, each round starting one call further on than
    the last (with three calls or more, none follows itself; they open the rounds in turn), after a round not timed;
    before each call, outside its time, os.sync(), so that none meets the writeback of files saved before it
    (a call after a durable save would otherwise start with no dirty pages, one after a save without fsync with
    all of that save's)."""
    names = list(calls)
    runs = {name: [] for name in names}
    for r in range(repeats + 1):
        for name in names[r % len(names):] + names[: r % len(names)]:
            os.sync()
            got = best_of(calls[name], 1)
            if r:
                runs[name].append(got)
    return {name: (min(w for w, _, _ in got), min(c for _, c, _ in got), min(got)[2]) for name, got in runs.items()}


def page_faults() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def same_kv(a: list, b: list, tokens: int) -> bool:
    def valid(x):
        return bytes(memoryview(x[..., :tokens, :]))  # memoryview of a slice copies it contiguous

    return all(valid(x.keys) == valid(y.keys) and valid(x.values) == valid(y.values) for x, y in zip(a, b))


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_rise(tokens: int, op: str) -> dict:
    """Run `op` once on a fresh session in this process: the peak RSS it adds, in bytes."""
    session = Session(tokens)
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        path = Path(tmp) / "cache.thaw"
        ready = {"restore": session.capture, "engine_restore": session.capture,
                 "load": lambda: session.save(path)}.get(op, lambda: None)()
        if op == "engine_restore":  # the engine holds a cache of the same shape first: the steady state
            session.engine_restore(ready)
        run = {"capture": session.capture, "restore": lambda: session.restore(ready),
               "engine_restore": lambda: session.engine_restore(ready),
               "save": lambda: session.save(path), "load": lambda: session.load(path)}[op]
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = status_kib("VmRSS")
        kept = run()
        rise = (status_kib("VmHWM") - before) * 1024
        del kept
    return {"op": op, "rise_bytes": rise, "kv_bytes": session.kv_bytes}


def alike_loads(tokens: int, repeats: int) -> dict:
    """thaw_mlx.load and mlx-lm's load, alternating, best of `repeats` each (this process's allocator as set)."""
    session = Session(tokens)
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        ours, theirs = Path(tmp) / "one.thaw", Path(tmp) / "cache.safetensors"
        session.save(ours)
        session.save_mlx_lm(theirs, fsync=False)
        runs = [(best_of(lambda: session.load(ours), 1), best_of(lambda: session.load_mlx_lm(theirs), 1))
                for _ in range(repeats)]
    return {name: min((run[i] for run in runs), key=lambda r: r[0]) for i, name in enumerate(("thaw", "mlx_lm"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss", choices=RSS_OPS, help="measure one operation's peak RSS (a child run)")
    parser.add_argument("--loads", choices=MALLOC_MODES, help="time the two loads alike (a child run)")
    args = parser.parse_args()
    SCRATCH.mkdir(exist_ok=True)
    if args.rss:
        print(json.dumps(rss_rise(args.tokens, args.rss)))
        return
    if args.loads:
        print(json.dumps(alike_loads(args.tokens, args.repeats)))
        return

    import thaw_format

    s = Session(args.tokens)
    mx, n = s.mx, args.tokens
    snapshot = s.capture()
    assert same_kv(s.cache, s.restore(snapshot), n)  # the round trip is exact
    assert same_kv(s.cache, s.engine_restore(snapshot), n) and same_kv(s.cache, s.engine_restore(snapshot), n)
    src, dst = np.ones(s.kv_bytes, np.uint8), np.zeros(s.kv_bytes, np.uint8)
    timed = {"memcpy": best_of(lambda: np.copyto(dst, src), args.repeats)}
    del src, dst
    timed["capture"] = best_of(s.capture, args.repeats)
    timed["restore"] = best_of(lambda: s.restore(snapshot), args.repeats)
    default_limit = mx.set_cache_limit(2 * s.kv_bytes)  # freed arrays kept for the next restore
    timed["restore_cache_kept"] = best_of(lambda: s.restore(snapshot), args.repeats)
    mx.set_cache_limit(default_limit)
    mx.clear_cache()
    timed["engine_restore"] = best_of(lambda: s.engine_restore(snapshot), args.repeats)

    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        one, generic, theirs = Path(tmp) / "one.thaw", Path(tmp) / "generic.thaw", Path(tmp) / "cache.safetensors"
        for suffix, durable in (("", True), ("_not_durable", False)):
            timed.update(alternated({
                "save_one_pass" + suffix: lambda durable=durable: s.save(one, durable),
                "save_generic" + suffix:
                    lambda durable=durable: thaw_format.save(s.capture(), generic, durable=durable),
                "save_mlx_lm" + ("_fsync" if durable else ""): lambda durable=durable: s.save_mlx_lm(theirs, durable),
            }, args.repeats))
        assert same_kv(s.cache, s.load(one), n) and same_kv(s.cache, s.load_mlx_lm(theirs), n)
        timed["load_one_pass"] = best_of(lambda: s.load(one), args.repeats)
        timed["load_generic"] = best_of(lambda: s.restore(thaw_format.load(generic)), args.repeats)
        timed["load_mlx_lm"] = best_of(lambda: s.load_mlx_lm(theirs), args.repeats)

    t, cpu, faults = ({key: triple[i] for key, triple in timed.items()} for i in (0, 1, 2))
    rss = {}
    for op in RSS_OPS:
        out = subprocess.run([sys.executable, __file__, "--tokens", str(n), "--rss", op], check=True,
                             capture_output=True, text=True).stdout
        rss[op] = json.loads(out.splitlines()[-1])["rise_bytes"] / s.kv_bytes
    for mode, env in MALLOC_MODES.items():
        out = subprocess.run([sys.executable, __file__, "--tokens", str(n), "--repeats", str(args.repeats),
                              "--loads", mode], check=True, capture_output=True, text=True,
                             env={**os.environ, **env}).stdout
        for side, (wall, process_cpu, flt) in json.loads(out.splitlines()[-1]).items():
            key = f"load_{side}_{mode}"
            t[key], cpu[key], faults[key] = wall, process_cpu, flt

    gb = s.kv_bytes / 1e9
    ratios = {"capture_vs_memcpy": t["memcpy"] / t["capture"], "restore_vs_memcpy": t["memcpy"] / t["restore"],
              "restore_cache_kept_vs_memcpy": t["memcpy"] / t["restore_cache_kept"],
              "engine_restore_vs_memcpy": t["memcpy"] / t["engine_restore"],
              "save_one_pass_vs_mlx_lm_fsync": t["save_mlx_lm_fsync"] / t["save_one_pass"],
              "save_one_pass_not_durable_vs_mlx_lm": t["save_mlx_lm"] / t["save_one_pass_not_durable"],
              "save_generic_vs_mlx_lm_fsync": t["save_mlx_lm_fsync"] / t["save_generic"],
              "save_generic_not_durable_vs_mlx_lm": t["save_mlx_lm"] / t["save_generic_not_durable"],
              "load_one_pass_vs_mlx_lm": t["load_mlx_lm"] / t["load_one_pass"],
              "load_generic_vs_mlx_lm": t["load_mlx_lm"] / t["load_generic"],
              **{f"load_one_pass_vs_mlx_lm_{mode}": t[f"load_mlx_lm_{mode}"] / t[f"load_thaw_{mode}"]
                 for mode in MALLOC_MODES}}
    data = {"tokens": n, "kv_bytes": s.kv_bytes, "repeats": args.repeats, "seconds": t, "cpu_seconds": cpu,
            "page_faults": faults, "ratios": ratios, "peak_rss_rise_vs_kv": rss}

    def row(label, key, ratio=""):
        return [label, f"{t[key]:.4f}", f"{cpu[key]:.4f}", f"{gb / t[key]:.2f}", str(faults[key]), ratio]

    def vs(key, base):
        return f"{t[base] / t[key]:.2f}x"

    table = [["operation", "seconds", "CPU seconds", "GB/s", "page faults", "ratio (>1: thaw faster)"],
             row("memcpy of the KV bytes (numpy, one thread)", "memcpy"),
             row("thaw_mlx.capture (KV only)", "capture", f"{ratios['capture_vs_memcpy']:.2f} of memcpy"),
             row("thaw_mlx.restore, functional: new arrays (+ mx.eval)", "restore",
                 f"{ratios['restore_vs_memcpy']:.2f} of memcpy"),
             row("thaw_mlx.restore, MLX's buffer cache raised to keep a restore", "restore_cache_kept",
                 f"{ratios['restore_cache_kept_vs_memcpy']:.2f} of memcpy"),
             row("MLXEngine.restore over a cache of the same shape", "engine_restore",
                 f"{ratios['engine_restore_vs_memcpy']:.2f} of memcpy"),
             row("thaw_mlx.save (one pass, durable: fsync)", "save_one_pass",
                 f"{vs('save_one_pass', 'save_mlx_lm_fsync')} of mlx-lm + fsync"),
             row("capture + thaw_format.save (durable: fsync)", "save_generic",
                 f"{vs('save_generic', 'save_mlx_lm_fsync')} of mlx-lm + fsync"),
             row("mlx_lm save_prompt_cache + fsync of file and directory", "save_mlx_lm_fsync"),
             row("thaw_mlx.save (one pass, durable=False: no fsync)", "save_one_pass_not_durable",
                 f"{vs('save_one_pass_not_durable', 'save_mlx_lm')} of mlx-lm as shipped"),
             row("capture + thaw_format.save (durable=False)", "save_generic_not_durable",
                 f"{vs('save_generic_not_durable', 'save_mlx_lm')} of mlx-lm as shipped"),
             row("mlx_lm save_prompt_cache (as shipped: no fsync)", "save_mlx_lm"),
             row("thaw_mlx.load (one pass, verified) + mx.eval", "load_one_pass", vs("load_one_pass", "load_mlx_lm")),
             row("thaw_format.load (verified) + restore", "load_generic", vs("load_generic", "load_mlx_lm")),
             row("mlx_lm load_prompt_cache + mx.eval (lazy otherwise)", "load_mlx_lm"),
             *(line for mode in MALLOC_MODES for line in (
                 row(f"thaw_mlx.load, allocator alike ({mode} memory)", f"load_thaw_{mode}",
                     vs(f"load_thaw_{mode}", f"load_mlx_lm_{mode}")),
                 row(f"mlx_lm load, allocator alike ({mode} memory)", f"load_mlx_lm_{mode}"))),
             ["peak RSS rise / KV bytes (fresh process each)",
              ", ".join(f"{op} {rss[op]:.2f}" for op in RSS_OPS), "", "", "", "target <= 1.25"]]
    notes = [f"mlx {mx.__version__} (CPU), mlx-lm prompt cache of {n} tokens, 8 layers x 8 KV heads x 128, float32 "
             f"({s.kv_bytes / 2**20:.0f} MiB of KV), KV only, identity computed once. thaw's saves are atomic "
             "(temporary file, rename) and write a CRC32C per 1 MiB chunk; its loads check each. Saves are "
             "compared like with like: thaw durable (the default: fsync of file and directory) against mlx-lm "
             "followed by the same fsyncs, thaw durable=False (no fsync: still atomic, a power loss may lose "
             "the file) against mlx-lm as shipped (no fsync, not atomic). Targets: capture and restore "
             ">= 0.5 of memcpy; save and load >= 1.0x mlx-lm's; peak RSS <= 1.25x the KV bytes. The machine is "
             "shared by several sessions: see the load average.",
             "Which restore is like for like with vLLM's and SGLang's: MLXEngine.restore. An engine's restore "
             "replaces its state, and vLLM and SGLang write the KV into their engine's KV pool, memory the process "
             "has already touched; MLXEngine.restore does the same, writing over the arrays of the cache it "
             "replaces (the steady state: an engine that held a cache of this shape, as a fork pool worker does "
             "round after round). thaw_mlx.restore, the functional API, returns a new cache beside the caller's: "
             "its arrays are new memory. On CPU, MLX takes memory from malloc and keeps freed buffers for reuse "
             f"only up to its cache limit ({default_limit / 2**20:.0f} MiB by default), and the memory glibc "
             "gives arrays this large is new to the process each time: the kernel zeroes each page "
             "at its first write (the page-fault column counts these faults), which costs about as long as the "
             "copy itself. memcpy copies into memory already touched, like the engine's restore. A program that "
             "restores with the functional API round after round can keep that memory instead: with "
             "mx.set_cache_limit raised above one cache's bytes (a process-wide MLX setting, the program's "
             "choice; thaw leaves it as it is), each restore gets the arrays of the one it replaced (the row "
             "'buffer cache raised'). New arrays are now faulted in before the scatter (thaw_format.mlx.writable_arrays: "
             "libthaw's prefault, madvise(MADV_POPULATE_WRITE) per 2 MiB piece whose first page is not resident, "
             "on the thread pool): the same faults (the page-fault column still counts them) and the same zeroing, "
             "but taken inside one system call per piece instead of one trap per page from the scatter's stores; "
             "memory the allocator hands out again is left alone (a check of one page per 2 MiB). Huge pages "
             "(MADV_HUGEPAGE on the new arrays, THP enabled=madvise here) were measured and not kept: 1.8x of "
             "mlx-lm with new memory when loads follow each other, but after 4 s idle each load took 0.5-1.05 s "
             "against 0.16-0.20 s without (no compaction stall counted in /proc/vmstat: this VM reports free "
             "2 MiB blocks to its host through virtio-balloon free page reporting, so a new huge page most likely "
             "costs the host's faults), and the first load into a new heap 0.67-0.74 s."]
    write_results("kv_move_mlx", "MLX: KV capture and restore against memcpy and mlx-lm's prompt-cache files",
                  command_line(), data, table, notes)


if __name__ == "__main__":
    main()
