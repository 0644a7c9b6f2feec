"""Token ids the model does not embed are refused by name before MLX sees them: MLX's embedding does not check its
indices, so -1 read the last row (the reply of another prompt), the vocabulary's size read past the table and
2**40 ended the process with a segmentation fault. Floats and strings are refused rather than truncated."""

import importlib

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

import thaw_mlx
from thaw_format import IncompatibleSnapshotError
from thaw_format.sdk import greedy

VOCAB = 256  # zoo.CONFIGS' vocab_size


@pytest.fixture
def engine(model_of):
    return thaw_mlx.MLXEngine(model_of("llama-kv"))


@pytest.mark.parametrize("bad", [-1, VOCAB, 2**40])
def test_an_id_outside_the_vocabulary_is_refused_before_anything_is_computed(engine, bad):
    match = rf"token id {bad} is outside the model's vocabulary of {VOCAB} ids \[0, {VOCAB}\)"
    with pytest.raises(ValueError, match=match):
        engine.generate([5, 6, bad], greedy(2))
    with pytest.raises(ValueError, match=match):
        engine.submit([5, bad, 6], greedy(2))
    assert engine.sessions == [] and engine.running == {}
    assert engine.generate([5, 6, VOCAB - 1], greedy(2)).token_ids  # the last id is one


@pytest.mark.parametrize("bad", [3.7, "7", 2.0, True])
def test_an_id_that_is_no_integer_is_refused_not_truncated(engine, bad):
    with pytest.raises(TypeError, match=rf"token ids must be integers, got {bad!r}"):
        engine.generate([5, bad], greedy(2))
    assert engine.sessions == []


def test_integer_types_of_numpy_and_mlx_are_token_ids(engine):
    import numpy as np

    plain = engine.generate([5, 6, 7], greedy(3)).token_ids
    assert engine.generate([np.int64(5), mx.array(6), np.int32(7)], greedy(3)).token_ids == plain


def test_the_functional_generate_refuses_them_with_the_cache_untouched(model_of):
    model = model_of("llama-kv")
    cache = make_prompt_cache(model)
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside"):
        list(thaw_mlx.generate(model, cache, [5, VOCAB], 3))
    with pytest.raises(ValueError, match="at least one token"):  # was "the cache holds -1 tokens"
        list(thaw_mlx.generate(model, cache, [], 3))
    assert thaw_mlx.num_cached_tokens(cache) == 0
    assert len(list(thaw_mlx.generate(model, cache, [5, 6], 3))) == 3


def test_a_refused_id_leaves_a_cache_holding_every_token_as_it_was(model_of):
    """A cache holding every token drops the last one to compute it again (as mlx-lm's generate_step does): it
    dropped it before the pending tokens were checked, so a refused id left the cache a token short."""
    model = model_of("llama-kv")
    cache = make_prompt_cache(model)
    model(mx.array([[5, 6]]), cache=cache)
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside"):
        list(thaw_mlx.generate(model, cache, [5, VOCAB], 3))
    assert thaw_mlx.num_cached_tokens(cache) == 2


def test_arrays_of_token_ids_are_continued(model_of):
    """`if not tokens` raised "The truth value of an array with more than one element is ambiguous" for a numpy
    array of tokens, and refused np.array([0]) as empty."""
    import numpy as np

    model = model_of("llama-kv")

    def continued(tokens):
        return list(thaw_mlx.generate(model, make_prompt_cache(model), tokens, 3))

    assert continued(np.array([5, 6])) == continued(mx.array([5, 6])) == continued([5, 6])
    assert continued(np.array([0])) == continued([0])


def test_a_snapshot_whose_request_in_flight_holds_such_an_id_is_refused_before_the_engine_changes(engine, model_of):
    """Its tokens not yet computed go to the model on its next step: the restore took it, and that step raised
    (a segmentation fault before ids were checked) and every later step raised StopIteration."""
    engine.submit([5, 6, 7, 8, 9], greedy(8))
    for _ in range(3):
        engine.step()
    snapshot = engine.capture(include_weights=False)
    snapshot.scheduler.requests[0].output_token_ids[-1] = 2**40  # the last output token: not in the KV
    target = thaw_mlx.MLXEngine(model_of("llama-kv"))
    target.generate([5, 6, 7], greedy(2))
    with pytest.raises(IncompatibleSnapshotError, match=rf"request 'mlx-0': token id {2**40} is outside"):
        target.restore(snapshot)
    assert target.running == {} and [s.tokens[:3] for s in target.sessions] == [[5, 6, 7]]


@pytest.mark.parametrize("arch, args", [
    # keeps its arguments as model.config, not model.args: every id raised AttributeError 'args'
    ("youtu_llm", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
                       qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16)),
    # names its vocabulary num_vocab: ids past the table were not refused
    ("phixtral", dict(model_type="phixtral", num_vocab=VOCAB, model_dim=64, num_heads=4, num_layers=1,
                      rotary_dim=8)),
])
def test_a_model_s_vocabulary_is_found_under_each_name_mlx_lm_gives_it(arch, args):
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    model = module.Model(module.ModelArgs(**args))
    with pytest.raises(ValueError, match=rf"token id {VOCAB} is outside the model's vocabulary of {VOCAB} ids"):
        list(thaw_mlx.generate(model, make_prompt_cache(model), [5, VOCAB], 1))
    assert len(list(thaw_mlx.generate(model, make_prompt_cache(model), [5, VOCAB - 1], 1))) == 1
