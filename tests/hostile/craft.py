"""Crafting hostile snapshots: a second, independent encoder of the container layout (spec/SPEC.md section 3).

It writes whatever it is told, valid or not, and re-seals checksums after an edit, so that a hostile file gets
past the header CRC and reaches the deeper check it is aimed at. It shares no code with thaw_format on purpose:
a bug in the reader's layout arithmetic cannot hide behind the same bug here.
"""

from __future__ import annotations

import json
import random
import struct
from dataclasses import dataclass

import crc32c

import thaw_format as tf
from thaw_format.dtypes import ITEMSIZE

MAGIC = b"\x89THAW\r\n\x1a"
END_MAGIC = b"THAW-END"
ALIGN = 4096
PREAMBLE = struct.Struct("<8sHHIIIQ")  # magic, major, minor, required, optional, region count R, JSON length J
REGION = struct.Struct("<QQII")  # offset, length, chunk size, flags
PREAMBLE_FIELDS = ("magic", "major", "minor", "required", "optional", "region_count", "json_length")
REGION_FIELDS = ("offset", "length", "chunk_size", "flags")


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def crc(data) -> int:
    return crc32c.crc32c(bytes(data))


@dataclass(frozen=True)
class Where:
    """Byte positions inside one file, read from its preamble and region table alone."""

    region_count: int
    json_length: int
    regions: tuple  # (offset, length, chunk_size, flags) per table entry
    file_length: int

    @property
    def table_start(self) -> int:
        return PREAMBLE.size

    @property
    def json_start(self) -> int:
        return PREAMBLE.size + REGION.size * self.region_count

    @property
    def header_length(self) -> int:  # including the 4-byte header CRC
        return self.json_start + self.json_length + 4

    @property
    def trailer_offset(self) -> int:
        end = self.header_length
        for offset, length, _, _ in self.regions:
            end = offset + length
        return align(end)


def where(buf) -> Where:
    """Locate the parts of `buf`; the table must be inside the buffer."""
    _, _, _, _, _, count, json_length = PREAMBLE.unpack_from(buf)
    regions = tuple(REGION.unpack_from(buf, PREAMBLE.size + i * REGION.size) for i in range(count))
    return Where(count, json_length, regions, len(buf))


def header_length(buf) -> int:
    """The header length (with its CRC) that the preamble alone declares."""
    _, _, _, _, _, count, json_length = PREAMBLE.unpack_from(buf)
    return PREAMBLE.size + REGION.size * count + json_length + 4


def reseal(buf: bytearray) -> bytearray:
    """Recompute the header CRC after an edit, at the position the (possibly edited) preamble declares."""
    body_end = header_length(buf) - 4
    struct.pack_into("<I", buf, body_end, crc(buf[:body_end]))
    return buf


def set_preamble(buf: bytearray, seal: bool = True, **values) -> bytearray:
    fields = dict(zip(PREAMBLE_FIELDS, PREAMBLE.unpack_from(buf)))
    fields.update(values)
    PREAMBLE.pack_into(buf, 0, *(fields[f] for f in PREAMBLE_FIELDS))
    return reseal(buf) if seal else buf


def set_region(buf: bytearray, index: int, seal: bool = True, **values) -> bytearray:
    position = PREAMBLE.size + index * REGION.size
    fields = dict(zip(REGION_FIELDS, REGION.unpack_from(buf, position)))
    fields.update(values)
    REGION.pack_into(buf, position, *(fields[f] for f in REGION_FIELDS))
    return reseal(buf) if seal else buf


def chunk_crcs(data: bytes, chunk_size: int) -> list[int]:
    return [crc(data[i : i + chunk_size]) for i in range(0, len(data), chunk_size)]


def trailer(crcs: list[int]) -> bytes:
    table = struct.pack(f"<{len(crcs)}I", *crcs)
    return table + struct.pack("<I8s", crc(table), END_MAGIC)


def container(document, payloads=(), *, chunk_size: int = ALIGN, required: int = 0, optional: int = 0,
              major: int = 1, minor: int = 0) -> bytearray:
    """A structurally valid container around any JSON document (a value, or raw bytes) and region payloads."""
    doc = document if isinstance(document, (bytes, bytearray)) else json.dumps(document).encode()
    payloads = [bytes(p) for p in payloads]
    offset = align(PREAMBLE.size + REGION.size * len(payloads) + len(doc) + 4)
    table, offsets, crcs = b"", [], []
    for p in payloads:
        table += REGION.pack(offset, len(p), chunk_size, 0)
        offsets.append(offset)
        crcs += chunk_crcs(p, chunk_size)
        offset = align(offset + len(p))
    body = PREAMBLE.pack(MAGIC, major, minor, required, optional, len(payloads), len(doc)) + table + doc
    buf = bytearray(body + struct.pack("<I", crc(body)))
    for at, p in zip(offsets, payloads):
        buf += bytes(at - len(buf)) + p
    buf += bytes(offset - len(buf))
    return buf + trailer(crcs)


