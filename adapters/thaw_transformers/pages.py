"""The engine's prefix cache: token-id pages of KV, and their exchange with a snapshot's token-major pages.

A transformers cache layer holds one sequence as [1, kv_heads, tokens, head_dim]. The prefix cache keeps the
same values cut into pages of `page_size` tokens, keyed by their parent page and their token ids, so that a
prompt extending a cached prefix reuses that KV instead of computing it again. Only a page that no other page
continues may hold fewer than `page_size` tokens (spec 5.4). A page's KV is one row of a block: per layer,
[pages, page_size, kv_heads, head_dim] keys and values shared by the pages added together, the snapshot's own
layout, so that its exchange with a snapshot and a hit's gathering cost a few torch calls per layer, not per page.

In a snapshot every page becomes row p of [num_pages, page_size, ...] tensors per layer (spec 5.3):
    "attention": k [pages, page_size, kv_heads, head_dim], v the same with V's head size;
    "mla":       latent [pages, page_size, latent_dim]: DeepSeek's compressed KV then its rope key, which is what
                 transformers caches for multi-head latent attention (as keys and values of one head).
A sliding-window layer is written as "attention": its pages hold every token's KV, not only the window's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from thaw_format import IncompatibleSnapshotError, KVCache, KVLayer, PrefixTree, Snapshot
from thaw_format.sdk.tokens import common_prefix_length
from thaw_format.torch import from_torch, to_torch

from .transfer import to_device, to_host


@dataclass(frozen=True)
class LayerLayout:
    """What one layer's cache holds per token: keys [heads, head_dim] and values [heads, v_head_dim]."""

    kind: str  # "attention" or "mla"
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    window: Optional[int] = None  # the sliding window, for a layer that attends to one

    def descriptor(self, tensors: dict) -> KVLayer:
        if self.kind == "mla":  # the latent is the compressed KV, then the rope key
            return KVLayer("mla", tensors, params={"latent_dim": self.head_dim + self.v_head_dim,
                                                   "rope_dim": self.v_head_dim})
        params = {} if self.v_head_dim == self.head_dim else {"v_head_dim": self.v_head_dim}
        return KVLayer("attention", tensors, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, params=params)


@dataclass(frozen=True, eq=False)
class Page:
    parent: int  # index of the page this one continues, -1 for a root
    tokens: tuple
    block: tuple  # per layer (keys, values) [pages, page_size, heads, d]: the pages added with this one
    row: int  # this page's row of the block; past len(tokens) it is zero


