"""thaw_format: versioned, checksummed snapshots of live inference engines (spec/SPEC.md)."""

import sys

if sys.byteorder != "little":  # every stored integer and tensor is little-endian; no byte-swapping path exists
    raise ImportError("thaw_format supports little-endian hosts only")

from .mover import backend
from .compat import check_kv_layout, check_model
from .container import MAJOR, MINOR, Limits
from .digest import checkpoint_model_info, checkpoint_weights_digest, config_digest, weights_digest
from .errors import (
    CorruptSnapshotError,
    IncompatibleSnapshotError,
    MissingTensorError,
    SnapshotError,
    UnknownWeightsError,
    UnsupportedVersionError,
)
from .files import load_file, save_file
from .reader import SnapshotFile, load, loads, open, verify
from .snapshot import (
    EngineInfo,
    KVCache,
    KVLayer,
    Lineage,
    ModelInfo,
    NativeHash,
    PrefixTree,
    Request,
    SamplingParams,
    SchedulerState,
    Snapshot,
    Weights,
    WeightsRef,
)
from .tensor import Tensor, as_tensor
from .version import package_version
from .writer import EncodedSnapshot, dumps, save, write

__version__ = package_version()
FORMAT_VERSION = (MAJOR, MINOR)

__all__ = [
    "CorruptSnapshotError", "EncodedSnapshot", "EngineInfo", "FORMAT_VERSION", "IncompatibleSnapshotError",
    "KVCache", "KVLayer", "Limits", "Lineage", "MissingTensorError", "ModelInfo", "NativeHash", "PrefixTree", "Request",
    "SamplingParams", "SchedulerState", "Snapshot", "SnapshotError", "SnapshotFile", "Tensor", "UnknownWeightsError",
    "UnsupportedVersionError", "Weights", "WeightsRef", "as_tensor", "backend", "check_kv_layout",
    "check_model", "checkpoint_model_info", "checkpoint_weights_digest", "config_digest", "dumps", "load",
    "load_file", "loads", "open", "save", "save_file", "verify", "weights_digest", "write",
]
