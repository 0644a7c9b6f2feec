"""Capture an mlx-lm session (model + prompt cache + tokens) into a Snapshot, and restore or fork it.

A session is one sequence: `tokens` are its ids so far, and the prompt cache holds the KV of the first
`offset` of them. thaw_mlx.generate keeps offset == len(tokens) - 1 (the last token is fed by the next step);
mlx-lm's generate_step runs one ahead and leaves offset == len(tokens). Both are captured as they stand.
"""

from __future__ import annotations

from itertools import chain
from typing import Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from thaw_format import (
    EngineInfo,
    IncompatibleSnapshotError,
    KVCache,
    Lineage,
    ModelInfo,
    Request,
    SamplingParams,
    SchedulerState,
    Snapshot,
    Weights,
    check_kv_layout,
)
from thaw_format.sdk import DEFAULT_PAGE_SIZE, lineage_now

from . import _internals
from .identity import check_snapshot_model, checked_info, model_dtype, model_weights
from .pages import (Paging, check_layer, check_whole, decode_layer, encode_layer, fill_checked, layer_dtype,
                    num_cached_tokens, scatter_targets)
from .prefix_tree import INSIDE_ID, REQUEST_ID, branch_request, engine_sequences, ends_inside, tree_of



def capture(
    model: nn.Module,
    prompt_cache: list,
    tokens: Sequence[int],
    *,
    num_prompt_tokens: Optional[int] = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    include_weights: bool = True,
    sampler=None,
    label: Optional[str] = None,
    parent: Optional[str] = None,
    info: Optional[ModelInfo] = None,
    finished: bool = False,
    paging: Optional[Paging] = None,
    others: Sequence[tuple[list, Sequence[int]]] = (),
) -> Snapshot:
    """Snapshot the session. The tensors share MLX's memory until the snapshot is written.

    `num_prompt_tokens` splits `tokens` into prompt and output (default: all prompt); `sampler`, a
    thaw_mlx.Sampler, records how the session samples and its PRNG key (default greedy); `parent` is the id of
    the snapshot this session was restored from; `info` is the model's identity, thaw_mlx.model_info(model),
    computed once: pass it to save digesting every weight again, and always for a model loaded from a
    checkpoint (model_info(model, checkpoint=...)), whose identity the model alone does not know (its dtype
    must be the model's: ValueError otherwise); `finished=True` records a session served to the end: engines that run requests (vLLM, SGLang) then take
    its KV as prefix cache instead of resuming it as a request in flight. `paging` makes the KV pages
    (default: gathered now); thaw_mlx.save defers them, to gather them straight into the file. `others` are
    more sessions of the model, (prompt cache, tokens) each, whose KV the snapshot holds too, as more branches of
    its prefix tree (the pages they share with a session before them written once): MLXEngine's capture of all
    its sessions. Their caches must be paged alike (KVCache, or QuantizedKVCache of the same bits): a ring or
    recurrent layer holds one sequence. thaw_mlx.restore reads the session; MLXEngine.restore every one.
    """
    for cache in [prompt_cache, *(cache for cache, _ in others)]:
        if len(cache) != len(model.layers):
            raise ValueError(f"the prompt cache has {len(cache)} layers, the model {len(model.layers)}")
    return snapshot_of_cache(
        prompt_cache,
        tokens,
        model=checked_info(model, info),
        weights=Weights(model_weights(model)) if include_weights else None,
        num_prompt_tokens=num_prompt_tokens,
        page_size=page_size,
        sampler=sampler,
        lineage=Lineage(parent=parent, label=label, created=lineage_now()),
        finished=finished,
        paging=paging,
        others=others,
    )