class PrefixCache:
    """A forest of pages found by token ids. Pages are never changed, only added or replaced, so that a copy
    (a fork child's cache, a capture's scratch table) shares them without sharing the table.

    The pages one insert adds (a request's new pages) share a block, as do a restored snapshot's. A block lives
    while any of its pages does: a partial page replaced by a longer one leaves its row behind."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.pages: list[Page] = []
        self.children: dict[int, list[int]] = {}

    def copy(self) -> "PrefixCache":
        other = PrefixCache(self.page_size)
        other.pages, other.children = list(self.pages), {k: list(v) for k, v in self.children.items()}
        return other

    def match(self, tokens: Sequence[int], limit: int) -> tuple[list[int], int]:
        """(pages, n): the chain of pages holding the KV of the longest cached prefix of `tokens`, at most
        `limit` tokens long; the last page may be used for its first tokens only."""
        chain, parent, n = [], -1, 0
        while n < limit:
            best, best_len = None, 0
            for child in self.children.get(parent, ()):
                common = common_prefix_length(self.pages[child].tokens, tokens[n : n + self.page_size])
                if common > best_len:
                    best, best_len = child, common
            if best is None:
                break
            chain.append(best)
            n += min(best_len, limit - n)
            if best_len < self.page_size:
                break
            parent = best
        return chain, n

    def insert(self, tokens: Sequence[int], kv: Sequence[tuple]) -> list[int]:
        """Page the KV of `tokens` (per layer (keys, values) [len(tokens), heads, d]); pages already held are kept.
        Returns the chain of pages now holding them."""
        chain, parent, start, size = [], -1, 0, self.page_size
        while start < len(tokens):  # the pages held already; once one is not, none after it is (it has no children)
            piece = tuple(tokens[start : start + size])
            held = next((c for c in self.children.get(parent, ()) if self.pages[c].tokens[: len(piece)] == piece), None)
            if held is None:
                break
            chain.append(held)
            parent, start = held, start + size
        if start >= len(tokens):
            return chain
        block = tuple((_paged(k[start : len(tokens)], size), _paged(v[start : len(tokens)], size)) for k, v in kv)
        for row, first in enumerate(range(start, len(tokens), size)):
            piece = tuple(tokens[first : first + size])
            siblings = self.children.setdefault(parent, [])
            page = Page(parent, piece, block, row)
            # a partial page this one extends is replaced: only a leaf may be partial, and it is one
            shorter = next((c for c in siblings if piece[: len(self.pages[c].tokens)] == self.pages[c].tokens), None)
            if shorter is None:
                shorter = len(self.pages)
                self.pages.append(page)
                siblings.append(shorter)
            else:
                self.pages[shorter] = page
            chain.append(shorter)
            parent = shorter
        return chain

    def gather(self, chain: list[int], num_tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first num_tokens tokens of a chain, layer after layer: (keys, values) [1, heads, tokens, d]. Where
        the chain is consecutive rows of one block (a restored snapshot's, one prefill's) they are views of it, to
        be copied, not written (_internals.fill); otherwise new tensors, made as each layer is asked for so that
        one layer's are let go before the next one's are made."""
        runs = _runs(self.pages[p] for p in chain)
        for layer in range(len(runs[0][0])):
            keys, values = ([block[layer][role][a:b].flatten(0, 1) for block, a, b in runs] for role in (0, 1))
            keys, values = (torch.cat(t) if len(t) > 1 else t[0] for t in (keys, values))
            yield keys[:num_tokens].transpose(0, 1).unsqueeze(0), values[:num_tokens].transpose(0, 1).unsqueeze(0)

    def subset(self, keep: set) -> tuple["PrefixCache", dict]:
        """The pages in `keep` (closed under parents), renumbered in order: (the cache, old index -> new)."""
        other, new = PrefixCache(self.page_size), {}
        for old in sorted(keep):
            page = self.pages[old]
            new[old] = len(other.pages)
            parent = new[page.parent] if page.parent != -1 else -1
            other.pages.append(Page(parent, page.tokens, page.block, page.row))
            other.children.setdefault(parent, []).append(new[old])
        return other, new

    def chain_of(self, page: int) -> list[int]:
        chain = []
        while page != -1:
            chain.append(page)
            page = self.pages[page].parent
        return chain[::-1]


