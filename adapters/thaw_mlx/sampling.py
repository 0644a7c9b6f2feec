"""A sampler whose randomness can be captured: SamplingParams plus its own PRNG key.

mlx-lm's samplers draw from MLX's global PRNG, whose state cannot be read or set, so a sampled session could not
resume exactly. This one draws with an explicit key, split once per sampled token; the key travels in the
snapshot (Request.rng_state) and the same filters as mlx-lm's make_sampler apply, in the same order.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from thaw_format import IncompatibleSnapshotError, Request, SamplingParams, Snapshot
from thaw_format.mlx import from_mlx, to_mlx

from .session import session_request


class Sampler:
    """Call with log-probabilities [1, vocab] to get the next token; `key` is the PRNG state for the next draw."""

    def __init__(self, params: SamplingParams, key: Optional[mx.array] = None) -> None:
        unsupported = [name for name, off in (("repetition_penalty", 1.0), ("presence_penalty", 0.0),
                                              ("frequency_penalty", 0.0)) if getattr(params, name) != off]
        if unsupported:
            raise ValueError(f"thaw_mlx.Sampler does not apply {', '.join(unsupported)}")
        self.params = params
        self.key = key if key is not None else mx.random.key(_seed_bits(params.seed or 0))

    def __call__(self, logprobs: mx.array) -> mx.array:
        p = self.params
        if p.temperature == 0:
            return mx.argmax(logprobs, axis=-1)
        if 0 < p.top_p < 1:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p != 0:
            logprobs = apply_min_p(logprobs, p.min_p)
        if p.top_k > 0:
            logprobs = apply_top_k(logprobs, p.top_k)
        self.key, draw = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1 / p.temperature), key=draw)

    def state(self):
        """(SamplingParams, the key's bytes as uint8, the format's opaque RNG state): what a snapshot records."""
        return self.params, from_mlx(self.key.view(mx.uint8))


def _seed_bits(seed: int) -> int:
    """A seed as the uint64 MLX's key takes: the format's seeds are any 64-bit integer, signed or not (spec
    section 5's `int`), so a negative one is its two's-complement bits (-1 is 2**64 - 1)."""
    if not -(1 << 63) <= seed < 1 << 64:
        raise ValueError(f"seed {seed} does not fit 64 bits: a seed is in [-2**63, 2**64 - 1]")
    return seed % (1 << 64)


def sampler_of(snapshot: Snapshot) -> Sampler:
    """The captured session's sampler, continuing from the key it stood at (greedy if none was recorded)."""
    return request_sampler(session_request(snapshot))


def request_sampler(request: Request) -> Sampler:
    """A snapshot's request's sampler, continuing from the key it stood at (greedy if none was recorded)."""
    if request.rng_state is None:
        return Sampler(request.sampling)
    state = request.rng_state
    if state.dtype != "uint8" or state.shape != (8,):
        raise IncompatibleSnapshotError(f"rng_state is {state.dtype}{list(state.shape)}; an MLX key is 8 bytes")
    return Sampler(request.sampling, to_mlx(state).view(mx.uint32))
