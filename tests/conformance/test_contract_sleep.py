"""thaw_format.sdk.sleep / wake on the template's contract engine: the logic every engine shares (the durable
file, when the engine is closed, what a failed save or a bad file leaves, which factories a file may name), and
the shared sleep/wake test (tests/sleep_checks.py), here also with the wake in another process."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import thaw_format
from sleep_checks import PARAMS, PROMPTS, check_woken, run_midway, sleep_midway
from sleep_checks import in_flight, test_sleep_then_wake_finishes_the_requests_exactly  # noqa: F401  shared
from thaw_conformance.template.adapter import ToyThawEngine
from thaw_conformance.template.driver import driver
from thaw_format import CorruptSnapshotError, IncompatibleSnapshotError
from thaw_format.sdk import UnregisteredFactory, Unsupported, sleep, wake
from thaw_format.sdk.sleep import LAUNCH_KEY


@pytest.fixture
def sleeper(tmp_path):
    return lambda: driver().start("toy", tmp_path)


@pytest.fixture
def closed():
    return lambda engine: engine.engine is None  # ToyThawEngine.close drops its engine


@pytest.fixture
def started():
    """A factory the caller passes to wake (the template's own start), recording each engine it starts."""
    engines = []

    def start(**config):
        engines.append(ToyThawEngine.start(**config))
        return engines[-1]

    start.engines = engines
    return start


@pytest.fixture
def slept(sleeper, tmp_path):
    """A file an engine slept to with two requests in flight, and those requests' references."""
    path = tmp_path / "slept.thaw"
    return path, sleep_midway(sleeper(), path)


def rewritten(path, out, launch: dict):
    """The snapshot at `path` with its recorded launch spec replaced (None: removed), as someone else wrote it."""
    snapshot = thaw_format.load(path)
    snapshot.metadata[LAUNCH_KEY] = launch
    if launch is None:
        del snapshot.metadata[LAUNCH_KEY]
    thaw_format.save(snapshot, out)
    return out


def test_the_engine_is_closed_only_once_the_file_is_durably_written(sleeper, tmp_path, monkeypatch):
    engine = sleeper()
    run_midway(engine)
    open_while_saving, fsyncs = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    path = tmp_path / "slept.thaw"
    snapshot_id = sleep(engine, path, progress=lambda n: open_while_saving.append(engine.engine is not None))
    assert open_while_saving and all(open_while_saving) and engine.engine is None
    assert len(fsyncs) >= 2  # the file, then its folder (the rename)
    assert thaw_format.verify(path) == snapshot_id and os.listdir(tmp_path) == ["slept.thaw"]
    snapshot = thaw_format.load(path)
    assert not (snapshot.weights and snapshot.weights.tensors) and snapshot.model.weights_digest  # by digest only
    assert snapshot.metadata[LAUNCH_KEY] == {"factory": "thaw_conformance.template.adapter:ToyThawEngine.start",
                                             "kwargs": {"vocab_size": 256, "hidden_size": 32, "num_layers": 2,
                                                        "num_heads": 2, "head_dim": 16, "seed": 0}}
    fsyncs.clear()
    sleep(sleeper(), tmp_path / "fast.thaw", durable=False)
    assert fsyncs == []


def _raise_midway(written: int) -> None:
    raise OSError(28, "No space left on device (the test's)")


@pytest.mark.parametrize("where", ["missing folder", "folder is a file", "write fails midway"])
def test_a_failed_save_leaves_the_engine_open_and_serving(sleeper, tmp_path, where):
    engine = sleeper()
    ids, want = run_midway(engine)
    (tmp_path / "file").write_bytes(b"")
    path, progress = {"missing folder": (tmp_path / "missing" / "slept.thaw", None),
                      "folder is a file": (tmp_path / "file" / "slept.thaw", None),
                      "write fails midway": (tmp_path / "slept.thaw", _raise_midway)}[where]
    with pytest.raises(OSError):
        sleep(engine, path, progress=progress)
    assert sorted(os.listdir(tmp_path)) == ["file"]  # no file, no temporary left
    done = engine.finish()  # the requests in flight go on where they were
    assert [done[rid].output_token_ids for rid in ids] == want
    assert engine.generate(PROMPTS[0], PARAMS).token_ids == want[0]


def test_an_engine_without_mid_stream_refuses_to_sleep_with_requests_in_flight(sleeper, tmp_path):
    """No engine of thaw's lacks mid_stream; one that did is refused before anything is written or closed."""
    class NoMidStream(ToyThawEngine):
        @classmethod
        def capabilities(cls):
            return super().capabilities() - {"mid_stream", "mid_stream_seeded"}

    engine = sleeper()
    ids, want = run_midway(engine)
    quiet = NoMidStream(engine.engine)
    with pytest.raises(Unsupported, match="cannot sleep with 2 requests in flight.*mid_stream"):
        sleep(quiet, tmp_path / "slept.thaw")
    assert os.listdir(tmp_path) == [] and quiet.engine is not None
    done = engine.finish()
    assert [done[rid].output_token_ids for rid in ids] == want


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_a_damaged_file_starts_no_engine(slept, started, tmp_path, damage):
    path, _ = slept
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        with thaw_format.open(path) as f:
            region = f.info("kv/0/k")[2]
        data[region.offset + 5] ^= 0x40  # a KV page's byte: only its chunk's CRC can tell
    bad = tmp_path / "bad.thaw"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshotError):
        wake(bad, factory=started)
    assert started.engines == []


