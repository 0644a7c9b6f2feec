"""thaw_format.sdk.sleep / wake on the template's contract engine: the logic every engine shares (the durable
file, when the engine is closed, what a failed save, a failed close or a bad file leaves, which factories and
options a file may name), and the shared sleep/wake tests (tests/sleep_checks.py), here also with the wake in
another process. The template's factory is not among those a file may name in production (factories.REGISTERED):
these tests add it."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import thaw_format
from sleep_checks import PARAMS, PROMPTS, check_woken, run_midway, sleep_midway
from sleep_checks import at_sleep, in_flight  # noqa: F401  shared fixtures
from sleep_checks import test_a_capture_does_not_change_as_the_engine_goes_on  # noqa: F401  the shared tests
from sleep_checks import test_a_woken_engine_sleeps_again_before_finishing  # noqa: F401
from sleep_checks import test_sleep_then_wake_finishes_the_requests_exactly  # noqa: F401
from thaw_conformance.template.adapter import ToyThawEngine
from thaw_conformance.template.driver import driver
from thaw_format import CorruptSnapshotError, IncompatibleSnapshotError
from thaw_format.sdk import (LocalDirectory, OneOf, RefusedLaunch, SleptNotClosed, Unsupported, greedy, seeded,
                             sleep, wake)
from thaw_format.sdk import factories
from thaw_format.sdk.launch import start_arguments
from thaw_format.sdk.sleep import GIVEN_AT_WAKE_KEY, LAUNCH_KEY

TEMPLATE = "thaw_conformance.template.adapter:ToyThawEngine.start"
REGISTER_TEMPLATE = f"from thaw_format.sdk import factories; factories.REGISTERED |= {{{TEMPLATE!r}}}"


@pytest.fixture(autouse=True)
def template_registered(monkeypatch):
    monkeypatch.setattr(factories, "REGISTERED", factories.REGISTERED | {TEMPLATE})


@pytest.fixture
def wakes():
    """wake, closing each engine it woke at the end of the test."""
    engines = []

    def wake_and_keep(*args, **kwargs):
        awake = wake(*args, **kwargs)
        engines.append(awake.engine)
        return awake

    yield wake_and_keep
    for engine in engines:
        engine.close()


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
    start.launch_options = ToyThawEngine.launch_options  # what a file may set for it
    yield start
    for engine in engines:
        engine.close()


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
    open_while_saving, fsyncs = [], []  # fsyncs: whether the engine was open at each
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(engine.engine is not None), real_fsync(fd))[1])
    path = tmp_path / "slept.thaw"
    snapshot_id = sleep(engine, path, progress=lambda n: open_while_saving.append(engine.engine is not None))
    assert open_while_saving and all(open_while_saving) and engine.engine is None
    assert len(fsyncs) >= 2 and all(fsyncs)  # the file, then its folder (the rename), both before the close
    assert thaw_format.verify(path) == snapshot_id and os.listdir(tmp_path) == ["slept.thaw"]
    snapshot = thaw_format.load(path)
    assert not (snapshot.weights and snapshot.weights.tensors) and snapshot.model.weights_digest  # by digest only
    assert snapshot.metadata[LAUNCH_KEY] == {"factory": "thaw_conformance.template.adapter:ToyThawEngine.start",
                                             "kwargs": {"vocab_size": 256, "hidden_size": 32, "num_layers": 2,
                                                        "num_heads": 2, "head_dim": 16, "seed": 0},
                                             "given_at_wake": []}
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


def test_overrides_replace_the_recorded_arguments(slept, tmp_path, wakes):
    """A file recording the wrong model (a folder that moved, here a seed) wakes with the caller's argument."""
    path, want = slept
    recorded = thaw_format.load(path).metadata[LAUNCH_KEY]
    moved = rewritten(path, tmp_path / "moved.thaw", {**recorded, "kwargs": {**recorded["kwargs"], "seed": 1}})
    with pytest.raises(IncompatibleSnapshotError):
        wake(moved)
    check_woken(wakes(moved, overrides={"seed": 0}), want)


