"""An MLXEngine's sessions as the format's prefix tree (spec 5.4), and the sessions a tree gives back.

A capture cuts the computed tokens of each sequence it holds into pages and adds them to one tree: a page that
is there already (the same tokens after the same page) is shared, so a prefix several sessions share is written
once, from the first sequence that holds it, and each later sequence adds its pages from the first one the tree
lacks (all the pages after it are new too: their parent is). Only the last page of a sequence may be partial,
so no partial page is ever a parent. A shared page is identified by its tokens, as vLLM's and SGLang's prefix
caches identify theirs: a request starts from a copy of a held prefix's KV, so sessions that share a prefix share
its bytes; two requests in flight together compute the same prefix apart (byte-equal in every check here:
llama, qwen2, gemma2, bf16, prompts of 73 and 95 tokens), and the first sequence's bytes are written.

A restore makes a session of each branch of the tree (a leaf's chain), as vLLM and SGLang rebuild their prefix
caches from it, and of each finished request that names its pages, besides the request in flight it resumes,
whose pages are its own. A session that ends on a page of the request in flight has no leaf: the capture names
it as a finished request (ends_inside).
"""

from __future__ import annotations

from typing import Optional

from thaw_format import PrefixTree, Request, SamplingParams

REQUEST_ID = "mlx-0"  # the id of a session's request in a snapshot, and of one made for a branch
INSIDE_ID = "mlx-session"  # the finished request of a session ending inside the request in flight (ends_inside)


def tree_of(sequences: list[list[int]], page_size: int) -> tuple[PrefixTree, list[list[int]], list[int]]:
    """(the tree of the sequences' computed tokens, each one's chain of pages, each one's first page that no
    sequence before it holds: its pages from there on are the tree's next ones, in order)."""
    parents, tokens, index = [], [], {}
    chains, firsts = [], []
    for computed in sequences:
        chain, parent, first = [], -1, None
        for start in range(0, len(computed), page_size):
            key = (parent, tuple(computed[start : start + page_size]))
            page = index.get(key)
            if page is None:
                page = index[key] = len(parents)
                parents.append(parent)
                tokens.append(list(key[1]))
                first = len(chain) if first is None else first
            chain.append(page)
            parent = page
        chains.append(chain)
        firsts.append(len(chain) if first is None else first)
    return PrefixTree(parents=parents, tokens=tokens), chains, firsts


def branch_request(tree: PrefixTree, leaf: int) -> Request:
    """A branch of the tree as a finished request: its chain's tokens, every one computed, and its pages."""
    tokens = tree.chain_tokens(leaf)
    return Request(id=REQUEST_ID, status="finished", prompt_token_ids=tokens, output_token_ids=[],
                   sampling=SamplingParams(temperature=0.0), num_computed_tokens=len(tokens), pages=tree.chain(leaf))


def ends_inside(chains: list[list[int]]) -> Optional[int]:
    """The longest sequence after the first whose pages all lie on the first's chain, or None. When the first
    is the request in flight, whose branch a restore resumes rather than makes a session of, that sequence ends
    at a page the tree shows no end at: the capture lists it as a finished request (the shorter ones are
    prefixes of it, and so served from its session)."""
    inside = [i for i in range(1, len(chains)) if chains[i] == chains[0][: len(chains[i])]]
    return max(inside, key=lambda i: len(chains[i]), default=None)


def engine_sequences(tree: PrefixTree, pending: Optional[Request], finished: list[Request]) -> list[Request]:
    """What MLXEngine restores of a tree, each as a request naming its pages: the request in flight (`pending`)
    first, if any, then a session for each branch that ends in none of the listed requests' pages, then one for
    each `finished` request that names pages, last (an MLX capture lists its latest session there, or the one
    ending inside the request in flight: ends_inside), so that the engine's latest session is the parent's."""
    own = [pending] if pending is not None else []
    listed = [r for r in finished if r.pages]
    ends = {tuple(r.pages) for r in own + listed}
    return own + [branch_request(tree, leaf) for leaf in tree.leaves() if tuple(tree.chain(leaf)) not in ends] + listed
