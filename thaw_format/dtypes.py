"""Element types by name. The format knows names and sizes only; bindings map names to framework types.

Names are PyTorch's without the `torch.` prefix. Every value is stored little-endian.
"""

from __future__ import annotations

from .errors import CorruptSnapshotError

# name -> bytes per element. float4_e2m1fn_x2 packs two 4-bit values in one byte element.
ITEMSIZE: dict[str, int] = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1,
    "complex128": 16,
    "complex64": 8,
    "complex32": 4,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
}


def itemsize(dtype: str, where: str = "") -> int:
    """Bytes per element of `dtype`; an unknown name is a format error naming where it was found."""
    try:
        return ITEMSIZE[dtype]
    except (KeyError, TypeError):
        prefix = f"{where}: " if where else ""
        raise CorruptSnapshotError(f"{prefix}unknown dtype {dtype!r}") from None
