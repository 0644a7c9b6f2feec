"""Model weights: captured by engine-native parameter name, restored through SGLang's weight-update API."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from thaw_format import IncompatibleSnapshotError, Snapshot, Weights, checkpoint_weights_digest, weights_digest
from thaw_format.sdk.inplace import InPlaceWeights
from thaw_format.torch import from_torch, to_torch

from . import _internals


def _checkpoint_keys(model_dir: Path) -> set[str]:
    keys: set[str] = set()
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys.update(f.keys())
    return keys


def capture_weights(scheduler) -> Weights:
    """Every parameter under SGLang's name; `checkpoint_names` maps those the checkpoint holds unchanged.

    Fused parameters (qkv_proj, gate_up_proj) have no single checkpoint name and are left out of the map.
    """
    tensors = {name: from_torch(p) for name, p in _internals.model(scheduler).named_parameters()}
    in_checkpoint = _checkpoint_keys(_internals.model_path(scheduler))
    return Weights(tensors=tensors, checkpoint_names={n: n for n in tensors if n in in_checkpoint})


def engine_weights_digest(scheduler) -> str | None:
    """The identity of the weights the engine holds (spec 5.1), the same in every engine serving them.

    The checkpoint's digest (SGLang fuses and renames parameters; the checkpoint files are what engines share),
    computed on first use; after a restore that loaded a snapshot's weights, that snapshot's digest; after the
    weights changed in place (thaw_weights_changed), the digest the user named them by (None: unknown).
    """
    if scheduler.thaw_in_place.changed:
        return scheduler.thaw_in_place.digest
    if scheduler.thaw_weights_digest is None:
        scheduler.thaw_weights_digest = checkpoint_weights_digest(_internals.model_path(scheduler))
    return scheduler.thaw_weights_digest


def check_weights(scheduler, weights: Weights) -> None:
    """Refuse weights that do not cover this model's parameters exactly, by name, shape and dtype."""
    params = dict(_internals.model(scheduler).named_parameters())
    missing = sorted(set(params) - set(weights.tensors))
    unknown = sorted(set(weights.tensors) - set(params))
    if missing or unknown:
        raise IncompatibleSnapshotError(
            f"weights: the snapshot lacks parameters {missing[:5]} and has unknown ones {unknown[:5]}"
        )
    for name, tensor in weights.tensors.items():
        param = params[name]
        engine = (str(param.dtype).removeprefix("torch."), tuple(param.shape))
        if (tensor.dtype, tuple(tensor.shape)) != engine:
            raise IncompatibleSnapshotError(
                f"weights[{name!r}]: the snapshot has {(tensor.dtype, tuple(tensor.shape))}, the engine has {engine}"
            )


def restore_weights(scheduler, snapshot: Snapshot) -> None:
    """Load the snapshot's weights; the engine's weights identity becomes the snapshot's (or, if it names
    none, the digest of the loaded tensors)."""
    tensors = snapshot.weights.tensors
    _internals.load_weights(scheduler, [(name, to_torch(t)) for name, t in tensors.items()])
    scheduler.thaw_weights_digest = snapshot.model.weights_digest or weights_digest(tensors)
    scheduler.thaw_in_place = InPlaceWeights()  # the snapshot's weights, named by its digest
