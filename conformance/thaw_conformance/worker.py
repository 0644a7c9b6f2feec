"""The per-engine worker: runs inside the engine's own virtualenv and writes its check results as JSON.

    python -m thaw_conformance.worker --driver vllm --arch llama,qwen2 --workdir DIR --out results.json

For each architecture the parent phase runs here, then a fresh process of the same Python
(`--phase child`) restores what the parent captured and compares. thaw-conformance launches this.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .drivers import load_driver
from .results import CheckResult, Recorder
from .runner import child_phase, parent_phase
from .sdk import Workload

CHILD_TIMEOUT_S = 900


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thaw_conformance.worker")
    parser.add_argument("--driver", required=True, help="built-in name or module:factory")
    parser.add_argument("--arch", default="all", help="comma-separated architectures, or all")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--phase", choices=("all", "child"), default="all")
    args = parser.parse_args(argv)
    driver = load_driver(args.driver)
    workload = Workload()
    if args.phase == "child":
        recorder = Recorder(driver.name, args.arch)
        timings = child_phase(driver, args.arch, args.workdir, workload, recorder)
        _write(args.out, {"results": [r.to_json() for r in recorder.results], "timings": timings})
        return 0
    known = driver.architectures()
    archs = known if args.arch == "all" else args.arch.split(",")
    results, timings = [], {}
    for arch in archs:
        recorder = Recorder(driver.name, arch)
        if arch not in known:
            recorder.missing("skipped", f"the {driver.name} driver has no {arch} model (it has: {', '.join(known)})")
        else:
            timings[arch] = _run_arch(args.driver, driver, arch, args.workdir / driver.name / arch, workload, recorder)
        results += [r.to_json() for r in recorder.results]
    _write(args.out, {"engine": driver.name, "versions": driver.versions(), "python": platform.python_version(),
                      "executable": sys.executable, "results": results, "timings": timings})
    return 0


def _run_arch(spec: str, driver, arch: str, workdir: Path, workload: Workload, recorder: Recorder) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        parent = parent_phase(driver, arch, workdir, workload)
    except Exception as exc:
        recorder.missing("error", f"the parent phase failed: {type(exc).__name__}: {exc}")
        return {}
    out = workdir / "child.json"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "thaw_conformance.worker", "--phase", "child", "--driver", spec,
                           "--arch", arch, "--workdir", str(workdir), "--out", str(out)],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0 or not out.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        recorder.missing("error", f"the fresh-process child exited {done.returncode}: {' | '.join(tail)}")
        return {"parent": parent["timings"]}
    child = json.loads(out.read_text())
    recorder.results.extend(CheckResult(**r) for r in child["results"])
    child["timings"]["process_s"] = time.perf_counter() - started
    return {"parent": parent["timings"], "child": child["timings"]}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    sys.exit(main())
