"""Tests of the conformance suite itself: they run the real CLI and worker in subprocesses, as users do."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _env() -> dict:
    paths = [str(HERE), str(REPO / "conformance"), str(REPO / "adapters"), str(REPO)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="session")
def run_worker(tmp_path_factory):
    """Run the worker on a driver spec in a subprocess; returns {(arch, check): result}."""
    def run(spec: str, arch: str = "toy") -> dict:
        workdir = tmp_path_factory.mktemp("worker")
        out = workdir / "results.json"
        done = subprocess.run([sys.executable, "-m", "thaw_conformance.worker", "--driver", spec, "--arch", arch,
                               "--workdir", str(workdir), "--out", str(out)], env=_env(), capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return {(r["arch"], r["check"]): r for r in json.loads(out.read_text())["results"]}
    return run


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory):
    """Run thaw-conformance with arguments; returns (exit status, receipt dict, markdown text)."""
    def run(*args: str, python: str = sys.executable, timeout: int = 600):
        workdir = tmp_path_factory.mktemp("cli")
        out = workdir / "receipt.json"
        done = subprocess.run([python, "-m", "thaw_conformance.cli", *args, "--out", str(out), "--workdir",
                               str(workdir)], env=_env(), capture_output=True, text=True, timeout=timeout)
        assert out.exists(), done.stderr
        return done.returncode, json.loads(out.read_text()), out.with_suffix(".md").read_text()
    return run
