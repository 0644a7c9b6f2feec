"""Sampled sessions resume exactly: the sampler's PRNG key travels in the snapshot (Request.rng_state)."""

import mlx.core as mx
import pytest

import thaw_format
import thaw_mlx
from resume_worker import run_in_new_process
from sessions import kv_digest, make_cache
from thaw_format import IncompatibleSnapshotError, SamplingParams, Tensor
from zoo import PROMPT

MORE_TOKENS = 16
PARAMS = {
    "temperature": SamplingParams(temperature=1.0, seed=3),
    "top_k": SamplingParams(temperature=0.8, top_k=20, seed=4),
    "top_p_min_p": SamplingParams(temperature=1.2, top_p=0.9, min_p=0.05, seed=5),
}


def sampled_session(model, params):
    sampler = thaw_mlx.Sampler(params)
    cache = make_cache(model, "kv")
    tokens = PROMPT + list(thaw_mlx.generate(model, cache, PROMPT, 8, sampler=sampler))
    return cache, tokens, sampler


@pytest.fixture(scope="module")
def resumed(model_of, tmp_path_factory):
    """params name -> (parent's continuation, greedy continuation, child's); the children share one new process."""
    model = model_of("llama-kv")
    jobs, parents = [], {}
    for name, params in PARAMS.items():
        cache, tokens, sampler = sampled_session(model, params)
        path = tmp_path_factory.mktemp(name) / "session.thaw"
        thaw_format.save(thaw_mlx.capture(model, cache, tokens, sampler=sampler), path)
        greedy = list(thaw_mlx.generate(model, thaw_mlx.restore(model, thaw_format.load(path)), tokens, MORE_TOKENS))
        out = list(thaw_mlx.generate(model, cache, tokens, MORE_TOKENS, sampler=sampler))
        parents[name] = ({"tokens": out, "kv_digest": kv_digest(model, cache, tokens + out)}, greedy)
        jobs.append({"snapshot": str(path), "suffix": [], "max_tokens": MORE_TOKENS})
    return {name: (*parents[name], child) for name, child in zip(PARAMS, run_in_new_process(jobs))}


@pytest.mark.parametrize("name", list(PARAMS))
def test_sampled_session_resumes_exactly_in_a_new_process(name, resumed):
    parent, greedy, child = resumed[name]
    assert parent["tokens"] != greedy  # sampling really happened
    assert child == parent


def test_another_key_gives_another_continuation(model_of):
    model = model_of("llama-kv")
    cache, tokens, sampler = sampled_session(model, PARAMS["temperature"])
    snapshot = thaw_mlx.capture(model, cache, tokens, sampler=sampler)
    same = thaw_mlx.sampler_of(snapshot)
    other = thaw_mlx.Sampler(snapshot.scheduler.requests[0].sampling, mx.random.key(99))
    runs = [list(thaw_mlx.generate(model, thaw_mlx.restore(model, snapshot), tokens, MORE_TOKENS, sampler=s))
            for s in (same, other)]
    assert runs[0] == list(thaw_mlx.generate(model, cache, tokens, MORE_TOKENS, sampler=sampler)) != runs[1]


def test_what_the_sampler_cannot_do_is_refused(model_of):
    with pytest.raises(ValueError, match="repetition_penalty"):
        thaw_mlx.Sampler(SamplingParams(temperature=1.0, repetition_penalty=1.1))
    model = model_of("llama-kv")
    cache, tokens, sampler = sampled_session(model, PARAMS["temperature"])
    snapshot = thaw_mlx.capture(model, cache, tokens, sampler=sampler)
    snapshot.scheduler.requests[0].rng_state = Tensor("uint8", (4,), bytes(4))
    with pytest.raises(IncompatibleSnapshotError, match="8 bytes"):
        thaw_mlx.sampler_of(snapshot)


def test_every_seed_the_format_holds_seeds_a_sampler(model_of):
    """The format's seeds are any 64-bit integer, signed or not (spec section 5); MLX's key takes a uint64, and a
    negative seed (-1 is common) raised MLX's "key(): incompatible function arguments". A negative seed is its 64
    bits."""
    assert mx.array_equal(thaw_mlx.Sampler(SamplingParams(temperature=1.0, seed=-1)).key,
                          thaw_mlx.Sampler(SamplingParams(temperature=1.0, seed=2**64 - 1)).key)
    assert not mx.array_equal(thaw_mlx.Sampler(SamplingParams(temperature=1.0, seed=-2**63)).key,
                              thaw_mlx.Sampler(SamplingParams(temperature=1.0, seed=0)).key)
    engine = thaw_mlx.MLXEngine(model_of("llama-kv"))

    def sampled(seed):
        return engine.generate([5, 6, 7], SamplingParams(temperature=1.0, seed=seed, max_tokens=3,
                                                         ignore_eos=True)).token_ids

    assert len(sampled(-7)) == 3 and sampled(-7) == sampled(2**64 - 7)
    for seed in (2**64, -2**63 - 1):
        with pytest.raises(ValueError, match=rf"seed {seed} does not fit 64 bits"):
            thaw_mlx.Sampler(SamplingParams(temperature=1.0, seed=seed))
