"""A snapshot of another model or layout is refused with IncompatibleSnapshotError naming the field, before
anything is built or changed; captures thaw cannot represent are refused too."""

import json
import math

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ConcatenateKVCache, KVCache
from mlx_lm.utils import load_model

import thaw_mlx
from sessions import CASES, start
from thaw_format import (IncompatibleSnapshotError, KVLayer, SchedulerState, Tensor, checkpoint_model_info,
                         checkpoint_weights_digest, weights_digest)
from zoo import CONFIGS, make_model


@pytest.fixture
def llama_snapshot(session):
    """A fresh capture per test, so that a test may edit it."""
    model, cache, tokens = session("llama-kv")
    return thaw_mlx.capture(model, cache, tokens)


def refused(model, snapshot, match: str, **kw):
    before = thaw_mlx.model_info(model)
    with pytest.raises(IncompatibleSnapshotError, match=match):
        thaw_mlx.restore(model, snapshot, **kw)
    assert thaw_mlx.model_info(model) == before  # the model is untouched


def test_a_path_instead_of_a_snapshot_is_refused_by_name(session, tmp_path):
    """thaw_mlx.restore and MLXEngine.restore take a Snapshot; a file's path gets the two ways to use it, not an
    AttributeError."""
    model, _, _ = session("llama-kv")
    with pytest.raises(TypeError, match=r"got str .*thaw_format.load\(path\)"):
        thaw_mlx.restore(model, str(tmp_path / "trunk.thaw"))
    engine = thaw_mlx.MLXEngine(model)  # its restore and check said "'str' object has no attribute 'kv'"
    for use in (engine.restore, engine.check):
        with pytest.raises(TypeError, match=r"got str .*engine.restore_source\(path\)"):
            use(str(tmp_path / "trunk.thaw"))


def test_another_architecture(model_of, llama_snapshot):
    refused(model_of("qwen2-kv"), llama_snapshot, "model.architecture: the snapshot has 'llama'")


def test_another_config(llama_snapshot):
    refused(make_model("llama", num_hidden_layers=3), llama_snapshot, "model.config_digest")


def test_another_dtype(model_of, llama_snapshot):
    refused(model_of("llama-kv-fp16"), llama_snapshot, "model.dtype: the snapshot has 'float32'")


def test_an_identity_given_with_another_dtype_lets_no_kv_of_that_dtype_in(model_of, llama_snapshot):
    """A caller's `info` (here the float32 model's, as computed before a cast to float16) vouches for the model's
    config and weights; the KV's dtype is checked against the dtype the model has, and an engine or a capture
    refuses an identity whose dtype is not the model's."""
    model, info = model_of("llama-kv-fp16"), llama_snapshot.model
    refused(model, llama_snapshot, "kv.dtype: the snapshot has 'float32', the engine has 'float16'", info=info)
    with pytest.raises(ValueError, match="info.dtype is 'float32', the model's parameters are 'float16'"):
        thaw_mlx.MLXEngine(model, info)
    cache, tokens = start(CASES["llama-kv-fp16"], model)[1:]
    with pytest.raises(ValueError, match="info.dtype is 'float32', the model's parameters are 'float16'"):
        thaw_mlx.capture(model, cache, tokens, info=info)


def test_other_weights_unless_told_not_to_check(llama_snapshot):
    model = make_model("llama")
    model.update({"lm_head": {"weight": model.lm_head.weight + 1}})
    refused(model, llama_snapshot, "model.weights_digest")
    assert len(thaw_mlx.restore(model, llama_snapshot, check_weights=False)) == 2


LAYOUT_EDITS = {
    "kv.layers \\(count\\)": lambda s: s.kv.layers.pop(),
    "kv.layers\\[1\\].num_kv_heads": lambda s: setattr(s.kv.layers[1], "num_kv_heads", 4),
    "kv.layers\\[0\\].head_dim": lambda s: setattr(s.kv.layers[0], "head_dim", 8),
    "kv.dtype": lambda s: setattr(s.kv, "dtype", "bfloat16"),
    "\\(mla\\): thaw_mlx restores attention, quantized, ring and recurrent":
        lambda s: s.kv.layers.__setitem__(0, KVLayer("mla", {}, 2, 16)),
    "prefix tree's tokens are not the session's": lambda s: setattr(s.scheduler.requests[0], "num_computed_tokens", 80),
    "2 pages of 32 cannot hold exactly 80": lambda s: (setattr(s, "prefix", None),
                                                       setattr(s.scheduler.requests[0], "num_computed_tokens", 80)),
    "pages \\[1\\] are not one chain": lambda s: setattr(s.scheduler.requests[0], "pages", [1]),
    "must hold tensors \\['k', 'v'\\]": lambda s: s.kv.layers[1].tensors.pop("v"),
    "one sequence; the snapshot holds 2 requests": lambda s: s.scheduler.requests.append(s.scheduler.requests[0]),
    "holds 0 requests and a prefix tree of 0 branches": lambda s: (setattr(s, "scheduler", SchedulerState([])),
                                                                    setattr(s, "prefix", None)),
}


