"""A newcomer's install: the package built once as a wheel, installed into fresh virtualenvs (no system
site-packages, pip's normal index) with each extra that installs here, then the README's "Use" block and its
`thaw` commands run as written (taken from README.md, so the README cannot drift from what works).

Cost: each virtualenv is new, so this is the price of `pip install` itself (the torch wheel dominates) plus one
libthaw build: 54 s of CPU; on this project's shared 2-core machine, 5 minutes of wall time at load average 23
and 10 minutes at 25-30 (other sessions' engine tests and a vLLM install beside it), with pip's cache warm
(`.cache/xdg/pip` under scripts/env.sh, which the set-up scripts fill first). Not measured on an idle machine. Marked `install`; CI runs it (scripts/test.sh runs tests/install in .venv).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "spec" / "vectors"


def readme_blocks(heading: str) -> list[tuple[str, str]]:
    """(language, text) of each fenced block under the README's `## heading`, in order."""
    section = (ROOT / "README.md").read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```(\w*)\n(.*?)^```$", section, re.S | re.M)


def clean_env() -> dict:
    """This process's environment without the checkout on PYTHONPATH: the venv must use what it installed."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return env


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=clean_env(), **kwargs)
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


EXTRAS = ("", "torch,cli", "mlx")


@pytest.fixture(scope="module")
def venvs(tmp_path_factory) -> dict[str, Path]:
    """extras -> the bin folder of a fresh virtualenv holding thaw[extras]. One wheel (libthaw compiled once,
    with this environment's setuptools and cffi); the three installs run side by side, since most of their
    time is spent waiting on downloads and unpacking, not on the CPU."""
    root = tmp_path_factory.mktemp("install")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", root, ROOT])
    wheel = next(root.glob("thaw-*.whl"))
    installs = {}
    for extras in EXTRAS:
        env_dir = root / f"venv-{extras.replace(',', '-') or 'core'}"
        run([sys.executable, "-m", "venv", env_dir])
        requirement = f"thaw[{extras}] @ {wheel.as_uri()}" if extras else str(wheel)
        installs[extras] = env_dir / "bin", subprocess.Popen(
            [env_dir / "bin" / "python", "-m", "pip", "install", "-q", "--no-compile", requirement],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=clean_env())
    out = {}
    for extras, (bin_dir, process) in installs.items():
        log = process.communicate()[0]
        out[extras] = bin_dir if process.returncode == 0 else f"pip install thaw[{extras}] failed:\n{log[-3000:]}"
    return out


def venv_with(venvs: dict, extras: str) -> Path:
    if isinstance(venvs[extras], str):
        pytest.fail(venvs[extras])
    return venvs[extras]


def test_core_install_has_the_command_and_names_the_missing_extras(tmp_path, venvs):
    bin_dir = venv_with(venvs, "")
    run([bin_dir / "thaw", "verify", *sorted(VECTORS.glob("*.thaw"))])
    for module, extra in (("thaw_format.torch", "torch"), ("thaw_format.mlx", "mlx"), ("thaw_mlx", "mlx"),
                          ("thaw_vllm", "vllm"), ("thaw_sglang", "sglang"), ("thaw_transformers", "transformers"),
                          ("thaw_langgraph", "langgraph"), ("thaw_ray", "ray")):
        result = subprocess.run([bin_dir / "python", "-c", f"import {module}"], capture_output=True, text=True,
                                env=clean_env())
        assert result.returncode == 1 and f"pip install 'thaw[{extra}]'" in result.stderr, (module, result.stderr)
    convert = subprocess.run([bin_dir / "thaw", "convert", "a", "b"], capture_output=True, text=True, env=clean_env())
    assert convert.returncode == 2 and "pip install 'thaw[mlx]'" in convert.stderr, convert.stderr


def test_torch_extra_runs_the_readme_use_block_as_written(tmp_path, venvs):
    bin_dir = venv_with(venvs, "torch,cli")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(VECTORS / "scheduler_in_flight.thaw", work / "trunk.thaw")  # what scripts/demo.sh would save
    blocks = readme_blocks("Use")
    (work / "use.py").write_text(next(text for language, text in blocks if language == "python"))
    result = subprocess.run([bin_dir / "python", "use.py"], cwd=work, capture_output=True, env=clean_env())
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == (work / "trunk.thaw").read_bytes()  # tf.write(snap, sys.stdout.buffer): the same bytes
    commands = next(text for language, text in blocks if language == "")  # the `thaw` commands
    assert commands.count("thaw ") >= 5
    for line in commands.splitlines():
        argv = line.split("#")[0].split()
        result = subprocess.run([bin_dir / argv[0], *argv[1:]], cwd=work, capture_output=True, text=True,
                                env=clean_env())
        assert result.returncode in ((0, 1) if argv[1] == "diff" else (0,)), (line, result.stderr)
        assert "Traceback" not in result.stderr, (line, result.stderr)


def test_mlx_extra_brings_thaw_mlx_and_convert_without_torch(tmp_path, venvs):
    bin_dir = venv_with(venvs, "mlx")
    run([bin_dir / "python", "-c", "import thaw_mlx, thaw_format.mlx, importlib.util as u; "
                                   "assert u.find_spec('torch') is None, 'torch came with [mlx]'"])
    assert "prompt-cache file" in run([bin_dir / "thaw", "convert", "--help"]).stdout
