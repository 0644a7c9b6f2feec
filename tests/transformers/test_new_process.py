"""A snapshot restored in a fresh process: pages byte-identical, in-flight requests finish as in the parent,
and the continuation (greedy and seeded) and the cache hit are the parent's."""

import pytest

import thaw_format
from thaw_format.sdk import greedy, seeded
from conftest import PROMPT, model_dir
from worker import page_digests, run_in_new_process


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_new_process_continues_exactly(arch, engine, saved):
    parent = engine(arch)
    first = parent.generate(PROMPT, greedy(6))
    rid = parent.submit(PROMPT[::-1][:40], seeded(7, 12))
    for _ in range(5):
        parent.step()
    snap = parent.capture()
    path = saved(snap)
    pages = page_digests(thaw_format.load(path))
    finished = parent.finish()[rid].output_token_ids
    prompt = PROMPT + first.token_ids
    want = parent.generate(prompt, greedy(8))
    got = run_in_new_process({"model": str(model_dir(arch)), "snapshot": str(path), "prompt": prompt})
    assert got["pages"].items() >= pages.items()  # every captured page, byte for byte (finishing adds more)
    assert got["finished"] == {rid: finished}
    assert (got["greedy"], got["cached"]) == (want.token_ids, want.cached_tokens)
    assert got["seeded"] == parent.generate(prompt, seeded(1234, 8)).token_ids
