"""`thaw-conformance`: run the suite against engines, each in its own virtualenv, and write a receipt.

    thaw-conformance --engine vllm|sglang|mlx|template|all --arch all --out receipt.json

One worker process per engine runs with that engine's Python (default: in a checkout, the repository's venv for
it where scripts/setup-*.sh made one, else the current interpreter; `--python-for vllm=PATH` overrides), writes
per-check JSON, and this process merges everything, adds the format conformance of the golden vectors and the
cross-engine checks, and writes receipt.json + receipt.md.
Exit status: 0 when nothing failed or errored; 1 when something did; 2 for a usage error, found before any engine
starts: an engine, --driver module or factory, --python-for interpreter or architecture that does not exist.
An engine not installed here is no usage error: its checks are skipped, with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from . import cross, receipt
from .drivers import BUILTIN, VENVS
from .checkout import CHECKOUT, cache_dir
from .results import Recorder
from .vectors import check_vectors, default_dir

ALL_ENGINES = ("template", "mlx", "vllm", "sglang", "transformers")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.engine_arch = dict(_pair(parser, p, "--engine-arch") for p in args.engine_arch)
    args.engine_fork_arch = dict(_pair(parser, p, "--engine-fork-arch") for p in args.engine_fork_arch)
    pythons = dict(_pair(parser, p, "--python-for") for p in args.python_for)
    outside = dict(_pair(parser, d, "--driver") for d in args.driver)
    drivers = {**{e: e for e in BUILTIN}, **outside}
    engines = ALL_ENGINES + tuple(e for e in outside if e not in ALL_ENGINES) if args.engine == ["all"] \
        else tuple(args.engine)
    # A misspelt engine would otherwise run nothing, list every check skipped, and exit 0 like a pass.
    unknown = [e for e in engines if e not in drivers and ":" not in e]
    if "all" in unknown:
        parser.error("--engine: 'all' stands alone (it is every built-in engine and those given --driver)")
    if unknown:
        parser.error(f"--engine: no engine {', '.join(map(repr, unknown))}; the built-in ones are "
                     f"{', '.join(ALL_ENGINES)} (or all); an adapter from outside thaw is named with "
                     f"--driver {unknown[0]}=MODULE:FACTORY")
    if args.timeout <= 0:
        parser.error(f"--timeout: seconds per engine must be positive, got {args.timeout}")
    if args.workdir is not None and args.workdir.exists() and not args.workdir.is_dir():
        parser.error(f"--workdir: {str(args.workdir)!r} is a file, not a folder")
    if args.out.is_dir():  # found only when the receipt is written, after the whole run
        parser.error(f"--out: {str(args.out)!r} is a folder; name the receipt's file "
                     f"(e.g. {args.out / 'receipt.json'})")
    absent = [f"{e}={p}" for e, p in pythons.items() if not Path(p).exists()]
    if absent:  # it ran nothing, listed every check skipped and exited 0, like a pass
        parser.error(f"--python-for: no interpreter at {', '.join(map(repr, absent))}")
    env = _worker_env()
    _check_names(parser, args, engines, drivers, outside, pythons, env)
    workdir = args.workdir or cache_dir() / "conformance" / time.strftime("%Y%m%d-%H%M%S")
    engine_info, results, timings = {}, [], {}
    for engine in engines:
        python = _python(engine, pythons)
        info, engine_results, engine_timings = _run_engine(engine, drivers.get(engine, engine), python, args, workdir,
                                                           env)
        engine_info[engine], timings[engine] = info, engine_timings
        results += engine_results
        print(f"{engine}: {info['status']}", file=sys.stderr)
    cross_results = []
    if args.cross:
        engine_pythons = {e: _python(e, pythons) for e in engines}
        cross_results = cross.run_all(engine_info, engine_pythons, args.cross_arch.split(","), workdir, env,
                                      args.timeout, ring=args.cross_ring)
    if not args.no_vectors:
        results += [r.to_json() for r in check_vectors(args.vectors)]
    command = "thaw-conformance " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    made = receipt.build(command, engine_info, results, timings, cross_results)
    md = receipt.write(made, args.out)
    print(md.read_text())
    print(f"receipt: {args.out} and {md}", file=sys.stderr)
    return 0 if receipt.passed(made) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thaw-conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", nargs="+", default=["all"],
                        help=f"{', '.join(ALL_ENGINES)}, a name given --driver, or all (built-in and --driver ones)")
    parser.add_argument("--arch", default="all", help="comma-separated zoo architectures, or all")
    parser.add_argument("--engine-arch", action="append", default=[], metavar="ENGINE=ARCHS",
                        help="architectures for one engine, overriding --arch (engine starts are slow)")
    parser.add_argument("--fork-arch", default="all",
                        help="architectures to run the fork and sleep/wake checks on (both start engines), or all")
    parser.add_argument("--engine-fork-arch", action="append", default=[], metavar="ENGINE=ARCHS",
                        help="architectures for one engine's fork and sleep/wake checks, overriding --fork-arch")
    parser.add_argument("--out", type=Path, default=Path("receipt.json"))
    parser.add_argument("--python-for", action="append", default=[], metavar="ENGINE=PYTHON",
                        help="the Python (of a virtualenv with the engine and thaw installed) to run ENGINE with")
    parser.add_argument("--driver", action="append", default=[], metavar="ENGINE=MODULE:FACTORY",
                        help="a driver outside thaw, run as engine ENGINE")
    parser.add_argument("--workdir", type=Path, help="scratch space for models and snapshots")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per engine")
    parser.add_argument("--vectors", type=Path, default=default_dir(), help="golden vectors directory")
    parser.add_argument("--no-vectors", action="store_true", help="skip the format conformance of the vectors")
    parser.add_argument("--cross-arch", default="llama,qwen2", help="architectures for the cross-engine checks")
    parser.add_argument("--no-cross", dest="cross", action="store_false", help="skip the cross-engine checks")
    parser.add_argument("--cross-ring", action="store_true",
                        help="cross each engine into the next only (the last into the first), not every ordered pair")
    return parser


def _check_names(parser, args, engines: tuple, drivers: dict, outside: dict, pythons: dict, env: dict) -> None:
    """Refuse, before any engine starts, a --driver whose module or factory does not exist, an architecture
    (--arch, --engine-arch) that no engine asked has, and fork architectures (--fork-arch, --engine-fork-arch) an
    engine does not run; each ran nothing, or no fork, listed its checks skipped and exited 0.

    Each engine's worker is asked in its own interpreter (`--phase list`: it imports the driver, starts
    nothing), only where a name needs checking. An engine not installed here cannot answer: it is skipped in
    the run, with its reason, as before; an architecture only some engines have is skipped on the others."""
    for option, per_engine in (("--engine-arch", args.engine_arch), ("--engine-fork-arch", args.engine_fork_arch)):
        unknown = [e for e in per_engine if e not in drivers and e not in engines]
        if unknown:
            parser.error(f"{option}: no engine {', '.join(map(repr, unknown))}; the built-in ones are "
                         f"{', '.join(ALL_ENGINES)}, or a name given --driver")
    explicit = (args.arch != "all" or any(archs != "all" for archs in args.engine_arch.values())
                or any(map(_named, [args.fork_arch, *args.engine_fork_arch.values()])))
    known = {}
    # a driver named on the command line (--driver, or --engine MODULE:FACTORY) is always looked up
    named = [*outside, *(e for e in engines if ":" in e)]
    for engine in dict.fromkeys([*named, *(engines if explicit else ())]):
        listed = _list_architectures(drivers.get(engine, engine), _python(engine, pythons), env, args.timeout)
        if listed.get("not_found"):
            option = f"--driver {engine}={drivers[engine]}" if engine in outside else f"--engine {engine}"
            parser.error(f"{option}: {listed['unavailable']} (for {_python(engine, pythons)})")
        if "architectures" in listed:
            known[engine] = listed["architectures"]
    for engine, archs in args.engine_arch.items():
        unknown = [a for a in archs.split(",") if archs != "all" and engine in known and a not in known[engine]]
        if unknown:
            parser.error(f"--engine-arch: the {engine} driver has no {', '.join(map(repr, unknown))} "
                         f"(it has: {', '.join(known[engine])})")
    have = sorted({a for e in engines if e in known for a in known[e]})
    unknown = [a for a in args.arch.split(",") if args.arch != "all" and have and a not in have]
    if unknown:
        parser.error(f"--arch: no engine here has {', '.join(map(repr, unknown))} (they have: {', '.join(have)})")

    def runs(engine: str) -> list:
        """The architectures an engine runs; [] where unknown (all, and its driver could not be asked)."""
        archs = args.engine_arch.get(engine, args.arch)
        return known.get(engine, []) if archs == "all" else archs.split(",")

    for engine, archs in args.engine_fork_arch.items():
        unknown = [a for a in _named(archs) if runs(engine) and a not in runs(engine)]
        if unknown:
            parser.error(f"--engine-fork-arch: {engine} runs no {', '.join(map(repr, unknown))} "
                         f"(it runs: {', '.join(runs(engine))}; or all, or none)")
    run = sorted({a for e in engines if e not in args.engine_fork_arch for a in runs(e)})
    unknown = [a for a in _named(args.fork_arch) if run and a not in run]
    if unknown:
        parser.error(f"--fork-arch: no engine here runs {', '.join(map(repr, unknown))} (they run: {', '.join(run)}; "
                     f"or all, or none)")


def _named(archs: str) -> list:
    """The architectures a fork option names: none for all and none."""
    return [] if archs in ("all", "none") else archs.split(",")


def _list_architectures(spec: str, python: Path, env: dict, timeout: int) -> dict:
    """The worker's answer to `--phase list`, or {} where it gave none (it crashed: the run reports that)."""
    with tempfile.TemporaryDirectory(prefix="thaw-conformance-") as scratch:
        out = Path(scratch) / "list.json"
        try:
            subprocess.run([str(python), "-m", "thaw_conformance.worker", "--phase", "list", "--driver", spec,
                            "--workdir", scratch, "--out", str(out)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {}
        return json.loads(out.read_text()) if out.exists() else {}


def _python(engine: str, pythons: dict) -> Path:
    if engine in pythons:
        return Path(pythons[engine])
    venv = CHECKOUT / VENVS.get(engine, ".venv") / "bin" / "python" if CHECKOUT is not None else None
    # An engine the current interpreter cannot import is reported by its worker as not available here.
    return venv if venv is not None and venv.exists() else Path(sys.executable)


def _pair(parser, text: str, option: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        parser.error(f"{option} takes ENGINE=VALUE, got {text!r}")
    return key, value


def _worker_env() -> dict:
    """The environment edge: offline hubs and, in a checkout, every cache inside it, unless the caller set them.
    Installed, the user's own cache locations stand (the zoo's is `cache_dir()` in both processes)."""
    env = dict(os.environ)
    defaults = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if CHECKOUT is not None:
        cache = cache_dir()
        defaults.update({"HF_HOME": cache / "hf", "XDG_CACHE_HOME": cache / "xdg", "VLLM_CACHE_ROOT": cache / "vllm",
                         "TORCHINDUCTOR_CACHE_DIR": cache / "inductor", "TRITON_CACHE_DIR": cache / "triton"})
    for key, value in defaults.items():
        env.setdefault(key, str(value))
    if CHECKOUT is not None:  # the checkout's packages, whichever venv runs them
        paths = [str(CHECKOUT), str(CHECKOUT / "adapters"), str(CHECKOUT / "conformance")]
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _run_engine(engine: str, spec: str, python: Path, args, workdir: Path, env: dict) -> tuple[dict, list, dict]:
    """Run one engine's worker; an engine that is not installed or crashes gives a receipt line, not an abort."""
    out, log = workdir / f"{engine}.json", workdir / f"{engine}.log"
    workdir.mkdir(parents=True, exist_ok=True)
    archs = args.engine_arch.get(engine, args.arch)
    command = [str(python), "-m", "thaw_conformance.worker", "--driver", spec, "--arch", archs, "--fork-arch",
               args.engine_fork_arch.get(engine, args.fork_arch), "--workdir", str(workdir), "--out", str(out)]
    started = time.perf_counter()
    status = None
    try:
        with open(log, "w") as stream:
            done = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, timeout=args.timeout)
        if done.returncode != 0:
            status = f"the worker exited {done.returncode}: " + " | ".join(log.read_text().strip().splitlines()[-4:])
    except subprocess.TimeoutExpired:
        status = f"timed out after {args.timeout} s (log: {log})"
    if not out.exists():
        return _absent(engine, status or "the worker wrote no results", "error")
    data = json.loads(out.read_text())
    if "unavailable" in data:
        return {"status": f"not available here: {data['unavailable']}"}, data["results"], {}
    results = data["results"]
    if status:  # architectures the worker never reached: errors, with the reason
        for arch in archs.split(",") if archs != "all" else []:
            if arch not in data["done"]:
                recorder = Recorder(engine, arch)
                recorder.missing("error", status)
                results += [r.to_json() for r in recorder.results]
    info = {"status": status or f"ran in {time.perf_counter() - started:.0f} s", "versions": data["versions"],
            "python": data["python"], "executable": data["executable"], "driver": spec,
            "zoo_checkpoints": data["zoo_checkpoints"]}
    return info, results, data["timings"]


def _absent(engine: str, why: str, status: str) -> tuple[dict, list, dict]:
    recorder = Recorder(engine, "-")
    recorder.missing(status, why)
    return {"status": why}, [r.to_json() for r in recorder.results], {}


if __name__ == "__main__":
    sys.exit(main())
