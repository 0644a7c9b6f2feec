"""Requests: one sequence being generated, how it samples, and its record in a snapshot (spec 5.5).

Sampling runs on the CPU with a torch.Generator of its own per request, so a seeded request draws the same
numbers on any device, and its generator state travels in the snapshot (`rng_state`) to continue exactly.
Every sampled token's log-probability is that of the model's own distribution (log-softmax of the logits,
before temperature and truncation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from thaw_format import IncompatibleSnapshotError, Request, SamplingParams, Snapshot
from thaw_format.sdk import Unsupported, pending_requests
from thaw_format.torch import from_torch, to_torch

# Canonical sampling fields this engine does not apply, with the value that means "off".
NOT_APPLIED = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
RNG_STATE_BYTES = torch.Generator().get_state().numel()  # a CPU (Mersenne Twister) generator's state


def sampling_problem(params: SamplingParams) -> Optional[str]:
    """Why this engine cannot sample as `params` asks, or None."""
    used = [f"{name}={getattr(params, name)}" for name, off in NOT_APPLIED.items() if getattr(params, name) != off]
    if params.extra:
        used.append(f"extra={sorted(params.extra)}")
    if params.max_tokens is not None and params.max_tokens < 1:  # done() waits for a first token: it gave one
        used.append(f"max_tokens={params.max_tokens} (at least 1)")
    if params.temperature < 0 or not 0 < params.top_p <= 1 or params.top_k < 0 or not 0 <= params.min_p <= 1:
        used.append(f"temperature={params.temperature} top_p={params.top_p} top_k={params.top_k} "
                    f"min_p={params.min_p} (out of range)")
    return f"thaw_transformers does not sample with {', '.join(used)}" if used else None


class Sampler:
    """Picks each next token as `params` says: greedy at temperature 0, else from the truncated distribution."""

    def __init__(self, params: SamplingParams, rng_state: Optional[torch.Tensor] = None) -> None:
        problem = sampling_problem(params)
        if problem:
            raise Unsupported(problem)
        self.params = params
        self.generator = torch.Generator()
        if rng_state is not None:
            self.generator.set_state(rng_state)
        elif params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> tuple[int, float]:
        """(token, its log-probability) from the last position's logits [vocab]."""
        logits = logits.float().cpu()
        logprobs = torch.log_softmax(logits, dim=-1)
        p = self.params
        if p.temperature == 0:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / p.temperature, dim=-1)
            if p.top_k > 0:
                probs[probs < torch.topk(probs, min(p.top_k, probs.numel())).values[-1]] = 0
            if p.top_p < 1:
                ordered, order = torch.sort(probs, descending=True)
                outside = torch.cumsum(ordered, 0) - ordered >= p.top_p * ordered.sum()
                probs[order[outside]] = 0
            if p.min_p > 0:
                probs[probs < p.min_p * probs.max()] = 0
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        return token, float(logprobs[token])


@dataclass
class Running:
    """A request in flight: its cache holds the KV of every token but those in `pending` (fed next step)."""

    id: str
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    cache: object  # the request's transformers DynamicCache
    pending: list[int]
    cached_tokens: int  # tokens of its input (prompt, and output before a restore) taken from the prefix cache
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_computed(self) -> int:
        return len(self.tokens) - len(self.pending)

    def done(self, eos: set, max_tokens: int) -> bool:
        if not self.output:
            return False
        last, p = self.output[-1], self.params
        return len(self.output) >= (p.max_tokens if p.max_tokens is not None else max_tokens) or \
            last in p.stop_token_ids or (not p.ignore_eos and last in eos)

    def record(self, pages: list[int]) -> Request:
        """The request as a snapshot holds it: pages are those of its computed tokens, in chain order."""
        seeded = self.params.temperature != 0
        return Request(id=self.id, status="running", prompt_token_ids=list(self.prompt),
                       output_token_ids=list(self.output), sampling=self.params, num_computed_tokens=self.num_computed,
                       pages=pages, rng_state=from_torch(self.sampler.generator.get_state()) if seeded else None)


def resume_state(request: Request) -> Optional[torch.Tensor]:
    """The generator state a resumed request continues with (None: start from its seed; greedy draws nothing)."""
    if request.rng_state is None or request.sampling.temperature == 0:
        return None
    return to_torch(request.rng_state).clone()


def check_pending(snapshot: Snapshot, engine_name: str) -> None:
    """Refuse requests this engine cannot continue exactly (each error names the request and why)."""
    foreign = snapshot.engine is None or snapshot.engine.name != engine_name
    for r in pending_requests(snapshot):
        where = f"scheduler request {r.id!r}"
        problem = sampling_problem(r.sampling)
        if problem:
            raise IncompatibleSnapshotError(f"{where}: {problem}")
        tokens = r.prompt_token_ids + r.output_token_ids
        if not r.prompt_token_ids or not 0 <= r.num_computed_tokens <= len(tokens):
            raise IncompatibleSnapshotError(f"{where}: {r.num_computed_tokens} computed tokens of {len(tokens)}")
        if r.sampling.temperature != 0 and r.output_token_ids:
            if r.rng_state is None or foreign:
                held = "no generator state" if r.rng_state is None else \
                    f"the generator state of {snapshot.engine.name if snapshot.engine else 'an unnamed engine'}"
                raise IncompatibleSnapshotError(
                    f"{where}: it samples and {len(r.output_token_ids)} tokens are out, but the snapshot holds {held}, "
                    "so thaw_transformers cannot draw what comes next exactly")
            if r.rng_state.dtype != "uint8" or r.rng_state.shape != (RNG_STATE_BYTES,):
                raise IncompatibleSnapshotError(f"{where}: rng_state is {r.rng_state.dtype}{list(r.rng_state.shape)}, "
                                                f"a torch CPU generator state is uint8[{RNG_STATE_BYTES}]")
        if r.pages and snapshot.prefix is not None:
            tree = snapshot.prefix
            if any(not 0 <= p < tree.num_pages for p in r.pages) or tree.chain(r.pages[-1]) != r.pages or \
                    tree.chain_tokens(r.pages[-1])[: r.num_computed_tokens] != tokens[: r.num_computed_tokens]:
                raise IncompatibleSnapshotError(f"{where}: its pages {r.pages} do not hold its computed tokens")