def test_a_factory_not_registered_is_refused_without_importing_it(slept, tmp_path, monkeypatch, wakes):
    (tmp_path / "planted_factory.py").write_text("import pathlib\npathlib.Path(__file__).with_suffix('.ran').touch()\n"
                                               "raise SystemExit('a snapshot file ran this')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path, want = slept
    recorded = thaw_format.load(path).metadata[LAUNCH_KEY]
    planted = rewritten(path, tmp_path / "planted.thaw", {**recorded, "factory": "planted_factory:start"})
    with pytest.raises(RefusedLaunch, match="'planted_factory:start'.*nothing was imported"):
        wake(planted)
    assert not (tmp_path / "planted_factory.ran").exists() and "planted_factory" not in sys.modules
    check_woken(wakes(planted, factory=ToyThawEngine.start), want)  # the caller's own choice is honoured


# What a hostile file might set: options not on the adapter's list (whatever they do), values not plain.
HOSTILE = {"not listed": {"trust_remote_code": True}, "a hook by name": {"forward_hooks": "os.system"},
           "not a plain value": {"seed": {"module": "os", "name": "system"}}, "another type": {"seed": "0"}}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_file_may_set_only_the_options_its_adapter_lists(slept, tmp_path, started, wakes, case):
    path, want = slept
    recorded = thaw_format.load(path).metadata[LAUNCH_KEY]
    kwargs = {**recorded["kwargs"], **HOSTILE[case]}
    hostile = rewritten(path, tmp_path / "hostile.thaw", {**recorded, "kwargs": kwargs})
    [key] = HOSTILE[case]
    with pytest.raises(RefusedLaunch, match=f"sets {key}"):
        wake(hostile, factory=started)
    with pytest.raises(RefusedLaunch, match=f"sets {key}"):
        wake(hostile)
    assert started.engines == []
    safe = {key: 0 if key == "seed" else None}  # the caller's word: its own value, or the default
    check_woken(wakes(hostile, overrides=safe, factory=tolerant), want)


def tolerant(trust_remote_code=None, forward_hooks=None, api_key=None, hf_token=None, **config):
    """The template's start, taking (and ignoring) the hostile cases' options and WithSecrets' secrets."""
    return ToyThawEngine.start(**config)


tolerant.launch_options = ToyThawEngine.launch_options


def test_a_file_with_a_value_that_is_not_plain_imports_no_factory(slept, tmp_path, monkeypatch):
    """Plain values are checked before a registered factory's module (vLLM's imports vllm and torch) is."""
    (tmp_path / "heavy_factory.py").write_text("import pathlib\npathlib.Path(__file__).with_suffix('.ran').touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(factories, "REGISTERED", factories.REGISTERED | {"heavy_factory:start"})
    path, _ = slept
    odd = rewritten(path, tmp_path / "odd.thaw", {"factory": "heavy_factory:start", "kwargs": {"hooks": ["os.system"]}})
    with pytest.raises(RefusedLaunch, match="hooks=.*not a plain value"):
        wake(odd)
    assert not (tmp_path / "heavy_factory.ran").exists()


def test_a_model_directory_must_exist_here(tmp_path):
    """A path option (LocalDirectory) is a directory that exists: never a hub id the engine would download."""
    options = {"model": LocalDirectory}
    assert start_arguments({"model": str(tmp_path)}, None, options) == {"model": str(tmp_path)}
    for elsewhere in ("meta-llama/Llama-3.1-8B", str(tmp_path / "gone")):
        with pytest.raises(RefusedLaunch, match=f"model='{elsewhere}' \\(not an existing local directory\\)"):
            start_arguments({"model": elsewhere}, None, options)
        assert start_arguments({"model": elsewhere}, {"model": str(tmp_path)}, options) == {"model": str(tmp_path)}


def test_an_option_with_a_set_of_values_takes_those_only():
    """OneOf: a loader that reads the model directory, never one that fetches weights elsewhere or is a plugin."""
    options = {"load_format": OneOf("auto", "safetensors"), "flag": OneOf(1)}
    assert start_arguments({"load_format": "safetensors", "flag": 1}, None, options) == {"load_format": "safetensors",
                                                                                        "flag": 1}
    for key, value in (("load_format", "runai_streamer"), ("load_format", ["auto"]), ("flag", True)):
        with pytest.raises(RefusedLaunch, match=re.escape(f"sets {key}={value!r} (not one of ")):
            start_arguments({key: value}, None, options)
    assert start_arguments({"load_format": "dummy"}, {"load_format": "auto"}, options) == {"load_format": "auto"}


class WithSecrets(ToyThawEngine):
    """An engine whose launch arguments hold a secret and an option that is not on its list."""

    def launch_spec(self):
        spec = super().launch_spec()
        return type(spec)(spec.factory, {**spec.kwargs, "api_key": "sk-secret", "hf_token": "hf_secret"})


class DefaultToken(ToyThawEngine):
    """An engine started with an unlisted argument set to None, the engine's default (vLLM's hf_token=None)."""

    def launch_spec(self):
        spec = super().launch_spec()
        return type(spec)(spec.factory, {**spec.kwargs, "hf_token": None})


def test_an_argument_left_at_its_default_is_neither_refused_nor_written(sleeper, tmp_path, wakes):
    engine = DefaultToken(sleeper().engine)
    _, want = run_midway(engine)
    path = tmp_path / "slept.thaw"
    sleep(engine, path)
    assert "hf_token" not in thaw_format.load(path).metadata[LAUNCH_KEY]["kwargs"]
    check_woken(wakes(path), want)  # the template's start, which takes no hf_token


class NotJSONAble(ToyThawEngine):
    """An engine started with an argument its launch spec cannot hold (vLLM's with an object for a value)."""

    def launch_spec(self):
        spec = super().launch_spec()
        return type(spec)(spec.factory, spec.kwargs, frozenset({"compilation_config"}))


class OddSeed(ToyThawEngine):
    """An engine whose listed option has a value of another type."""

    def launch_spec(self):
        spec = super().launch_spec()
        return type(spec)(spec.factory, {**spec.kwargs, "seed": [0]})


@pytest.mark.parametrize("kind, why", [
    (WithSecrets, "started with api_key, hf_token, which a snapshot file does not hold.*given_at_wake"),
    (NotJSONAble, "started with compilation_config, which a snapshot file does not hold.*given_at_wake"),
    (OddSeed, r"seed=\[0\] \(not of type int\)"),
])
def test_an_engine_whose_launch_arguments_a_file_cannot_hold_refuses_to_sleep(sleeper, tmp_path, kind, why):
    """Without them wake would start a different engine: refused before anything is written or closed."""
    engine = kind(sleeper().engine)
    ids, want = run_midway(engine)
    with pytest.raises(Unsupported, match=why):
        sleep(engine, tmp_path / "slept.thaw")
    assert os.listdir(tmp_path) == [] and engine.engine is not None
    done = engine.finish()
    assert [done[rid].output_token_ids for rid in ids] == want


def test_options_given_at_wake_are_written_by_name_only_and_wake_needs_them(sleeper, tmp_path, wakes, started):
    engine = WithSecrets(sleeper().engine)
    _, want = run_midway(engine)
    path = tmp_path / "slept.thaw"
    sleep(engine, path, given_at_wake=["hf_token", "api_key", "seed"])  # a listed option too: the caller's choice
    metadata = thaw_format.load(path).metadata
    assert LAUNCH_KEY not in metadata  # thaw before given_at_wake reads that key only: it refuses this file
    record = metadata[GIVEN_AT_WAKE_KEY]
    assert record["given_at_wake"] == ["api_key", "hf_token", "seed"] and "seed" not in record["kwargs"]
    assert b"secret" not in path.read_bytes()
    for partial, missing in ((None, "'api_key', 'hf_token', 'seed'"), ({"api_key": "k", "seed": 0}, "'hf_token'")):
        with pytest.raises(RefusedLaunch, match=f"slept with {missing} given at wake.*overrides"):
            wake(path, factory=started, overrides=partial)
    assert started.engines == []  # nothing started
    check_woken(wakes(path, factory=tolerant, overrides={"api_key": "k", "hf_token": None, "seed": 0}), want)


def test_a_file_naming_many_arguments_given_at_wake_is_refused_in_a_short_message(slept, tmp_path):
    path, _ = slept
    recorded = thaw_format.load(path).metadata[LAUNCH_KEY]
    names = [f"{i:04d}" + "x" * 10_000 for i in range(1000)]
    hostile = rewritten(path, tmp_path / "hostile.thaw", {**recorded, "given_at_wake": names})
    with pytest.raises(RefusedLaunch, match="slept with '0000x.*' and 990 more given at wake") as refused:
        wake(hostile)
    assert len(str(refused.value)) < 2000


def test_given_at_wake_naming_an_argument_the_engine_was_not_started_with_is_refused(sleeper, tmp_path):
    engine = WithSecrets(sleeper().engine)
    with pytest.raises(ValueError, match="given_at_wake names 'hf_tokn', which the engine was not started with"):
        sleep(engine, tmp_path / "slept.thaw", given_at_wake=["api_key", "hf_tokn"])
    assert os.listdir(tmp_path) == [] and engine.engine is not None


def test_a_file_with_two_launch_records_is_refused(slept, tmp_path):
    path, _ = slept
    snapshot = thaw_format.load(path)
    snapshot.metadata[GIVEN_AT_WAKE_KEY] = {**snapshot.metadata[LAUNCH_KEY], "given_at_wake": ["seed"]}
    thaw_format.save(snapshot, tmp_path / "two.thaw")
    with pytest.raises(IncompatibleSnapshotError, match="holds both"):
        wake(tmp_path / "two.thaw", factory=ToyThawEngine.start)


def test_given_at_wake_may_be_a_generator(sleeper, tmp_path):
    path = tmp_path / "slept.thaw"
    sleep(WithSecrets(sleeper().engine), path, given_at_wake=(name for name in ("hf_token", "api_key")))
    assert thaw_format.load(path).metadata[GIVEN_AT_WAKE_KEY]["given_at_wake"] == ["api_key", "hf_token"]


@pytest.mark.parametrize("names", ["hf_token", [1]])
def test_given_at_wake_is_a_collection_of_names(sleeper, tmp_path, names):
    with pytest.raises(TypeError, match="given_at_wake is a collection of argument names"):
        sleep(WithSecrets(sleeper().engine), tmp_path / "slept.thaw", given_at_wake=names)
    assert os.listdir(tmp_path) == []


def test_a_seeded_request_needs_mid_stream_seeded(sleeper, tmp_path):
    class NotSeeded(ToyThawEngine):
        @classmethod
        def capabilities(cls):
            return super().capabilities() - {"mid_stream_seeded"}

    greedy_only = NotSeeded(sleeper().engine)
    greedy_only.submit(PROMPTS[0], greedy(8))
    greedy_only.step()
    sleep(greedy_only, tmp_path / "greedy.thaw")  # nothing seeded in flight: it sleeps
    engine = NotSeeded(sleeper().engine)
    ids = [engine.submit(PROMPTS[0], greedy(8)), engine.submit(PROMPTS[1], seeded(7, 8))]
    engine.step()
    with pytest.raises(Unsupported, match="mid_stream_seeded"):
        sleep(engine, tmp_path / "seeded.thaw")
    assert os.listdir(tmp_path) == ["greedy.thaw"] and engine.engine is not None
    assert engine.finish().keys() == set(ids)


class CloseFails(ToyThawEngine):
    def close(self):
        super().close()
        raise OSError("the test's close failure")


def test_a_failed_close_after_a_durable_save_says_the_file_is_complete(sleeper, tmp_path, wakes):
    engine = CloseFails(sleeper().engine)
    _, want = run_midway(engine)
    path = tmp_path / "slept.thaw"
    with pytest.raises(SleptNotClosed, match="is complete") as raised:
        sleep(engine, path)
    assert thaw_format.verify(path) == raised.value.snapshot_id
    assert isinstance(raised.value.__cause__, OSError)
    check_woken(wakes(path), want)


def test_a_failed_close_of_a_refusing_engine_keeps_the_refusal(slept):
    path, _ = slept
    with pytest.raises(IncompatibleSnapshotError) as raised:
        wake(path, factory=CloseFails.start, overrides={"seed": 1})  # another model: refused
    assert any("the test's close failure" in note for note in raised.value.__notes__)


@pytest.mark.parametrize("launch", [None, TEMPLATE, {"factory": 3, "kwargs": {}},
                                    {"factory": TEMPLATE, "kwargs": {}, "given_at_wake": "seed"}])
def test_a_file_without_a_valid_launch_record_is_refused_by_name(slept, tmp_path, launch, wakes):
    path, want = slept
    odd = rewritten(path, tmp_path / "odd.thaw", launch)
    with pytest.raises(IncompatibleSnapshotError, match=LAUNCH_KEY):
        wake(odd)
    if launch is None:  # a capture saved by hand: the caller says what to start
        check_woken(wakes(odd, factory=ToyThawEngine.start, overrides={"seed": 0}), want)


WAKE_ELSEWHERE = REGISTER_TEMPLATE + textwrap.dedent("""
    import json, sys
    from thaw_format.sdk import wake
    awake = wake(sys.argv[1])
    done = awake.engine.finish(awake.resumed)
    awake.engine.close()
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


def test_every_option_a_file_may_set_is_an_argument_of_start():
    """The template's start takes its model config's fields."""
    from thaw_conformance.template.engine import ToyModelConfig

    assert ToyThawEngine.launch_options.keys() <= {f.name for f in dataclasses.fields(ToyModelConfig)}