def document_of(buf) -> dict:
    w = where(buf)
    return json.loads(bytes(buf[w.json_start : w.json_start + w.json_length]))


def payloads_of(buf) -> list[bytes]:
    return [bytes(buf[offset : offset + length]) for offset, length, _, _ in where(buf).regions]


def rebuild(buf, edit) -> bytearray:
    """Re-encode `buf` after `edit(document, payloads)` changed its document or payloads in place."""
    doc, payloads, regions = document_of(buf), payloads_of(buf), where(buf).regions
    edit(doc, payloads)
    return container(doc, payloads, chunk_size=regions[0][2] if regions else ALIGN)


def repair(buf) -> bytes:
    """Make every checksum of an arbitrary (mutated) file match its bytes, wherever its table allows it.

    Re-seals the header CRC when the declared header fits, and when every declared region also fits with a
    valid chunk size, rewrites the trailer to match the data. What stays wrong is then structure, not a
    checksum, which is what a fuzzer should spend its time on.
    """
    buf = bytearray(buf)
    if len(buf) < PREAMBLE.size or header_length(buf) > len(buf):
        return bytes(buf)
    w = where(buf)
    regions_fit = all(
        offset + length <= len(buf) and ALIGN <= chunk_size <= 1 << 30 and not chunk_size & (chunk_size - 1)
        for offset, length, chunk_size, _ in w.regions
    )
    if regions_fit and w.trailer_offset <= len(buf):
        crcs = [c for offset, length, size, _ in w.regions for c in chunk_crcs(buf[offset : offset + length], size)]
        buf = buf[: w.trailer_offset] + trailer(crcs)
    return bytes(reseal(buf))


# ------------------------------------------------------------------------------------------------ valid inputs


def tensor(rng: random.Random, dtype: str, shape: tuple) -> tf.Tensor:
    n = 1
    for d in shape:
        n *= d
    return tf.Tensor(dtype, shape, rng.randbytes(n * ITEMSIZE[dtype]))


def sample_snapshot(seed: int = 0) -> tf.Snapshot:
    """Every section filled; some tensors span several 4 KiB chunks so data errors have chunks to name."""
    rng = random.Random(seed)
    page_size, pages, heads, head_dim = 4, 3, 2, 64
    kv_shape = (pages, page_size, heads, head_dim)  # 6 KiB of float32: two chunks
    return tf.Snapshot(
        model=tf.ModelInfo("LlamaForCausalLM", tf.config_digest({"hidden_size": 64}), "float32"),
        weights=tf.Weights(
            {"embed_tokens.weight": tensor(rng, "float32", (64, 48)), "norm.weight": tensor(rng, "bfloat16", (64,))},
            checkpoint_names={"embed_tokens.weight": "model.embed_tokens.weight"},
        ),
        kv=tf.KVCache(page_size, "float32", [
            tf.KVLayer("attention", {"k": tensor(rng, "float32", kv_shape), "v": tensor(rng, "float32", kv_shape)},
                       num_kv_heads=heads, head_dim=head_dim),
        ]),
        prefix=tf.PrefixTree([-1, 0, 0], [[1, 2, 3, 4], [5, 6], [7]], tf.NativeHash("sha256", 4, ["ab", None, None])),
        scheduler=tf.SchedulerState([
            tf.Request("r0", "running", [1, 2, 3, 4, 5, 6], [9], tf.SamplingParams(temperature=0.5, seed=3),
                       num_computed_tokens=6, pages=[0, 1], rng_state=tensor(rng, "uint8", (16,))),
        ]),
        engine=tf.EngineInfo("vllm", "0.32.0"),
        lineage=tf.Lineage(label="trunk", created="2026-11-23T00:00:00Z"),
        metadata={"purpose": "hostile tests"},
    )


def sample_bytes(seed: int = 0) -> bytes:
    return tf.dumps(sample_snapshot(seed), chunk_size=ALIGN)


def flipped(buf, position: int, bit: int) -> bytearray:
    damaged = bytearray(buf)
    damaged[position] ^= 1 << bit
    return damaged
