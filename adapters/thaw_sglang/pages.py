"""Radix paths <-> the spec's pages: SGLang keeps a radix tree of token slots, a snapshot keeps pages.

Each root-to-leaf radix path is cut into pages of `page_size` tokens from its start; pages with the same
parent and the same tokens are one page, so shared prefixes stay shared. Where two paths part in the middle
of a page, each gets its own page holding the common tokens (the spec allows a short page only at a chain's
end, so a branch point cannot end a page). The reverse direction gives each leaf chain back as one token
sequence, which SGLang's own insert folds into a tree again.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
from thaw_format import PrefixTree
from thaw_format.sdk.tokens import common_prefix_length

PADDING = -1  # slot-table entry past the end of a short page


@dataclass(frozen=True)
class RadixPath:
    """One root-to-leaf path of a radix tree: its token ids and the KV slot of each token."""

    tokens: list[int]
    slots: torch.Tensor  # int64 [len(tokens)]


@dataclass(frozen=True)
class Pages:
    tree: PrefixTree
    slots: torch.Tensor  # int64 [num_pages, page_size]: the KV slot of each token, PADDING past a page's end

    def digest(self) -> str:
        """SHA-256 over the pages' tokens, their parents and their slots: what tensor-parallel ranks compare."""
        digest = hashlib.sha256(json.dumps([self.tree.parents, self.tree.tokens]).encode())
        digest.update(self.slots.contiguous().numpy().tobytes())
        return digest.hexdigest()


def paginate(paths: list[RadixPath], page_size: int) -> Pages:
    if page_size < 1:
        raise ValueError(f"page_size must be at least 1, not {page_size}")
    page_of: dict[tuple[int, tuple[int, ...]], int] = {}
    parents: list[int] = []
    tokens: list[list[int]] = []
    rows: list[np.ndarray] = []
    for path in paths:
        # the path's slots cut into page rows at once, PADDING past its end (no tensor per page)
        padded = np.full(-(-len(path.tokens) // page_size) * page_size, PADDING, np.int64)
        padded[: len(path.tokens)] = path.slots.cpu().numpy()
        padded = padded.reshape(-1, page_size)
        parent = -1
        for index, start in enumerate(range(0, len(path.tokens), page_size)):
            chunk = tuple(path.tokens[start : start + page_size])
            page = page_of.get((parent, chunk))
            if page is None:
                page = page_of[(parent, chunk)] = len(parents)
                parents.append(parent)
                tokens.append(list(chunk))
                rows.append(padded[index])
            parent = page
    slots = torch.from_numpy(np.stack(rows)) if rows else torch.empty((0, page_size), dtype=torch.int64)
    return Pages(PrefixTree(parents=parents, tokens=tokens), slots)


def chain_paths(paths: list[RadixPath], chains: list[list[int]]) -> list[RadixPath]:
    """Of the radix paths, only what holds each chain: its longest cached prefix, cut where the chain ends."""
    held = []
    for chain in chains:
        chain = [int(t) for t in chain]
        length, path = max(((common_prefix_length(p.tokens, chain), p) for p in paths), key=lambda c: c[0],
                           default=(0, None))
        if length:
            held.append(RadixPath(path.tokens[:length], path.slots[:length]))
    return held


@dataclass(frozen=True)
class Sequence:
    """A leaf chain as one token sequence, with the row of each token in the flattened page tensors."""

    tokens: list[int]
    rows: torch.Tensor  # int64 [len(tokens)]: page * page_size + offset


def leaf_sequences(tree: PrefixTree, page_size: int) -> list[Sequence]:
    sequences = []
    for leaf in tree.leaves():
        chain = tree.chain(leaf)
        # page p's tokens are rows p * page_size onwards: one arange, shifted per page (no tensor per page)
        lengths = np.fromiter((len(tree.tokens[p]) for p in chain), np.int64, len(chain))
        shift = np.asarray(chain, np.int64) * page_size - (np.cumsum(lengths) - lengths)
        rows = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(shift, lengths)
        sequences.append(Sequence(tree.chain_tokens(leaf), torch.from_numpy(rows)))
    return sequences


def distinct_token_count(tree: PrefixTree) -> int:
    """How many KV slots the tree needs once sibling pages share their common leading tokens."""
    siblings: dict[int, list[list[int]]] = defaultdict(list)
    for page, parent in enumerate(tree.parents):
        siblings[parent].append(tree.tokens[page])
    count = 0
    for pages in siblings.values():
        if len(pages) == 1:  # an only child (most pages: one per chain step) shares nothing
            count += len(pages[0])
            continue
        trie: dict = {}
        for page_tokens in pages:
            node = trie
            for token in page_tokens:
                if token not in node:
                    node[token] = {}
                    count += 1
                node = node[token]
    return count
