"""Weights changed in place (an RL trainer's step between rollouts): what every adapter's `weights_changed` keeps.

An engine names its weights by digest (spec 5.1): the checkpoint's, or its live weights'. A trainer that loads
new weights into the running engine (vLLM's `model.load_weights` through `collective_rpc`, SGLang's
`update_weights_from_tensor`, MLX's `model.load_weights`, torch's `load_state_dict`) leaves that name stale,
and with it every check a restore makes. `engine.weights_changed(digest)` tells the engine. From then on it
names its weights by `digest` (thaw_format.weights_digest over the full new weights, names and dtypes as the
checkpoint stores them, which the trainer holds), or, given none, by nothing it can prove: such an engine refuses
any snapshot that names a weights digest (it cannot show its weights are those) and refuses to capture (a snapshot
naming no weights would restore into any engine of the model, the old weights' too). An engine whose identity
names its own live weights (a model built in memory, no checkpoint's) computes their digest again instead.

Either way no engine started from its launch spec would hold these weights, so `launch_spec()` is refused, and
with it sleep and fork(processes=True) (both ask for it before they change anything).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from ..digest import checked_digest
from ..errors import IncompatibleSnapshotError, UnknownWeightsError
from ..snapshot import ModelInfo, Snapshot
from .contract import Unsupported

HOW = ("pass weights_changed(digest=thaw_format.weights_digest(new_weights)), the digest of the full new weights "
       "under their checkpoint names")
NOT_LAUNCHABLE = ("the weights were changed in place (weights_changed): an engine started from this launch spec "
                  "would hold the checkpoint's")


def check_idle(busy: bool) -> None:
    """weights_changed is for an idle engine (`busy`: requests in flight): one would go on with KV of the old
    weights."""
    if busy:
        raise RuntimeError("weights_changed needs an idle engine, and requests are in flight: finish or abort "
                           "them, then call it again; nothing changed")


def checked_live(digest: Optional[str], live: Callable[[], str]) -> str:
    """The digest of an engine's live weights (`live` computes it), where its identity names those: a `digest`
    given must be it."""
    digest, actual = checked_digest(digest), live()
    if digest is not None and digest != actual:
        raise ValueError(f"weights_changed: digest {digest!r} is not that of the engine's live weights, {actual!r} "
                         "(its identity names them, not a checkpoint's): nothing changed")
    return actual


@dataclasses.dataclass(frozen=True)
class InPlaceWeights:
    """What an engine knows of weights changed in place: never changed (its identity stands), or changed to
    `digest` (None: to weights it cannot name). `live`: its identity names its own live weights, not a
    checkpoint's (InPlaceWeights.loaded)."""

    live: bool = False
    changed: bool = False
    digest: Optional[str] = None

    @classmethod
    def loaded(cls, checkpoint, info: Optional[ModelInfo]) -> "InPlaceWeights":
        """The one naming rule: an engine with no checkpoint and no identity given computed its identity from its
        own live weights; any other names a checkpoint's (a caller giving `info` names the new weights as it did)."""
        return cls(live=checkpoint is None and info is None)

    def change(self, digest: Optional[str], live: Optional[Callable[[], str]] = None) -> "InPlaceWeights":
        """This engine's weights changed to `digest`; where its identity names its live weights, `live` computes
        their digest, which it is then (a `digest` given must equal it)."""
        digest = checked_live(digest, live) if self.live else checked_digest(digest)
        return dataclasses.replace(self, changed=True, digest=digest)

    def renamed(self, info: ModelInfo, digest: Optional[str], live: Callable[[], str]) -> tuple["InPlaceWeights", ModelInfo]:
        """change, and the engine's identity `info` naming the new weights."""
        changed = self.change(digest, live)
        return changed, dataclasses.replace(info, weights_digest=changed.digest)

    @property
    def unknown(self) -> bool:
        return self.changed and self.digest is None

    def check(self, snapshot: Snapshot) -> None:
        """check_known for this engine (after check_model against its identity)."""
        check_known(snapshot, self.unknown)

    def check_capture(self) -> None:
        """check_named for this engine."""
        check_named(self.unknown)

    def check_launch(self) -> None:
        """check_launchable for this engine."""
        check_launchable(self.changed)


def check_known(snapshot: Snapshot, unknown: bool) -> None:
    """Refuse a snapshot naming a weights digest where the engine's weights are `unknown` (changed in place
    without a digest): spec 5.1's rule, since the engine cannot show its weights are the snapshot's."""
    named = snapshot.model.weights_digest if snapshot.model is not None else None
    if unknown and named:
        raise IncompatibleSnapshotError(
            f"model.weights_digest: the snapshot has {named!r}; this engine's weights were changed in place "
            f"(weights_changed() without a digest), so it cannot show they are those: {HOW}")


def check_named(unknown: bool) -> None:
    """Refuse a capture where the engine's weights are `unknown` (changed in place without a digest)."""
    if unknown:
        raise UnknownWeightsError(
            "capture: this engine's weights were changed in place (weights_changed() without a digest), so a "
            "snapshot could not name them and would restore into any engine of the model, those still holding "
            f"the old weights too: {HOW}")


def check_launchable(changed: bool) -> None:
    """Refuse a launch spec (Unsupported) once the weights `changed` in place: sleep, fork(processes=True) and a
    fork pool would start engines holding the checkpoint's."""
    if changed:
        raise Unsupported(NOT_LAUNCHABLE)
