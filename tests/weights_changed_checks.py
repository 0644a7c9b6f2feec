"""The weights_changed tests, written once for every engine: each tests/<engine>/test_weights_changed.py imports them
and supplies the `updated` fixture (an Updated, made by `update`), so each engine's run stays in its environment.

An RL step loads new weights into the running engine (the engine's own in-place API); until told, the engine still
names the weights it loaded. After `weights_changed(digest)` it names the new ones by `digest` (the trainer's
thaw_format.weights_digest over the full new weights under checkpoint names): its prefix cache's old KV is gone, the
old weights' snapshot is refused by restore and check before the engine changes (its output and cache hit after are
as before), a capture names the new digest and restores; a capture with weights holds the live weights' bytes, or is
refused where the adapter can read back only its checkpoint's. After `weights_changed()` (no digest) every snapshot
naming a digest, the new weights' own too, is refused, and so is every capture, until the weights are named. A
request in flight or a malformed digest changes nothing. Sleep and fork(processes=True) are refused (an engine
started from the launch spec would hold the checkpoint's weights), the engine left open and serving.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pytest

from thaw_format import IncompatibleSnapshotError, Snapshot, UnknownWeightsError
from thaw_format.sdk import Unsupported, greedy, sleep

PARAMS = greedy(8)
UNNAMED = r"changed in place \(weights_changed\(\) without a digest\), so it cannot show they are those"
NOT_LAUNCHABLE = r"^the weights were changed in place \(weights_changed\): an engine started from this launch spec"


@dataclass
class Updated:
    engine: object
    prompt: list
    old: Snapshot  # captured before the update
    before: list  # the prompt's greedy output before the update
    digest: str  # the new weights' (under checkpoint names)
    # {name: bytes} of live weights a capture must hold (all of them, or those the step changed where the engine
    # renames and fuses the others); None: a capture with weights is refused
    live: Optional[Callable[[], dict]]


def update(engine, prompt, step: Callable[[], str], live: Optional[Callable[[], dict]]) -> Updated:
    """Serve `prompt`, capture, then run the trainer's `step` (it returns the new weights' digest): the engine still
    names the weights it loaded until told."""
    before = engine.generate(prompt, PARAMS).token_ids
    old = engine.capture(include_weights=False)
    digest = step()
    assert engine.model_info().weights_digest == old.model.weights_digest != digest  # stale until told
    return Updated(engine, list(prompt), old, before, digest, live)


def _served(updated: Updated):
    """The prompt served twice after the change: the first computed anew (the old KV is gone), the second a hit."""
    engine = updated.engine
    first = engine.generate(updated.prompt, PARAMS)
    again = engine.generate(updated.prompt, PARAMS)
    assert first.cached_tokens == 0 and again.token_ids == first.token_ids and again.cached_tokens > 0
    return again


def _named(updated: Updated):
    """The engine told of the new weights by their digest, the prompt served: its engine and that output."""
    updated.engine.weights_changed(updated.digest)
    return updated.engine, _served(updated)


def _untouched(updated: Updated, want) -> None:
    got = updated.engine.generate(updated.prompt, PARAMS)
    assert (got.token_ids, got.cached_tokens) == (want.token_ids, want.cached_tokens)


def test_a_named_update_refuses_the_old_snapshot_and_serves_the_new_weights(updated):
    engine, want = _named(updated)
    assert engine.model_info().weights_digest == updated.digest
    assert want.token_ids != updated.before  # the update took effect
    for refused in (engine.restore, engine.check):
        with pytest.raises(IncompatibleSnapshotError, match=r"^model\.weights_digest: the snapshot has 'sha256:"):
            refused(updated.old)
        _untouched(updated, want)
    new = engine.capture(include_weights=False)
    assert new.model.weights_digest == updated.digest
    engine.restore(new)
    _untouched(updated, want)


def test_a_capture_with_weights_holds_the_live_weights_or_is_refused(updated):
    engine, want = _named(updated)
    if updated.live is None:
        refused = r"include_weights=True\): .* reads the weights back from the checkpoint"
        with pytest.raises(UnknownWeightsError, match=refused):
            engine.capture(include_weights=True)
        return
    snapshot = engine.capture(include_weights=True)
    assert snapshot.model.weights_digest == updated.digest
    live = updated.live()
    assert live and all(bytes(snapshot.weights.tensors[name].data) == data for name, data in live.items())
    engine.restore(snapshot)
    _untouched(updated, want)


def test_an_unnamed_update_refuses_named_snapshots_and_captures(updated):
    engine, _ = _named(updated)
    new = engine.capture(include_weights=False)
    engine.weights_changed()
    assert engine.model_info().weights_digest is None
    want = _served(updated)
    for snapshot in (updated.old, new):  # the new weights' own too: the engine cannot show it still holds them
        with pytest.raises(IncompatibleSnapshotError, match=UNNAMED):
            engine.restore(snapshot)
        _untouched(updated, want)
    for capture in (lambda: engine.capture(include_weights=False), lambda: engine.capture_shared(chains=[updated.prompt])):
        with pytest.raises(UnknownWeightsError, match="could not name them"):
            capture()
    engine.weights_changed(updated.digest)
    engine.restore(new)
    _untouched(updated, want)


def test_a_request_in_flight_or_a_malformed_digest_changes_nothing(updated):
    engine, want = _named(updated)
    with pytest.raises(ValueError, match=r"not 'sha256:abc'"):
        engine.weights_changed("sha256:abc")
    rid = engine.submit(updated.prompt, greedy(4))
    with pytest.raises(RuntimeError, match="needs an idle engine"):
        engine.weights_changed(None)
    assert engine.abort(rid)
    assert engine.model_info().weights_digest == updated.digest
    _untouched(updated, want)  # the prefix cache kept: the same tokens, the same hit


def test_sleep_and_a_process_fork_are_refused_the_engine_left_serving(updated):
    engine, want = _named(updated)
    with tempfile.TemporaryDirectory() as directory, pytest.raises(Unsupported, match=NOT_LAUNCHABLE):
        sleep(engine, Path(directory) / "slept.thaw")
    _untouched(updated, want)  # still open and serving
    with pytest.raises(Unsupported, match=NOT_LAUNCHABLE):
        engine.fork(2, context=updated.prompt[:64], processes=True)
    _untouched(updated, want)


# The checks above, for an engine's `updated` fixture: each engine's test file imports them (`import *`).
CHECKS = (test_a_named_update_refuses_the_old_snapshot_and_serves_the_new_weights,
          test_a_capture_with_weights_holds_the_live_weights_or_is_refused,
          test_an_unnamed_update_refuses_named_snapshots_and_captures,
          test_a_request_in_flight_or_a_malformed_digest_changes_nothing,
          test_sleep_and_a_process_fork_are_refused_the_engine_left_serving)
__all__ = [check.__name__ for check in CHECKS]


@dataclass
class InMemory:
    """An engine over a model built in memory (no checkpoint: its identity names its own weights), a `step`
    changing them in place, and `digest`, the digest of its live weights (thaw_format.weights_digest)."""

    engine: object
    prompt: list
    step: Callable[[], None]
    digest: Callable[[], str]


def test_a_model_built_in_memory_is_named_by_its_live_weights_again(in_memory):
    engine = in_memory.engine
    engine.generate(in_memory.prompt, PARAMS)
    old = engine.capture(include_weights=False)
    in_memory.step()
    with pytest.raises(ValueError, match="not that of the engine's live weights"):
        engine.weights_changed("sha256:" + "0" * 64)
    assert engine.model_info().weights_digest == old.model.weights_digest  # nothing changed
    engine.weights_changed()
    assert engine.model_info().weights_digest == in_memory.digest() != old.model.weights_digest
    with pytest.raises(IncompatibleSnapshotError, match=r"^model\.weights_digest"):
        engine.restore(old)
