"""The JSON document: turns a Snapshot into (document, named tensors) and back, checking every rule.

A tensor belongs to a section by its name: `weights/<native name>`, `kv/<layer>/<role>`, `prefix/<field>`,
`scheduler/<request index>/rng_state`. The document's `tensors` list describes region i at index i.
"""

from __future__ import annotations

import json
import math
import re
import sys
from array import array
from itertools import accumulate, chain, compress
from operator import itemgetter
from dataclasses import fields
from typing import Any, Callable, Mapping, Optional

from .dtypes import ITEMSIZE, itemsize
from .errors import CorruptSnapshotError
from .snapshot import (
    PAGED_KINDS,
    REQUEST_STATUSES,
    SEQUENCE_KINDS,
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
from .tensor import MAX_DIM, MAX_DIMS, Tensor, as_tensor

Fail = Callable[[str], Exception]


def canonical_json(value: Any) -> bytes:
    """The one JSON encoding the writer emits: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# ---------------------------------------------------------------------------------------------------- encoding


def encode(snapshot: Snapshot) -> tuple[dict, list[tuple[str, Tensor]]]:
    """The document and the tensors (in region order) that represent `snapshot`."""
    doc: dict[str, Any] = {}
    tensors: list[tuple[str, Tensor]] = []
    if snapshot.model is not None:
        _check_keys(snapshot.model.config, "model.config")
        doc["model"] = _members(snapshot.model)
    if snapshot.weights is not None:
        w = snapshot.weights
        # written as "weights/<name>": a name of another type would be read back as its str(), another key
        odd = [name for name in w.tensors if not isinstance(name, str)]
        if odd:
            raise TypeError(f"weights: tensor names must be str, got {odd[0]!r} ({type(odd[0]).__name__})")
        tensors += [_named(f"weights/{name}", t) for name, t in w.tensors.items()]
        doc["weights"] = {
            "checkpoint_names": dict(w.checkpoint_names),
            "ref": _members(w.ref) if w.ref is not None else None,
        }
    if snapshot.kv is not None:
        doc["kv"] = _encode_kv(snapshot.kv, tensors)
    if snapshot.prefix is not None:
        doc["prefix"] = _encode_prefix(snapshot.prefix, tensors)
    if snapshot.scheduler is not None:
        doc["scheduler"] = _encode_scheduler(snapshot.scheduler, tensors)
    if snapshot.engine is not None:
        doc["engine"] = _members(snapshot.engine)
    if snapshot.lineage is not None:
        doc["lineage"] = _members(snapshot.lineage)
    if snapshot.metadata:
        _check_keys(snapshot.metadata, "metadata")
        doc["metadata"] = dict(snapshot.metadata)
    doc["tensors"] = [{"name": n, "dtype": t.dtype, "shape": list(t.shape)} for n, t in tensors]
    return doc, tensors


def _check_keys(value: Any, where: str) -> None:
    """TypeError for a dict key that is not a str, anywhere in the caller's free-form `value`: JSON would write
    1 as "1" (read back as another key), and keys of mixed types fail its sorting with a message naming none."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} ({type(key).__name__}) is not a str: a JSON object's keys are "
                                "strings, so it would be read back as another key")
            _check_keys(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_keys(item, f"{where}[{i}]")


def _named(name: str, value: Any) -> tuple[str, Tensor]:
    """(name, the value as a Tensor); a value that cannot be one, or of more dimensions than the format holds, is
    refused naming it, one among thousands."""
    try:
        tensor = as_tensor(value)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"tensor {name!r}: {exc}") from None
    if len(tensor.shape) > MAX_DIMS:  # numpy and torch allow more; the file's reader would refuse it
        raise ValueError(f"tensor {name!r}: {len(tensor.shape)} dimensions; a snapshot's tensors have at most "
                         f"{MAX_DIMS} (spec section 4): reshape it")
    return name, tensor


def _members(section) -> dict:
    """A section's fields as a JSON object, its values the section's own: the document is only serialised
    (dataclasses.asdict deep-copies every list item, a prefix's page hashes one by one)."""
    return {f.name: getattr(section, f.name) for f in fields(section)}


