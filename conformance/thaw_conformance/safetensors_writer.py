"""Write a .safetensors file from numpy arrays, laid out as the safetensors library lays it out.

Tensors of one dtype in name order, a compact JSON header with `{"format": "pt"}` metadata padded with spaces to
8 bytes: the bytes `save_pretrained` writes for the same tensors, without needing torch or the library.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write(path: Path, tensors: dict[str, tuple[tuple[int, ...], np.ndarray]], dtype: str) -> None:
    """`tensors`: name -> (shape, flat array of `dtype`'s bytes). Every tensor has the one `dtype`."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in sorted(tensors):
        shape, data = tensors[name]
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name][1]).data)