def snapshot_of_cache(
    prompt_cache: list,
    tokens: Sequence[int],
    *,
    model: Optional[ModelInfo],
    weights: Optional[Weights] = None,
    num_prompt_tokens: Optional[int] = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    sampler=None,
    lineage: Optional[Lineage] = None,
    finished: bool = False,
    paging: Optional[Paging] = None,
    others: Sequence[tuple[list, Sequence[int]]] = (),
) -> Snapshot:
    """The snapshot of a prompt cache whose model is described rather than at hand (capture, file import)."""
    tokens = [int(t) for t in tokens]
    caches = [prompt_cache, *(cache for cache, _ in others)]
    computed = [_computed(cache, seq) for cache, seq in [(prompt_cache, tokens), *others]]
    offset = len(computed[0])
    num_prompt_tokens = len(tokens) if num_prompt_tokens is None else num_prompt_tokens
    if not 0 <= num_prompt_tokens <= len(tokens):
        raise ValueError(f"num_prompt_tokens {num_prompt_tokens} is not within the {len(tokens)} tokens")
    if page_size < 1:
        raise ValueError(f"page_size must be positive, got {page_size}")
    sampling, rng_state = sampler.state() if sampler is not None else (SamplingParams(temperature=0.0), None)
    mx.eval([c.state for cache in caches for c in cache])

    tree, chains, firsts = tree_of(computed, page_size)
    # a run of pages per sequence: none for one whose pages are all an earlier one's
    held = [(cache, first) for cache, first, pages in zip(caches, firsts, chains) if first < len(pages)]
    layers = [encode_layer([cache[i] for cache, _ in held], [first for _, first in held], page_size, paging)
              for i in range(len(prompt_cache))]
    return Snapshot(
        model=model,
        weights=weights,
        kv=KVCache(page_size=page_size, dtype=layer_dtype(layers[0]), layers=layers),
        prefix=tree,
        scheduler=SchedulerState([
            Request(
                id=REQUEST_ID,
                status="finished" if finished else "running",
                prompt_token_ids=tokens[:num_prompt_tokens],
                output_token_ids=tokens[num_prompt_tokens:],
                sampling=sampling,
                num_computed_tokens=offset,
                pages=chains[0],
                rng_state=rng_state,
            ),
            *_inside_request(computed, chains, [tokens] + [seq for _, seq in others], finished),
        ]),
        engine=EngineInfo(
            name="mlx-lm",
            version=_internals.MLX_LM_VERSION,
            native_kv_layout="[batch, kv_heads, tokens, head_dim] per layer",
            extra={"mlx": mx.__version__, "cache_classes": [type(c).__name__ for c in prompt_cache]},
        ),
        lineage=lineage,
    )


def _inside_request(computed: list[list[int]], chains: list[list[int]], tokens: list, finished: bool) -> list:
    """The finished request (none or one) of the session ending inside the chain of the request in flight, the
    first sequence (prefix_tree.ends_inside): a restore makes a session of it, which the tree alone does not show."""
    inside = None if finished else ends_inside(chains)
    if inside is None:
        return []
    return [Request(id=INSIDE_ID, status="finished", prompt_token_ids=[int(t) for t in tokens[inside]],
                    output_token_ids=[], sampling=SamplingParams(temperature=0.0),
                    num_computed_tokens=len(computed[inside]), pages=chains[inside])]


def _computed(prompt_cache: list, tokens: Sequence[int]) -> list[int]:
    """The tokens whose KV the cache holds."""
    offset = num_cached_tokens(prompt_cache)
    if offset == 0:
        raise ValueError("the cache holds 0 tokens: an empty session has nothing to capture")
    if offset > len(tokens):
        raise ValueError(f"the cache holds {offset} tokens, but {len(tokens)} token ids were given")
    return [int(t) for t in tokens[:offset]]


def restore(
    model: nn.Module, snapshot: Snapshot, *, check_weights: bool = True, info: Optional[ModelInfo] = None
) -> list:
    """A new prompt cache holding the snapshot's KV, after checking that it belongs to this model.

    `info` is the model's identity as for capture (the one the snapshot was captured with: a checkpoint's, or
    the model's own); `check_weights=False` skips the weights digest.
    """
    return fork(model, snapshot, 1, check_weights=check_weights, info=info)[0]


def fork(
    model: nn.Module, snapshot: Snapshot, n: int, *, check_weights: bool = True, info: Optional[ModelInfo] = None
) -> list[list]:
    """n independent prompt caches from one snapshot. They share the restored buffers: MLX copies on write."""
    if n < 1:
        raise ValueError(f"fork needs n >= 1, got {n}")
    check_snapshot_model(model, snapshot, check_weights=check_weights, info=info)
    check_cache_layout(model, snapshot)
    parent = cache_of_snapshot(snapshot)
    return [parent] + [[_share(c) for c in parent] for _ in range(n - 1)]


