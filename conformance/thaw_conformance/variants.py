"""Bad snapshots made from a good one: damaged bytes, another model's identity, and KV replaced by noise.

The noise variant is a valid snapshot under the same prefix hashes: the control that proves a restore's
output comes from the restored bytes (it must change the output) and not from recomputation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

import thaw_format
from thaw_format import Tensor, Weights, WeightsRef, config_digest
from thaw_format.dtypes import itemsize


def damaged(path: Path, out_dir: Path) -> dict[str, Path]:
    """A copy with one byte flipped inside tensor data (only the checksums can tell), and a truncated copy."""
    data = bytearray(path.read_bytes())
    with thaw_format.open(path) as f:
        biggest = max(f.names(), key=lambda name: f.info(name)[2].length)
        region = f.info(biggest)[2]
    data[region.offset + region.length // 2] ^= 0x01
    flipped, truncated = out_dir / "flipped_byte.thaw", out_dir / "truncated.thaw"
    flipped.write_bytes(data)
    truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) * 2 // 3])
    return {"one flipped data byte": flipped, "truncated to 2/3": truncated}


def other_models(path: Path, out_dir: Path) -> dict[str, Path]:
    """Valid snapshots of another model: another config (and so config digest), and KV of other weights.

    The second is KV-only, naming weights by a digest the engine's are not: restoring it would put KV computed
    by other weights beside this engine's weights. (A snapshot that carries weights may legitimately replace
    the engine's, so it would test nothing.)
    """
    snapshot = thaw_format.load(path)
    model = snapshot.model
    config = dict(model.config or {}, thaw_conformance_other_model=True)
    other_digest = "sha256:" + hashlib.sha256(f"other weights than {model.weights_digest}".encode()).hexdigest()
    variants = {
        "another config": dataclasses.replace(snapshot, model=dataclasses.replace(
            model, config=config, config_digest=config_digest(config))),
        "KV of other weights": dataclasses.replace(
            snapshot, weights=Weights(ref=WeightsRef(weights_digest=other_digest)),
            model=dataclasses.replace(model, weights_digest=other_digest)),
    }
    paths = {}
    for i, (label, variant) in enumerate(variants.items()):
        paths[label] = out_dir / f"other_model_{i}.thaw"
        thaw_format.save(variant, paths[label])
    return paths


def noise_kv(path: Path, out: Path) -> Path:
    """The snapshot with every KV tensor replaced by seeded noise of the same dtype and shape."""
    snapshot = thaw_format.load(path)
    layers = [dataclasses.replace(layer, tensors={role: _noise(t, seed=i) for role, t in layer.tensors.items()})
              for i, layer in enumerate(snapshot.kv.layers)]
    thaw_format.save(dataclasses.replace(snapshot, kv=dataclasses.replace(snapshot.kv, layers=layers)), out)
    return out


def _noise(t: Tensor, seed: int) -> Tensor:
    """Random values of t's dtype (finite and unit-scale for float types), never equal to t's bytes."""
    rng = np.random.default_rng(seed)
    count = t.nbytes // itemsize(t.dtype)
    normal = rng.standard_normal(count).astype(np.float32)
    if t.dtype in ("float32", "float64", "float16"):
        raw = normal.astype(t.dtype).tobytes()
    elif t.dtype == "bfloat16":
        raw = (normal.view(np.uint32) >> 16).astype("<u2").tobytes()
    else:  # integer and packed quantized data: any bytes
        raw = rng.integers(0, 256, t.nbytes, dtype=np.uint8).tobytes()
    if raw == t.tobytes():
        raw = bytes(b ^ 0x01 for b in raw)
    return Tensor(t.dtype, t.shape, bytearray(raw))