def _paged(t: torch.Tensor, page_size: int) -> torch.Tensor:
    """A new [pages, page_size, ...] tensor of the token-major t, the last page zero past t's tokens."""
    n = t.shape[0]
    out = t.new_empty((-(-n // page_size) * page_size, *t.shape[1:]))
    out[:n] = t
    out[n:] = 0
    return out.view(-1, page_size, *t.shape[1:])


def _runs(pages) -> list[tuple[tuple, int, int]]:
    """(block, first row, end row) for each run of consecutive rows of one block among `pages`, in order."""
    runs = []
    for page in pages:
        if runs and runs[-1][0] is page.block and runs[-1][2] == page.row:
            runs[-1] = (page.block, runs[-1][1], page.row + 1)
        else:
            runs.append((page.block, page.row, page.row + 1))
    return runs


def to_snapshot(cache: PrefixCache, layouts: Sequence[LayerLayout], dtype: str) -> tuple[KVCache, PrefixTree]:
    """The pages as the format's token-major tensors, one per role and layer (one copy of each block's run of
    rows); partial pages zero-padded."""
    runs, layers = _runs(cache.pages), []
    for i, layout in enumerate(layouts):
        keys, values = (torch.cat([block[i][role][a:b] for block, a, b in runs]) for role in (0, 1))
        if layout.kind == "mla":  # one head: [pages, page_size, 1, d] -> the latent [pages, page_size, d_k + d_v]
            tensors = {"latent": from_torch(to_host(torch.cat([keys[:, :, 0], values[:, :, 0]], dim=-1)))}
        else:
            tensors = {"k": from_torch(to_host(keys)), "v": from_torch(to_host(values))}
        layers.append(layout.descriptor(tensors))
    tree = PrefixTree(parents=[p.parent for p in cache.pages], tokens=[list(p.tokens) for p in cache.pages])
    return KVCache(page_size=cache.page_size, dtype=dtype, layers=layers), tree


def from_snapshot(snapshot: Snapshot, layouts: Sequence[LayerLayout], device) -> PrefixCache:
    """A new prefix cache holding the snapshot's pages (on `device`) in one block, after check_pages accepted
    them. Slots past a partial page's tokens are unspecified in a snapshot (spec 5.3) and zeroed here."""
    kv, tree = snapshot.kv, snapshot.prefix
    size = kv.page_size
    tails = [p * size + t for p, tokens in enumerate(tree.tokens) for t in range(len(tokens), size)]
    tails = torch.tensor(tails, dtype=torch.long, device=device) if tails else None
    block = []
    for layout, layer in zip(layouts, kv.layers):
        roles = [to_device(to_torch(layer.tensors[role]), device)
                 for role in (("latent",) if layout.kind == "mla" else ("k", "v"))]
        for t in roles if tails is not None else ():  # as bytes: index_fill_ takes every dtype's bytes, not its values
            t.view(t.shape[0] * t.shape[1], -1).view(torch.uint8).index_fill_(0, tails, 0)
        if layout.kind == "mla":  # one head: the compressed KV, then the rope key
            latent, = roles
            roles = [latent[:, :, None, : layout.head_dim], latent[:, :, None, layout.head_dim :]]
        block.append(tuple(roles))
    cache, block = PrefixCache(size), tuple(block)
    for p, (parent, tokens) in enumerate(zip(tree.parents, tree.tokens)):
        cache.pages.append(Page(parent, tuple(tokens), block, p))
        cache.children.setdefault(parent, []).append(p)
    return cache


def check_pages(snapshot: Snapshot, layouts: Sequence[LayerLayout], dtype: str, page_size: int) -> None:
    """Refuse KV this engine cannot hold as pages: kinds, roles, shapes, dtype, page size, prefix tree."""
    kv, tree = snapshot.kv, snapshot.prefix
    if kv is None:
        raise IncompatibleSnapshotError("the snapshot has no kv section")
    if tree is None:
        raise IncompatibleSnapshotError("the snapshot's KV has no prefix tree: thaw_transformers finds pages by tokens")
    for field, have, want in (("kv.layers (count)", len(kv.layers), len(layouts)), ("kv.dtype", kv.dtype, dtype),
                              ("kv.page_size", kv.page_size, page_size)):
        if have != want:
            raise IncompatibleSnapshotError(f"{field}: the snapshot has {have!r}, the engine has {want!r}")
    for i, (layout, layer) in enumerate(zip(layouts, kv.layers)):
        want = layout.descriptor({})
        if (layer.kind, layer.num_kv_heads, layer.head_dim, layer.params) != \
                (want.kind, want.num_kv_heads, want.head_dim, want.params):
            raise IncompatibleSnapshotError(
                f"kv.layers[{i}]: the snapshot has {layer.kind} heads={layer.num_kv_heads} head_dim={layer.head_dim} "
                f"{layer.params}, the engine holds {want.kind} heads={want.num_kv_heads} head_dim={want.head_dim} "
                f"{want.params}")
        shapes = {"mla": {"latent": [layout.head_dim + layout.v_head_dim]}}.get(
            layout.kind, {"k": [layout.num_kv_heads, layout.head_dim], "v": [layout.num_kv_heads, layout.v_head_dim]})
        for role, tail in shapes.items():
            t = layer.tensors.get(role)
            expected = [tree.num_pages, page_size, *tail]
            if t is None or list(t.shape) != expected or t.dtype != dtype or len(layer.tensors) != len(shapes):
                got = "missing" if t is None else f"{t.dtype}{list(t.shape)}"
                raise IncompatibleSnapshotError(f"kv.layers[{i}] must hold {sorted(shapes)} with {role} "
                                                f"{dtype}{expected}; {role} is {got} among {sorted(layer.tensors)}")
    for p, (parent, tokens) in enumerate(zip(tree.parents, tree.tokens)):
        if not (-1 <= parent < p) or not 1 <= len(tokens) <= page_size or \
                (parent != -1 and len(tree.tokens[parent]) != page_size):
            raise IncompatibleSnapshotError(f"prefix page {p}: parent {parent}, {len(tokens)} tokens do not form a "
                                            f"prefix tree of pages of {page_size}")
