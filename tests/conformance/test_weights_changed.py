"""weights_changed on the template's engine and through the fork pool: after an RL step changes the parent's weights
in place, its old snapshots are refused, and a pool's workers (started from the parent's launch spec: the weights it
was started with) refuse a round of the parent's new KV, each worker's restore naming the field; a new pool is refused
(the parent's launch spec would start the old weights)."""

import pytest

from test_contract_fork import CONTEXT, PROMPT, parent  # noqa: F401  the template's engine, having served CONTEXT
from thaw_format import IncompatibleSnapshotError
from thaw_format.sdk import ForkPool, Unsupported, greedy


def _step(parent) -> None:
    """The trainer's step: one weight matrix changed in the running engine."""
    weights = parent.engine.weights
    name = sorted(weights)[0]
    weights[name] = weights[name] * 2


def test_the_old_snapshot_is_refused_and_the_prefix_cache_dropped(parent):
    old = parent.capture(include_weights=False)
    _step(parent)
    with pytest.raises(ValueError, match="not that of the engine's live weights"):
        parent.weights_changed(old.model.weights_digest)
    parent.weights_changed()
    assert parent.model_info().weights_digest != old.model.weights_digest
    first = parent.generate(PROMPT, greedy(4))
    assert first.cached_tokens == 0  # the old weights' pages are gone
    with pytest.raises(IncompatibleSnapshotError, match=r"^model\.weights_digest"):
        parent.restore(old)
    after = parent.generate(PROMPT, greedy(4))
    assert after.token_ids == first.token_ids and after.cached_tokens > 0


def test_a_new_pool_is_refused_the_launch_spec_naming_the_checkpoints_weights(parent):
    _step(parent)
    parent.weights_changed()
    with pytest.raises(Unsupported, match=r"^the weights were changed in place \(weights_changed\)"):
        ForkPool(parent, workers=1)


def test_a_pool_refuses_a_round_of_the_updated_parent(parent):
    with ForkPool(parent, workers=1) as pool:
        pool.fork(parent, 1, context=CONTEXT, suffixes=[[41]], params=greedy(2))
        _step(parent)
        parent.weights_changed()
        with pytest.raises(RuntimeError, match=r"model\.weights_digest: the snapshot has 'sha256:"):
            pool.fork(parent, 1, context=CONTEXT, suffixes=[[41]], params=greedy(2))
