"""spec/reference/decode.py, a reader written from spec/SPEC.md alone, against the golden vectors.

Imports nothing from thaw_format: it proves the spec (and its vectors) is enough to read, verify and write v1.0.
"""
import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "spec" / "vectors"
NAMES = sorted(p.stem for p in VECTORS.glob("*.thaw"))
_spec = importlib.util.spec_from_file_location("thaw_spec_reference", ROOT / "spec" / "reference" / "decode.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def vector(name):
    return (VECTORS / f"{name}.thaw").read_bytes(), json.loads((VECTORS / f"{name}.json").read_text())


def header_length(data):
    R, J = struct.unpack_from("<IQ", data, 20)
    return 32 + 24 * R + J + 4


def canonical(obj):  # §7
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def build(doc, blobs, *, major=1, minor=0, required=0, optional=0, chunk=1 << 20, flags=0):
    """A minimal §3 writer: `doc` is the JSON document (object or raw bytes), `blobs` the region bytes."""
    raw = doc if isinstance(doc, bytes) else canonical(doc)
    hl = 32 + 24 * len(blobs) + len(raw) + 4
    table, offsets, at = b"", [], ref.align(hl)
    for blob in blobs:
        table += struct.pack("<QQII", at, len(blob), chunk, flags)
        offsets.append(at)
        at = ref.align(at + len(blob))
    head = ref.MAGIC + struct.pack("<HHIIIQ", major, minor, required, optional, len(blobs), len(raw)) + table + raw
    out = bytearray(head + struct.pack("<I", ref.crc32c(head)))
    crcs = b""
    for off, blob in zip(offsets, blobs):
        out += bytes(off - len(out)) + blob
        crcs += b"".join(struct.pack("<I", ref.crc32c(blob[k:k + chunk])) for k in range(0, len(blob), chunk))
    out += bytes(at - len(out)) + crcs + struct.pack("<I", ref.crc32c(crcs)) + ref.END_MAGIC
    return bytes(out)


def rebuild(name, mutate_doc=None, **kw):
    """The vector's content re-encoded by build(), after `mutate_doc(document)`."""
    _, desc = vector(name)
    doc = json.loads(json.dumps(desc["document"]))
    if mutate_doc:
        mutate_doc(doc)
    kw.setdefault("required", desc["features"]["required"])
    kw.setdefault("optional", desc["features"]["optional"])
    kw.setdefault("minor", desc["version"][1])
    return build(doc, [bytes.fromhex(t["hex"]) for t in desc["tensors"]], **kw)


def rejects(data, match, cls=ref.CorruptSnapshotError):
    with pytest.raises(cls, match=match):
        ref.decode(data)


def test_crc32c_known_answer():  # §2
    assert ref.crc32c(b"123456789") == ref.crc32c_py(b"123456789") == 0xE3069283
    assert ref.crc32c_py(b"") == 0


def test_every_released_vector_exists():
    assert NAMES == ["kv_layer_kinds", "kv_only_weights_ref", "kv_prefix_tree", "kv_v_head_dim", "scheduler_in_flight",
                     "weights_only"]


@pytest.mark.parametrize("name", NAMES)
def test_vector_decodes_to_its_description(name):  # §11
    data, expected = vector(name)
    assert ref.decode(data) == expected


def test_vectors_decode_with_the_pure_python_crc32c(monkeypatch):  # the reader needs only the standard library
    monkeypatch.setattr(ref, "crc32c", ref.crc32c_py)
    for name in NAMES:
        data, expected = vector(name)
        assert ref.decode(data) == expected


@pytest.mark.parametrize("name", NAMES)
def test_vector_is_reproduced_by_a_writer_from_the_spec(name):  # §11, §7 canonical JSON, §10 default chunk size
    assert rebuild(name) == vector(name)[0]


def test_weights_digest_uses_engine_native_names():  # §7, checked across two vectors
    desc = vector("weights_only")[1]
    rows = sorted([t["name"][len("weights/"):], t["dtype"], t["shape"], f"{ref.crc32c(bytes.fromhex(t['hex'])):08x}"]
                  for t in desc["tensors"] if t["name"].startswith("weights/"))
    digest = "sha256:" + hashlib.sha256(canonical(rows)).hexdigest()
    assert digest == vector("kv_only_weights_ref")[1]["document"]["weights"]["ref"]["weights_digest"]


def test_config_digest():  # §7
    model = vector("kv_prefix_tree")[1]["document"]["model"]
    assert model["config_digest"] == "sha256:" + hashlib.sha256(canonical(model["config"])).hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_every_header_byte_flip_is_rejected(name):  # §8.1-§8.4
    data, _ = vector(name)
    for i in range(header_length(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(ref.ThawError):
            ref.decode(bytes(bad))


def test_any_byte_flip_anywhere_is_rejected():  # every byte is under a CRC, the zero-padding rule or a magic
    data, _ = vector("weights_only")
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x80
        with pytest.raises(ref.ThawError):
            ref.decode(bytes(bad))


@pytest.mark.parametrize("name", NAMES)
def test_truncation_and_trailing_bytes_are_rejected(name):  # §8.1, §8.3, §8.6
    data, _ = vector(name)
    hl = header_length(data)
    for n in sorted({0, 7, 31, 32, 33, hl - 5, hl - 1, hl, ref.align(hl), len(data) // 2, len(data) - 13,
                     len(data) - 12, len(data) - 8, len(data) - 1}):
        with pytest.raises(ref.ThawError):
            ref.decode(data[:n])
    rejects(data + b"\0", r"§8\.6")


def test_data_byte_flip_names_the_chunk():  # §8.11
    bad = bytearray(vector("scheduler_in_flight")[0])
    bad[12288 + 5] ^= 0xFF  # region 2 (kv/1/k) starts at 12288
    rejects(bytes(bad), r"§8\.11: .*'kv/1/k', region 2, chunk 0 \(global chunk 2\), file bytes \[12288, 12544\)")


def test_several_chunks_per_region_and_the_global_numbering():  # §3.2
    blob = bytes(range(256)) * 40  # 10240 bytes = 3 chunks of 4096
    doc = {"tensors": [{"name": "a", "dtype": "uint8", "shape": [5]}, {"name": "b", "dtype": "uint8", "shape": [10240]}]}
    data = build(doc, [b"\1" * 5, blob], chunk=4096)
    assert len(data) == 4096 + 4096 + 3 * 4096 + 4 * 4 + 12
    assert ref.decode(data)["tensors"][1]["hex"] == blob.hex()
    bad = bytearray(data)
    bad[8192 + 2 * 4096] ^= 1
    rejects(bytes(bad), r"'b', region 1, chunk 2 \(global chunk 3\), file bytes \[16384, 18432\)")


def test_padding_must_be_zero():  # §3.4, §8.12
    data, _ = vector("weights_only")
    bad = bytearray(data)
    bad[4096 + 1024 + 1] = 1  # after region 0's 1024 bytes, before region 1 at 8192
    rejects(bytes(bad), r"§8\.12: .*\[5120, 8192\)")


def test_version_and_feature_rules():  # §6, §8.2
    rejects(rebuild("weights_only", major=2), "major version 2", ref.UnsupportedVersionError)
    rejects(rebuild("weights_only", required=0b100), "unknown required", ref.UnsupportedVersionError)
    assert ref.decode(rebuild("weights_only", minor=7))["version"] == [1, 7]          # every minor of 1 is read
    assert ref.decode(rebuild("weights_only", optional=0b100))["features"]["optional"] == 0b100  # unknown: ignored
    rejects(rebuild("kv_only_weights_ref", required=0), "weights_ref")                 # §5.2 sets bit 0
    rejects(rebuild("kv_v_head_dim", required=0), "kv_v_head_dim")                     # §5.3 sets bit 1
    rejects(rebuild("kv_prefix_tree", required=0b10), "kv_v_head_dim")


def test_region_table_rules():  # §3.2, §8.5
    rejects(rebuild("weights_only", flags=1), "non-zero flags")
    rejects(rebuild("weights_only", chunk=3 * 4096), "power of two")
    rejects(rebuild("weights_only", chunk=2048), "power of two")


def test_json_rules():  # §3.3, §8.8, §8.9
    t = [{"name": "a", "dtype": "uint8", "shape": [1]}]
    rejects(build(b'{"tensors":[],"tensors":[]}', []), "repeats a key")
    rejects(build(b'{"tensors":[], "x": NaN}', []), "RFC 8259")
    rejects(build(b'{"tensors":[]', []), "does not parse")
    rejects(build(b'{"tensors":[],"x":"\xff"}', []), "not UTF-8")
    rejects(build(b"[]", []), "not an object")
    rejects(build(b'{"tensors":[],"x":' + b"[" * 64 + b"]" * 64 + b"}", []), "nests deeper")
    assert ref.decode(build(b'{"tensors":[],"x":' + b"[" * 63 + b"]" * 63 + b"}", []))["tensors"] == []
    rejects(build({"tensors": t}, []), "exactly R")
    rejects(build({"tensors": t + t}, [b"\0", b"\0"]), "repeats")
    rejects(build({"tensors": [dict(t[0], dtype="int3")]}, [b"\0"]), "unknown dtype")
    rejects(build({"tensors": [dict(t[0], shape=[True])]}, [b"\0"]), "non-negative integers")
    rejects(build({"tensors": [dict(t[0], shape=[2])]}, [b"\0"]), "region 0 holds 1")


def test_section_rules():  # §5, §8.10
    rejects(rebuild("kv_prefix_tree", lambda d: d["kv"].update(page_size="4")), r"kv\.page_size is not count")
    rejects(rebuild("kv_prefix_tree", lambda d: d["kv"]["layers"][1]["tensors"].append("z")), "'kv/1/z'")
    rejects(rebuild("kv_prefix_tree", lambda d: d["prefix"].update(num_pages=2)), "hashes")
    rejects(rebuild("scheduler_in_flight", lambda d: d["prefix"].update(num_pages=3)), "prefix/parents")
    rejects(rebuild("scheduler_in_flight", lambda d: d["kv"].update(page_size=3)), "tokens")
    rejects(rebuild("scheduler_in_flight", lambda d: d["scheduler"]["requests"][0].update(pages=[2])), "outside")
    rejects(rebuild("scheduler_in_flight", lambda d: d["model"].pop("dtype")), r"model\.dtype is missing")
    assert ref.decode(rebuild("weights_only", lambda d: d.update(future={"x": 1})))["document"]["future"] == {"x": 1}
