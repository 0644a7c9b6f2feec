"""Cross-engine KV checks: rounding passes, KV out of place fails, pages line up by their tokens, and a target
that caches whole pages only may leave out the partial last page."""

import numpy as np

from thaw_conformance.compare import kv_closeness, kv_diff
from thaw_conformance.cross import KV_TOLERANCE, _continuation
from thaw_conformance.results import Recorder
from thaw_format import KVCache, KVLayer, PrefixTree, Snapshot
from thaw_format.numpy import from_numpy

PAGE = 4
TOKENS = list(range(10, 20))  # 10 tokens: two full pages and one of 2
HEADS, DIM = 2, 8


def _snapshot(k: np.ndarray, v: np.ndarray, tokens=TOKENS, order=None) -> Snapshot:
    """Token-major K/V [tokens, heads, dim] as pages of PAGE tokens, listed in `order` (default: in order)."""
    pages = [tokens[i : i + PAGE] for i in range(0, len(tokens), PAGE)]
    order = order or list(range(len(pages)))
    position = {page: i for i, page in enumerate(order)}  # page index in text order -> index in the snapshot

    def paged(a):
        padded = np.zeros((len(pages) * PAGE, *a.shape[1:]), np.float32)
        padded[: len(a)] = a[: len(tokens)]
        by_text = padded.reshape(len(pages), PAGE, *a.shape[1:])
        return from_numpy(by_text[order])

    tree = PrefixTree(parents=[position[p - 1] if p else -1 for p in order], tokens=[pages[p] for p in order])
    layer = KVLayer("attention", {"k": paged(k), "v": paged(v)}, num_kv_heads=HEADS, head_dim=DIM)
    return Snapshot(kv=KVCache(page_size=PAGE, dtype="float32", layers=[layer]), prefix=tree)


def _kv(seed: int, length: int = len(TOKENS)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((length, HEADS, DIM)).astype(np.float32) * 3 for _ in range(2))


def test_same_tokens_line_up_whatever_the_page_order_and_last_page_length():
    k, v = _kv(0, 13)
    own = _snapshot(k, v, TOKENS + [20, 21, 22])  # the target's own KV covers 3 more tokens
    restored = _snapshot(k[:10] + 1e-6, v[:10], order=[2, 0, 1])
    tokens, diff, scale = kv_closeness(own, restored)
    assert tokens == 10 and 0 < diff < 2e-6 and scale == float(np.abs(np.concatenate([k[:10], v[:10]])).max())


def test_kv_out_of_place_is_far_beyond_the_tolerance():
    k, v = _kv(1)
    own = _snapshot(k, v)
    # heads swapped, K and V swapped, positions shifted by one
    for wrong in (_snapshot(k[:, ::-1], v), _snapshot(v, k), _snapshot(np.roll(k, 1, axis=0), v)):
        tokens, diff, scale = kv_closeness(own, wrong)
        assert tokens == 10 and diff > 10 * KV_TOLERANCE * scale


def test_the_continuation_check_fails_kv_out_of_place_and_reports_other_tokens():
    k, v = _kv(2)
    own, close, swapped = _snapshot(k, v), _snapshot(k + 1e-6, v), _snapshot(v, k)
    recorder = Recorder("a->b", "toy")
    _continuation(recorder, own, close, [1, 2], [1, 2], [1, 2])
    _continuation(recorder, own, close, [1, 2], [1, 3], [1, 2])
    _continuation(recorder, own, swapped, [1, 2], [1, 2], [1, 2])
    _continuation(recorder, own, _snapshot(k, v, tokens=list(range(50, 60))), [1], [1], [1])
    assert [r.status for r in recorder.results] == ["passed", "differs", "failed", "failed"]
    assert "max abs diff" in recorder.results[0].detail and "no token's KV in common" in recorder.results[3].detail


def test_a_target_caching_whole_pages_only_may_leave_out_the_partial_page_alone():
    k, v = _kv(3)
    source, whole_pages = _snapshot(k, v), _snapshot(k[:8], v[:8], tokens=TOKENS[:8])
    assert kv_diff(source, whole_pages) == "the page ending at token 10 (of 3 pages) is missing"
    assert kv_diff(source, whole_pages, full_pages_only=True) is None
    one_page = _snapshot(k[:4], v[:4], tokens=TOKENS[:4])
    assert kv_diff(source, one_page, full_pages_only=True) == "the page ending at token 8 (of 3 pages) is missing"
