"""Generate from a session exactly where it stands, never running ahead of what it has yielded."""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from .pages import num_cached_tokens

PREFILL_STEP = 2048  # mlx-lm generate_step's default prefill chunk: the same chunks give the same bytes


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
    offset = num_cached_tokens(prompt_cache)
    if offset == len(tokens):
        # mlx-lm's generate_step runs one ahead: drop the last token's KV and compute it again, identically.
        if not can_trim_prompt_cache(prompt_cache):
            raise ValueError(
                "the cache already holds the last token and cannot drop it (a rotating cache past its window, or "
                "a recurrent state); "
                "sessions that are to be resumed should be advanced with thaw_mlx.generate"
            )
        trim_prompt_cache(prompt_cache, 1)
        offset -= 1
    if not 0 <= offset < len(tokens):
        raise ValueError(f"the cache holds {offset} tokens, but the session has {len(tokens)}")
    pending = [int(t) for t in tokens[offset:]]
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
