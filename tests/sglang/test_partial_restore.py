"""A restore whose KV write fails partway leaves SGLang's cache empty, never serving the partial KV.

The scheduler inserts the restored tree before it writes the KV, and a snapshot in the client's memory is read from
there during that write (thaw_format.sdk.remote): a page the scheduler cannot read in the middle of a tensor fails
the write after other units moved. A fresh engine of its own: one refused remote reads (tests/sglang/
test_kv_transport) would have the client copy the KV itself, and touch the unreadable page.
"""

import pytest
from conftest import generate
from thaw_format.sdk import lent, remote
from unreadable import unreadable_page

PROMPT = list(range(500, 620))  # 120 tokens: three full pages and a short one


def test_a_remote_read_failing_partway_leaves_nothing_cached(thaw_sglang, zoo, engines, tmp_path):
    """A snapshot mapped from its file (thaw_format.load(mmap=True)) with a page of its last layer's V unreadable
    (every layer before it is written first): the restore fails with the scheduler's EFAULT, and the engine
    reports no cached token for PROMPT, still giving the same continuation. With the page readable again the same
    snapshot restores and serves PROMPT from the cache."""
    import thaw_format

    engine = engines(zoo.make_model("llama"))
    generate(engine, PROMPT)
    continued = PROMPT + [41, 42, 43]
    reference = generate(engine, continued)
    path = tmp_path / "kv.thaw"
    thaw_sglang.capture(engine, path, include_weights=False, chains=[PROMPT])
    loaded = thaw_format.load(path, mmap=True)
    assert not remote.refused(engine)  # else the client copies the KV itself, and faults on the page
    with unreadable_page(loaded.kv.layers[-1].tensors["v"].data):
        with pytest.raises(RuntimeError, match=r"RemoteReadError: \[Errno 14\] process \d+ does not map"):
            thaw_sglang.restore(engine, loaded)
    assert lent.last_sent(engine) == "remote"
    assert generate(engine, continued) == (reference[0], 0)
    assert engine.leak_warnings() == 0

    assert engine.flush_cache().success
    thaw_sglang.restore(engine, loaded)
    assert generate(engine, continued) == (reference[0], len(PROMPT))
    assert engine.leak_warnings() == 0
