"""thaw-conformance on an MLX user's machine: `pip install thaw[mlx]` (no torch), no checkout, no options.

A virtualenv with only the project and its `mlx` extra (made once under .cache, the project reinstalled from
this checkout on every run, not editable) runs the README's command from an empty directory, with the caches
in a temporary home: it must default to its own interpreter, read the golden vectors shipped in the package,
build the zoo checkpoint without torch, and write a receipt in which everything passed. The checkpoint it built
must be byte-identical to the one this (torch-carrying) environment builds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from thaw_conformance import zoo
from thaw_conformance.models import ARCHS

VENV = REPO / ".cache" / "venv-torch-free"
PYTHON = VENV / "bin" / "python"


def _clean_env(**extra) -> dict:
    """No PYTHONPATH: only what is installed in the virtualenv may be imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XDG_CACHE_HOME", "HF_HOME")}
    return dict(env, **extra)


def _install() -> None:
    if not PYTHON.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(VENV)], check=True)  # pip --python fills it
        # pip's own cache stays where the set-up scripts filled it (scripts/env.sh): on a fresh clone the wheels
        # of mlx, mlx-lm and transformers are there already, not downloaded again.
        cache = {"PIP_CACHE_DIR": str(Path(os.environ["XDG_CACHE_HOME"]) / "pip")} \
            if "XDG_CACHE_HOME" in os.environ and "PIP_CACHE_DIR" not in os.environ else {}
        subprocess.run([sys.executable, "-m", "pip", "--python", str(PYTHON), "install", "-q", f"{REPO}[mlx]"],
                       check=True, env=_clean_env(**cache), timeout=1800)
    else:  # the dependencies stay; this checkout's code replaces the last run's
        subprocess.run([sys.executable, "-m", "pip", "--python", str(PYTHON), "install", "-q", "--no-deps",
                        "--force-reinstall", str(REPO)], check=True, env=_clean_env(), timeout=1800)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    try:
        _install()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        reason = f"could not make the torch-free virtualenv {VENV}: {exc}"
        if os.environ.get("THAW_REQUIRE_ENGINES") == "1":
            pytest.fail(f"THAW_REQUIRE_ENGINES=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("home")
    cwd = tmp_path_factory.mktemp("cwd")
    done = subprocess.run([str(VENV / "bin" / "thaw-conformance"), "--engine", "mlx", "--arch", "llama", "--no-cross",
                           "--out", "receipt.json"], cwd=cwd, env=_clean_env(HOME=str(home)), capture_output=True,
                          text=True, timeout=1200)
    return done, cwd, home


def test_installed_mlx_conformance_passes_without_torch(installed):
    done, cwd, _ = installed
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    receipt = json.loads((cwd / "receipt.json").read_text())
    assert receipt["engines"]["mlx"]["executable"] == str(PYTHON)
    mlx = [r for r in receipt["results"] if r["engine"] == "mlx"]
    assert mlx and all(r["status"] == "passed" for r in mlx), [r for r in mlx if r["status"] != "passed"]
    vectors = {r["arch"] for r in receipt["results"] if r["engine"] == "format"}
    assert vectors == {p.stem for p in (REPO / "spec" / "vectors").glob("*.thaw")}  # the shipped copy, all of it
    assert receipt["machine"]["thaw"]["git_commit"] is None
    assert (cwd / "receipt.md").exists()
    done = subprocess.run([str(PYTHON), "-c", "import torch"], env=_clean_env(), capture_output=True)
    assert done.returncode != 0  # the run above really had no torch


def test_checkpoint_bytes_match_this_environment(installed, tmp_path):
    _, _, home = installed
    ours = zoo.make_model("llama", tmp_path, **ARCHS["llama"])
    built = home / ".cache" / "thaw" / "zoo" / ours.name  # the digest names the same recipe in both
    for name in ("config.json", "model.safetensors"):
        assert (built / name).read_bytes() == (ours / name).read_bytes(), name
