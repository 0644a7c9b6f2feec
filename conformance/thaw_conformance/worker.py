"""The per-engine worker: runs inside the engine's own virtualenv and writes its check results as JSON.

    python -m thaw_conformance.worker --driver vllm --arch llama,qwen2 --workdir DIR --out results.json

For each architecture a process of the same Python runs the parent phase (`--phase parent`), then a fresh
one restores what the parent captured and compares (`--phase child`); this process starts no engine, so
every engine gets a clean process. thaw-conformance launches this.
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

from .checked import ContractViolation
from .cross import cross_phase
from .drivers import DriverNotFound, load_driver
from .results import CheckResult, Recorder
from .runner import child_phase, parent_phase
from .sdk import Unsupported, Workload

PHASE_TIMEOUT_S = 900


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m thaw_conformance.worker")
    parser.add_argument("--driver", required=True, help="built-in name or module:factory")
    parser.add_argument("--arch", default="all", help="comma-separated architectures, or all")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--phase", choices=("all", "parent", "child", "cross", "list"), default="all",
                        help="cross: restore the snapshot another engine captured in --workdir; list: write the "
                             "driver's architectures, start nothing")
    parser.add_argument("--fork-arch", default="all", help="architectures to run the fork check on, or all")
    args = parser.parse_args(argv)
    try:
        driver = load_driver(args.driver)
    except ImportError as exc:  # the engine or its adapter is not installed in this environment
        recorder = Recorder(args.driver, "-")
        recorder.missing("skipped", f"the {args.driver} driver cannot be imported here: {exc}")
        _write(args.out, {"engine": args.driver, "versions": {}, "unavailable": str(exc), "python": platform.python_version(),
                          "executable": sys.executable, "results": [r.to_json() for r in recorder.results], "timings": {},
                          "not_found": isinstance(exc, DriverNotFound)})
        return 0
    if args.phase == "list":
        _write(args.out, {"architectures": list(driver.architectures())})
        return 0
    workload = Workload(fork_archs=None if args.fork_arch == "all" else tuple(args.fork_arch.split(",")))
    if args.phase == "cross":
        recorder = Recorder(driver.name, args.arch)
        cross_phase(driver, args.arch, args.workdir, workload, recorder)
        _write(args.out, {"results": [r.to_json() for r in recorder.results]})
        return 0
    if args.phase == "parent":
        try:
            parent_phase(driver, args.arch, args.workdir, workload)
        except Unsupported as exc:  # the driver cannot serve this architecture at all: every check says why
            _write(args.out, {"unsupported": str(exc)})
        except ContractViolation as exc:  # the parent's engine broke a rule: every check fails, naming it
            _write(args.out, {"violation": str(exc)})
        return 0
    if args.phase == "child":
        recorder = Recorder(driver.name, args.arch)
        timings = child_phase(driver, args.arch, args.workdir, workload, recorder)
        _write(args.out, {"results": [r.to_json() for r in recorder.results], "timings": timings})
        return 0
    known = driver.architectures()
    archs = known if args.arch == "all" else args.arch.split(",")
    report = {"engine": driver.name, "versions": driver.versions(), "python": platform.python_version(),
              "executable": sys.executable, "zoo_checkpoints": bool(getattr(driver, "zoo_checkpoints", False)),
              "results": [], "timings": {}, "done": []}
    for arch in archs:  # the report is rewritten after each architecture: a timeout keeps what was done
        recorder = Recorder(driver.name, arch)
        if arch not in known:
            recorder.missing("skipped", f"the {driver.name} driver has no {arch} model (it has: {', '.join(known)})")
        else:
            report["timings"][arch] = _run_arch(args.driver, arch, args.workdir / driver.name / arch, args.fork_arch,
                                                 recorder)
        report["results"] += [r.to_json() for r in recorder.results]
        report["done"].append(arch)
        _write(args.out, report)
    return 0


def _run_arch(spec: str, arch: str, workdir: Path, fork_arch: str, recorder: Recorder) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    timings = {}
    for phase in ("parent", "child"):
        out = workdir / f"{phase}.json"
        started = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-m", "thaw_conformance.worker", "--phase", phase, "--driver", spec,
                                   "--arch", arch, "--workdir", str(workdir), "--out", str(out),
                                   "--fork-arch", fork_arch],
                                  capture_output=True, text=True, timeout=PHASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            recorder.missing("error", f"the {phase} phase timed out after {PHASE_TIMEOUT_S} s")
            return timings
        (workdir / f"{phase}.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not out.exists():
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            recorder.missing("error", f"the {phase} phase exited {done.returncode}: {tail}")
            return timings
        result = json.loads(out.read_text())
        if "unsupported" in result:
            recorder.missing("unsupported", f"not supported by the adapter: {result['unsupported']}")
            return timings
        if "violation" in result:
            recorder.missing("failed", f"the parent phase: {result['violation']}")
            return timings
        timings[phase] = dict(result["timings"], process_s=time.perf_counter() - started)
    recorder.results.extend(CheckResult(**r) for r in result["results"])
    return timings


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    sys.exit(main())
