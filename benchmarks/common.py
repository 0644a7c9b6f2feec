"""What every benchmark shares: the machine description, best-of timing, and writing JSON + markdown."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    from thaw_format import backend

    return {
        "cpu": model,
        "cpus": len(os.sched_getaffinity(0)),
        "avx512f": " avx512f" in flags,
        "vpclmulqdq": " vpclmulqdq" in flags,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "thaw_backend": backend(),
        "load_average": [round(x, 1) for x in os.getloadavg()],  # the machine is shared: say how busy it was
    }


def best_seconds(fn, min_time: float = 0.1) -> tuple[float, int]:
    """Seconds per call of fn, from a batch of calls lasting at least min_time, and the batch size."""
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / calls, calls
        calls = max(calls * 2, int(calls * min_time / max(elapsed, 1e-9)) + 1)


def best_of(fn, repeats: int = 3) -> float:
    """The fastest of `repeats` calls of fn, in seconds (garbage collected before each)."""
    import gc

    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def write_results(name: str, title: str, command: str, data: dict, table: list[list[str]], notes: list[str]) -> None:
    """benchmarks/results/<name>.json and <name>.md (a markdown table naming the command and machine)."""
    RESULTS.mkdir(exist_ok=True)
    info = machine()
    payload = {"command": command, "machine": info, **data}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# {title}", "", f"Command: `{command}`  ", f"Machine: {info['cpu']}, {info['cpus']} CPUs, "
             f"{info['memory_gib']} GiB, Linux {info['kernel']}, Python {info['python']}  ",
             f"Backend: {info['thaw_backend']}  ",
             f"Load average when written (1/5/15 min, shared machine): {info['load_average']}", ""]
    lines.append("| " + " | ".join(table[0]) + " |")
    lines.append("|" + "|".join("---" for _ in table[0]) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    lines += [""] + notes
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
