"""safetensors-shaped helpers: a dict of tensors in, a dict of torch tensors out."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from .gcpause import gc_paused
from .reader import open as open_snapshot
from .snapshot import Snapshot, Weights
from .writer import save


@gc_paused
def save_file(tensors: Mapping[str, Any], path, metadata: Optional[Mapping[str, Any]] = None, *,
              durable: bool = True) -> str:
    """Save torch tensors or numpy arrays by name as a weights-only snapshot; returns the snapshot id.
    Atomic as thaw_format.save; `durable=False` skips its fsyncs (a power loss may lose the file)."""
    if not isinstance(tensors, Mapping):  # a Snapshot is save's
        hint = ": for a Snapshot use thaw_format.save" if isinstance(tensors, Snapshot) else ""
        raise TypeError(f"save_file takes a dict of tensors by name, got {type(tensors).__name__}{hint}")
    # converted as they are encoded, where an error names the tensor
    weights = Weights(tensors=dict(tensors))
    return save(Snapshot(weights=weights, metadata=dict(metadata or {})), path, durable=durable)


@gc_paused
def load_file(path, device="cpu", *, mmap: bool = True) -> dict:
    """Load a snapshot's weights as torch tensors, every chunk and padding byte verified first.

    `device`, as safetensors' load_file takes it ("cpu", "cuda:0", a torch.device, an int), is where the
    tensors go (on a device other than the CPU they are copies there, whatever `mmap` says): one this machine
    lacks, or torch does not know, is refused before the data is read.

    By default the tensors view a copy-on-write mapping of the file, checked in one parallel pass: no byte is
    copied, and writing a tensor never changes the file. As with any mapping (safetensors' too), a later
    in-place truncation or rewrite of the file by another program can reach pages not yet written, or raise
    SIGBUS; `save` never changes a file in place. `mmap=False` gives tensors in memory of their own instead."""
    with open_snapshot(path) as f:
        # The path and the header first: a FIFO, a directory or a file that is no snapshot is refused at once, not
        # after torch's import (seconds on a first call, over a minute measured on a busy machine), which comes
        # before the data is read, so that a missing torch is said before a long load.
        from .torch import device_of, to_torch

        target = device_of(device)
        snapshot = f.snapshot(copy=not mmap)
    tensors = snapshot.weights.tensors if snapshot.weights is not None else {}
    if target.type == "cpu":
        return {name: to_torch(t) for name, t in tensors.items()}
    return {name: to_torch(t).to(target) for name, t in tensors.items()}
