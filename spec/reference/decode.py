"""Independent reader for the thaw snapshot format 1.2 (reads every 1.x), written from spec/SPEC.md alone.

Standard library only (the `crc32c` package is used when installed, else a table-driven CRC32C).
decode(data) verifies the whole file and returns the description that spec/vectors/NAME.json holds:
{"id", "version": [major, minor], "features": {"required", "optional"}, "document", "tensors": [...]}.
Usage: python decode.py FILE.thaw   (prints that description as JSON)
"""
import hashlib
import json
import re
import struct
import sys

MAGIC, END_MAGIC, ALIGN = b"\x89THAW\r\n\x1a", b"THAW-END", 4096          # §3.1, §3.5
MAJOR, KNOWN_REQUIRED = 1, 0b11                              # §6: bit 0 = weights_ref, bit 1 = kv_v_head_dim
LIMITS = {"json": 64 << 20, "regions": 1 << 20, "dims": 16, "depth": 64}   # §9 defaults
ITEMSIZE = {  # §4
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "complex128": 16, "complex64": 8, "complex32": 4,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1, "int64": 8, "uint64": 8, "int32": 4, "uint32": 4, "int16": 2, "uint16": 2,
    "int8": 1, "uint8": 1, "bool": 1,
}


class ThawError(Exception): """Any reason to reject a file (§8)."""
class CorruptSnapshotError(ThawError): """§8: the default error."""
class UnsupportedVersionError(ThawError): """§8.2: another major version or an unknown required feature bit."""


def _crc_entry(n):
    for _ in range(8):
        n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1
    return n


_TABLE = [_crc_entry(n) for n in range(256)]