def cache_of_snapshot(snapshot: Snapshot, expected: Optional[list[dict]] = None) -> list:
    """The snapshot's prompt cache, once check_snapshot_kv says MLX can hold it (which model it fits is restore's
    check). `expected`, per layer, maps paged roles to the CRCs their file bytes must have (thaw_mlx.load)."""
    return caches_of_checked(snapshot, [check_snapshot_kv(snapshot)], expected)[0]


def caches_of_checked(snapshot: Snapshot, requests: list[Request], expected: Optional[list[dict]] = None,
                      spare: Optional[Callable[[list[list[tuple]]], list[list]]] = None) -> list[list]:
    """A prompt cache for each of `requests` (their pages and computed tokens) of a snapshot whose KV
    check_sequences_kv passed: for MLXEngine, which makes every check before it gives up its arrays. `spare`,
    called once every check has passed (nothing is written over before), gives the arrays the paged tensors may
    be written over (pages.scatter_targets). With `expected` and several requests, each tensor is checked whole
    first, once, not once per cache that reads its pages."""
    kv = snapshot.kv
    if expected is not None and spare is not None:
        raise ValueError("caches_of_checked: spare arrays take only a source checked whole before, not `expected`")
    checked_first = expected is not None and len(requests) > 1
    if checked_first:
        check_whole(kv.layers, expected)
    each = expected if expected is not None and not checked_first else [None] * len(kv.layers)
    caches = []
    for request, targets in zip(requests, scatter_targets(kv.layers, [r.pages for r in requests], spare)):
        filled = fill_checked(kv.layers, request.pages, each, targets)
        caches.append([decode_layer(layer, request.pages, request.num_computed_tokens, checks, layer_targets, roles)
                       for layer, checks, layer_targets, roles in zip(kv.layers, each, targets, filled)])
    if checked_first:  # let go of a mapped file's pages, as a checked scatter does
        for check in (e for checks in expected for e in checks.values() if e.done is not None):
            check.done()
    mx.eval([c.state for cache in caches for c in cache])
    return caches


def check_snapshot_kv(snapshot: Snapshot) -> Request:
    """Refuse KV that MLX cannot hold as one session's cache (its pages, their chain, each layer's tensors),
    before anything is built; the session's request (session_request)."""
    return check_sequences_kv(snapshot, [session_request(snapshot)])[0]


def check_sequences_kv(snapshot: Snapshot, requests: list[Request]) -> list[Request]:
    """Refuse KV that MLX cannot hold as a cache for each of `requests` (their pages, their chains, each layer's
    tensors), before anything is built; the requests."""
    kv = snapshot.kv
    if kv is None:
        raise IncompatibleSnapshotError("the snapshot has no kv section")
    one_each = [layer.kind for layer in kv.layers if layer.kind in ("ring", "recurrent")]
    if len(requests) > 1 and one_each:
        raise IncompatibleSnapshotError(f"{len(requests)} sequences (the prefix tree's branches, a request in "
                                        f"flight), but a {one_each[0]} layer of MLX holds one sequence")
    listed = snapshot.scheduler.requests if snapshot.scheduler is not None else []
    for request in [*requests, *(r for r in listed if not any(r is q for q in requests))]:
        _check_chain(snapshot, request)  # a request not restored too: its pages must be its tokens'
    for request in requests:
        for i, layer in enumerate(kv.layers):
            check_layer(i, layer, request.pages, request.num_computed_tokens, kv.page_size)
            if layer_dtype(layer) != kv.dtype:
                raise IncompatibleSnapshotError(f"kv.layers[{i}] is {layer_dtype(layer)}, the KV cache {kv.dtype}")
    return requests


def _check_chain(snapshot: Snapshot, request: Request) -> None:
    if snapshot.prefix is not None and request.pages:
        if snapshot.prefix.chain(request.pages[-1]) != request.pages:
            raise IncompatibleSnapshotError(f"the session's pages {request.pages} are not one chain of the prefix tree")
        tokens = list(chain.from_iterable(map(snapshot.prefix.tokens.__getitem__, request.pages)))  # the chain's
        if tokens != (request.prompt_token_ids + request.output_token_ids)[: request.num_computed_tokens]:
            raise IncompatibleSnapshotError("the prefix tree's tokens are not the session's computed tokens")


