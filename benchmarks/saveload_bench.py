"""Save and load, page cache hot: thaw_format (checksums on; loads verified) against safetensors and
torch.save/torch.load (no checksums), and a plain memory copy of the same bytes as the limit.

Timing runs every competitor side by side in one process on the same tensors, in interleaved rounds (one
file at a time, to keep memory modest). Peak RSS is measured in a fresh subprocess per competitor and
operation (`python saveload_bench.py rss ...`), since a process's peak cannot be reset.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = ("large", "gib", "small")


def make_tensors(case: str, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """large: 2 GB (times scale) in 300 tensors of mixed sizes and dtypes; gib: 1 GiB in 256 tensors of 4 MiB
    (fp32, bf16, fp16 in turn; issue 18's case); small: 20,000 tensors of 1-16 KiB."""
    gen = torch.Generator().manual_seed(0)
    if case == "gib":
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
        specs = [(f"layer.{i}.weight", dtypes[i % 3], (4 << 20) // dtypes[i % 3].itemsize) for i in range(256)]
    elif case == "large":
        weights = torch.rand(300, generator=gen) + 0.05
        sizes = (weights / weights.sum() * 2e9 * scale).long().tolist()
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
        specs = [(f"layer.{i}.weight", dtypes[i % 3], max(1, s // dtypes[i % 3].itemsize)) for i, s in enumerate(sizes)]
    else:
        counts = torch.randint(256, 4096, (20_000,), generator=gen).tolist()
        specs = [(f"block.{i}.param", torch.float32, c) for i, c in enumerate(counts)]
    out = {}
    for name, dtype, count in specs:
        t = torch.empty(count, dtype=dtype)
        t.uniform_(-1, 1, generator=gen)  # in place: no temporary, so RSS stays at the data size
        out[name] = t
    return out


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_thaw(tensors, path):
    import thaw_format

    thaw_format.save_file(tensors, path)


def load_thaw(path):
    import thaw_format

    return thaw_format.load_file(path)


def load_thaw_copy(path):
    import thaw_format

    return thaw_format.load_file(path, mmap=False)


def load_thaw_mmap(path):
    import thaw_format
    from thaw_format.torch import to_torch

    snapshot = thaw_format.load(path, mmap=True)
    return {name: to_torch(t) for name, t in snapshot.weights.tensors.items()}


def save_safetensors(tensors, path):
    from safetensors.torch import save_file

    save_file(tensors, path)


def load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def load_safetensors_touched(path):
    """safetensors maps the file and reads nothing until used; this touches one byte of every page, the
    least any use of the tensors costs."""
    tensors = load_safetensors(path)
    for t in tensors.values():
        if t.numel():
            t.reshape(-1).view(torch.uint8)[::4096].sum()
    return tensors


def load_safetensors_checked(path):
    """safetensors plus the check thaw_format makes: CRC32C of every tensor's bytes (libthaw, parallel), so
    both sides read every byte once. safetensors has no checksums to compare with; this only costs the read."""
    from thaw_format import mover

    tensors = load_safetensors(path)
    for t in tensors.values():
        if t.numel():
            mover.crc32c(t.reshape(-1).view(torch.uint8).numpy())
    return tensors


def save_torch(tensors, path):
    torch.save(tensors, path)


def load_torch(path):
    return torch.load(path, weights_only=True)


SAVERS = {"thaw_format": save_thaw, "safetensors": save_safetensors, "torch": save_torch}
# loader name: (the saver whose file it reads, function)
LOADERS = {
    "thaw_format load_file (mapped, verified)": ("thaw_format", load_thaw),
    "thaw_format load mmap=True (verified)": ("thaw_format", load_thaw_mmap),
    "thaw_format load_file mmap=False (copy, verified)": ("thaw_format", load_thaw_copy),
    "safetensors load_file (lazy mmap, unverified)": ("safetensors", load_safetensors),
    "safetensors load_file + touch every page": ("safetensors", load_safetensors_touched),
    "safetensors load_file + CRC32C of every tensor": ("safetensors", load_safetensors_checked),
    "torch.load (copy, unverified)": ("torch", load_torch),
}


def memory_copy(tensors, copies):
    for name, t in tensors.items():
        copies[name].copy_(t)


def raw_write_seconds(tensors, path: Path, fifo: bool = False) -> float:
    """The tensors' bytes written to a new file one after another, no format and no checksums: the floor of
    any save to that filesystem."""
    views = [t.reshape(-1).view(torch.uint8).numpy() for t in tensors.values()]

    def write():
        with open(path, "wb", buffering=0) as f:
            for view in views:
                f.write(view)

    seconds, _ = timed(write, fifo=fifo)
    path.unlink()
    return seconds


# Before each timed call: torch's OpenMP workers spin for milliseconds after a parallel op (the round-trip
# check of the previous loader), and on a 2-CPU machine a spinning worker takes a CPU from whichever competitor
# is timed next; measured here: the next mapped check took 10-15 ms of CPU more.
SETTLE_SECONDS = 0.05


@contextlib.contextmanager
def realtime(enabled: bool):
    """With `enabled`, every thread of this process runs at SCHED_FIFO for the block, so that other processes'
    CPU use on a shared machine lands in no timing (Linux; root or CAP_SYS_NICE). Each thread's policy is put
    back after. Timed blocks last milliseconds to seconds, which other processes then wait for."""
    if not enabled:
        yield
        return
    threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    before = {tid: (os.sched_getscheduler(tid), os.sched_getparam(tid)) for tid in threads}
    try:
        for tid in threads:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(1))
        yield
    finally:  # threads started inside the block (a thread pool's first use) inherited SCHED_FIFO: back to normal
        for tid in map(int, os.listdir("/proc/self/task")):
            policy, param = before.get(tid, (os.SCHED_OTHER, os.sched_param(0)))
            with contextlib.suppress(ProcessLookupError):
                os.sched_setscheduler(tid, policy, param)


def timed(fn, *args, fifo: bool = False):
    """(seconds, result) of fn(*args), after SETTLE_SECONDS of rest."""
    time.sleep(SETTLE_SECONDS)
    with realtime(fifo):
        start = time.perf_counter()
        result = fn(*args)
        seconds = time.perf_counter() - start
    return seconds, result


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def time_case(case: str, scale: float, directory: Path, rounds: int, fifo: bool = False) -> dict:
    """Best seconds of each saver and loader over `rounds` interleaved rounds, plus the memory copy. `fifo`:
    timed calls run at SCHED_FIFO (see `realtime`)."""
    tensors = make_tensors(case, scale)
    copies = {name: torch.ones_like(t) for name, t in tensors.items()}  # preallocated and faulted in
    copy_s = min(timed(memory_copy, tensors, copies, fifo=fifo)[0] for _ in range(rounds))
    del copies  # before any file exists, to keep the peak at three times the data
    save_s = {name: float("inf") for name in SAVERS}
    load_s = {name: float("inf") for name in LOADERS}
    raw_write_s = float("inf")
    for _ in range(rounds):
        raw_write_s = min(raw_write_s, raw_write_seconds(tensors, directory / f"raw-{case}", fifo))
        for saver, save in SAVERS.items():  # one file at a time keeps memory modest
            path = directory / f"bench-{case}"
            save_s[saver] = min(save_s[saver], timed(save, tensors, path, fifo=fifo)[0])
            for name, (source, load) in LOADERS.items():
                if source != saver:
                    continue
                seconds, loaded = timed(load, path, fifo=fifo)
                load_s[name] = min(load_s[name], seconds)
                assert same(loaded, tensors), f"{name} did not round-trip"
                del loaded
            path.unlink()
    return {"bytes": nbytes(tensors), "tensors": len(tensors), "save": save_s, "load": load_s, "memory_copy": copy_s,
            "raw_write": raw_write_s}


def rss_child(case: str, scale: float, op: str, name: str, path: str) -> None:
    """Run one save or load in this fresh process and print its peak RSS (bytes) as JSON, with the RSS it had
    before (interpreter, torch, thaw_format and safetensors imported)."""
    import safetensors.torch  # noqa: F401  (imported up front so every competitor's baseline is the same)
    import thaw_format  # noqa: F401

    baseline = peak_rss()
    if op == "save":
        tensors = make_tensors(case, scale)
        SAVERS[name](tensors, path)
    else:
        tensors = LOADERS[name][1](path)
    print(json.dumps({"peak": peak_rss(), "baseline": baseline, "data": nbytes(tensors)}))


def peak_rss() -> int:
    """This process's peak resident set in bytes. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork
    and exec, so a child would report its parent's size."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "rss", *args], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_rss(case: str, scale: float, directory: Path) -> dict:
    """Peak RSS of each saver and loader, each in its own fresh process: {"save": {...}, "load": {...}}."""
    out = {"save": {}, "load": {}}
    for saver in SAVERS:
        path = str(directory / f"rss-{case}")
        out["save"][saver] = _child([case, str(scale), "save", saver, path])
        for name, (source, _) in LOADERS.items():
            if source == saver:
                out["load"][name] = _child([case, str(scale), "load", name, path])
        os.unlink(path)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["rss"])
    parser.add_argument("case", choices=CASES)
    parser.add_argument("scale", type=float)
    parser.add_argument("op", choices=["save", "load"])
    parser.add_argument("name", choices=list(SAVERS) + list(LOADERS))
    parser.add_argument("path")
    a = parser.parse_args()
    rss_child(a.case, a.scale, a.op, a.name, a.path)
