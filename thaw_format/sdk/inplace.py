"""Weights changed in place (an RL trainer's step between rollouts): what every adapter's `weights_changed` keeps.

An engine names its weights by digest (spec 5.1): the checkpoint's, or its live weights'. A trainer that loads
new weights into the running engine (vLLM's `model.load_weights` through `collective_rpc`, SGLang's
`update_weights_from_tensor`, MLX's `model.load_weights`, torch's `load_state_dict`) leaves that name stale,
and with it every check a restore makes. `engine.weights_changed(digest)` tells the engine. From then on it
names its weights by `digest` (thaw_format.weights_digest over the full new weights under checkpoint names,
which the trainer holds), or, given none, by nothing it can prove: such an engine refuses any snapshot that
names a weights digest (it cannot show its weights are those) and refuses to capture (a snapshot naming no
weights would restore into any engine of the model, the old weights' too).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional

from ..errors import IncompatibleSnapshotError
from ..snapshot import ModelInfo, Snapshot

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
HOW = ("pass weights_changed(digest=thaw_format.weights_digest(new_weights)), the digest of the full new weights "
       "under their checkpoint names")


class UnknownWeightsError(RuntimeError):
    """The engine's weights were changed in place without a digest: it cannot name them in a snapshot."""


def check_idle(in_flight: int) -> None:
    """weights_changed is for an idle engine (`in_flight` requests: none): a request in flight would go on with
    KV of the old weights."""
    if in_flight:
        raise RuntimeError("weights_changed needs an idle engine, and requests are in flight: finish or abort "
                           "them, then call it again; nothing changed")


def checked_digest(digest: Optional[str]) -> Optional[str]:
    """`digest` if it is one thaw_format.weights_digest gives ("sha256:" and 64 lowercase hex digits), or None."""
    if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        raise ValueError(f"weights_changed's digest is thaw_format.weights_digest(tensors) ('sha256:' and 64 "
                         f"lowercase hex digits), not {digest!r}")
    return digest


@dataclasses.dataclass
class InPlaceWeights:
    """What an engine knows of weights changed in place: never changed (its identity stands), or changed to
    `digest` (None: to weights it cannot name)."""

    changed: bool = False
    digest: Optional[str] = None

    def change(self, digest: Optional[str], live: Optional[Callable[[], str]] = None) -> None:
        """Name the changed weights by `digest`. `live` computes the digest of the live weights, for an engine
        whose identity names those (a model built in memory, not loaded from a checkpoint): it is the digest
        then, and a `digest` given must equal it."""
        digest = checked_digest(digest)
        if live is not None:
            actual = live()
            if digest is not None and digest != actual:
                raise ValueError(f"weights_changed: digest {digest!r} is not that of the engine's live weights, "
                                 f"{actual!r} (its identity names them, not a checkpoint's): nothing changed")
            digest = actual
        self.digest, self.changed = digest, True

    @property
    def unknown(self) -> bool:
        return self.changed and self.digest is None

    def identity(self, loaded: ModelInfo) -> ModelInfo:
        """The engine's identity: the one it was `loaded` with, its weights digest replaced once they changed."""
        return dataclasses.replace(loaded, weights_digest=self.digest) if self.changed else loaded

    def check(self, snapshot: Snapshot) -> None:
        """check_known for this engine (after check_model against its identity)."""
        check_known(snapshot, self.unknown)

    def check_capture(self) -> None:
        """check_named for this engine."""
        check_named(self.unknown)


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


def refuse_checkpoint_weights(engine: str) -> None:
    """A capture with weights on an engine that can read back only its checkpoint's, after they changed."""
    raise UnknownWeightsError(
        f"capture(include_weights=True): {engine} reads the weights back from the checkpoint it loaded (its live "
        "parameters are repacked and cannot be read), and they were changed in place since (weights_changed()): "
        "capture with include_weights=False, which names the new weights by digest")