def crc32c_py(data, crc=0):
    """§2: CRC32C (Castagnoli, reflected 0x82F63B78, init and final XOR 0xFFFFFFFF)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


try:
    from crc32c import crc32c
except ImportError:  # pragma: no cover
    crc32c = crc32c_py


def align(x):  # §2
    return -(-x // ALIGN) * ALIGN


def _fail(msg, cls=CorruptSnapshotError):
    raise cls(msg)


def _is_int(x):  # §5: JSON true/false are not integers; every integer fits int64 or uint64
    return isinstance(x, int) and not isinstance(x, bool) and -(1 << 63) <= x < 1 << 64


def _is_count(x):  # §5: a non-negative integer that fits int64
    return _is_int(x) and 0 <= x < 1 << 63


def _is_number(x):  # §5: a finite binary64 value (an integer literal too)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return abs(float(x)) != float("inf")
    except OverflowError:
        return False


CHECKS = {"int": _is_int, "count": _is_count, "number": _is_number,
          "ints": lambda x: isinstance(x, list) and all(map(_is_int, x)),
          "counts": lambda x: isinstance(x, list) and all(map(_is_count, x))}


# §5 member types, "name:type"; "?" marks a member that MAY be absent or null. Unknown members are ignored (§5).
SCHEMA = {
    "model": "architecture:str config_digest:str dtype:str weights_digest?:str config?:object",          # §5.1
    "weights": "checkpoint_names?:object ref?:object",                                                   # §5.2
    "kv": "page_size:count dtype:str layers:array",                                                      # §5.3
    "prefix": "num_pages:count hash?:object",                                                            # §5.4
    "scheduler": "requests:array",                                                                       # §5.5
    "engine": "name:str version:str attention_backend?:str native_kv_layout?:str tp_rank?:count "
              "tp_size?:count extra?:object",                                                            # §5.6
    "lineage": "parent?:str label?:str created?:str",                                                    # §5.7
    "metadata": "",                                                                                      # §5.8
    "weights.ref": "weights_digest:str snapshot_id?:str",                                                # §5.2
    "layer": "kind:str num_kv_heads?:count head_dim?:count params?:object tensors:array",                # §5.3
    "prefix.hash": "algorithm:str tokens_per_hash:count hashes:array seed?:str params?:object",          # §5.4
    "request": "id:str status:str prompt_token_ids:ints output_token_ids:ints sampling?:object "
               "num_computed_tokens?:count pages?:ints rng_state?:bool extra?:object",                   # §5.5
    "sampling": "temperature?:number top_p?:number top_k?:int min_p?:number seed?:int max_tokens?:count "
                "stop_token_ids?:ints ignore_eos?:bool repetition_penalty?:number presence_penalty?:number "
                "frequency_penalty?:number logprobs?:count extra?:object",                               # §5.5.1
}
TYPES = {"str": str, "object": dict, "array": list, "bool": bool}
# §5.3: per known kind, its roles and the params it requires (non-negative integers; all but `keep` >= 1)
KIND_ROLES = {"attention": ["k", "v"], "sliding_window": ["k", "v"], "mla": ["latent"],
              "quantized": ["k", "k_biases", "k_scales", "v", "v_biases", "v_scales"], "ring": ["k", "v"]}
KIND_PARAMS = {"sliding_window": ["window"], "mla": ["latent_dim", "rope_dim"], "quantized": ["bits", "group_size"],
               "ring": ["window", "keep"]}
PAGED = ("attention", "sliding_window", "mla", "quantized")
RESERVED = ("weights", "kv", "prefix", "scheduler")                   # §4: namespaces of this version's sections


def _check(obj, kind, where):
    """§8.10: `obj` is an object whose members have the types SCHEMA[kind] gives."""
    if not isinstance(obj, dict):
        _fail(f"§8.10: {where} is not an object")
    for member in SCHEMA[kind].split():
        key, typ = member.split(":")
        optional, key = key.endswith("?"), key.rstrip("?")
        value = obj.get(key)
        if value is None and not optional:
            _fail(f"§8.10: {where}.{key} is missing")
        if value is not None and not (CHECKS[typ](value) if typ in CHECKS else isinstance(value, TYPES[typ])):
            _fail(f"§8.10: {where}.{key} is not {typ}")


def _parse_json(raw):
    """§3.3, §8.8: UTF-8, RFC 8259 (no NaN/Infinity), object at top level, no repeated key, nesting limit."""
    def pairs(items):
        obj = dict(items)
        if len(obj) != len(items):
            _fail("§8.8: JSON document repeats a key in an object")
        return obj

    def bad_constant(name):
        _fail(f"§8.8: JSON document contains {name}, which RFC 8259 does not allow")

    def finite(text):
        value = float(text)
        if value in (float("inf"), float("-inf")):
            _fail(f"§5: number {text} is not finite")
        return value

    def depth(x):  # the top-level object is level 1
        return 1 + max(map(depth, x.values() if isinstance(x, dict) else x), default=0) \
            if isinstance(x, (dict, list)) else 0
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=pairs, parse_constant=bad_constant,
                         parse_float=finite)
        too_deep = depth(doc) > LIMITS["depth"]
    except UnicodeDecodeError as e:
        _fail(f"§8.8: JSON document is not UTF-8 ({e})")
    except RecursionError:
        too_deep = True
    except ValueError as e:  # json.JSONDecodeError is a ValueError; our own errors are not
        _fail(f"§8.8: JSON document does not parse ({e})")
    if too_deep:
        _fail(f"§8.8: JSON document nests deeper than {LIMITS['depth']} levels")
    if not isinstance(doc, dict):
        _fail("§8.8: JSON document is not an object")
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        _fail("§8.8: a \\u escape in the JSON document encodes a lone surrogate, which is not text")
    return doc


def _check_tensors(doc, regions):
    """§4, §8.9: one entry per region, unique non-empty names, known dtypes, shapes that match the lengths."""
    entries = doc.get("tensors")
    if not isinstance(entries, list) or len(entries) != len(regions):
        _fail(f"§8.9: 'tensors' is not an array of exactly R = {len(regions)} entries")
    seen = set()
    for i, (t, (_, length, _, _)) in enumerate(zip(entries, regions)):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            _fail(f"§8.9: tensors[{i}] has no non-empty string name")
        name, dtype, shape = t["name"], t.get("dtype"), t.get("shape")
        if name in seen:
            _fail(f"§8.9: tensor name {name!r} repeats (tensors[{i}])")
        seen.add(name)
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            _fail(f"§8.9: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > LIMITS["dims"] or \
                not all(map(_is_count, shape)):
            _fail(f"§8.9: tensor {name!r} shape {shape!r} is not <= {LIMITS['dims']} non-negative integers")
        size = ITEMSIZE[dtype]
        for d in shape:
            size *= d
        if size != length:
            _fail(f"§8.9: tensor {name!r}: shape {shape} x {dtype} is {size} bytes, region {i} holds {length}")
    return entries


def _check_sections(doc, required, optional, tensors):
    """§5, §8.10: member types, referenced tensors, §5 rules. `tensors`: name -> (dtype, shape, bytes)."""
    for section in ("model", "weights", "kv", "prefix", "scheduler", "engine", "lineage", "metadata"):
        if doc.get(section) is not None:
            _check(doc[section], section, section)
    used = set()

    def need(name, dtype=None, shape=None, where=""):
        if name not in tensors:
            _fail(f"§8.10: {where} refers to tensor {name!r}, which does not exist")
        used.add(name)
        t_dtype, t_shape, _ = tensors[name]
        if (dtype and t_dtype != dtype) or (shape is not None and t_shape != shape):
            _fail(f"§8.10: tensor {name!r} is {t_dtype} {t_shape}, {where} needs {dtype or t_dtype} {shape}")
        return tensors[name]
    weights = doc.get("weights")
    if weights is not None:                                                               # §5.2
        used.update(n for n in tensors if n.startswith("weights/"))
        names = weights.get("checkpoint_names") or {}
        if not all(isinstance(v, str) for v in names.values()):
            _fail("§5.2: weights.checkpoint_names values are not strings")
    ref = (weights or {}).get("ref")
    if ref is not None:
        _check(ref, "weights.ref", "weights.ref")
    if (ref is not None) != bool(required & 1):                                           # §5.2, §6
        _fail("§5.2: required feature bit 0 (weights_ref) must be set exactly when weights.ref is present")
    kv, prefix = doc.get("kv"), doc.get("prefix")
    if prefix is not None:                                                                # §5.4
        n = prefix["num_pages"]
        if kv is None:
            _fail("§5.4: a prefix tree without kv (its rules need kv.page_size)")
        if prefix.get("hash") is not None:
            _check(prefix["hash"], "prefix.hash", "prefix.hash")
            hashes = prefix["hash"]["hashes"]
            if len(hashes) != n or not all(h is None or isinstance(h, str) and re.fullmatch(r"([0-9a-f]{2})+", h)
                                           for h in hashes):
                _fail("§5.4: prefix.hash.hashes is not num_pages lowercase hex strings (whole bytes) or nulls")
        if (prefix.get("hash") is not None) != bool(optional & 1):
            _fail("§5.4: optional feature bit 0 (native_hashes) must be set exactly when prefix.hash is present")
        parents = struct.unpack(f"<{n}q", need("prefix/parents", "int64", [n], "prefix")[2])
        counts = struct.unpack(f"<{n}i", need("prefix/num_tokens", "int32", [n], "prefix")[2])
        need("prefix/token_ids", "int32", [sum(counts)], "prefix")
        for p in range(n):
            if not (parents[p] == -1 or 0 <= parents[p] < p):
                _fail(f"§5.4: page {p} has parent {parents[p]}: not -1 and not an earlier page")
            if not 1 <= counts[p] <= kv["page_size"]:
                _fail(f"§5.4: page {p} holds {counts[p]} tokens, not 1..{kv['page_size']}")
            if parents[p] >= 0 and counts[parents[p]] != kv["page_size"]:
                _fail(f"§5.4: page {parents[p]} is a parent but holds fewer than page_size tokens")
    if kv is not None and kv["page_size"] < 1:                                            # §5.3
        _fail("§5.3: kv.page_size < 1")
    if kv is not None:
        kv_pages = [prefix["num_pages"]] if prefix else None  # every paged tensor has the same page count
        for i, layer in enumerate(kv["layers"]):
            _check(layer, "layer", f"kv.layers[{i}]")
            roles, kind, params = layer["tensors"], layer["kind"], layer.get("params") or {}
            if not all(isinstance(r, str) for r in roles) or len(set(roles)) != len(roles):
                _fail(f"§5.3: kv.layers[{i}].tensors is not an array of distinct role names")
            shapes = {role: need(f"kv/{i}/{role}", where=f"kv.layers[{i}]")[:2] for role in roles}
            if kind not in KIND_ROLES and kind != "recurrent":
                continue  # §5.3: a kind of a later minor version is kept, checked only as above
            want = KIND_ROLES.get(kind) or [f"state.{k}" for k in range(max(1, len(roles)))]
            if sorted(roles) != sorted(want):
                _fail(f"§5.3: kv.layers[{i}] ({kind}) has roles {sorted(roles)}, its kind has {sorted(want)}")
            for key in KIND_PARAMS.get(kind, []):
                if not _is_count(params.get(key)) or (key != "keep" and params[key] < 1):
                    _fail(f"§5.3: kv.layers[{i}] ({kind}) params.{key} is not a valid integer")
            for role, (dtype, shape) in shapes.items():
                if kind in PAGED:
                    kv_pages = kv_pages if kv_pages is not None else shape[:1]
                    if shape[:2] != kv_pages + [kv["page_size"]]:
                        _fail(f"§5.3: paged tensor kv/{i}/{role} {shape} is not [num_pages, page_size, ...]")
                    packed = kind == "quantized" and role in ("k", "v")
                    if packed and dtype not in ("uint8", "uint16", "uint32", "uint64"):
                        _fail(f"§5.3: kv/{i}/{role} holds packed values as {dtype}, not an unsigned integer type")
                    if not packed and dtype != kv["dtype"]:
                        _fail(f"§5.3: kv/{i}/{role} is {dtype}, the cache's dtype is {kv['dtype']}")
            if kind in ("attention", "sliding_window"):
                heads, dim = layer.get("num_kv_heads"), layer.get("head_dim")
                v_dim = params.get("v_head_dim", dim)
                if not all(_is_count(x) and x >= 1 for x in (heads, dim, v_dim)):
                    _fail(f"§5.3: kv.layers[{i}] needs positive num_kv_heads, head_dim (and v_head_dim if given)")
                for role, (_, shape) in shapes.items():
                    if shape[2:] != [heads, v_dim if role == "v" else dim]:
                        _fail(f"§5.3: kv/{i}/{role} {shape} is not [pages, page_size, num_kv_heads, head_dim]"
                              " (v: v_head_dim when given)")
            if kind == "mla":
                shape = shapes["latent"][1]
                if len(shape) != 3 or shape[2] != params["latent_dim"] or params["rope_dim"] > params["latent_dim"]:
                    _fail(f"§5.3: kv/{i}/latent {shape} is not [pages, page_size, latent_dim], or rope_dim > latent_dim")
            if kind == "ring":
                k, v = shapes["k"][1], shapes["v"][1]
                if len(k) != 4 or len(v) != 4 or k[:2] != v[:2]:
                    _fail(f"§5.3: ring kv/{i} k {k} and v {v} are not [sequences, capacity, heads, dim]")
                for key in ("write_index", "offset"):
                    if not CHECKS["counts"](params.get(key)) or len(params[key]) != k[0]:
                        _fail(f"§5.3: ring layer {i} params.{key} is not one non-negative integer per sequence")
                if params["keep"] > params["window"] or any(w > k[1] for w in params["write_index"]):
                    _fail(f"§5.3: ring layer {i}: keep > window, or a write_index past the capacity")
            firsts = {tuple(shape[:1]) for _, shape in shapes.values()}
            if kind == "recurrent" and (len(firsts) != 1 or () in firsts):
                _fail(f"§5.3: recurrent layer {i}: tensors are not [sequences, ...] with one sequence count")
    v_head_dim = kv is not None and any("v_head_dim" in (layer.get("params") or {}) for layer in kv["layers"])
    if v_head_dim != bool(required & 2):                                                  # §5.3, §6
        _fail("§5.3: required feature bit 1 (kv_v_head_dim) must be set exactly when a KV layer has v_head_dim")
    requests = (doc.get("scheduler") or {}).get("requests") or []
    for i, req in enumerate(requests):                                                    # §5.5
        _check(req, "request", f"scheduler.requests[{i}]")
        if req.get("sampling") is not None:
            _check(req["sampling"], "sampling", f"scheduler.requests[{i}].sampling")
        if req["status"] not in ("waiting", "running", "preempted", "finished"):
            _fail(f"§5.5: scheduler.requests[{i}].status {req['status']!r} is unknown")
        if (req.get("num_computed_tokens") or 0) > len(req["prompt_token_ids"]) + len(req["output_token_ids"]):
            _fail(f"§5.5: scheduler.requests[{i}].num_computed_tokens exceeds its token count")
        n = prefix["num_pages"] if prefix else 0
        if any(not 0 <= p < n for p in req.get("pages") or []):
            _fail(f"§5.5: scheduler.requests[{i}].pages refers to a page outside the prefix tree")
        if req.get("rng_state"):
            shape = need(f"scheduler/{i}/rng_state", "uint8", where=f"scheduler.requests[{i}].rng_state")[1]
            if len(shape) != 1:
                _fail(f"§5.5: scheduler/{i}/rng_state is not a 1-D uint8 tensor")
    engine = doc.get("engine")
    if engine is not None:                                                                # §5.6
        rank = engine.get("tp_rank")
        size = engine.get("tp_size")
        rank, size = 0 if rank is None else rank, 1 if size is None else size
        if not rank < size:
            _fail("§5.6: engine.tp_rank is not below engine.tp_size")
    stray = [n for n in tensors if n.split("/", 1)[0] in RESERVED and n not in used]     # §4
    if stray:
        _fail(f"§4: tensor {stray[0]!r} is under a section's namespace that does not refer to it")


def decode(data):
    """Verify `data` (bytes) fully and return its description (§11). Raises ThawError subclasses (§8)."""
    data = bytes(data)
    if len(data) < 32 or data[:8] != MAGIC:                                               # §8.1
        _fail("§8.1: shorter than 32 bytes or wrong magic (bytes [0, 8))")
    major, minor, required, optional, R, J = struct.unpack_from("<HHIIIQ", data, 8)       # §3.1
    if major != MAJOR:                                                                    # §8.2
        _fail(f"§8.2: major version {major}, this reader reads {MAJOR}", UnsupportedVersionError)
    if required & ~KNOWN_REQUIRED:
        _fail(f"§8.2: unknown required feature bits {required & ~KNOWN_REQUIRED:#x}", UnsupportedVersionError)
    if R > LIMITS["regions"] or J > LIMITS["json"]:                                       # §8.3, §9
        _fail(f"§8.3: R = {R} or J = {J} above this reader's limits")
    table_end = 32 + 24 * R
    header_length = table_end + J + 4                                                     # §3.2
    if header_length > len(data):
        _fail(f"§8.3: header of {header_length} bytes is longer than the file ({len(data)} bytes)")
    stored = struct.unpack_from("<I", data, header_length - 4)[0]                         # §3.4
    if crc32c(data[:header_length - 4]) != stored:
        _fail(f"§8.4: header CRC32C mismatch over bytes [0, {header_length - 4})")
    regions, expected = [], align(header_length)                                          # §3.2
    for i in range(R):
        offset, length, chunk, flags = struct.unpack_from("<QQII", data, 32 + 24 * i)
        if flags:
            _fail(f"§8.5: region {i} has non-zero flags {flags:#x}")
        if chunk & (chunk - 1) or not 4096 <= chunk <= 1 << 30:
            _fail(f"§8.5: region {i} chunk size {chunk} is not a power of two in [4096, 2^30]")
        if offset != expected:
            _fail(f"§8.5: region {i} offset {offset}, §3.2 prescribes {expected}")
        if offset + length > len(data):
            _fail(f"§8.5: region {i} bytes [{offset}, {offset + length}) run past the end of the file")
        regions.append((offset, length, chunk, -(-length // chunk)))
        expected = align(offset + length)
    trailer_offset, C = expected, sum(r[3] for r in regions)                              # §3.2
    if len(data) != trailer_offset + 4 * C + 12:                                          # §8.6, §3.5
        _fail(f"§8.6: file is {len(data)} bytes, the table implies {trailer_offset + 4 * C + 12}")
    table = data[trailer_offset:trailer_offset + 4 * C]
    if data[-8:] != END_MAGIC:                                                            # §8.7
        _fail(f"§8.7: wrong end magic at bytes [{len(data) - 8}, {len(data)})")
    if crc32c(table) != struct.unpack_from("<I", data, trailer_offset + 4 * C)[0]:
        _fail(f"§8.7: trailer CRC32C mismatch over the chunk table [{trailer_offset}, {trailer_offset + 4 * C})")
    doc = _parse_json(data[table_end:table_end + J])                                      # §3.3, §8.8
    entries = _check_tensors(doc, regions)                                                # §4, §8.9
    chunk_crcs, g, pad_start, tensors = struct.unpack(f"<{C}I", table), 0, header_length, {}
    for i, ((offset, length, chunk, count), t) in enumerate(zip(regions, entries)):
        if any(data[pad_start:offset]):                                                   # §3.4, §8.12
            _fail(f"§8.12: non-zero padding in bytes [{pad_start}, {offset})")
        for k in range(count):                                                            # §3.2, §8.11
            lo, hi = offset + k * chunk, offset + min((k + 1) * chunk, length)
            if crc32c(data[lo:hi]) != chunk_crcs[g]:
                _fail(f"§8.11: CRC32C mismatch in tensor {t['name']!r}, region {i}, chunk {k} "
                      f"(global chunk {g}), file bytes [{lo}, {hi})")
            g += 1
        tensors[t["name"]] = (t["dtype"], t["shape"], data[offset:offset + length])
        pad_start = offset + length
    if any(data[pad_start:trailer_offset]):                                               # §8.12
        _fail(f"§8.12: non-zero padding in bytes [{pad_start}, {trailer_offset})")
    _check_sections(doc, required, optional, tensors)                                     # §5, §8.10
    snapshot_id = "sha256:" + hashlib.sha256(data[:header_length] + data[trailer_offset:]).hexdigest()  # §3.6
    return {"id": snapshot_id, "version": [major, minor], "features": {"required": required, "optional": optional},
            "document": doc,
            "tensors": [{"name": n, "dtype": d, "shape": s, "hex": b.hex()} for n, (d, s, b) in tensors.items()]}


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        print(json.dumps(decode(f.read()), indent=1, sort_keys=True))
