"""Waiting and running requests: their tokens, sampling settings, and the pages of their computed KV.

A running request's KV is not yet all in the radix tree (SGLang inserts decoded tokens when a request
finishes), so its committed tokens are captured as one more chain of pages, named in `Request.pages`.
"""

from __future__ import annotations

from dataclasses import dataclass

from thaw_format import PrefixTree, Request, SamplingParams, SchedulerState

from . import _internals
from .pages import RadixPath


def _sampling(params) -> SamplingParams:
    """SGLang's normalised settings (greedy reads temperature 1, top_k 1) in the format's terms."""
    top_k = int(params.top_k)
    return SamplingParams(
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        top_k=0 if top_k < 0 or top_k >= _internals.TOP_K_ALL else top_k,
        min_p=float(params.min_p),
        seed=params.sampling_seed,
        max_tokens=params.max_new_tokens,
        stop_token_ids=sorted(params.stop_token_ids or []),
        ignore_eos=bool(params.ignore_eos),
        repetition_penalty=float(params.repetition_penalty),
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
    )


@dataclass
class CapturedRequests:
    state: SchedulerState
    paths: list[RadixPath]  # one per request with committed KV, in `state.requests` order

    def assign_pages(self, tree: PrefixTree) -> None:
        """Name in each request the chain of pages holding its committed tokens."""
        leaf_of = {tuple(tree.chain_tokens(leaf)): leaf for leaf in tree.leaves()}
        with_kv = iter(self.paths)
        for request in self.state.requests:
            if request.num_computed_tokens:
                path = next(with_kv)
                request.pages = tree.chain(_page_ending(tree, leaf_of, path.tokens))


def _page_ending(tree: PrefixTree, leaf_of: dict, tokens: list[int]) -> int:
    """The page whose chain holds exactly `tokens` (a leaf, or an inner page when another path extends it)."""
    exact = leaf_of.get(tuple(tokens))
    if exact is not None:
        return exact
    for leaf in leaf_of.values():
        chain = tree.chain(leaf)
        length = 0
        for page in chain:
            length += len(tree.tokens[page])
            if length == len(tokens) and tree.chain_tokens(page) == tokens:
                return page
    raise AssertionError("a captured request's tokens do not end on a page boundary of the prefix tree")


def capture_requests(scheduler) -> CapturedRequests:
    requests, paths = [], []
    for live in _internals.live_requests(scheduler):
        computed = len(live.slots)
        requests.append(
            Request(
                id=live.rid,
                status=live.status,
                prompt_token_ids=live.prompt,
                output_token_ids=live.output,
                sampling=_sampling(live.sampling),
                num_computed_tokens=computed,
            )
        )
        if computed:
            paths.append(RadixPath((live.prompt + live.output)[:computed], live.slots))
    return CapturedRequests(SchedulerState(requests), paths)


def resume_arguments(request: Request) -> tuple[list[int], dict]:
    """The input ids and SGLang sampling settings that continue `request` where the snapshot left it.

    The tokens generated so far become part of the input, so the restored KV is a prefix-cache hit and only
    the last token is computed again. Frequency and presence penalties then count them as prompt tokens.
    """
    return request.prompt_token_ids + request.output_token_ids, sglang_params(request.sampling,
                                                                               len(request.output_token_ids))


def sglang_params(s: SamplingParams, produced: int = 0) -> dict:
    """SGLang's sampling_params for the format's settings, with `produced` tokens of max_tokens already made."""
    params = {
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k or -1,
        "min_p": s.min_p,
        "ignore_eos": s.ignore_eos,
        "repetition_penalty": s.repetition_penalty,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
    }
    if s.max_tokens is not None:
        params["max_new_tokens"] = s.max_tokens - produced
    if s.stop_token_ids:
        params["stop_token_ids"] = list(s.stop_token_ids)
    if s.seed is not None:
        params["sampling_seed"] = s.seed
    return params
