"""Shared vLLM engines for the thaw_vllm tests: tiny random-weight models, one engine per (model, dtype),
in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0); tests that need another process run helper scripts."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import engine_guard

# In-process engines for this test process; set before vLLM reads it (the edge of the test run).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

HERE = Path(__file__).parent
ENGINE_KWARGS = dict(block_size=32, enforce_eager=True, skip_tokenizer_init=True, max_model_len=4096,
                     kv_cache_memory_bytes=64 << 20)
DTYPES = ("float32", "bfloat16")


@pytest.fixture(scope="session")
def vllm():
    return engine_guard.require("vllm", "install it with scripts/setup-vllm.sh")


@pytest.fixture(scope="session")
def zoo():
    return engine_guard.require("thaw_conformance.zoo", "the repository must be installed (pip install -e .)")


_ENGINES = {}


def make_engine(zoo, arch: str, dtype: str, **overrides):
    import thaw_vllm

    key = (arch, dtype, tuple(sorted(overrides.items())))
    if key not in _ENGINES:
        model = zoo.make_model(arch, dtype=dtype)
        _ENGINES[key] = thaw_vllm.LLM(model, dtype=dtype, **{**ENGINE_KWARGS, **overrides})
    return _ENGINES[key]


@pytest.fixture(scope="session", params=DTYPES)
def engine(request, vllm, zoo):
    """A llama engine of each dtype, shared by every test of the session."""
    return make_engine(zoo, "llama", request.param)


@pytest.fixture
def greedy(vllm):
    return vllm.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def generate(llm, prompt, params):
    from vllm.inputs import TokensPrompt

    out = llm.generate([TokensPrompt(prompt_token_ids=list(prompt))], params, use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), out.num_cached_tokens or 0


def run_helper(script: str, config: dict, timeout: int = 300) -> dict:
    """Run tests/vllm/<script> in a new process with this interpreter; it reports a "THAW_RESULT <json>" line.
    The helper leads a session of its own, which is killed whole when it ends (its engine core and ranks are not
    left behind, on a timeout either); a failure shows what it printed."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(config.pop("env", {}))
    proc = subprocess.Popen([sys.executable, str(HERE / script), json.dumps(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        failure = None if proc.returncode == 0 else f"failed ({proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        failure = f"timed out after {timeout} s"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    printed = f"stdout:\n{stdout[-4000:]}\nstderr:\n{stderr[-4000:]}"
    if failure:
        raise AssertionError(f"{script} {failure}:\n{printed}")
    lines = [line for line in stdout.splitlines() if line.startswith("THAW_RESULT ")]
    assert lines, f"{script} reported nothing:\n{printed}"
    return json.loads(lines[-1][len("THAW_RESULT "):])


def trunk_tokens(n: int, seed: int = 0) -> list[int]:
    """Deterministic prompt ids in [3, 1000)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(3, 1000) for _ in range(n)]
