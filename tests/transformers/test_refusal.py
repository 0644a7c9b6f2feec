"""Snapshots this engine cannot hold are refused with a precise error before anything changes: the engine then
serves exactly as before (same pages, same output)."""

import subprocess
import sys

import pytest

import thaw_format
from thaw_format import CorruptSnapshotError, IncompatibleSnapshotError, KVLayer, SamplingParams
from thaw_format.sdk import greedy, seeded
from conftest import PROMPT, page_bytes


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A llama snapshot with a seeded request in flight, and its file."""
    from conftest import shared_engine
    parent = shared_engine("llama")
    parent.generate(PROMPT, greedy(6))
    parent.submit(PROMPT[::-1][:40], seeded(7, 12))
    for _ in range(3):
        parent.step()
    path = tmp_path_factory.mktemp("refusal") / "snapshot.thaw"
    thaw_format.save(parent.capture(), path)
    return path


def _edit(snap, field, value):
    """The snapshot with one attribute path (dotted) set to value."""
    *parents, last = field.split(".")
    target = snap
    for name in parents:
        target = target[int(name)] if name.isdigit() else getattr(target, name)
    setattr(target, last, value)
    return snap


EDITS = {
    "architecture": ("model.architecture", "MistralForCausalLM", "model.architecture"),
    "config": ("model.config_digest", "sha256:" + "0" * 64, "model.config_digest"),
    "dtype": ("model.dtype", "bfloat16", "model.dtype"),
    "weights digest": ("model.weights_digest", "sha256:" + "1" * 64, "model.weights_digest"),
    "page size": ("kv.page_size", 16, "kv.page_size"),
    "heads": ("kv.layers.0.num_kv_heads", 4, "kv.layers[0]"),
    "kind": ("kv.layers.1.kind", "sliding_window", "kv.layers[1]"),
    "penalty": ("scheduler.requests.0.sampling.repetition_penalty", 1.3, "repetition_penalty"),
    "foreign generator": ("engine.name", "vllm", "generator state of vllm"),
    "no generator": ("scheduler.requests.0.rng_state", None, "no generator state"),
    "pages": ("scheduler.requests.0.pages", [0, 1], "do not hold its computed tokens"),
}


@pytest.mark.parametrize("label", list(EDITS))
def test_refused_and_untouched(label, served, engine):
    field, value, named = EDITS[label]
    e = engine("llama")
    first = e.generate(PROMPT, greedy(6))
    before = page_bytes(e.capture(include_weights=False))
    bad = _edit(thaw_format.load(served), field, value)
    for attempt in (e.check, e.restore):
        with pytest.raises(IncompatibleSnapshotError, match=named.replace("[", r"\[").replace("]", r"\]")):
            attempt(bad)
    assert page_bytes(e.capture(include_weights=False)) == before and not e.requests
    assert e.generate(PROMPT + first.token_ids, greedy(4)).cached_tokens == 75


def test_other_architecture_refused(served, engine):
    e = engine("qwen3")
    with pytest.raises(IncompatibleSnapshotError, match="model.architecture"):
        e.restore(thaw_format.load(served))
    assert e.capture(include_weights=False).kv is None


def test_a_path_instead_of_a_snapshot_is_refused_by_name(served, engine):
    """restore takes a Snapshot; a file's path (restore_source's argument) is named, with the two ways to use it."""
    e = engine("llama")
    for attempt, path in ((e.check, served), (e.restore, served), (e.restore, str(served))):
        with pytest.raises(TypeError, match=r"got (PosixPath|str) .*thaw_format.load\(path\).*restore_source\(path\)"):
            attempt(path)
    assert e.capture(include_weights=False).kv is None


def test_missing_layer_tensor_refused(served, engine):
    snap = thaw_format.load(served)
    snap.kv.layers[0] = KVLayer("attention", {"k": snap.kv.layers[0].tensors["k"]}, 2, 32)
    with pytest.raises(IncompatibleSnapshotError, match=r"kv.layers\[0\] must hold"):
        engine("llama").restore(snap)


def test_unsupported_sampling_in_generate(engine):
    from thaw_format.sdk import Unsupported
    with pytest.raises(Unsupported, match="frequency_penalty"):
        engine("llama").generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=2, frequency_penalty=0.5))


def test_max_tokens_below_one_is_refused(engine):
    """max_tokens=0 or -1 gave one token (a request is done only once it has one); refused, as vLLM refuses it."""
    from thaw_format.sdk import Unsupported
    for n in (0, -1):
        with pytest.raises(Unsupported, match=rf"max_tokens={n} \(at least 1\)"):
            engine("llama").generate(PROMPT, greedy(n))
        with pytest.raises(Unsupported, match=rf"max_tokens={n} \(at least 1\)"):
            engine("llama").submit(PROMPT, greedy(n))


def test_params_that_are_not_sampling_params_are_refused_by_name(engine):
    """generate(prompt, None) raised AttributeError from the sampler (and differently on every engine)."""
    llama = engine("llama")
    for params in (None, {"max_tokens": 2}):
        for call in (llama.generate, llama.submit):
            with pytest.raises(TypeError, match=f"params must be a thaw_format.SamplingParams .*, not "
                                                f"{type(params).__name__}"):
                call(PROMPT, params)
    assert llama.requests == {}


def test_a_dtype_torch_does_not_have_is_refused_by_name():
    """dtype="float33" raised "module 'torch' has no attribute 'float33'"; "nn" reached from_pretrained as a module."""
    from conftest import model_dir
    from thaw_transformers import TransformersEngine

    for dtype in ("float33", "nn"):
        with pytest.raises(ValueError, match=rf"dtype='{dtype}' is not a torch dtype"):
            TransformersEngine.start(str(model_dir("llama")), dtype=dtype)


def test_damaged_file_refused(served, tmp_path):
    """The format refuses a flipped byte and a truncated file before any engine sees them."""
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped, cut = tmp_path / "flipped.thaw", tmp_path / "cut.thaw"
    flipped.write_bytes(bytes(data))
    cut.write_bytes(served.read_bytes()[:-100])
    for path in (flipped, cut):
        with pytest.raises(CorruptSnapshotError):
            thaw_format.load(path)


def _renamed_weights(snap):
    """The snapshot's weights under other names, as another engine's native (fused) names would be."""
    snap.weights = thaw_format.Weights({"other/" + name: t for name, t in snap.weights.tensors.items()})
    return snap


def test_weights_under_another_engines_names_of_this_checkpoint_are_this_models(served, engine):
    """vLLM and SGLang name a checkpoint's weights their own way (qkv_proj, ...); with this checkpoint's digest
    they are the weights this engine already serves: the KV restores and hits the cache."""
    e = engine("llama")
    snap = _renamed_weights(thaw_format.load(served))
    e.restore(snap)
    assert page_bytes(e.capture(include_weights=False)) == page_bytes(thaw_format.load(served))
    e.finish()


def test_weights_under_other_names_without_this_digest_are_refused(served, engine):
    e = engine("llama")
    snap = _renamed_weights(thaw_format.load(served))
    snap.model.weights_digest = None  # nothing says they are this checkpoint's
    with pytest.raises(IncompatibleSnapshotError, match="weights: missing"):
        e.restore(snap)


@pytest.mark.parametrize("missing", ["torch", "transformers"])
def test_import_without_the_extra_names_it(missing):
    """As every integration does (README, "Add thaw to your project"): the error says which extra to install."""
    code = f"import sys; sys.modules[{missing!r}] = None; import thaw_transformers"  # None: import fails
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and "pip install 'thaw[transformers]'" in result.stderr, result.stderr


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_start_without_a_checkpoint_directory_names_it(where, tmp_path):
    from thaw_transformers import TransformersEngine

    path = tmp_path / "model"
    if where == "empty":
        path.mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a Hugging Face checkpoint directory.*model/config\.json"):
        TransformersEngine.start(str(path))
