"""The hostile corpus: how each committed file in corpus/ was made, and what a reader must answer for it.

The tests read the committed files and corpus/index.json, not this module; it is kept to show how each file
was crafted and to add cases. Rewrite the corpus with `.venv/bin/python tests/hostile/corpus.py`.
Every file that aims past the header CRC carries a valid one (craft.reseal), so it reaches its check.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # run as a script: make `hostile` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostile import craft  # noqa: E402

CORPUS = Path(__file__).with_name("corpus")
INDEX = CORPUS / "index.json"

# name -> (builder, call, expected exception class name or None for "reads fine", message fragment, why)
CASES: dict[str, tuple[Callable[[], bytes], str, Optional[str], str, str]] = {}


def case(name: str, error: Optional[str], match: str, why: str, call: str = "load"):
    def register(build):
        CASES[name] = (build, call, error, match, why)
        return build

    return register


def corrupt(name: str, match: str, why: str, call: str = "load"):
    return case(name, "CorruptSnapshotError", match, why, call)


# ------------------------------------------------------------------------------------------------ bases


def weights_doc(entries: list) -> dict:
    return {"weights": {"checkpoint_names": {}, "ref": None}, "tensors": entries}


def two_tensors() -> bytearray:
    """A valid weights-only file: a float32 [2, 2] and a uint8 [8]."""
    entries = [
        {"name": "weights/a", "dtype": "float32", "shape": [2, 2]},
        {"name": "weights/b", "dtype": "uint8", "shape": [8]},
    ]
    return craft.container(weights_doc(entries), [bytes(range(16)), bytes(range(100, 108))])


def with_document(edit: Callable[[dict], None], base: Callable[[], bytearray] = two_tensors) -> bytearray:
    return craft.rebuild(base(), lambda doc, payloads: edit(doc))


def with_json(text: bytes) -> bytearray:
    """A valid container whose document is exactly `text` (and no regions)."""
    return craft.container(text)


def sections() -> bytearray:
    """A valid file with KV, prefix tree and scheduler: 2 pages of 2 tokens, one head of dim 2."""
    i32 = lambda values: struct.pack(f"<{len(values)}i", *values)  # noqa: E731
    i64 = lambda values: struct.pack(f"<{len(values)}q", *values)  # noqa: E731
    doc = {
        "kv": {"page_size": 2, "dtype": "float32", "layers": [
            {"kind": "attention", "num_kv_heads": 1, "head_dim": 2, "params": {}, "tensors": ["k", "v"]}]},
        "prefix": {"num_pages": 2, "hash": None},
        "scheduler": {"requests": [{"id": "r0", "status": "running", "prompt_token_ids": [1, 2, 3],
                                    "output_token_ids": [4], "pages": [0, 1], "rng_state": False}]},
        "tensors": [
            {"name": "kv/0/k", "dtype": "float32", "shape": [2, 2, 1, 2]},
            {"name": "kv/0/v", "dtype": "float32", "shape": [2, 2, 1, 2]},
            {"name": "prefix/parents", "dtype": "int64", "shape": [2]},
            {"name": "prefix/num_tokens", "dtype": "int32", "shape": [2]},
            {"name": "prefix/token_ids", "dtype": "int32", "shape": [3]},
        ],
    }
    return craft.container(doc, [bytes(32), bytes(range(32)), i64([-1, 0]), i32([2, 1]), i32([1, 2, 3])])


def edit_sections(edit: Callable[[dict, list], None]) -> bytearray:
    return craft.rebuild(sections(), edit)


# ------------------------------------------------------------------------------------------------ readable


@case("valid_two_tensors", None, "", "control: the base of most cases reads fine")
def _():
    return two_tensors()


@case("valid_sections", None, "", "control: the base of the section cases reads fine")
def _():
    return sections()


@case("unknown_optional_feature", None, "", "unknown optional feature bits are ignored")
def _():
    return craft.set_preamble(two_tensors(), optional=1 << 17)


# ------------------------------------------------------------------------------------------------ preamble


@corrupt("empty", "shorter than the 32-byte preamble", "zero bytes")
def _():
    return b""


@corrupt("short_preamble", "shorter than the 32-byte preamble", "31 bytes of a valid file")
def _():
    return two_tensors()[:31]


@corrupt("bad_magic", "not a thaw snapshot", "a PNG signature")
def _():
    return craft.set_preamble(two_tensors(), magic=b"\x89PNG\r\n\x1a\n")


@corrupt("text_mode_transfer", "not a thaw snapshot", "CR LF turned into LF by a text-mode copy")
def _():
    data = two_tensors()
    return data[:5] + data[6:]


@case("major_version_2", "UnsupportedVersionError", "format version 2.0", "a future major version")
def _():
    return craft.set_preamble(two_tensors(), major=2)


@case("unknown_required_feature", "UnsupportedVersionError", "requires unknown features 0x00000080",
      "a required feature bit this reader does not know")
def _():
    return craft.set_preamble(two_tensors(), required=1 << 7)


@corrupt("region_count_over_cap", "Limits.max_regions", "4 billion regions declared")
def _():
    return craft.set_preamble(two_tensors(), seal=False, region_count=2**32 - 1)


@corrupt("json_length_over_cap", "Limits.max_json_bytes", "a 2^63-byte JSON document declared")
def _():
    return craft.set_preamble(two_tensors(), seal=False, json_length=2**63)


@corrupt("header_past_end", "truncated", "100000 regions (under the cap) in a 12 KiB file")
def _():
    return craft.set_preamble(two_tensors(), seal=False, region_count=100_000)


@corrupt("header_crc_wrong", "header checksum mismatch", "one JSON byte changed, CRC not resealed")
def _():
    data = two_tensors()
    at = craft.where(data).json_start + 3
    data[at] ^= 0x20
    return data


# ------------------------------------------------------------------------------------------------ region table


@corrupt("region_flags_set", "reserved and must be zero", "reserved flags bit set")
def _():
    return craft.set_region(two_tensors(), 0, flags=1)


@corrupt("chunk_size_zero", "is not a power of two", "chunk size 0 (a division by zero elsewhere)")
def _():
    return craft.set_region(two_tensors(), 0, chunk_size=0)


@corrupt("chunk_size_not_power_of_two", "is not a power of two", "chunk size 6000")
def _():
    return craft.set_region(two_tensors(), 0, chunk_size=6000)


@corrupt("chunk_size_over_cap", "is not a power of two", "chunk size 2 GiB, over Limits.max_chunk_size")
def _():
    return craft.set_region(two_tensors(), 0, chunk_size=1 << 31)


@corrupt("region_unaligned", "must be 4096", "first region one byte off its aligned offset")
def _():
    return craft.set_region(two_tensors(), 0, offset=4097)


@corrupt("regions_overlap", "regions are packed in order", "region 1 starts where region 0 starts")
def _():
    return craft.set_region(two_tensors(), 1, offset=4096)


@corrupt("region_before_header", "regions are packed in order", "region 0 at offset 0, over the header")
def _():
    return craft.set_region(two_tensors(), 0, offset=0)


@corrupt("region_past_end", "run past the end", "a region of 2^64 - 1 bytes")
def _():
    return craft.set_region(two_tensors(), 1, length=2**64 - 1)


@corrupt("region_offset_plus_length_wraps", "run past the end",
         "offset + length wraps to 16 in 64-bit arithmetic")
def _():
    return craft.set_region(two_tensors(), 1, length=2**64 - 8192 + 16)


@corrupt("region_longer_than_tensor", "needs 16 bytes but its region holds 20",
         "region 0 grows by 4 bytes into its padding; trailer resealed to match")
def _():
    data = craft.set_region(two_tensors(), 0, length=20)
    w = craft.where(data)
    crcs = [c for offset, length, size, _ in w.regions for c in craft.chunk_crcs(data[offset : offset + length], size)]
    return data[: w.trailer_offset] + craft.trailer(crcs)


# ------------------------------------------------------------------------------------------- file length, trailer, data


@corrupt("trailing_bytes", "has trailing bytes", "one zero byte appended")
def _():
    return two_tensors() + b"\0"


@corrupt("truncated_in_trailer", "truncated", "last byte of the end magic missing")
def _():
    return two_tensors()[:-1]


@corrupt("truncated_in_data", "truncated", "cut inside region 1")
def _():
    return two_tensors()[:8200]


@corrupt("end_magic_wrong", "end magic", "end magic THAW-EOF")
def _():
    return two_tensors()[:-8] + b"THAW-EOF"


@corrupt("trailer_crc_wrong", "checksum of the chunk table mismatch", "one chunk CRC changed, table CRC stale")
def _():
    data = two_tensors()
    data[-13] ^= 1
    return data


@corrupt("data_crc_wrong", "tensor 'weights/b' (region 1): checksum mismatch in chunk 0, file bytes [8192, 8200)",
         "one data byte of weights/b changed")
def _():
    data = two_tensors()
    data[8195] ^= 0x10
    return data


@corrupt("padding_nonzero", "padding bytes", "a non-zero byte between the header and region 0", call="verify")
def _():
    data = two_tensors()
    data[4000] = 0xFF
    return data


# ------------------------------------------------------------------------------------------------ JSON


@corrupt("json_not_utf8", "not UTF-8", "a Latin-1 byte inside a string")
def _():
    return with_json(b'{"tensors": [], "metadata": {"k": "caf\xe9"}}')


@corrupt("json_syntax", "does not parse", "a missing closing brace")
def _():
    return with_json(b'{"tensors": [')


@corrupt("json_empty", "does not parse", "a zero-length document")
def _():
    return with_json(b"")


@corrupt("json_bom", "does not parse", "a UTF-8 byte order mark before the object")
def _():
    return with_json(b'\xef\xbb\xbf{"tensors": []}')


@corrupt("json_not_object", "must be an object, got list", "a top-level array")
def _():
    return with_json(b"[]")


@corrupt("json_duplicate_key", "duplicate key 'tensors'", "the `tensors` key twice; Python keeps the last")
def _():
    return with_json(b'{"tensors": [{"name": "x", "dtype": "uint8", "shape": [1]}], "tensors": []}')


@corrupt("json_nested_65", "nests deeper than 64 levels", "metadata nested 64 lists deep (65 with the root)")
def _():
    return with_json(b'{"tensors": [], "metadata": {"x": ' + b"[" * 63 + b"]" * 63 + b"}}")


@corrupt("json_nested_100k", "nested too deeply to parse", "100000 open brackets: deeper than Python's parser goes")
def _():
    return with_json(b'{"tensors": [], "metadata": {"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}")


@corrupt("json_nan", "NaN is not a JSON number", "NaN, which Python's parser accepts and RFC 8259 does not")
def _():
    return with_json(b'{"tensors": [], "metadata": {"x": NaN}}')


@corrupt("json_number_overflow", "overflows a double", "1e999, which Python reads as inf")
def _():
    return with_json(b'{"tensors": [], "metadata": {"x": 1e999}}')


@corrupt("json_huge_integer", "does not parse", "a 5000-digit integer (Python refuses to convert it)")
def _():
    return with_json(b'{"tensors": [], "metadata": {"x": ' + b"9" * 5000 + b"}}")


@corrupt("json_lone_surrogate", "lone surrogate", "a \\udfff escape: valid JSON syntax, not Unicode text")
def _():
    return with_json(b'{"tensors": [], "lineage": {"label": "\\udfff"}}')


# ------------------------------------------------------------------------------------------------ tensors list


def tensor_entry(**changes):
    def edit(doc):
        doc["tensors"][0].update(changes)

    return with_document(edit)


@corrupt("tensors_not_list", "`tensors` must be a list", "tensors is an object")
def _():
    return with_json(b'{"tensors": {}}')


@corrupt("tensors_count_mismatch", "lists 1 tensors but the region table has 2", "one entry for two regions")
def _():
    return with_document(lambda doc: doc["tensors"].pop())


@corrupt("tensor_entry_not_object", "tensors[0] must be an object", "an entry that is a string")
def _():
    return with_document(lambda doc: doc["tensors"].__setitem__(0, "weights/a"))


@corrupt("tensor_name_missing", "tensors[0].name is missing", "an entry without a name")
def _():
    return with_document(lambda doc: doc["tensors"][0].pop("name"))


@corrupt("tensor_name_empty", "must be non-empty and unique", "an empty name")
def _():
    return tensor_entry(name="")


@corrupt("tensor_names_duplicate", "must be non-empty and unique", "two regions both named weights/a")
def _():
    return with_document(lambda doc: doc["tensors"][1].update(name="weights/a", dtype="float32", shape=[2]))


@corrupt("dtype_unknown", "unknown dtype 'float128'", "a dtype name no table knows")
def _():
    return tensor_entry(dtype="float128", shape=[1])


@corrupt("dtype_not_string", "tensors[0].dtype must be str", "dtype given as an item size")
def _():
    return tensor_entry(dtype=4)


@corrupt("shape_not_list", "tensors[0].shape must be list", "shape given as a string")
def _():
    return tensor_entry(shape="2x2")


@corrupt("shape_negative", "must be at most 16 non-negative integers", "shape [-2, -2]: the product is right")
def _():
    return tensor_entry(shape=[-2, -2])


@corrupt("shape_bool", "must be at most 16 non-negative integers", "shape [true, 4]: a bool is not a dimension")
def _():
    return tensor_entry(dtype="uint8", shape=[True, 16])


@corrupt("shape_float", "must be at most 16 non-negative integers", "shape [4.0]")
def _():
    return tensor_entry(shape=[4.0])


@corrupt("shape_17_dims", "must be at most 16 non-negative integers", "17 dimensions of 1 (over Limits.max_dims)")
def _():
    return tensor_entry(dtype="uint8", shape=[1] * 16 + [16])


@corrupt("shape_huge", "needs 4835703278458516698824704 bytes but its region holds 16", "shape [2^40, 2^40]")
def _():
    return tensor_entry(shape=[2**40, 2**40])


@corrupt("shape_size_wraps_u64", "needs 18446744073709551632 bytes but its region holds 16",
         "float32 [2^62 + 4]: 4 bytes each is 2^64 + 16, which wraps to the region's 16 in 64-bit arithmetic")
def _():
    return tensor_entry(shape=[2**62 + 4])


@corrupt("kv_tensor_missing", "which the document does not list",
         "kv layer 0 names roles k and v, the table holds kv/0/k and kv/0/value")
def _():
    return edit_sections(lambda doc, payloads: doc["tensors"][1].update(name="kv/0/value"))


# ------------------------------------------------------------------------------------------------ sections


@corrupt("section_wrong_type", "document.model must be an object", "model given as a string")
def _():
    return with_json(b'{"tensors": [], "model": "llama"}')


@case("kv_unknown_kind", None, "", "a KV layer of kind 'paged_attention', which a later minor may define: kept (spec 5.3)")
def _():
    return edit_sections(lambda doc, payloads: doc["kv"]["layers"][0].update(kind="paged_attention"))


@corrupt("kv_page_size_mismatch", "paged tensors are [num_pages=2, page_size=4",
         "kv.page_size 4 while the pages hold 2 tokens")
def _():
    return edit_sections(lambda doc, payloads: doc["kv"].update(page_size=4))


@corrupt("kv_roles_repeat", "must be distinct role names", "roles [k, k]")
def _():
    return edit_sections(lambda doc, payloads: doc["kv"]["layers"][0].update(tensors=["k", "k"]))


@corrupt("prefix_parent_forward", "parent 1 must be -1 or an earlier page", "page 0 continues page 1")
def _():
    return edit_sections(lambda doc, payloads: payloads.__setitem__(2, struct.pack("<2q", 1, 0)))


@corrupt("prefix_parent_self", "parent 1 must be -1 or an earlier page", "page 1 continues itself (a cycle)")
def _():
    return edit_sections(lambda doc, payloads: payloads.__setitem__(2, struct.pack("<2q", -1, 1)))


@corrupt("prefix_counts_disagree", "prefix: 2 pages", "num_tokens says 2 + 2 tokens, token_ids holds 3")
def _():
    return edit_sections(lambda doc, payloads: payloads.__setitem__(3, struct.pack("<2i", 2, 2)))


@corrupt("prefix_negative_count", "prefix: 2 pages", "num_tokens [4, -1]: the sum is right")
def _():
    return edit_sections(lambda doc, payloads: payloads.__setitem__(3, struct.pack("<2i", 4, -1)))


@corrupt("prefix_hash_entry_not_string", "every entry must be lowercase hex of whole bytes or null",
         "a native hash given as {}")
def _():
    def add_hash(doc, payloads):
        doc["prefix"]["hash"] = {"algorithm": "sha256", "tokens_per_hash": 2, "hashes": ["ab", {}]}

    return craft.set_preamble(edit_sections(add_hash), optional=1)


@corrupt("prefix_wrong_dtype", "must be a 1-D int64 tensor, got float64[2]", "parents stored as float64")
def _():
    return edit_sections(lambda doc, payloads: doc["tensors"][2].update(dtype="float64"))


@corrupt("scheduler_page_out_of_range", "are not pages of the prefix tree", "a request on page 7 of 2")
def _():
    return edit_sections(lambda doc, payloads: doc["scheduler"]["requests"][0].update(pages=[0, 7]))


@corrupt("scheduler_bad_status", "status 'sleeping' is not one of", "an unknown request status")
def _():
    return edit_sections(lambda doc, payloads: doc["scheduler"]["requests"][0].update(status="sleeping"))


@corrupt("scheduler_token_not_int", "prompt_token_ids must be ints", "a token id given as a string")
def _():
    return edit_sections(lambda doc, payloads: doc["scheduler"]["requests"][0].update(prompt_token_ids=[1, "2"]))


@corrupt("rng_state_missing", "refers to tensor 'scheduler/0/rng_state'", "rng_state: true without the tensor")
def _():
    return edit_sections(lambda doc, payloads: doc["scheduler"]["requests"][0].update(rng_state=True))


@corrupt("feature_bit_without_content", "weights_ref (required bit 0) is set but the document lacks it",
         "the weights_ref bit set on a file that carries its weights")
def _():
    return craft.set_preamble(two_tensors(), required=1)


@corrupt("content_without_feature_bit", "native_hashes (optional bit 0) is clear but the document has it",
         "prefix.hash present, its feature bit clear")
def _():
    def add_hash(doc, payloads):
        doc["prefix"]["hash"] = {"algorithm": "sha256", "tokens_per_hash": 2, "hashes": ["ab", None]}

    return edit_sections(add_hash)


@corrupt("prefix_without_kv", "a prefix section requires a kv section", "the kv section and its tensors removed")
def _():
    def drop_kv(doc, payloads):
        del doc["kv"], doc["tensors"][:2], payloads[:2]

    return edit_sections(drop_kv)


@corrupt("kv_dtype_mismatch", "has dtype float32, the cache's dtype is bfloat16", "kv.dtype disagrees with the pages")
def _():
    return edit_sections(lambda doc, payloads: doc["kv"].update(dtype="bfloat16"))


@corrupt("kv_page_count_mismatch", "paged tensors are [num_pages=2", "k holds 1 page of 2 heads, the tree has 2 pages")
def _():
    return edit_sections(lambda doc, payloads: doc["tensors"][0].update(shape=[1, 2, 2, 2]))


@corrupt("prefix_partial_parent", "continued by another page, so it must be full", "page 0 holds 1 of 2 tokens")
def _():
    return edit_sections(lambda doc, payloads: payloads.__setitem__(3, struct.pack("<2i", 1, 2)))


@corrupt("integer_member_is_bool", "kv.page_size must be count, got true", "page_size true: a bool is not an int")
def _():
    return edit_sections(lambda doc, payloads: doc["kv"].update(page_size=True))


def sampling(**members) -> Callable[[dict, list], None]:
    return lambda doc, payloads: doc["scheduler"]["requests"][0].update(sampling=members)


@corrupt("sampling_number_huge_int", "temperature must be number", "temperature 10**400: an integer past binary64")
def _():
    return edit_sections(sampling(temperature=10**400))


@corrupt("sampling_int_past_64_bits", "top_k must be int", "top_k 2**64: past every 64-bit integer")
def _():
    return edit_sections(sampling(top_k=1 << 64))


@corrupt("sampling_number_is_string", "top_p must be number", "top_p given as a string")
def _():
    return edit_sections(sampling(top_p="0.9"))


@corrupt("shape_dim_past_int64", "non-negative integers below 2**63", "shape [2**64, 0]: zero elements, no int64 dims")
def _():
    def add(doc, payloads):
        doc["tensors"].append({"name": "weights/c", "dtype": "uint8", "shape": [1 << 64, 0]})
        payloads.append(b"")

    return craft.rebuild(two_tensors(), add)


@corrupt("weights_without_section", "the document has no weights section", "weights/ tensors and no weights section")
def _():
    return with_document(lambda doc: doc.pop("weights"))


@corrupt("kv_tensor_not_listed", "the kv section does not refer to it", "a kv/0/extra tensor no layer lists")
def _():
    def add(doc, payloads):
        doc["tensors"].append({"name": "kv/0/extra", "dtype": "uint8", "shape": [1]})
        payloads.append(b"x")

    return edit_sections(add)


@corrupt("kv_extra_role", "must hold tensors ['k', 'v']", "an attention layer with a third role")
def _():
    def add(doc, payloads):
        doc["kv"]["layers"][0]["tensors"].append("extra")
        doc["tensors"].append({"name": "kv/0/extra", "dtype": "float32", "shape": [2, 2, 1, 2]})
        payloads.append(bytes(32))

    return edit_sections(add)


@corrupt("kv_attention_without_heads", "needs num_kv_heads and head_dim", "an attention layer without num_kv_heads")
def _():
    return edit_sections(lambda doc, payloads: doc["kv"]["layers"][0].update(num_kv_heads=None))


@corrupt("prefix_hash_uppercase", "lowercase hex of whole bytes", "a native hash written in upper case")
def _():
    def add_hash(doc, payloads):
        doc["prefix"]["hash"] = {"algorithm": "sha256", "tokens_per_hash": 2, "hashes": ["AB", None]}

    return craft.set_preamble(edit_sections(add_hash), optional=1)


@corrupt("engine_tp_rank_past_size", "tp_rank 2 must be in [0, tp_size)", "tp_rank 2 of tp_size 2")
def _():
    return edit_sections(lambda doc, payloads: doc.update(engine={"name": "e", "version": "1", "tp_rank": 2, "tp_size": 2}))


@corrupt("scheduler_computed_past_tokens", "num_computed_tokens 9 is not in [0, 4]", "9 computed of 4 tokens")
def _():
    return edit_sections(lambda doc, payloads: doc["scheduler"]["requests"][0].update(num_computed_tokens=9))


@corrupt("scheduler_pages_without_prefix", "are not pages of the prefix tree (0 pages)",
         "a request on pages while the file has kv but no prefix tree")
def _():
    def drop_prefix(doc, payloads):
        del doc["prefix"], doc["tensors"][2:], payloads[2:]

    return edit_sections(drop_prefix)


@corrupt("rng_state_not_1d", "must be a 1-D uint8 tensor, got uint8[2, 2]", "an RNG state of shape [2, 2]")
def _():
    def add(doc, payloads):
        doc["scheduler"]["requests"][0]["rng_state"] = True
        doc["tensors"].append({"name": "scheduler/0/rng_state", "dtype": "uint8", "shape": [2, 2]})
        payloads.append(bytes(4))

    return edit_sections(add)


@corrupt("checkpoint_name_not_string", "checkpoint_names must map", "a checkpoint name given as a number")
def _():
    return with_document(lambda doc: doc["weights"].update(checkpoint_names={"a": 7}))


@case("unknown_members_ignored", None, "", "members a reader does not know, at any level, are ignored (spec 5)")
def _():
    def add_unknown(doc, payloads):
        doc["future_section"] = {"x": [1, 2]}
        doc["kv"]["future_member"] = "y"

    return edit_sections(add_unknown)


# ------------------------------------------------------------------------------------------------ writing


def write_corpus(directory: Path = CORPUS) -> None:
    directory.mkdir(exist_ok=True)
    for old in directory.glob("*.thaw"):
        old.unlink()
    index = []
    for name, (build, call, error, match, why) in CASES.items():
        (directory / f"{name}.thaw").write_bytes(bytes(build()))
        index.append({"file": f"{name}.thaw", "call": call, "error": error, "match": match, "why": why})
    (directory / "index.json").write_text(json.dumps({"cases": index}, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write_corpus()
    print(f"wrote {len(CASES)} files and index.json to {CORPUS}")
