"""Structure-aware property tests: hypothesis edits a valid snapshot where it is most fragile (the JSON
document, the region table, the preamble, bytes of the header) and re-seals the CRCs so the edit reaches the
deeper checks. For any input the reader either refuses with a SnapshotError or returns a snapshot that the
writer can write back and that reads back equal. Example counts are bounded here; fuzz/ runs longer.
"""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import thaw_format as tf
from hostile import craft

BASE = craft.sample_bytes()
DOCUMENT = craft.document_of(BASE)
PAYLOADS = craft.payloads_of(BASE)
BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64 - 1, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["", "k", "v", "attention", "ring", "float32", "int64", "weights/embed_tokens.weight",
                     "kv/0/k", "prefix/parents", "running"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def accepted_or_refused(data) -> None:
    """The property: a SnapshotError (anything else propagates and fails), or a snapshot that round-trips."""
    try:
        snapshot = tf.loads(bytes(data))
    except tf.SnapshotError:
        return
    again = tf.loads(tf.dumps(snapshot))
    assert again == snapshot


def paths(value, prefix=()):
    """Every path into a JSON value, as tuples of keys and indices."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, prefix + (index,))


DOCUMENT_PATHS = [p for p in paths(DOCUMENT) if p]


DELETE = object()


def replaced(document, path, new):
    copy = json.loads(json.dumps(document))
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    if new is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return copy


@BOUNDED
@given(path=st.sampled_from(DOCUMENT_PATHS), new=json_values | st.just(DELETE))
def test_any_document_member_replaced_or_deleted(path, new):
    accepted_or_refused(craft.container(replaced(DOCUMENT, path, new), PAYLOADS, optional=1))


@BOUNDED
@given(path=st.sampled_from(DOCUMENT_PATHS), new=st.integers(min_value=-3, max_value=2**64 + 3))
def test_any_document_member_replaced_by_an_edge_integer(path, new):
    accepted_or_refused(craft.container(replaced(DOCUMENT, path, new), PAYLOADS, optional=1))


@BOUNDED
@given(document=st.dictionaries(st.sampled_from(list(DOCUMENT) + ["x"]), json_values, max_size=6))
def test_documents_made_up_from_scratch(document):
    accepted_or_refused(craft.container(document, PAYLOADS, optional=1))


@BOUNDED
@given(data=st.data())
def test_raw_json_text_edits(data):
    """Byte-level edits of the document text itself: stray quotes, escapes, surrogates, control bytes."""
    text = bytearray(json.dumps(DOCUMENT).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 8))
        insert = data.draw(st.binary(max_size=6) | st.sampled_from(
            [b'"', b"\\", b"\\ud800", b"\\u0000", b"NaN", b"-0", b"1e400", b"[", b"{", b"}", b",", b":", b"\xff"]))
        text[at : at + cut] = insert
    accepted_or_refused(craft.container(bytes(text), PAYLOADS, optional=1))


u64 = st.integers(min_value=0, max_value=2**64 - 1)
u32 = st.integers(min_value=0, max_value=2**32 - 1)


@BOUNDED
@given(
    index=st.integers(0, len(PAYLOADS) - 1),
    offset=st.none() | u64 | st.integers(0, 70000),
    length=st.none() | u64 | st.integers(0, 70000),
    chunk_size=st.none() | u32 | st.sampled_from([0, 1, 4095, 4096, 8192, 1 << 30, 1 << 31]),
    flags=st.none() | u32,
)
def test_region_table_entries(index, offset, length, chunk_size, flags):
    changes = {k: v for k, v in dict(offset=offset, length=length, chunk_size=chunk_size, flags=flags).items()
               if v is not None}
    accepted_or_refused(craft.set_region(bytearray(BASE), index, **changes))


@BOUNDED
@given(
    field=st.sampled_from(craft.PREAMBLE_FIELDS[1:]),
    value=st.integers(min_value=0, max_value=2**64 - 1),
    seal=st.booleans(),
)
def test_preamble_fields(field, value, seal):
    bits = {"major": 16, "minor": 16, "required": 32, "optional": 32, "region_count": 32, "json_length": 64}[field]
    data = bytearray(BASE)
    craft.set_preamble(data, seal=False, **{field: value % 2**bits})
    if seal and craft.header_length(data) <= len(data):
        craft.reseal(data)
    accepted_or_refused(data)


@BOUNDED
@given(data=st.data())
def test_header_bytes_overwritten_and_resealed(data):
    header_end = craft.header_length(BASE) - 4
    damaged = bytearray(BASE)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, header_end - 1))
        damaged[at] = data.draw(st.integers(0, 255))
    if craft.header_length(damaged) <= len(damaged):
        craft.reseal(damaged)
    accepted_or_refused(damaged)


@BOUNDED
@given(data=st.data())
def test_whole_file_cut_and_spliced(data):
    """Arbitrary splices anywhere in the file, unsealed: truncations, insertions, duplicated ranges."""
    damaged = bytearray(BASE)
    start = data.draw(st.integers(0, len(damaged)))
    end = data.draw(st.integers(start, min(len(damaged), start + 5000)))
    source = data.draw(st.integers(0, len(BASE) - 1))
    damaged[start:end] = BASE[source : source + data.draw(st.integers(0, 5000))]
    if bytes(damaged) != BASE:
        accepted_or_refused(damaged)


def test_property_base_counts():
    # Every member of the sample document is a target of the replacement tests above.
    assert len(DOCUMENT_PATHS) > 100
