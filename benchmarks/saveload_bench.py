"""Save and load, page cache hot: thaw_format (checksums on; loads verified) against safetensors and
torch.save/torch.load (no checksums), and a plain memory copy of the same bytes as the limit.

Timing runs every competitor side by side in one process on the same tensors, in interleaved rounds (one
file on disk at a time, to keep memory modest). Peak RSS is measured in a fresh subprocess per competitor
and operation (`python saveload_bench.py rss ...`), since a process's peak cannot be reset.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

CASES = ("large", "small")


def make_tensors(case: str, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """large: 2 GB (times scale) in 300 tensors of mixed sizes and dtypes; small: 20,000 tensors of 1-16 KiB."""
    gen = torch.Generator().manual_seed(0)
    if case == "large":
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


def save_safetensors(tensors, path):
    from safetensors.torch import save_file

    save_file(tensors, path)


def load_safetensors(path):
    from safetensors.torch import load_file

    return load_file(path)


def save_torch(tensors, path):
    torch.save(tensors, path)


def load_torch(path):
    return torch.load(path, weights_only=True)


COMPETITORS = {
    "thaw_format (checksummed, verified)": (save_thaw, load_thaw),
    "safetensors": (save_safetensors, load_safetensors),
    "torch.save / torch.load": (save_torch, load_torch),
}


def memory_copy(tensors, copies):
    for name, t in tensors.items():
        copies[name].copy_(t)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def time_case(case: str, scale: float, directory: Path, rounds: int) -> dict:
    """{competitor: {"save": s, "load": s}} best of `rounds`, plus the memory copy."""
    tensors = make_tensors(case, scale)
    copies = {name: torch.empty_like(t) for name, t in tensors.items()}
    best = {name: {"save": float("inf"), "load": float("inf")} for name in COMPETITORS}
    best["memory copy"] = {"save": float("inf"), "load": float("inf")}
    for _ in range(rounds):
        for name, (save, load) in COMPETITORS.items():
            path = directory / f"bench-{case}"
            best[name]["save"] = min(best[name]["save"], timed(save, tensors, path))
            start = time.perf_counter()
            loaded = load(path)
            best[name]["load"] = min(best[name]["load"], time.perf_counter() - start)
            assert same(loaded, tensors), f"{name} did not round-trip"
            del loaded
            path.unlink()
        t = timed(memory_copy, tensors, copies)
        best["memory copy"] = {"save": min(best["memory copy"]["save"], t), "load": min(best["memory copy"]["load"], t)}
    return {"bytes": nbytes(tensors), "tensors": len(tensors), "seconds": best}


def rss_child(case: str, scale: float, competitor: str, op: str, path: str) -> None:
    """Run one save or load in this fresh process and print its peak RSS as JSON."""
    save, load = COMPETITORS[competitor]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if op == "save":
        tensors = make_tensors(case, scale)
        data = nbytes(tensors)
        save(tensors, path)
    else:
        data = os.path.getsize(path)
        loaded = load(path)
        data = nbytes(loaded)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "imports": base, "data": data}))


def measure_rss(case: str, scale: float, directory: Path) -> dict:
    """{competitor: {"save": {...}, "load": {...}}}, each op in its own subprocess."""
    out = {}
    me = str(Path(__file__).resolve())
    for competitor, (save, _) in COMPETITORS.items():
        path = directory / f"rss-{case}"
        runs = {}
        for op in ("save", "load"):
            proc = subprocess.run([sys.executable, me, "rss", case, str(scale), competitor, op, str(path)],
                                  capture_output=True, text=True, check=True)
            runs[op] = json.loads(proc.stdout.strip().splitlines()[-1])
        path.unlink()
        out[competitor] = runs
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["rss"])
    parser.add_argument("case", choices=CASES)
    parser.add_argument("scale", type=float)
    parser.add_argument("competitor", choices=list(COMPETITORS))
    parser.add_argument("op", choices=["save", "load"])
    parser.add_argument("path")
    a = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    rss_child(a.case, a.scale, a.competitor, a.op, a.path)