def engine_requests(snapshot: Snapshot, pending: Optional[Request]) -> list[Request]:
    """The sequences MLXEngine restores, each a request naming its pages: `pending` (the request in flight it
    resumes, if any), then a session per branch of the prefix tree and per finished request naming its pages
    (prefix_tree.engine_sequences); a snapshot without a tree holds its one sequence (session_request)."""
    if snapshot.prefix is None or not snapshot.prefix.num_pages:
        return [session_request(snapshot)]
    listed = snapshot.scheduler.requests if snapshot.scheduler is not None else []
    return engine_sequences(snapshot.prefix, pending, [r for r in listed if r.status == "finished"])


def _share(cache):
    """The same cache with its own array objects over the same buffers: MLX's own writes copy a shared buffer,
    and so does a restore of MLXEngine (pages.moved_buffers) before it writes over one."""
    return type(cache).from_state(tree_map(lambda a: a[...] if isinstance(a, mx.array) else a, cache.state))


def check_cache_layout(model: nn.Module, snapshot: Snapshot) -> None:
    """Refuse KV of another shape than the model's: layers, heads, head size, and the dtype its parameters have
    (not a caller's identity's: that vouches for config and weights, and could name a dtype the model left)."""
    # Most mlx-lm ModelArgs name these as HF configs do; where one does not, that check is left to the tensors.
    args = model.args
    num_heads = getattr(args, "num_attention_heads", None)
    num_kv_heads = getattr(args, "num_key_value_heads", None) or num_heads
    head_dim = getattr(args, "head_dim", None) or (args.hidden_size // num_heads if num_heads else None)
    v_head_dim = head_dim
    if getattr(args, "qk_rope_head_dim", None):  # DeepSeek MLA: per-head K of nope + rope parts, its own V size
        num_kv_heads, head_dim, v_head_dim = num_heads, args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim
    check_kv_layout(snapshot, num_layers=len(model.layers), dtype=model_dtype(model))
    for i, layer in enumerate(snapshot.kv.layers):
        if layer.kind == "recurrent":  # states have model-specific shapes: the config digest vouches for them
            continue
        fields = (("num_kv_heads", layer.num_kv_heads, num_kv_heads), ("head_dim", layer.head_dim, head_dim),
                  ("params.v_head_dim", layer.params.get("v_head_dim", layer.head_dim), v_head_dim))
        for field, have, want in fields:
            if want is not None and have != want:
                raise IncompatibleSnapshotError(f"kv.layers[{i}].{field}: the snapshot has {have!r}, the engine has {want!r}")


def snapshot_num_computed(snapshot: Snapshot) -> int:
    """How many tokens the snapshot's KV holds."""
    return session_request(snapshot).num_computed_tokens


def snapshot_tokens(snapshot: Snapshot) -> list[int]:
    """The session's token ids: prompt then output."""
    request = session_request(snapshot)
    return request.prompt_token_ids + request.output_token_ids


def session_request(snapshot: Snapshot) -> Request:
    """The snapshot's one sequence: its one request, or its one request in flight beside finished ones (an MLX
    engine's capture lists a session that ends inside it), or, for a snapshot of an idle engine's prefix cache
    (no requests, as vLLM and SGLang write), the one chain of its prefix tree, every token of it computed. A
    tree of several branches is for MLXEngine.restore, which makes a session of each."""
    requests = snapshot.scheduler.requests if snapshot.scheduler is not None else []
    in_flight = [r for r in requests if r.status != "finished"]
    if len(requests) == 1:
        return requests[0]
    if len(in_flight) == 1:
        return in_flight[0]
    leaves = snapshot.prefix.leaves() if snapshot.prefix is not None and not requests else []
    if len(leaves) == 1:
        return branch_request(snapshot.prefix, leaves[0])
    raise IncompatibleSnapshotError(
        f"an MLX session is one sequence; the snapshot holds {len(requests)} requests"
        + (f" and a prefix tree of {len(leaves)} branches (MLXEngine.restore holds each as a session)"
           if not requests else "")
    )
