"""Seeded random weights that every machine computes to the same bits, with numpy alone.

Element i of the tensor named N under seed S is splitmix64(key + (i + 1) * 0x9E3779B97F4A7C15), key being the
first 8 bytes (little-endian) of sha256("S:N"); its top 24 bits give one of 2**24 odd integers spread evenly over
(-2**24, 2**24), scaled to standard deviation `std` (uniform, zero mean). Only integer arithmetic and IEEE-rounded
multiplication are involved (no libm, no generator whose stream a library may change), so a Mac and a Linux
machine write the same checkpoint bytes; each tensor depends on its own name only, not on the order of the others.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 22  # elements per vectorised step: bounds the temporaries of a large embedding


def uniform(name: str, seed: int, count: int, std: float) -> np.ndarray:
    """`count` float32 values of the tensor `name`, zero mean, standard deviation `std`."""
    key = np.uint64(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
    scale = std * math.sqrt(3.0) / (1 << 24)  # odd integers over (-2**24, 2**24) have std 2**24 / sqrt(3)
    out = np.empty(count, np.float32)
    for start in range(0, count, _CHUNK):
        x = np.arange(start + 1, min(start + _CHUNK, count) + 1, dtype=np.uint64)
        x *= _GOLDEN  # uint64 arithmetic wraps modulo 2**64, as splitmix64 needs
        x += key
        x ^= x >> np.uint64(30)
        x *= _MIX1
        x ^= x >> np.uint64(27)
        x *= _MIX2
        x ^= x >> np.uint64(31)
        odd = (x >> np.uint64(40)).astype(np.int64) * 2 - ((1 << 24) - 1)
        out[start : start + len(x)] = odd * scale
    return out


def cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values in `dtype`, rounded to nearest even; bfloat16 as its uint16 bit patterns (numpy has none)."""
    if dtype == "float32":
        return values
    if dtype == "float16":
        return values.astype(np.float16)
    if dtype == "bfloat16":
        bits = values.view(np.uint32)
        return ((bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)).astype(np.uint16)
    raise ValueError(f"zoo dtype {dtype!r} is not one of float32, float16, bfloat16")
