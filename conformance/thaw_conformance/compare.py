"""Comparisons of weights, KV and logprobs: byte comparisons (None when identical, else what differs first), and
the numeric closeness of two engines' KV of one text."""

from __future__ import annotations

import struct
from typing import Mapping, Optional

import numpy as np

from thaw_format import Snapshot, Tensor
from thaw_format.numpy import to_numpy
from thaw_format.snapshot import PAGED_KINDS


def weights_diff(expected: Mapping[str, Tensor], got: Mapping[str, Tensor]) -> Optional[str]:
    if set(expected) != set(got):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        return f"tensor names differ: missing {missing[:3]}, unexpected {extra[:3]}"
    for name in sorted(expected):
        diff = tensor_diff(expected[name], got[name])
        if diff:
            return f"{name}: {diff}"
    return None


def tensor_diff(expected: Tensor, got: Tensor) -> Optional[str]:
    if (expected.dtype, expected.shape) != (got.dtype, got.shape):
        return f"{expected.dtype}{list(expected.shape)} vs {got.dtype}{list(got.shape)}"
    if expected.data != got.data:
        first = next(i for i, (a, b) in enumerate(zip(expected.data, got.data)) if a != b)
        return f"bytes differ from byte {first} of {expected.nbytes}"
    return None


def pages_by_prefix(snapshot: Snapshot) -> dict[tuple, list[tuple[str, Tensor]]]:
    """Each KV page keyed by every token id from its root to its end, so that two snapshots can be compared
    whatever order their engines listed the pages in. The value: (layer.role, that page's bytes) pairs."""
    kv, tree = snapshot.kv, snapshot.prefix
    if kv is None or tree is None:
        return {}
    pages = {}
    for page in range(tree.num_pages):
        parts = []
        for i, layer in enumerate(kv.layers):
            for role in sorted(layer.tensors) if layer.kind in PAGED_KINDS else ():
                t = layer.tensors[role]
                stride = t.nbytes // t.shape[0]
                parts.append((f"{i}.{role}", Tensor(t.dtype, t.shape[1:], t.data[page * stride : (page + 1) * stride])))
        pages[tuple(tree.chain_tokens(page))] = parts
    return pages


def kv_diff(expected: Snapshot, got: Snapshot, *, full_pages_only: bool = False) -> Optional[str]:
    """Every page of `expected` must be in `got` with the same tokens, dtype, shape and bytes.

    `full_pages_only`: a partial last page `got` lacks is no difference (engines that cache whole blocks only,
    as vLLM does, leave those tokens to be computed again).
    """
    if expected.kv is None:
        return "the expected snapshot has no KV"
    if got.kv is None:
        return "the engine reports no KV"
    if (expected.kv.page_size, expected.kv.dtype) != (got.kv.page_size, got.kv.dtype):
        return f"page size/dtype {expected.kv.page_size}/{expected.kv.dtype} vs {got.kv.page_size}/{got.kv.dtype}"
    if len(expected.kv.layers) != len(got.kv.layers):
        return f"{len(expected.kv.layers)} KV layers vs {len(got.kv.layers)}"
    for i, (a, b) in enumerate(zip(expected.kv.layers, got.kv.layers)):
        if a.kind != b.kind or a.params != b.params:
            return f"layer {i}: {a.kind} {a.params} vs {b.kind} {b.params}"
        if a.kind not in PAGED_KINDS:  # per-sequence state (ring buffers, recurrent): compared whole
            diff = weights_diff(a.tensors, b.tensors)
            if diff:
                return f"layer {i} ({a.kind}): {diff}"
    want, have = pages_by_prefix(expected), pages_by_prefix(got)
    for prefix, parts in want.items():
        if prefix not in have and full_pages_only and len(prefix) % expected.kv.page_size:
            continue  # only a leaf page can be partial, so its chain's length is not a multiple of the page size
        if prefix not in have:
            return f"the page ending at token {len(prefix)} (of {len(want)} pages) is missing"
        for (role, a), (_, b) in zip(parts, have[prefix]):
            diff = tensor_diff(a, b)
            if diff:
                return f"page ending at token {len(prefix)}, layer.role {role}: {diff}"
    return None


def token_rows(snapshot: Snapshot) -> dict[tuple, list[np.ndarray]]:
    """The K/V of every token the snapshot's attention layers hold, keyed by the token ids up to and including
    it (so that two engines' snapshots of one text line up whatever their page order or last page's length).
    The value: one float64 row per (layer, role), in layer and role order."""
    kv, tree = snapshot.kv, snapshot.prefix
    if kv is None or tree is None:
        return {}
    rows: dict[tuple, list[np.ndarray]] = {}
    layers = [(layer, sorted(layer.tensors)) for layer in kv.layers if layer.kind in ("attention", "sliding_window")]
    arrays = [[to_numpy(layer.tensors[role]) for role in roles] for layer, roles in layers]
    for page in range(tree.num_pages):
        chain = tree.chain_tokens(page)
        start = len(chain) - len(tree.tokens[page])
        for r in range(len(tree.tokens[page])):
            key = tuple(chain[: start + r + 1])
            rows[key] = [a[page, r].astype(np.float64) for per_layer in arrays for a in per_layer]
    return rows


def kv_closeness(expected: Snapshot, got: Snapshot) -> tuple[int, float, float]:
    """(tokens compared, max |expected - got|, max |expected|) over the tokens both snapshots hold K/V for."""
    want, have = token_rows(expected), token_rows(got)
    shared = [key for key in want if key in have]
    diff = max((float(np.max(np.abs(a - b))) for key in shared for a, b in zip(want[key], have[key])), default=0.0)
    scale = max((float(np.max(np.abs(a))) for key in shared for a in want[key]), default=0.0)
    return len(shared), diff, scale


def float_bits(values: Optional[list[float]]) -> Optional[list[str]]:
    """Floats as the hex of their IEEE-754 double bits: JSON-safe and compared exactly."""
    return None if values is None else [struct.pack("<d", v).hex() for v in values]