def _encode_kv(kv: KVCache, tensors: list) -> dict:
    layers = []
    for i, layer in enumerate(kv.layers):
        roles = list(layer.tensors)
        tensors += [_named(f"kv/{i}/{role}", layer.tensors[role]) for role in roles]
        layers.append(
            {
                "kind": layer.kind,
                "num_kv_heads": layer.num_kv_heads,
                "head_dim": layer.head_dim,
                "params": dict(layer.params),
                "tensors": roles,
            }
        )
    return {"page_size": kv.page_size, "dtype": kv.dtype, "layers": layers}


def _int_tensor(dtype: str, values: list[int]) -> Tensor:
    code = {"int32": "i", "int64": "q"}[dtype]
    try:
        return Tensor(dtype, (len(values),), array(code, values))
    except OverflowError as exc:
        raise ValueError(f"value out of {dtype} range: {exc}") from None


def _encode_prefix(prefix: PrefixTree, tensors: list) -> dict:
    tensors.append(("prefix/parents", _int_tensor("int64", prefix.parents)))
    tensors.append(("prefix/num_tokens", _int_tensor("int32", list(map(len, prefix.tokens)))))
    tensors.append(("prefix/token_ids", _int_tensor("int32", list(chain.from_iterable(prefix.tokens)))))
    return {"num_pages": prefix.num_pages, "hash": _members(prefix.hash) if prefix.hash is not None else None}


def _encode_scheduler(scheduler: SchedulerState, tensors: list) -> dict:
    requests = []
    for i, req in enumerate(scheduler.requests):
        entry = _members(req)
        entry["sampling"] = _members(req.sampling)
        entry["rng_state"] = req.rng_state is not None
        if req.rng_state is not None:
            tensors.append(_named(f"scheduler/{i}/rng_state", req.rng_state))
        requests.append(entry)
    return {"requests": requests}


def features(snapshot: Snapshot) -> tuple[int, int]:
    """(required, optional) feature bits the content uses; see container.REQUIRED_FEATURES."""
    required = 1 if snapshot.weights is not None and snapshot.weights.ref is not None else 0
    if snapshot.kv is not None and any("v_head_dim" in layer.params for layer in snapshot.kv.layers):
        required |= 2
    optional = 1 if snapshot.prefix is not None and snapshot.prefix.hash is not None else 0
    return required, optional


def check_features(doc: dict, required: int, optional: int) -> None:
    """The known feature bits must agree with the content (spec section 8, rule 10)."""
    present = {
        "weights_ref (required bit 0)": (bool(required & 1), _member(doc, "weights", "ref")),
        "kv_v_head_dim (required bit 1)": (bool(required & 2), _has_v_head_dim(doc)),
        "native_hashes (optional bit 0)": (bool(optional & 1), _member(doc, "prefix", "hash")),
    }
    for feature, (bit, member) in present.items():
        if bit != member:
            raise CorruptSnapshotError(
                f"feature {feature} is {'set' if bit else 'clear'} but the document {'lacks' if bit else 'has'} it"
            )


def _has_v_head_dim(doc: dict) -> bool:
    kv = doc.get("kv")
    layers = kv.get("layers") if isinstance(kv, dict) else None
    return isinstance(layers, list) and any(
        isinstance(layer, dict) and isinstance(layer.get("params"), dict) and "v_head_dim" in layer["params"]
        for layer in layers
    )


def _member(doc: dict, section: str, key: str) -> bool:
    value = doc.get(section)
    return isinstance(value, dict) and value.get(key) is not None


# ---------------------------------------------------------------------------------------------------- decoding


