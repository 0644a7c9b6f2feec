"""Compatibility checks an adapter runs before touching an engine: each mismatch names the field and both values."""

from __future__ import annotations

from typing import Optional

from .errors import IncompatibleSnapshotError
from .snapshot import ModelInfo, Snapshot


def _mismatch(field: str, snapshot_value, engine_value) -> IncompatibleSnapshotError:
    return IncompatibleSnapshotError(f"{field}: the snapshot has {snapshot_value!r}, the engine has {engine_value!r}")


def expect_snapshot(value) -> None:
    """Refuse anything but a Snapshot (a path handed to a restore) by saying so, not "'str' has no attribute"."""
    if not isinstance(value, Snapshot):
        raise TypeError(f"expected a thaw_format.Snapshot, got {type(value).__name__} {value!r:.80}: load a "
                        "file with thaw_format.load(path), or restore from it with engine.restore_source(path)")


def check_model(snapshot: Snapshot, engine: ModelInfo, *, check_weights: bool = True) -> None:
    """Refuse a snapshot of another model: architecture, config, dtype, and (if both know it) weights digest."""
    expect_snapshot(snapshot)
    model = snapshot.model
    if model is None:
        raise IncompatibleSnapshotError("the snapshot has no model section, so it cannot be matched to this engine")
    for field in ("architecture", "config_digest", "dtype"):
        if getattr(model, field) != getattr(engine, field):
            raise _mismatch(f"model.{field}", getattr(model, field), getattr(engine, field))
    if check_weights and model.weights_digest and engine.weights_digest and model.weights_digest != engine.weights_digest:
        raise _mismatch("model.weights_digest", model.weights_digest, engine.weights_digest)


def check_kv_layout(
    snapshot: Snapshot,
    *,
    num_layers: int,
    dtype: str,
    num_kv_heads: Optional[int] = None,
    head_dim: Optional[int] = None,
    page_size: Optional[int] = None,
) -> None:
    """Refuse KV the engine cannot hold: layer count, dtype, heads, head size, and page size when it must match."""
    kv = snapshot.kv
    if kv is None:
        raise IncompatibleSnapshotError("the snapshot has no kv section")
    if len(kv.layers) != num_layers:
        raise _mismatch("kv.layers (count)", len(kv.layers), num_layers)
    if kv.dtype != dtype:
        raise _mismatch("kv.dtype", kv.dtype, dtype)
    if page_size is not None and kv.page_size != page_size:
        raise _mismatch("kv.page_size", kv.page_size, page_size)
    for i, layer in enumerate(kv.layers):
        if num_kv_heads is not None and layer.num_kv_heads != num_kv_heads:
            raise _mismatch(f"kv.layers[{i}].num_kv_heads", layer.num_kv_heads, num_kv_heads)
        if head_dim is not None and layer.head_dim != head_dim:
            raise _mismatch(f"kv.layers[{i}].head_dim", layer.head_dim, head_dim)
