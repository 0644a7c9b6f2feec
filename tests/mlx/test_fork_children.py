"""fork: n children of one snapshot, each given its own suffix, each continue as the parent itself would."""

import pytest

import thaw_format
import thaw_mlx
from resume_worker import run_in_new_process
from sessions import kv_digest

SUFFIXES = [[7], [200, 201, 202], [42, 42], [9, 99, 199, 250, 3]]
MORE_TOKENS = 10


def parent_continuation(session, name: str, suffix: list[int]) -> dict:
    """What the parent itself produces given the suffix (a fresh, identical parent session per suffix)."""
    model, cache, tokens = session(name)
    out = list(thaw_mlx.generate(model, cache, tokens + suffix, MORE_TOKENS))
    return {"tokens": out, "kv_digest": kv_digest(model, cache, tokens + suffix + out)}


FORKED = ["llama-kv", "llama-rotating", "llama-quantized", "llama-sliding-mixed", "lfm2-hybrid"]


@pytest.mark.parametrize("name", FORKED)
def test_children_with_different_suffixes_continue_as_the_parent(name, session):
    model, cache, tokens = session(name)
    children = thaw_mlx.fork(model, thaw_mlx.capture(model, cache, tokens), len(SUFFIXES))
    # step the children in turns, so that any state shared between them would corrupt the others
    streams = [thaw_mlx.generate(model, child, tokens + s, MORE_TOKENS) for child, s in zip(children, SUFFIXES)]
    outputs = [[] for _ in SUFFIXES]
    for _ in range(MORE_TOKENS):
        for out, stream in zip(outputs, streams):
            out.append(next(stream))
    for child, suffix, out in zip(children, SUFFIXES, outputs):
        assert {"tokens": out, "kv_digest": kv_digest(model, child, tokens + suffix + out)} == \
            parent_continuation(session, name, suffix)
    assert len({tuple(out) for out in outputs}) == len(SUFFIXES)


def test_children_in_a_new_process(session, saved):
    model, cache, tokens = session("qwen3-kv")
    path = saved(thaw_mlx.capture(model, cache, tokens))
    jobs = [{"snapshot": path, "suffix": s, "max_tokens": MORE_TOKENS} for s in SUFFIXES]
    assert run_in_new_process(jobs) == [parent_continuation(session, "qwen3-kv", s) for s in SUFFIXES]


def test_a_child_snapshot_names_its_parent(session, saved):
    model, cache, tokens = session("llama-kv")
    parent = thaw_format.load(saved(thaw_mlx.capture(model, cache, tokens, label="root"), "parent.thaw"))
    child = thaw_mlx.fork(model, parent, 2)[1]
    out = list(thaw_mlx.generate(model, child, tokens, 3))
    snapshot = thaw_mlx.capture(model, child, tokens + out, parent=parent.id, label="child")
    assert snapshot.lineage.parent == parent.id and parent.id.startswith("sha256:")
    assert thaw_mlx.snapshot_tokens(snapshot) == tokens + out
