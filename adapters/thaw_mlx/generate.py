"""Generate from a session exactly where it stands, never running ahead of what it has yielded."""

from __future__ import annotations

import operator
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from . import _internals
from .pages import num_cached_tokens

PREFILL_STEP = 2048  # mlx-lm generate_step's default prefill chunk: the same chunks give the same bytes


def token_ids(model: nn.Module, tokens: Sequence[int]) -> list[int]:
    """`tokens` as ints, each one an id the model embeds: MLX's embedding does not check its indices, so an id past
    the vocabulary read another row or memory past the table (a segmentation fault, measured at 2**40), and -1
    the last row, silently. A float or a string is refused too, where int() would truncate 3.7 to 3."""
    ids = [t if type(t) is int else _token_id(t) for t in tokens]
    vocab = _internals.vocab_size(model)
    bad = next((t for t in ids if t < 0 or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the model's vocabulary of {vocab} ids [0, {vocab})"
                         if vocab is not None else f"token id {bad} is negative")
    return ids


def _token_id(t) -> int:
    """An integer of another type (numpy's, a 0-d mx.array) as an int; a bool is refused, though it is an index
    (True is 1): it is a mistake, never a token."""
    if not isinstance(t, bool):
        try:
            return operator.index(t)
        except TypeError:
            pass
    raise TypeError(f"token ids must be integers, got {t!r} ({type(t).__name__})")


def greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def generate(
    model: nn.Module,
    prompt_cache: list,
    tokens: Sequence[int],
    max_tokens: int,
    *,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    prefill_step: int = PREFILL_STEP,
) -> Iterator[int]:
    """Yield up to max_tokens token ids continuing `tokens` (the whole sequence so far), updating the cache.

    What the cache lacks is fed as mlx-lm's generate_step feeds a prompt (all but the last token in prefill
    chunks, then the last token alone), so the tokens are those an uninterrupted generate_step gives. After each
    yielded token the cache holds every token but that one, so the session can be captured at any point.
    """
    sampler = sampler or greedy
    if len(tokens) == 0:  # not `not tokens`: a numpy or mx array of tokens has no truth value
        raise ValueError("generate needs at least one token to continue from")
    offset = num_cached_tokens(prompt_cache)
    # mlx-lm's generate_step runs one ahead: a cache holding the last token drops it, to compute it again identically.
    full = offset == len(tokens)
    if full and not can_trim_prompt_cache(prompt_cache):
        raise ValueError(
            "the cache already holds the last token and cannot drop it (a rotating cache past its window, or "
            "a recurrent state); "
            "sessions that are to be resumed should be advanced with thaw_mlx.generate"
        )
    start = offset - 1 if full else offset
    if not 0 <= start < len(tokens):
        raise ValueError(f"the cache holds {offset} tokens, but the session has {len(tokens)}")
    pending = token_ids(model, tokens[start:])  # before the trim: a refused id leaves the cache as it was
    if full:
        trim_prompt_cache(prompt_cache, 1)
    while len(pending) > 1:
        chunk = pending[: min(prefill_step, len(pending) - 1)]
        model(mx.array(chunk)[None], cache=prompt_cache)
        mx.eval([c.state for c in prompt_cache])
        pending = pending[len(chunk):]
    last = pending[0]
    for _ in range(max_tokens):
        logits = model(mx.array([[last]]), cache=prompt_cache)[:, -1, :]
        token = sampler(logits - mx.logsumexp(logits, keepdims=True))
        mx.eval(token, [c.state for c in prompt_cache])
        last = token.item()
        yield last