def test_fork_needs_a_child(model_of, llama_snapshot):
    with pytest.raises(ValueError, match="n >= 1"):
        thaw_mlx.fork(model_of("llama-kv"), llama_snapshot, 0)


@pytest.mark.parametrize("match", list(LAYOUT_EDITS))
def test_layouts_the_model_cannot_hold(match, model_of, llama_snapshot):
    LAYOUT_EDITS[match](llama_snapshot)
    refused(model_of("llama-kv"), llama_snapshot, match)


RING_EDITS = {
    "MLX caches hold one sequence": {"write_index": [1, 2]},
    "do not fit a buffer": {"keep": 40},
    "must hold integers": {"window": "16"},
}


@pytest.mark.parametrize("match", list(RING_EDITS))
def test_rings_mlx_cannot_hold(match, session):
    model, cache, tokens = session("llama-rotating")
    snapshot = thaw_mlx.capture(model, cache, tokens)
    snapshot.kv.layers[0].params.update(RING_EDITS[match])
    refused(model, snapshot, match)


@pytest.mark.parametrize("params", [{"bits": 7}, {"group_size": 16}, {"bits": 4}])
def test_quantization_mlx_cannot_use(params, session):
    model, cache, tokens = session("llama-quantized")
    snapshot = thaw_mlx.capture(model, cache, tokens)
    snapshot.kv.layers[1].params.update(params)
    refused(model, snapshot, "kv.layers\\[1\\] \\(quantized\\)")


def test_captures_thaw_cannot_represent(model_of):
    model = model_of("llama-kv")
    concatenating = [ConcatenateKVCache() for _ in model.layers]
    model(mx.array([[1, 2]]), cache=concatenating)
    with pytest.raises(TypeError, match="ConcatenateKVCache"):
        thaw_mlx.capture(model, concatenating, [1, 2])
    batch = [KVCache() for _ in model.layers]
    model(mx.array([[1, 2, 3], [4, 5, 6]]), cache=batch)
    with pytest.raises(ValueError, match="batch of 2"):
        thaw_mlx.capture(model, batch, [1, 2, 3])
    single = [KVCache() for _ in model.layers]
    model(mx.array([[1, 2, 3]]), cache=single)
    with pytest.raises(ValueError, match="holds 3 tokens, but 2 token ids"):
        thaw_mlx.capture(model, single, [1, 2])
    for given in ([1], []):  # with [] it said "holds 0 tokens, but 0 token ids were given"
        with pytest.raises(ValueError, match="the cache holds 0 tokens: an empty session has nothing to capture"):
            thaw_mlx.capture(model, [KVCache() for _ in model.layers], given)


def test_a_known_identity_is_used_as_given(model_of, llama_snapshot):
    """restore(info=...) trusts the caller's model_info instead of digesting the weights again."""
    model = model_of("llama-kv")
    info = thaw_mlx.model_info(model)
    assert len(thaw_mlx.restore(model, llama_snapshot, info=info)) == 2
    info.weights_digest = "sha256:" + "0" * 64
    with pytest.raises(IncompatibleSnapshotError, match="model.weights_digest"):
        thaw_mlx.restore(model, llama_snapshot, info=info)
    assert thaw_mlx.capture(model, thaw_mlx.restore(model, llama_snapshot), thaw_mlx.snapshot_tokens(llama_snapshot),
                            info=info).model.weights_digest == info.weights_digest


def test_recurrent_states_mlx_cannot_hold(session):
    model, cache, tokens = session("lfm2-hybrid")
    with pytest.raises(ValueError, match="needs an attention layer"):
        thaw_mlx.num_cached_tokens([cache[0], cache[2]])  # recurrent layers alone do not count tokens
    snapshot = thaw_mlx.capture(model, cache, tokens)
    state = snapshot.kv.layers[0].tensors["state.0"]
    snapshot.kv.layers[0].tensors["state.0"] = Tensor(state.dtype, (2, *state.shape[1:]), state.tobytes() * 2)
    refused(model, snapshot, "every state must be \\[1, ...\\]")


@pytest.mark.parametrize("name, role", [("llama-rotating", "k"), ("llama-quantized", "v_scales"),
                                        ("llama-quantized", "k")])
