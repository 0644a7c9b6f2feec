"""pytest plugin: the conformance suite as ordinary pytest tests, for an engine author's own adapter.

    pytest -p thaw_conformance.pytest_plugin --pyargs thaw_conformance.suite --thaw-driver mypkg.thaw:driver

One test per (architecture, check). A check the adapter does not support is skipped with "not supported
by the adapter: ...", never passed. Each architecture runs once, in a worker process of this Python (its
fresh-process checks need a second process anyway), so the driver must be importable from sys.path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .drivers import load_driver
from .results import CHECKS

WORKER_TIMEOUT_S = 1800


def pytest_addoption(parser):
    group = parser.getgroup("thaw-conformance")
    group.addoption("--thaw-driver", action="append", default=[], metavar="SPEC",
                    help="driver to check: a built-in name (template, mlx, vllm, sglang, transformers) or "
                     "module:factory")
    group.addoption("--thaw-arch", default="all", help="comma-separated architectures, or all (default)")


def pytest_generate_tests(metafunc):
    if "thaw_case" not in metafunc.fixturenames:
        return
    cases, ids = [], []
    for spec in metafunc.config.getoption("thaw_driver"):
        driver = load_driver(spec)
        arch = metafunc.config.getoption("thaw_arch")
        for a in driver.architectures() if arch == "all" else arch.split(","):
            for check in CHECKS:
                cases.append((spec, a, check))
                ids.append(f"{driver.name}-{a}-{check}")
    if not cases:
        raise pytest.UsageError("thaw_conformance.suite needs --thaw-driver SPEC")
    metafunc.parametrize("thaw_case", cases, ids=ids)


@pytest.fixture(scope="session")
def thaw_results(tmp_path_factory):
    """(driver spec, arch) -> {check name: result}, running the worker once per pair."""
    done: dict = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))

    def results(spec: str, arch: str) -> dict:
        if (spec, arch) not in done:
            workdir = tmp_path_factory.mktemp("thaw-conformance")
            out = workdir / "results.json"
            subprocess.run([sys.executable, "-m", "thaw_conformance.worker", "--driver", spec, "--arch", arch,
                            "--workdir", str(workdir), "--out", str(out)], env=env, check=True, timeout=WORKER_TIMEOUT_S)
            done[spec, arch] = {r["check"]: r for r in json.loads(out.read_text())["results"]}
        return done[spec, arch]

    return results
