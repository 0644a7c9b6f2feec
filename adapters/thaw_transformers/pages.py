"""The engine's prefix cache: token-id pages of KV, and their exchange with a snapshot's token-major pages.

A transformers cache layer holds one sequence as [1, kv_heads, tokens, head_dim]. The prefix cache keeps the
same values cut into pages of `page_size` tokens, each page [tokens, kv_heads, head_dim] per layer and keyed by
its parent page and its token ids, so that a prompt extending a cached prefix reuses that KV instead of computing
it again. Only a page that no other page continues may hold fewer than `page_size` tokens (spec 5.4).

In a snapshot every page becomes row p of [num_pages, page_size, ...] tensors per layer (spec 5.3):
    "attention": k [pages, page_size, kv_heads, head_dim], v the same with V's head size;
    "mla":       latent [pages, page_size, latent_dim]: DeepSeek's compressed KV then its rope key, which is what
                 transformers caches for multi-head latent attention (as keys and values of one head).
A sliding-window layer is written as "attention": its pages hold every token's KV, not only the window's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

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


@dataclass(frozen=True)
class Page:
    parent: int  # index of the page this one continues, -1 for a root
    tokens: tuple
    kv: tuple  # per layer (keys, values), [len(tokens), heads, d] each


class PrefixCache:
    """A forest of pages found by token ids. Pages are never changed, only added or replaced, so that a copy
    (a fork child's cache, a capture's scratch table) shares them without sharing the table."""

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
        chain, parent = [], -1
        for start in range(0, len(tokens), self.page_size):
            piece = tuple(tokens[start : start + self.page_size])
            siblings = self.children.setdefault(parent, [])
            held = next((c for c in siblings if self.pages[c].tokens[: len(piece)] == piece), None)
            if held is None:
                page = Page(parent, piece, tuple((k[start : start + len(piece)].clone(),
                                                  v[start : start + len(piece)].clone()) for k, v in kv))
                # a partial page this one extends is replaced: only a leaf may be partial, and it is one
                shorter = next((c for c in siblings if piece[: len(self.pages[c].tokens)] == self.pages[c].tokens), None)
                held = shorter if shorter is not None else len(self.pages)
                if shorter is not None:
                    self.pages[held] = page
                else:
                    self.pages.append(page)
                    siblings.append(held)
            chain.append(held)
            parent = held
        return chain

    def gather(self, chain: list[int], num_tokens: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first num_tokens tokens of a chain, one layer: (keys, values) [1, heads, tokens, d]."""
        keys = torch.cat([self.pages[p].kv[layer][0] for p in chain])[:num_tokens]
        values = torch.cat([self.pages[p].kv[layer][1] for p in chain])[:num_tokens]
        return keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0)

    def subset(self, keep: set) -> tuple["PrefixCache", dict]:
        """The pages in `keep` (closed under parents), renumbered in order: (the cache, old index -> new)."""
        other, new = PrefixCache(self.page_size), {}
        for old in sorted(keep):
            page = self.pages[old]
            new[old] = len(other.pages)
            parent = new[page.parent] if page.parent != -1 else -1
            other.pages.append(Page(parent, page.tokens, page.kv))
            other.children.setdefault(parent, []).append(new[old])
        return other, new

    def chain_of(self, page: int) -> list[int]:
        chain = []
        while page != -1:
            chain.append(page)
            page = self.pages[page].parent
        return chain[::-1]


def to_snapshot(cache: PrefixCache, layouts: Sequence[LayerLayout], dtype: str) -> tuple[KVCache, PrefixTree]:
    """The pages as the format's token-major tensors, one per role and layer; partial pages zero-padded."""
    size, layers = cache.page_size, []
    for i, layout in enumerate(layouts):
        keys, values = (_stack([page.kv[i][role] for page in cache.pages], size) for role in (0, 1))
        if layout.kind == "mla":  # one head: [pages, page_size, 1, d] -> the latent [pages, page_size, d_k + d_v]
            tensors = {"latent": from_torch(to_host(torch.cat([keys[:, :, 0], values[:, :, 0]], dim=-1)))}
        else:
            tensors = {"k": from_torch(to_host(keys)), "v": from_torch(to_host(values))}
        layers.append(layout.descriptor(tensors))
    tree = PrefixTree(parents=[p.parent for p in cache.pages], tokens=[list(p.tokens) for p in cache.pages])
    return KVCache(page_size=size, dtype=dtype, layers=layers), tree


def _stack(pieces: list[torch.Tensor], page_size: int) -> torch.Tensor:
    """[pages, page_size, ...]: the pages in one stack (one copy on a GPU, not one per page), a partial one
    zero-padded first."""
    return torch.stack([piece if piece.shape[0] == page_size else _padded(piece, page_size) for piece in pieces])


def _padded(piece: torch.Tensor, page_size: int) -> torch.Tensor:
    out = piece.new_zeros((page_size, *piece.shape[1:]))
    out[: piece.shape[0]] = piece
    return out


def from_snapshot(snapshot: Snapshot, layouts: Sequence[LayerLayout], device) -> PrefixCache:
    """A new prefix cache holding the snapshot's pages (on `device`), after check_pages accepted them."""
    kv, tree = snapshot.kv, snapshot.prefix
    cache = PrefixCache(kv.page_size)
    per_layer = []
    for layout, layer in zip(layouts, kv.layers):
        if layout.kind == "mla":
            latent = to_device(to_torch(layer.tensors["latent"]), device)
            keys, values = latent[:, :, None, : layout.head_dim], latent[:, :, None, layout.head_dim :]  # one head
        else:
            keys, values = (to_device(to_torch(layer.tensors[r]), device) for r in ("k", "v"))
        per_layer.append((keys, values))
    for p, (parent, tokens) in enumerate(zip(tree.parents, tree.tokens)):
        n = len(tokens)
        cache.pages.append(Page(parent, tuple(tokens), tuple((k[p, :n], v[p, :n]) for k, v in per_layer)))
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
