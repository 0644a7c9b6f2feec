"""One request's state after an engine step: what streaming and response metadata read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Progress:
    token_ids: list[int]  # every output token so far
    cached_tokens: int  # prompt tokens the engine served from its cache, by its own count
    finished: bool
