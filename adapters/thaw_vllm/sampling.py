"""vLLM SamplingParams <-> thaw's canonical SamplingParams."""

from __future__ import annotations

import thaw_format

_CANONICAL = ("temperature", "top_p", "min_p", "seed", "max_tokens", "ignore_eos", "repetition_penalty",
              "presence_penalty", "frequency_penalty", "logprobs")
_EXTRA = ("min_tokens", "n", "skip_special_tokens", "detokenize")


def to_thaw(params) -> thaw_format.SamplingParams:
    fields = {name: getattr(params, name) for name in _CANONICAL}
    return thaw_format.SamplingParams(
        **fields,
        top_k=max(int(params.top_k), 0),  # vLLM spells "off" as 0 or -1
        stop_token_ids=list(params.stop_token_ids or []),
        extra={name: getattr(params, name) for name in _EXTRA},
    )


def to_vllm(sampling: thaw_format.SamplingParams, *, max_tokens=None):
    """vLLM params for a request; `max_tokens` overrides (a resumed request has fewer left)."""
    from vllm import SamplingParams

    fields = {name: getattr(sampling, name) for name in _CANONICAL}
    fields["max_tokens"] = max_tokens if max_tokens is not None else sampling.max_tokens
    extra = {k: v for k, v in sampling.extra.items() if k in _EXTRA}
    return SamplingParams(**fields, top_k=sampling.top_k, stop_token_ids=list(sampling.stop_token_ids), **extra)
