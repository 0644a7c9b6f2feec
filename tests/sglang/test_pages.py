"""Radix paths <-> pages, without an engine."""

import pytest
import torch

import engine_guard


@pytest.fixture(scope="module")
def pages():
    return engine_guard.require("thaw_sglang.pages", "install it with scripts/setup-sglang.sh")


def _path(pages, tokens, first_slot):
    return pages.RadixPath(list(tokens), torch.arange(first_slot, first_slot + len(tokens), dtype=torch.int64))


def test_paths_that_part_inside_a_page_share_full_pages_and_copy_the_common_tokens(pages):
    shared = list(range(10))
    a = _path(pages, shared + [50, 51], 100)
    b = pages.RadixPath(shared + [60], torch.cat([a.slots[:10], torch.tensor([200])]))
    cut = pages.paginate([a, b], page_size=4)
    assert cut.tree.parents == [-1, 0, 1, 1]
    assert cut.tree.tokens == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 50, 51], [8, 9, 60]]
    assert cut.slots.tolist() == [[100, 101, 102, 103], [104, 105, 106, 107], [108, 109, 110, 111], [108, 109, 200, -1]]
    assert pages.distinct_token_count(cut.tree) == 13


def test_leaf_sequences_give_back_each_path_and_its_rows(pages):
    a, b = _path(pages, range(9), 0), _path(pages, list(range(4)) + [70, 71], 20)
    cut = pages.paginate([a, b], page_size=4)
    sequences = pages.leaf_sequences(cut.tree, page_size=4)
    assert [s.tokens for s in sequences] == [a.tokens, b.tokens]
    flat = cut.slots.reshape(-1)
    assert flat[sequences[0].rows].tolist() == a.slots.tolist()
    assert flat[sequences[1].rows].tolist() == [0, 1, 2, 3, 24, 25]


def test_a_path_ending_on_a_page_boundary_is_an_inner_page_of_a_longer_one(pages):
    cut = pages.paginate([_path(pages, range(8), 0), _path(pages, range(4), 0)], page_size=4)
    assert cut.tree.parents == [-1, 0] and cut.tree.leaves() == [1]


def test_chain_paths_hold_each_chains_longest_cached_prefix_and_nothing_else(pages):
    a, b = _path(pages, range(10), 0), _path(pages, list(range(4)) + [70, 71, 72], 20)
    held = pages.chain_paths([a, b], [list(range(6)), [0, 1, 2, 3, 70, 99], [5, 6]])
    assert [p.tokens for p in held] == [list(range(6)), [0, 1, 2, 3, 70]]  # cut at the chain's end, or where it parts
    assert [p.slots.tolist() for p in held] == [list(range(6)), [20, 21, 22, 23, 24]]
    assert pages.chain_paths([a, b], []) == []


def test_leaf_sequence_rows_are_each_tokens_page_and_offset(pages):
    """Rows as their definition gives them (page * page_size + offset, page by page down the chain), and the slot
    count with only children (counted whole) beside siblings (their common tokens once)."""
    paths = [_path(pages, range(11), 0), _path(pages, list(range(6)) + [90, 91, 92, 93, 94], 40),
             _path(pages, list(range(8)) + [7], 80)]
    cut = pages.paginate(paths, page_size=3)
    for sequence, leaf in zip(pages.leaf_sequences(cut.tree, page_size=3), cut.tree.leaves()):
        want = [p * 3 + i for p in cut.tree.chain(leaf) for i in range(len(cut.tree.tokens[p]))]
        assert sequence.rows.dtype == torch.int64 and sequence.rows.tolist() == want
    assert pages.distinct_token_count(cut.tree) == len({(tuple(p.tokens[: i + 1])) for p in paths
                                                        for i in range(len(p.tokens))})
