"""thaw_vllm.rpc: a snapshot's error crosses vLLM's process boundaries as data and is raised again as itself
(test_lent_kv checks the whole way, worker -> engine core -> client, on a multiprocessing engine)."""

import pytest

import thaw_format


def test_every_error_travels_as_data_and_comes_back_as_its_class(vllm):
    """A callee never raises through vLLM (a collective_rpc would leave the other ranks' replies queued): a
    snapshot's error comes back as its class, a builtin one as its class, any other as a RuntimeError naming it."""
    from thaw_format.mover import RemoteReadError
    from thaw_vllm import rpc

    @rpc.as_data
    def callee(exc):
        raise exc

    for kind in (thaw_format.CorruptSnapshotError, thaw_format.IncompatibleSnapshotError):
        data = callee(kind("kv/0/k chunk 3: checksum mismatch"))
        assert data == {"error": {"type": kind.__name__, "message": "kv/0/k chunk 3: checksum mismatch"}}
        with pytest.raises(kind, match="^kv/0/k chunk 3: checksum mismatch$"):
            rpc.unwrap(data)
    for exc in (ValueError("not a snapshot's"), FileNotFoundError("no segment"), MemoryError("no room")):
        with pytest.raises(type(exc), match=f"^{exc.args[0]}$"):
            rpc.unwrap(callee(exc))
    refused = callee(RemoteReadError(1, 42, 0x1000, 16, "not the sender"))
    with pytest.raises(RuntimeError, match=f"^RemoteReadError: .*{RemoteReadError.REFUSED}: not the sender"):
        rpc.unwrap(refused)  # lent.sending falls back on the refusal's text
    with pytest.raises(RuntimeError, match="^SystemExit: odd$"):  # a name that is no exception class here
        rpc.unwrap({"error": {"type": "SystemExit", "message": "odd"}})
    assert rpc.unwrap({"source": "shm://x#1"}) == {"source": "shm://x#1"}


def test_an_engines_replies_are_all_read_before_an_error_is_raised(vllm):
    from thaw_vllm import rpc

    with pytest.raises(ValueError, match="rank 1"):
        rpc.unwrap_all([{"source": "shm://x#1"}, {"error": {"type": "ValueError", "message": "rank 1"}}])
    assert rpc.unwrap_all([{"source": "shm://x#1"}, None]) == {"source": "shm://x#1"}


def test_an_engine_made_without_engine_args_is_named_so(vllm):
    """describe (which capture and restore ask first) names what to do, not vLLM's missing thaw_describe."""
    from types import SimpleNamespace

    from thaw_vllm import api

    plain = SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(kv_transfer_config=None)))
    with pytest.raises(RuntimeError, match="without thaw's KV connector"):
        api.describe(plain)


def test_a_describe_error_is_asked_again_not_kept(vllm, monkeypatch):
    """thaw_vllm.LLM keeps the workers' describe once every rank answered it; a rank's error (as data) is not kept:
    the next call asks the workers again."""
    import thaw_vllm

    answers = [[{"kv": {}}, {"error": {"type": "MemoryError", "message": "rank 1: no room"}}],
               [{"kv": {}}, {"kv": {}}]]
    asked = []

    def collective_rpc(self, method, *args, **kwargs):
        asked.append(method)
        return answers[len(asked) - 1]

    monkeypatch.setattr(vllm.LLM, "collective_rpc", collective_rpc)
    llm = thaw_vllm.LLM.__new__(thaw_vllm.LLM)  # no engine: only its collective_rpc is called
    assert llm.collective_rpc("thaw_describe") == answers[0]
    assert llm.collective_rpc("thaw_describe") == answers[1]
    assert llm.collective_rpc("thaw_describe") == answers[1] and asked == ["thaw_describe"] * 2


def test_a_callees_error_returned_as_data_keeps_none_of_its_locals(vllm):
    """No twin here of the frame bug thaw_format.sdk.agreement had (tests/format/test_agreement_frames.py): as_data's
    `except ... as exc` unbinds the exception once its data is made, so nothing keeps the callee's frames, and the
    locals they hold (a staged snapshot viewing a lent segment), past its return. The collector off: only reference
    counts free them."""
    import gc
    import weakref

    from thaw_vllm import rpc

    class Held:
        pass

    refs = []

    @rpc.as_data
    def callee():
        held = Held()
        refs.append(weakref.ref(held))
        raise OSError("this rank's read failed")

    gc.disable()
    try:
        assert rpc.is_error(callee())
        assert refs[0]() is None
    finally:
        gc.enable()