def test_tensors_of_the_wrong_rank_or_size(name, role, session):
    model, cache, tokens = session(name)
    snapshot = thaw_mlx.capture(model, cache, tokens)
    layer = snapshot.kv.layers[0]
    t = layer.tensors[role]
    itemsize = t.nbytes // math.prod(t.shape)
    for shape in (t.shape[:2] + (t.shape[2] * t.shape[3],), t.shape[:3] + (t.shape[3] // 2,)):  # rank 3; half size
        layer.tensors[role] = Tensor(t.dtype, shape, bytes(math.prod(shape) * itemsize))
        refused(model, snapshot, "kv.layers\\[0\\]")


def _checkpoint(weights: dict, directory):
    """A Hugging Face-style llama checkpoint: config.json (file fields included) and model.safetensors."""
    directory.mkdir()
    config = dict(CONFIGS["llama"], architectures=["LlamaForCausalLM"], torch_dtype="float32",
                  transformers_version="5.19.0")
    (directory / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(directory / "model.safetensors"), weights)
    return directory, config


def test_a_model_loaded_from_a_checkpoint_is_identified_by_it(model_of, tmp_path):
    """model_info(checkpoint=...) is the identity the vLLM and SGLang adapters derive from the same files."""
    weights = dict(tree_flatten(model_of("llama-kv").parameters()))
    directory, config = _checkpoint(weights, tmp_path / "llama")
    model, _ = load_model(directory)
    info = thaw_mlx.model_info(model, checkpoint=directory)
    assert info == checkpoint_model_info(config, "float32", checkpoint_weights_digest(directory))
    assert info.architecture == "LlamaForCausalLM" and "torch_dtype" not in info.config
    assert thaw_mlx.model_info(model, checkpoint=directory, weights_digest=False).weights_digest is None

    model, cache, tokens = start(CASES["llama-kv"], model)
    snapshot = thaw_mlx.capture(model, cache, tokens, info=info)
    assert snapshot.model == info
    assert len(thaw_mlx.restore(model, snapshot, info=info)) == 2
    # Without the checkpoint the model's identity is its own (ModelArgs, MLX weights): the refusal says so.
    refused(model, snapshot, "model.architecture: the snapshot has 'LlamaForCausalLM', the engine has 'llama' "
            r".*info=thaw_mlx.model_info\(model, checkpoint=")

    # The same architecture and config with other weights: another checkpoint digest, refused.
    other_dir, _ = _checkpoint(dict(weights, **{"lm_head.weight": -weights["lm_head.weight"]}), tmp_path / "other")
    other = thaw_mlx.model_info(load_model(other_dir)[0], checkpoint=other_dir)
    assert (other.config_digest, other.architecture) == (info.config_digest, info.architecture)
    with pytest.raises(IncompatibleSnapshotError, match="model.weights_digest"):
        thaw_mlx.restore(model, snapshot, info=other)


def test_a_model_built_in_memory_keeps_the_digest_of_its_mlx_weights(model_of):
    model = model_of("llama-kv")
    info = thaw_mlx.model_info(model)
    assert info.architecture == "llama" and info.weights_digest == weights_digest(thaw_mlx.model_weights(model))


def test_capture_arguments_out_of_range(session):
    model, cache, tokens = session("llama-kv")
    with pytest.raises(ValueError, match="num_prompt_tokens 99"):
        thaw_mlx.capture(model, cache, tokens, num_prompt_tokens=99)
    with pytest.raises(ValueError, match="page_size must be positive"):
        thaw_mlx.capture(model, cache, tokens, page_size=0)


def test_max_tokens_below_one_is_refused(model_of):
    """max_tokens=0 or -1 gave an empty reply here and an error on vLLM and transformers: refused on every engine."""
    from thaw_format.sdk import greedy

    engine = thaw_mlx.MLXEngine(model_of("llama-kv"))
    for n in (0, -1):
        with pytest.raises(ValueError, match=f"thaw_mlx needs max_tokens of at least 1, got {n}"):
            engine.generate([5, 6, 7], greedy(n))
        with pytest.raises(ValueError, match=f"thaw_mlx needs max_tokens of at least 1, got {n}"):
            engine.submit([5, 6, 7], greedy(n))
    assert engine.sessions == [] and engine.running == {}


def test_params_that_are_not_sampling_params_are_refused_by_name(model_of):
    """generate(prompt, None) raised AttributeError (params.max_tokens), and differently on every engine."""
    engine = thaw_mlx.MLXEngine(model_of("llama-kv"))
    for params in (None, {"max_tokens": 2}):
        for call in (engine.generate, engine.submit):
            with pytest.raises(TypeError, match=f"params must be a thaw_format.SamplingParams .*, not "
                                                f"{type(params).__name__}"):
                call([5, 6, 7], params)
    assert engine.sessions == [] and engine.running == {}
