"""fork(llm, n): thaw_vllm's fork call over the contract's engine-agnostic fork (thaw_format.sdk.fork).

In-process children share the parent engine (its weights and its cached KV pages); each child's prompt is
the context plus its own suffix, served from the prefix cache. Process children are equal engines started by
thaw_format.sdk.child from the parent's launch arguments (thaw_vllm.engine_args records them), each restoring
the KV of the context. A child takes suffixes and vLLM SamplingParams, as before the contract existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from thaw_format.sdk import fork as contract_fork
from thaw_format.sdk.fork import generate_all as sdk_generate_all

from . import sampling


@dataclass
class Completion:
    token_ids: list[int]
    num_cached_tokens: int


class Child:
    """One fork. `generate(suffix, params)` continues the context with `suffix` appended."""

    def __init__(self, context: list[int], child) -> None:
        self.context, self._child = context, child

    def generate(self, suffix: Sequence[int], params) -> Completion:
        done = self._child.generate(self.context + [int(t) for t in suffix], sampling.to_thaw(params))
        return Completion(done.token_ids, done.cached_tokens)

    def close(self) -> None:
        self._child.close()


def generate_all(children: Sequence[Child], suffixes: Sequence[Sequence[int]], params) -> list[Completion]:
    """Every child continues with its suffix, in order; children in other processes run side by side."""
    if len(suffixes) != len(children):  # zip would drop the extra children or suffixes without a word
        raise ValueError(f"{len(children)} children and {len(suffixes)} suffixes: give each child one suffix")
    prompts = [child.context + [int(t) for t in suffix] for child, suffix in zip(children, suffixes)]
    done = sdk_generate_all([child._child for child in children], prompts, sampling.to_thaw(params))
    return [Completion(d.token_ids, d.cached_tokens) for d in done]


def fork(llm, n: int, *, context: Optional[Sequence[int]] = None, processes: bool = False) -> list[Child]:
    """n children continuing `context` (default: the prompt of a thaw_vllm.LLM's last single-prompt generate)."""
    from .engine import VLLMEngine

    context = context if context is not None else getattr(llm, "thaw_context", None)
    if context is None:
        raise ValueError("fork needs the context to continue: pass context=token ids")
    context = [int(t) for t in context]
    return [Child(context, child) for child in contract_fork(VLLMEngine(llm), n, context=context, processes=processes)]