def test_a_model_that_does_not_match_is_refused_and_the_woken_engine_closed(slept, started):
    path, _ = slept
    with pytest.raises(IncompatibleSnapshotError, match=r"model\.\w+_digest"):
        wake(path, factory=started, overrides={"seed": 1})  # another model of the same shape
    [engine] = started.engines
    assert engine.engine is None


def test_overrides_replace_the_recorded_arguments(slept, tmp_path, started):
    """A file recording the wrong model (a folder that moved, here a seed) wakes with the caller's argument."""
    path, want = slept
    recorded = thaw_format.load(path).metadata[LAUNCH_KEY]
    moved = rewritten(path, tmp_path / "moved.thaw", {**recorded, "kwargs": {**recorded["kwargs"], "seed": 1}})
    with pytest.raises(IncompatibleSnapshotError):
        wake(moved)
    awake = wake(moved, overrides={"seed": 0})
    check_woken(awake, want)


def test_a_factory_not_registered_is_refused_without_importing_it(slept, tmp_path, monkeypatch):
    (tmp_path / "planted_factory.py").write_text("import pathlib\npathlib.Path(__file__).with_suffix('.ran').touch()\n"
                                               "raise SystemExit('a snapshot file ran this')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path, want = slept
    recorded = thaw_format.load(path).metadata[LAUNCH_KEY]
    planted = rewritten(path, tmp_path / "planted.thaw", {**recorded, "factory": "planted_factory:start"})
    with pytest.raises(UnregisteredFactory, match="'planted_factory:start'.*nothing was imported"):
        wake(planted)
    assert not (tmp_path / "planted_factory.ran").exists() and "planted_factory" not in sys.modules
    check_woken(wake(planted, factory=ToyThawEngine.start), want)  # the caller's own choice is honoured


def test_a_file_may_not_set_an_option_that_runs_code(slept, tmp_path, started):
    path, _ = slept
    recorded = thaw_format.load(path).metadata[LAUNCH_KEY]
    remote = rewritten(path, tmp_path / "remote.thaw",
                       {**recorded, "kwargs": {**recorded["kwargs"], "trust_remote_code": True}})
    with pytest.raises(UnregisteredFactory, match="trust_remote_code"):
        wake(remote, factory=started)
    assert started.engines == []


@pytest.mark.parametrize("launch", [None, "thaw_conformance.template.adapter:ToyThawEngine.start",
                                    {"factory": 3, "kwargs": {}}])
def test_a_file_without_a_valid_launch_record_is_refused_by_name(slept, tmp_path, launch):
    path, want = slept
    odd = rewritten(path, tmp_path / "odd.thaw", launch)
    with pytest.raises(IncompatibleSnapshotError, match=LAUNCH_KEY):
        wake(odd)
    if launch is None:  # a capture saved by hand: the caller says what to start
        check_woken(wake(odd, factory=ToyThawEngine.start, overrides={"seed": 0}), want)


WAKE_ELSEWHERE = textwrap.dedent("""
    import json, sys
    from thaw_format.sdk import wake
    awake = wake(sys.argv[1])
    done = awake.engine.finish(awake.resumed)
    print(json.dumps({r.request_id: [r.prompt_token_ids, done[r.request_id].output_token_ids,
                                     done[r.request_id].cached_tokens] for r in awake.resumed}))
""")


def test_an_engine_slept_in_this_process_wakes_in_another(slept):
    path, want = slept
    done = subprocess.run([sys.executable, "-c", WAKE_ELSEWHERE, str(path)], capture_output=True, text=True,
                          timeout=120, check=True)
    outputs = json.loads(done.stdout)
    assert {tuple(prompt): tokens for prompt, tokens, _ in outputs.values()} == \
        {tuple(prompt): tokens for prompt, tokens in zip(PROMPTS, want)}
    assert all(cached > 0 for _, _, cached in outputs.values())
