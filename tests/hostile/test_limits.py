"""Resource limits: what reading may allocate, measured with tracemalloc (Python-heap allocations; libthaw's C
staging buffers are bounded separately and covered by tests/format/test_bounded_memory.py)."""

import random
import tracemalloc

import pytest

import thaw_format as tf
from thaw_format import mover
from hostile import craft

SLACK = 256 << 10  # Python objects of the header, table and document of a small file


def peak_of(call) -> int:
    tracemalloc.start()
    try:
        try:
            call()
        except tf.SnapshotError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    rng = random.Random(3)
    sizes = [3 << 20, 1 << 20, 5000]
    weights = tf.Weights({f"w{i}": tf.Tensor("uint8", (n,), rng.randbytes(n)) for i, n in enumerate(sizes)})
    path = tmp_path_factory.mktemp("limits") / "big.thaw"
    tf.save(tf.Snapshot(weights=weights), path)
    return path, path.read_bytes(), sum(sizes)


@pytest.mark.parametrize("how", ["load", "load unverified", "loads", "load mmap", "loads no copy", "verify"])
def test_reading_a_valid_file_allocates_the_tensors_and_little_more(big_file, how):
    path, data, tensor_bytes = big_file
    call, copies = {
        "load": (lambda: tf.load(path), True),
        "load unverified": (lambda: tf.load(path, verify=False), True),
        "loads": (lambda: tf.loads(data), True),
        "load mmap": (lambda: tf.load(path, mmap=True), False),
        "loads no copy": (lambda: tf.loads(data, copy=False), False),
        "verify": (lambda: tf.verify(path), False),
    }[how]
    # A copy's arena of 4 MiB and more is allocated mover.HUGE_PAGE larger, to start on a huge page: address space
    # the load never touches.
    assert peak_of(call) <= (tensor_bytes + mover.HUGE_PAGE if copies else 0) + SLACK


def declaring(**preamble) -> bytes:
    return bytes(craft.set_preamble(craft.container({"tensors": []}), seal=False, **preamble))


@pytest.mark.parametrize("data, match", [
    (declaring(json_length=60 << 20), "truncated"),  # under Limits.max_json_bytes, past the end of the file
    (declaring(region_count=1 << 20), "truncated"),  # exactly Limits.max_regions, past the end of the file
    (bytes(craft.set_region(craft.container({"tensors": [{"name": "t", "dtype": "uint8", "shape": [1]}]}, [b"x"]),
                            0, length=1 << 40)), "run past the end"),
], ids=["json-60MiB", "regions-1M", "region-1TiB"])
def test_huge_declarations_are_refused_before_allocating(data, match):
    with pytest.raises(tf.CorruptSnapshotError, match=match):
        tf.loads(data)
    assert peak_of(lambda: tf.loads(data)) <= 4 * len(data) + (64 << 10)


def nested(depth: int) -> dict:
    value = []
    for _ in range(depth - 3):  # the root object, the metadata object and the innermost list make three
        value = [value]
    return {"tensors": [], "metadata": {"x": value}}


@pytest.mark.parametrize("limits, data, match", [
    (tf.Limits(max_json_bytes=64), craft.container({"tensors": [], "metadata": {"k": "v" * 64}}), "max_json_bytes"),
    (tf.Limits(max_regions=1), craft.container({"tensors": [{"name": n, "dtype": "uint8", "shape": [1]} for n in "ab"]},
                                               [b"a", b"b"]), "max_regions"),
    (tf.Limits(max_dims=2), craft.container({"tensors": [{"name": "t", "dtype": "uint8", "shape": [1, 1, 1]}]}, [b"t"]),
     "at most 2 non-negative integers"),
    (tf.Limits(max_chunk_size=4096), craft.container({"tensors": [{"name": "t", "dtype": "uint8", "shape": [1]}]},
                                                     [b"t"], chunk_size=8192), r"power of two in \[4096, 4096\]"),
    (tf.Limits(max_json_depth=3), craft.container(nested(4)), "nests deeper than 3 levels"),
], ids=["json-bytes", "regions", "dims", "chunk-size", "json-depth"])
def test_each_limit_is_configurable(limits, data, match):
    tf.loads(bytes(data))  # within the default limits
    with pytest.raises(tf.CorruptSnapshotError, match=match):
        tf.loads(bytes(data), limits=limits)


def test_a_limit_can_be_raised():
    data = bytes(craft.container(nested(100)))
    with pytest.raises(tf.CorruptSnapshotError, match="Limits.max_json_depth"):
        tf.loads(data)
    assert tf.loads(data, limits=tf.Limits(max_json_depth=100)).metadata["x"]


@pytest.mark.parametrize("filler, bound", [("{}", 40), ("[]", 40), ("0", 12), ('""', 12)])
def test_json_document_amplification_is_bounded(filler, bound):
    """The parsed document costs Python objects: up to ~30x its text for `[{},{},...]` (measured 26-29x).

    This is the one allocation that is a multiple of the file rather than of the declared tensors; the cap on
    it is Limits.max_json_bytes (see RELIABILITY.md for what the default allows).
    """
    count = (256 << 10) // (len(filler) + 1)
    text = ('{"tensors":[],"metadata":{"x":[' + ",".join([filler] * count) + "]}}").encode()
    data = bytes(craft.container(text))
    assert peak_of(lambda: tf.loads(data)) <= bound * len(text)


def test_many_zero_length_regions_cost_a_bounded_multiple_of_the_file():
    count = 4000
    document = {"tensors": [{"name": f"t{i}", "dtype": "uint8", "shape": [0]} for i in range(count)]}
    data = bytes(craft.container(document, [b""] * count))
    assert len(tf.loads(data).metadata) == 0
    assert peak_of(lambda: tf.loads(data)) <= 25 * len(data)  # measured ~17x: a Region and an entry per region