def parse_json(data: bytes, max_depth: int) -> dict:
    """Parse the document, refusing duplicate keys, non-UTF-8, and nesting deeper than `max_depth`."""

    def no_duplicates(pairs):
        obj = dict(pairs)  # in C: a document lists one object per tensor, and there may be 10^5 tensors
        if len(obj) != len(pairs):
            seen = set()
            for key, _ in pairs:
                if key in seen:
                    raise CorruptSnapshotError(f"JSON document: duplicate key {key!r}")
                seen.add(key)
        return obj

    # Python's parser accepts NaN and Infinity and turns 1e999 into inf; RFC 8259 and the writer allow neither.
    def not_json(constant):
        raise CorruptSnapshotError(f"JSON document: {constant} is not a JSON number")

    def finite(text):
        value = float(text)
        if not math.isfinite(value):
            raise CorruptSnapshotError(f"JSON document: number {text[:40]} overflows a double")
        return value

    try:
        doc = json.loads(
            data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=not_json, parse_float=finite
        )
    except UnicodeDecodeError as exc:
        raise CorruptSnapshotError(f"JSON document is not UTF-8: {exc}") from None
    except RecursionError:
        raise CorruptSnapshotError("JSON document is nested too deeply to parse") from None
    except ValueError as exc:
        raise CorruptSnapshotError(f"JSON document does not parse: {exc}") from None
    if not isinstance(doc, dict):
        raise CorruptSnapshotError(f"JSON document must be an object, got {type(doc).__name__}")
    # Level by level, holding only the containers of one level: a document of millions of tiny containers
    # costs one list slot each here. The children of a level are filtered by type with C iterators only
    # (the parser makes exact dicts and lists), not a Python test per value.
    level, depth = [doc], 1
    while level:
        if depth > max_depth:
            raise CorruptSnapshotError(f"JSON document nests deeper than {max_depth} levels (Limits.max_json_depth)")
        children = list(chain.from_iterable(v.values() if type(v) is dict else v for v in level))
        level = list(compress(children, map(_CONTAINERS.__contains__, map(type, children))))
        depth += 1
    # A \uD800-\uDFFF escape can smuggle a lone surrogate past UTF-8 decoding; such text cannot be written back.
    if _SURROGATE_ESCAPE.search(data):
        try:
            canonical_json(doc)
        except UnicodeEncodeError:
            raise CorruptSnapshotError("JSON document: a \\u escape encodes a lone surrogate, which is not text") from None
    return doc


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_CONTAINERS = frozenset((dict, list))


