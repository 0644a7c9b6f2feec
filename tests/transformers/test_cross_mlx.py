"""Snapshots cross between thaw_mlx (mlx-lm) and thaw_transformers serving the same zoo checkpoint: the KV pages
land byte for byte, the target reports the restored tokens as cached, and the restored KV is the target's own
KV of those tokens up to rounding (two engines' kernels round differently; thaw moves bytes exactly)."""

import pytest

import engine_guard

engine_guard.require("mlx_lm", "install the core environment: scripts/setup-core.sh")

import thaw_format  # noqa: E402
from thaw_conformance.compare import kv_closeness  # noqa: E402
from thaw_conformance.cross import KV_TOLERANCE  # noqa: E402
from thaw_format import IncompatibleSnapshotError  # noqa: E402
from thaw_format.sdk import greedy, seeded  # noqa: E402
from thaw_mlx import MLXEngine  # noqa: E402
from conftest import PROMPT, model_dir, page_bytes  # noqa: E402

ARCHS = ["llama", "gemma2"]


@pytest.fixture(scope="module")
def mlx_engine():
    engines = {}

    def start(arch):
        if arch not in engines:
            engines[arch] = MLXEngine.start(str(model_dir(arch)))
        engine = engines[arch]
        engine.close()  # a fresh session list over the same model
        return engine
    return start


def _lands(source: thaw_format.Snapshot, target, own: thaw_format.Snapshot) -> None:
    """The source's pages are in the target byte for byte, and close to the target's own KV of the same tokens."""
    landed = target.capture(include_weights=False)
    assert page_bytes(landed).items() >= page_bytes(source).items()
    tokens, diff, scale = kv_closeness(own, landed)
    assert tokens == 75 and diff <= KV_TOLERANCE * scale


@pytest.mark.parametrize("arch", ARCHS)
def test_mlx_to_transformers(arch, mlx_engine, engine, saved):
    mlx = mlx_engine(arch)
    first = mlx.generate(PROMPT, greedy(6))
    source = thaw_format.load(saved(mlx.capture()))
    target = engine(arch)
    prompt = PROMPT + first.token_ids
    target.generate(prompt, greedy(1))
    own = target.capture(include_weights=False)  # the target's own prefill of the same tokens
    assert target.restore(source) == []  # a session served to the end: its KV is cache, no request
    _lands(source, target, own)
    assert target.generate(prompt, greedy(8)).cached_tokens == len(prompt) - 1


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_to_mlx(arch, mlx_engine, engine, saved):
    parent = engine(arch)
    first = parent.generate(PROMPT, greedy(6))
    source = thaw_format.load(saved(parent.capture()))
    prompt = PROMPT + first.token_ids
    own_engine = engine(arch)
    own_engine.generate(prompt, greedy(1))
    mlx = mlx_engine(arch)
    mlx.restore(source)
    landed = mlx.capture(include_weights=False)
    assert page_bytes(landed) == page_bytes(source)
    tokens, diff, scale = kv_closeness(own_engine.capture(include_weights=False), landed)
    assert tokens == 75 and diff <= KV_TOLERANCE * scale
    assert mlx.generate(prompt, greedy(8)).cached_tokens == len(prompt) - 1


def test_mlx_request_in_flight_resumes_here(mlx_engine, engine, saved):
    """A greedy MLX request captured mid-stream continues in transformers from MLX's KV and tokens so far."""
    mlx = mlx_engine("llama")
    rid = mlx.submit(PROMPT[::-1][:40], greedy(12))
    for _ in range(5):
        mlx.step()
    source = thaw_format.load(saved(mlx.capture()))
    target = engine("llama")
    [resumed] = target.restore(source)
    assert resumed.request_id == rid and len(resumed.previous_output_token_ids) == 5
    done = target.finish()[rid]
    assert done.output_token_ids[:5] == resumed.previous_output_token_ids and len(done.output_token_ids) == 12
    assert done.cached_tokens == 44  # MLX's KV of the prompt and 4 outputs; the 5th output is fed here
    mlx.finish()


def test_seeded_mlx_request_refused(mlx_engine, engine, saved):
    """MLX's generator state cannot drive torch's: a seeded request in flight is refused, naming why."""
    mlx = mlx_engine("llama")
    mlx.submit(PROMPT[::-1][:40], seeded(7, 12))
    for _ in range(3):
        mlx.step()
    source = thaw_format.load(saved(mlx.capture()))
    mlx.finish()
    target = engine("llama")
    with pytest.raises(IncompatibleSnapshotError, match="generator state of mlx"):
        target.restore(source)
    assert not target.requests and target.capture(include_weights=False).kv is None
