"""Run the libthaw benchmarks and write benchmarks/results/*.json and *.md.

    python benchmarks/run.py                   # everything: CRC32C, 20,000 small tensors, the 2 GB case
    python benchmarks/run.py crc32c small      # a subset
    python benchmarks/run.py small gib --dir /var/tmp  # issue 18's load rows, on a local disk
    python benchmarks/run.py large --scale 0.1 # a 200 MB stand-in for the 2 GB case
    python benchmarks/run.py gib --dir /var/tmp --realtime  # timed calls at SCHED_FIFO, on a busy machine

Save/load files go to --dir (default /dev/shm, so neither side is disk-bound and the fsync of thaw_format's
atomic save costs nothing there; pass a disk directory to include the disk).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import crc32c_bench  # noqa: E402
import saveload_bench  # noqa: E402
from common import command_line, write_results  # noqa: E402


def report_crc32c(rounds: int) -> None:
    results = crc32c_bench.run(rounds)
    names = list(next(iter(results.values())))
    ours = [n for n in names if n.startswith("libthaw")]
    theirs = [n for n in names if not n.startswith("libthaw")]
    table = [["size"] + [f"{n} GB/s" for n in names] + [f"{n} / best package" for n in ours]]
    for size, row in results.items():
        best_package = max(row[n] for n in theirs)
        table.append([size] + [f"{row[n]:.1f}" for n in names] + [f"{row[n] / best_package:.2f}x" for n in ours])
    notes = ["Best of interleaved rounds; each figure is bytes checksummed per second of wall time, one call at a time "
             "(the thread-pool column splits a call across the pool from 4 MiB up)."]
    write_results("crc32c", "CRC32C throughput", command_line(), {"gb_per_s": results}, table, notes)


def report_saveload(case: str, scale: float, directory: Path, rounds: int, rss: bool, fifo: bool) -> None:
    timing = saveload_bench.time_case(case, scale, directory, rounds, fifo)
    size = timing["bytes"]
    memory = saveload_bench.measure_rss(case, scale, directory) if rss else {"save": {}, "load": {}}
    save_ref, load_ref, copy = timing["save"]["safetensors"], timing["load"][REFERENCE_LOAD], timing["memory_copy"]
    touched = timing["load"][TOUCHED_LOAD]
    table = [["operation", "GB/s", "vs safetensors", "vs safetensors + touch", "vs memory copy", "peak RSS / data",
              "(peak RSS - imports) / data"]]
    for op, seconds, ref in (("save", timing["save"], save_ref), ("load", timing["load"], load_ref)):
        for name, s in seconds.items():
            peak = memory[op].get(name)
            table.append([f"{op}: {name}", f"{size / s / 1e9:.2f}", f"{ref / s:.2f}x",
                          f"{touched / s:.2f}x" if op == "load" else "", f"{copy / s:.2f}x",
                          f"{peak['peak'] / size:.2f}" if peak else "-",
                          f"{(peak['peak'] - peak['baseline']) / size:.2f}" if peak else "-"])
    table.append(["memory copy (same bytes, preallocated)", f"{size / copy / 1e9:.2f}", "", "", "1.00x", "-", "-"])
    raw_write = timing["raw_write"]
    table.append(["write of the same bytes to a new file (no format, no checksums)", f"{size / raw_write / 1e9:.2f}",
                  "", "", f"{copy / raw_write:.2f}x", "-", "-"])
    where = "page cache hot; fsync is free there" if str(directory).startswith("/dev/shm") else \
        "a local disk, page cache hot: each load reads a file just written"
    notes = [f"Files in {directory} ({where}). Best of {rounds} interleaved rounds; ratios above 1 mean faster. "
             f"Loads are compared with `{REFERENCE_LOAD}` and with `{TOUCHED_LOAD}`. Each timed call starts after "
             f"{saveload_bench.SETTLE_SECONDS * 1e3:.0f} ms of rest, so torch's OpenMP workers, which spin for "
             "milliseconds after the previous loader's round-trip check, take no CPU from it."
             + (" Timed calls ran with every thread of the benchmark at SCHED_FIFO (--realtime): other processes on "
                "this shared machine took no CPU from a timed call (they still ran on a CPU it left idle, and shared "
                "the memory bandwidth)." if fifo else ""),
             "thaw_format computes CRC32C of every 1 MiB chunk while saving and checks every chunk (and the "
             "padding) before a loaded tensor sees it; safetensors and torch check nothing. safetensors load_file "
             "maps the file and reads no byte until used, so it is also shown touching every page once, and "
             "reading every byte once through the same CRC32C as thaw's check (libthaw's, parallel).",
             "thaw_format's load_file and load(mmap=True) map the file copy-on-write and check it in one parallel C "
             "pass over the mapping; load_file(mmap=False) reads into memory of its own. How fast a mapping faults "
             "in depends on the folios the page cache holds, set by how each format's save wrote the file: "
             "thaw_format writes in pieces that end on 2 MiB offsets for that reason.",
             "The last two rows are limits: a copy into tensors allocated and touched beforehand, and a plain write "
             "of the same bytes to a new file in the same directory (the floor for a save to that filesystem).",
             "Peak RSS: VmHWM of a fresh process doing only that save or load, over the data size; the last column "
             "leaves out what the process held after its imports (interpreter, torch, about 0.3 GB)."
             if rss else "Peak RSS not measured (--no-rss)."]
    name = f"saveload-{case}" + ("" if scale == 1.0 else f"-x{scale:g}")
    label = f"{timing['tensors']} tensors, {size / 1e9:.2f} GB"
    write_results(name, f"Save and load: {label}", command_line(),
                  {"case": case, "scale": scale, **timing, "rss": memory}, table, notes)


REFERENCE_LOAD = "safetensors load_file (lazy mmap, unverified)"
TOUCHED_LOAD = "safetensors load_file + touch every page"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", choices=["crc32c", "small", "gib", "large"],
                        default=["crc32c", "small", "gib", "large"])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the 2 GB of the large case")
    parser.add_argument("--dir", default="/dev/shm", help="where the save/load files go")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--realtime", action="store_true",
                        help="run timed save/load calls at SCHED_FIFO (Linux, root or CAP_SYS_NICE): on a busy shared "
                             "machine, other processes then run outside the timings")
    args = parser.parse_args()
    if args.realtime:
        with saveload_bench.realtime(True):  # refused here, before any work, where the privilege is missing
            pass
    if "crc32c" in args.parts:
        report_crc32c(max(args.rounds, 5))
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="thaw-bench-") as directory:
        for case in ("small", "gib", "large"):
            if case in args.parts:
                report_saveload(case, args.scale if case == "large" else 1.0, Path(directory), args.rounds,
                                not args.no_rss, args.realtime)


if __name__ == "__main__":
    main()