class _Fields:
    """Typed access to one JSON object, with errors that name the path."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, dict):
            raise CorruptSnapshotError(f"{where} must be an object, got {type(obj).__name__}")
        self.obj, self.where = obj, where

    def get(self, key: str, kind: str, *, optional: bool = False, default: Any = None) -> Any:
        where = f"{self.where}.{key}"
        if key not in self.obj or (optional and self.obj[key] is None):
            if optional:
                return default
            raise CorruptSnapshotError(f"{where} is missing")
        value = self.obj[key]
        if not _is(value, kind):
            raise CorruptSnapshotError(f"{where} must be {kind}, got {json.dumps(value)[:80]}")
        return value

    def sub(self, key: str) -> Optional["_Fields"]:
        value = self.obj.get(key)
        return None if value is None else _Fields(value, f"{self.where}.{key}")


# Integer members fit 64 bits: int64 or, for values such as seeds, uint64. Counts and dimensions are int64.
INT_MIN, INT_MAX, COUNT_MAX = -(1 << 63), (1 << 64) - 1, MAX_DIM


def _is(value: Any, kind: str) -> bool:
    if kind == "int":
        return type(value) is int and INT_MIN <= value <= INT_MAX
    if kind == "count":
        return type(value) is int and 0 <= value <= COUNT_MAX
    if kind == "number":  # a finite binary64: an integer literal past ~1.8e308 is not one
        if type(value) is float:
            return math.isfinite(value)
        return type(value) is int and abs(value) <= _FLOAT_MAX
    if kind == "ints":
        return isinstance(value, list) and ints_within(value, INT_MIN, INT_MAX)
    if kind == "counts":
        return isinstance(value, list) and ints_within(value, 0, COUNT_MAX)
    return isinstance(value, {"str": str, "bool": bool, "list": list, "object": dict}[kind])


_FLOAT_MAX = int(sys.float_info.max)


def ints_within(values: list, low: int, high: int) -> bool:
    """Every item an int (not a bool) in [low, high]: type, min and max each one pass in C (token lists run
    to many thousands of items, and a loop in Python over them was a fifth of a prompt cache's load)."""
    return not values or (set(map(type, values)) == {int} and low <= min(values) and max(values) <= high)


def describe_tensors(doc: dict, region_lengths: list[int], max_dims: int) -> list[tuple[str, str, tuple]]:
    """Check the `tensors` list against the region table: (name, dtype, shape) per region."""
    entries = doc.get("tensors")
    if not isinstance(entries, list):
        raise CorruptSnapshotError("JSON document: `tensors` must be a list")
    if len(entries) != len(region_lengths):
        raise CorruptSnapshotError(
            f"JSON document lists {len(entries)} tensors but the region table has {len(region_lengths)} regions"
        )
    described = _describe_quickly(entries, region_lengths, max_dims)
    if described is not None:
        return described
    seen = set()
    result = []
    for i, entry in enumerate(entries):
        # Field by field, naming the first fault; _describe_quickly found one (or a wrong size) somewhere.
        name = dtype = shape = None
        if type(entry) is dict:
            name, dtype, shape = entry.get("name"), entry.get("dtype"), entry.get("shape")
        if not (type(name) is str and name and name not in seen and type(dtype) is str and dtype in ITEMSIZE
                and type(shape) is list and len(shape) <= max_dims
                and all(type(d) is int and 0 <= d <= COUNT_MAX for d in shape)):
            name, dtype, shape = _tensor_entry(entry, i, seen, max_dims)
        seen.add(name)
        need = math.prod(shape) * ITEMSIZE[dtype]
        if need != region_lengths[i]:
            raise CorruptSnapshotError(
                f"tensor {name!r} (region {i}): {dtype}{shape} needs {need} bytes "
                f"but its region holds {region_lengths[i]}"
            )
        result.append((name, dtype, tuple(shape)))
    return result


def _describe_quickly(entries: list, region_lengths: list[int], max_dims: int) -> Optional[list]:
    """describe_tensors for a list that breaks no rule, column by column with C iterators (the per-entry
    loop costs more than reading the bytes of 10^4-10^5 small tensors); None where anything is off, for the
    loop to find and name."""
    if not entries:
        return []
    try:
        if _types(entries) != {dict}:
            return None
        names, dtypes, shapes = (list(map(itemgetter(key), entries)) for key in ("name", "dtype", "shape"))
        if _types(names) != {str} or _types(shapes) != {list} or not set(dtypes) <= ITEMSIZE.keys():
            return None
        dims = list(chain.from_iterable(shapes))
        if (len(set(names)) != len(names) or "" in names or max(map(len, shapes)) > max_dims
                or not _types(dims) <= {int} or (dims and not 0 <= min(dims) <= max(dims) <= COUNT_MAX)):
            return None
    except (KeyError, TypeError):  # a missing field, an unhashable dtype
        return None
    needs = list(map(int.__mul__, map(math.prod, shapes), map(ITEMSIZE.__getitem__, dtypes)))
    if needs != region_lengths:
        return None
    return list(zip(names, dtypes, map(tuple, shapes)))


def _types(values) -> set:
    return set(map(type, values))


def _tensor_entry(entry: Any, i: int, seen: set, max_dims: int) -> tuple[str, str, list]:
    """Check one `tensors` entry field by field, raising an error that names what is wrong."""
    f = _Fields(entry, f"tensors[{i}]")
    name = f.get("name", "str")
    where = f"tensor {name!r} (region {i})"
    if not name or name in seen:
        raise CorruptSnapshotError(f"{where}: tensor names must be non-empty and unique")
    dtype = f.get("dtype", "str")
    itemsize(dtype, where)
    shape = f.get("shape", "list")
    if len(shape) > max_dims or not all(_is(d, "count") for d in shape):
        raise CorruptSnapshotError(
            f"{where}: shape {json.dumps(shape)[:80]} must be at most {max_dims} non-negative integers below 2**63"
        )
    return name, dtype, shape


# First name segments of the sections this version defines: a tensor there that its section does not refer to
# would be dropped by a load and a save, so it is refused. Later minors add tensors under new segments only.
RESERVED_NAMESPACES = ("weights", "kv", "prefix", "scheduler")


def decode(doc: dict, tensor: Callable[[str], Tensor], names: list[str]) -> Snapshot:
    """Build the Snapshot; `names` are the tensor names in region order, `tensor(name)` supplies each one."""
    used: set[str] = set()
    lookup = tensor

    def tensor(name: str) -> Tensor:
        found = lookup(name)
        used.add(name)
        return found

    root = _Fields(doc, "document")
    snap = Snapshot()
    if (f := root.sub("model")) is not None:
        snap.model = ModelInfo(
            architecture=f.get("architecture", "str"),
            config_digest=f.get("config_digest", "str"),
            dtype=f.get("dtype", "str"),
            weights_digest=f.get("weights_digest", "str", optional=True),
            config=f.get("config", "object", optional=True),
        )
    if (f := root.sub("weights")) is not None:
        ref = f.sub("ref")
        # Every weights/ tensor, looked up and marked used in bulk: a checkpoint may have 10^5 of them.
        weight_names = [n for n in names if n.startswith("weights/")]
        used.update(weight_names)
        snap.weights = Weights(
            tensors=dict(zip([n[len("weights/") :] for n in weight_names], map(lookup, weight_names))),
            checkpoint_names=f.get("checkpoint_names", "object", optional=True, default={}),
            ref=None
            if ref is None
            else WeightsRef(ref.get("weights_digest", "str"), ref.get("snapshot_id", "str", optional=True)),
        )
    if (f := root.sub("kv")) is not None:
        snap.kv = _decode_kv(f, tensor)
    if (f := root.sub("prefix")) is not None:
        snap.prefix = _decode_prefix(f, tensor)
    if (f := root.sub("scheduler")) is not None:
        snap.scheduler = _decode_scheduler(f, tensor)
    if (f := root.sub("engine")) is not None:
        snap.engine = EngineInfo(
            name=f.get("name", "str"),
            version=f.get("version", "str"),
            attention_backend=f.get("attention_backend", "str", optional=True),
            native_kv_layout=f.get("native_kv_layout", "str", optional=True),
            tp_rank=f.get("tp_rank", "count", optional=True, default=0),
            tp_size=f.get("tp_size", "count", optional=True, default=1),
            extra=f.get("extra", "object", optional=True, default={}),
        )
    if (f := root.sub("lineage")) is not None:
        snap.lineage = Lineage(
            parent=f.get("parent", "str", optional=True),
            label=f.get("label", "str", optional=True),
            created=f.get("created", "str", optional=True),
        )
    snap.metadata = root.get("metadata", "object", optional=True, default={})
    unused = set(names).difference(used)
    stray = [n for n in names if n in unused and n.split("/", 1)[0] in RESERVED_NAMESPACES] if unused else []
    if stray:
        section = stray[0].split("/", 1)[0]
        raise CorruptSnapshotError(
            f"tensor {stray[0]!r} is under {section}/ but the {section} section does not refer to it"
            + (" (the document has no weights section)" if section == "weights" and snap.weights is None else "")
            + (f", nor to {len(stray) - 1} more" if len(stray) > 1 else "")
        )
    validate(snap, CorruptSnapshotError)
    return snap


def _need(tensor: Callable[[str], Tensor], name: str, where: str) -> Tensor:
    try:
        return tensor(name)
    except KeyError:
        raise CorruptSnapshotError(f"{where} refers to tensor {name!r}, which the document does not list") from None


def _decode_kv(f: _Fields, tensor) -> KVCache:
    layers = []
    for i, entry in enumerate(f.get("layers", "list")):
        lf = _Fields(entry, f"kv.layers[{i}]")
        roles = lf.get("tensors", "list")
        if not all(isinstance(r, str) for r in roles) or len(set(roles)) != len(roles):
            raise CorruptSnapshotError(f"kv.layers[{i}].tensors must be distinct role names")
        layers.append(
            KVLayer(
                kind=lf.get("kind", "str"),
                tensors={r: _need(tensor, f"kv/{i}/{r}", f"kv.layers[{i}]") for r in roles},
                num_kv_heads=lf.get("num_kv_heads", "count", optional=True),
                head_dim=lf.get("head_dim", "count", optional=True),
                params=lf.get("params", "object", optional=True, default={}),
            )
        )
    return KVCache(page_size=f.get("page_size", "count"), dtype=f.get("dtype", "str"), layers=layers)


def _int_list(t: Tensor, dtype: str, where: str) -> list[int]:
    if t.dtype != dtype or len(t.shape) != 1:
        raise CorruptSnapshotError(f"{where} must be a 1-D {dtype} tensor, got {t.dtype}{list(t.shape)}")
    values = array({"int32": "i", "int64": "q"}[dtype])
    values.frombytes(t.data)
    return values.tolist()


def _decode_prefix(f: _Fields, tensor) -> PrefixTree:
    parents = _int_list(_need(tensor, "prefix/parents", "prefix"), "int64", "tensor 'prefix/parents'")
    counts = _int_list(_need(tensor, "prefix/num_tokens", "prefix"), "int32", "tensor 'prefix/num_tokens'")
    flat = _int_list(_need(tensor, "prefix/token_ids", "prefix"), "int32", "tensor 'prefix/token_ids'")
    num_pages = f.get("num_pages", "count")
    if not (len(parents) == len(counts) == num_pages) or min(counts, default=0) < 0 or sum(counts) != len(flat):
        raise CorruptSnapshotError(
            f"prefix: {num_pages} pages, but parents has {len(parents)}, num_tokens has {len(counts)} "
            f"(sum {sum(counts)}) and token_ids has {len(flat)}"
        )
    ends = list(accumulate(counts))
    tokens = list(map(flat.__getitem__, map(slice, [0, *ends], ends)))
    hash_ = None
    if (h := f.sub("hash")) is not None:
        hash_ = NativeHash(
            algorithm=h.get("algorithm", "str"),
            tokens_per_hash=h.get("tokens_per_hash", "count"),
            hashes=h.get("hashes", "list"),
            seed=h.get("seed", "str", optional=True),
            params=h.get("params", "object", optional=True, default={}),
        )
    return PrefixTree(parents=parents, tokens=tokens, hash=hash_)


def _decode_scheduler(f: _Fields, tensor) -> SchedulerState:
    requests = []
    for i, entry in enumerate(f.get("requests", "list")):
        rf = _Fields(entry, f"scheduler.requests[{i}]")
        sf = rf.sub("sampling") or _Fields({}, f"scheduler.requests[{i}].sampling")
        defaults = SamplingParams()
        sampling = SamplingParams(
            **{
                name: sf.get(name, kind, optional=True, default=getattr(defaults, name))
                for name, kind in _SAMPLING_FIELDS.items()
            }
        )
        requests.append(
            Request(
                id=rf.get("id", "str"),
                status=rf.get("status", "str"),
                prompt_token_ids=rf.get("prompt_token_ids", "ints"),
                output_token_ids=rf.get("output_token_ids", "ints"),
                sampling=sampling,
                num_computed_tokens=rf.get("num_computed_tokens", "count", optional=True, default=0),
                pages=rf.get("pages", "ints", optional=True, default=[]),
                rng_state=_need(tensor, f"scheduler/{i}/rng_state", f"scheduler.requests[{i}]")
                if rf.get("rng_state", "bool", optional=True, default=False)
                else None,
                extra=rf.get("extra", "object", optional=True, default={}),
            )
        )
    return SchedulerState(requests=requests)


_SAMPLING_FIELDS = {
    "temperature": "number",
    "top_p": "number",
    "top_k": "int",
    "min_p": "number",
    "seed": "int",
    "max_tokens": "count",
    "stop_token_ids": "ints",
    "ignore_eos": "bool",
    "repetition_penalty": "number",
    "presence_penalty": "number",
    "frequency_penalty": "number",
    "logprobs": "count",
    "extra": "object",
}


# ---------------------------------------------------------------------------------------------------- rules


def validate(snap: Snapshot, fail: Fail) -> None:
    """The cross-section rules of spec/SPEC.md section 5; `fail` makes the exception (a reader's or a writer's)."""
    kv, prefix = snap.kv, snap.prefix
    if prefix is not None and kv is None:
        raise fail("a prefix section requires a kv section (its page size is kv.page_size)")
    num_pages = prefix.num_pages if prefix is not None else kv.num_pages if kv is not None else None
    if snap.weights is not None:
        names = snap.weights.checkpoint_names
        if not isinstance(names, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
            raise fail("weights.checkpoint_names must map engine-native names (str) to checkpoint names (str)")
    if kv is not None:
        if kv.page_size < 1:
            raise fail(f"kv.page_size must be positive, got {kv.page_size}")
        for i, layer in enumerate(kv.layers):
            _validate_layer(i, layer, kv, num_pages, fail)
    if prefix is not None:
        _validate_prefix(prefix, kv.page_size, fail)
    if snap.scheduler is not None:
        for i, req in enumerate(snap.scheduler.requests):
            _validate_request(i, req, prefix, fail)
    engine = snap.engine
    if engine is not None and not (type(engine.tp_size) is int and type(engine.tp_rank) is int
                                   and 0 <= engine.tp_rank < engine.tp_size):
        raise fail(f"engine: tp_rank {engine.tp_rank!r} must be in [0, tp_size) and tp_size {engine.tp_size!r} >= 1")


def _validate_prefix(prefix: PrefixTree, page_size: int, fail: Fail) -> None:
    continued = set()
    for i, (parent, tokens) in enumerate(zip(prefix.parents, prefix.tokens)):
        if not -1 <= parent < i:
            raise fail(f"prefix page {i}: parent {parent} must be -1 or an earlier page")
        if parent >= 0:
            continued.add(parent)
        if not 1 <= len(tokens) <= page_size:
            raise fail(f"prefix page {i}: holds {len(tokens)} tokens, must be 1..page_size ({page_size})")
    for p in continued:
        if len(prefix.tokens[p]) != page_size:
            raise fail(f"prefix page {p}: continued by another page, so it must be full ({page_size} tokens)")
    if prefix.hash is not None:
        hashes = prefix.hash.hashes
        if len(hashes) != prefix.num_pages:
            raise fail(f"prefix.hash: {len(hashes)} hashes for {prefix.num_pages} pages")
        bad = [] if _all_hex(hashes) else [h for h in hashes
                                            if not (h is None or isinstance(h, str) and _HEX.fullmatch(h))]
        if bad:
            raise fail("prefix.hash.hashes: every entry must be lowercase hex of whole bytes or null, "
                       f"got {bad[0]!r:.80}")


def _all_hex(hashes: list) -> bool:
    """Every entry None or lowercase hex of whole bytes: the strings joined and matched once, each one's
    length checked in C (one regex call per page cost more than the rest of the prefix's checks)."""
    given = [h for h in hashes if h is not None]
    if not given:
        return True
    if _types(given) != {str}:
        return False
    lengths = list(map(len, given))
    return min(lengths) > 0 and not any(map((1).__and__, lengths)) and bool(_HEX_DIGITS.fullmatch("".join(given)))


_HEX = re.compile(r"(?:[0-9a-f]{2})+")
_HEX_DIGITS = re.compile(r"[0-9a-f]*")


def _validate_request(i: int, req: Request, prefix: Optional[PrefixTree], fail: Fail) -> None:
    where = f"scheduler.requests[{i}]"
    if req.status not in REQUEST_STATUSES:
        raise fail(f"{where}.status {req.status!r} is not one of {REQUEST_STATUSES}")
    if req.rng_state is not None and (req.rng_state.dtype != "uint8" or len(req.rng_state.shape) != 1):
        raise fail(f"{where}.rng_state must be a 1-D uint8 tensor, got {req.rng_state.dtype}{list(req.rng_state.shape)}")
    tokens = len(req.prompt_token_ids) + len(req.output_token_ids)
    if not 0 <= req.num_computed_tokens <= tokens:
        raise fail(f"{where}.num_computed_tokens {req.num_computed_tokens} is not in [0, {tokens}] (its token count)")
    num_pages = prefix.num_pages if prefix is not None else 0
    bad = [p for p in req.pages if not 0 <= p < num_pages]
    if bad:
        raise fail(f"{where}.pages: {bad[:5]} are not pages of the prefix tree ({num_pages} pages)")


# Per known kind: its tensor roles, and the params it requires (non-negative integers; "keep" may be 0).
_ROLES = {
    "attention": ("k", "v"),
    "sliding_window": ("k", "v"),
    "mla": ("latent",),
    "quantized": ("k", "k_biases", "k_scales", "v", "v_biases", "v_scales"),
    "ring": ("k", "v"),
}
_PARAMS = {"sliding_window": ("window",), "mla": ("latent_dim", "rope_dim"), "quantized": ("bits", "group_size"),
           "ring": ("window", "keep")}
_PACKED_DTYPES = ("uint8", "uint16", "uint32", "uint64")


def _validate_layer(i: int, layer: KVLayer, kv: KVCache, num_pages: Optional[int], fail: Fail) -> None:
    """A known kind's roles, params and shapes. A kind this version does not define (added by a later minor)
    is kept as it is: only the generic rules apply (distinct roles, tensors that exist)."""
    kind = layer.kind
    if kind not in PAGED_KINDS + SEQUENCE_KINDS:
        return
    where = f"kv.layers[{i}] ({kind})"
    roles = tuple(sorted(layer.tensors))
    want = _ROLES.get(kind) or tuple(sorted(f"state.{n}" for n in range(max(1, len(roles)))))
    if roles != want:
        raise fail(f"{where} must hold tensors {list(want)}, has {list(roles)}")
    for key in _PARAMS.get(kind, ()):
        value = layer.params.get(key)
        if not _is(value, "count") or (value < 1 and key != "keep"):
            raise fail(f"{where} params.{key} must be a {'non-negative' if key == 'keep' else 'positive'} integer, "
                       f"got {value!r:.80}")
    page_size = kv.page_size
    if kind in PAGED_KINDS:
        for role, t in layer.tensors.items():
            if len(t.shape) < 2 or t.shape[1] != page_size or t.shape[0] != num_pages:
                raise fail(
                    f"{where} tensor {role!r} has shape {list(t.shape)}; paged tensors are "
                    f"[num_pages={num_pages}, page_size={page_size}, ...]"
                )
            packed = kind == "quantized" and role in ("k", "v")
            if packed and t.dtype not in _PACKED_DTYPES:
                raise fail(f"{where} tensor {role!r} has dtype {t.dtype}; packed values are one of {_PACKED_DTYPES}")
            if not packed and t.dtype != kv.dtype:
                raise fail(f"{where} tensor {role!r} has dtype {t.dtype}, the cache's dtype is {kv.dtype}")
    if kind in ("attention", "sliding_window"):
        _validate_heads(where, layer, page_size, fail)
    elif kind == "mla":
        latent, rope = layer.params["latent_dim"], layer.params["rope_dim"]
        shape = layer.tensors["latent"].shape
        if len(shape) != 3 or shape[2] != latent or rope > latent:
            raise fail(f"{where} tensor 'latent' has shape {list(shape)}, expected [pages, {page_size}, "
                       f"latent_dim={latent}] with rope_dim ({rope}) <= latent_dim")
    elif kind == "ring":
        k, v = layer.tensors["k"].shape, layer.tensors["v"].shape
        p = layer.params
        if len(k) != 4 or len(v) != 4 or k[:2] != v[:2]:
            raise fail(f"{where} tensors 'k' {list(k)} and 'v' {list(v)} must be [sequences, capacity, heads, dim]")
        for key in ("write_index", "offset"):
            if not _is(p.get(key), "counts") or len(p[key]) != k[0]:
                raise fail(f"{where} params.{key} must be {k[0]} non-negative integers (one per sequence)")
        if p["keep"] > p["window"] or any(w > k[1] for w in p["write_index"]):
            raise fail(f"{where}: keep {p['keep']} must be <= window {p['window']}, and each write_index <= "
                       f"the capacity {k[1]}")
    elif kind == "recurrent":
        firsts = {t.shape[:1] for t in layer.tensors.values()}
        if len(firsts) != 1 or () in firsts:
            raise fail(f"{where} tensors must all be [sequences, ...] with one sequence count")


def _validate_heads(where: str, layer: KVLayer, page_size: int, fail: Fail) -> None:
    """attention and sliding_window: num_kv_heads and head_dim are required, and fix both tensors' shapes."""
    heads, head_dim = layer.num_kv_heads, layer.head_dim
    if not (_is(heads, "count") and heads >= 1 and _is(head_dim, "count") and head_dim >= 1):
        raise fail(f"{where} needs num_kv_heads and head_dim (positive integers), got {heads!r} and {head_dim!r}")
    v_head_dim = layer.params.get("v_head_dim", head_dim)
    if "v_head_dim" in layer.params and not (_is(v_head_dim, "count") and v_head_dim >= 1):
        raise fail(f"{where} params.v_head_dim must be a positive integer, got {v_head_dim!r}")
    for role, t in layer.tensors.items():
        dim = head_dim if role == "k" else v_head_dim
        if t.shape[2:] != (heads, dim):
            name = "head_dim" if role == "k" else "v_head_dim"
            raise fail(
                f"{where} tensor {role!r} has shape {list(t.shape)}, expected "
                f"[pages, {page_size}, num_kv_heads={heads}, {name}={dim}]"
            )
