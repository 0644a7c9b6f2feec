"""thaw_mlx.save / thaw_mlx.load, the one-pass file paths: the same file bytes as capture + thaw_format.save and
the same caches as thaw_format.load + restore, for every cache kind; a bad chunk anywhere raises
CorruptSnapshotError and gives no cache. And the helper that lets a restore write into a new MLX array."""

import mlx.core as mx
import pytest

import thaw_format
import thaw_mlx
from sessions import CASES
from thaw_format import CorruptSnapshotError
from mlx.utils import tree_flatten
from thaw_format.mlx import filled_arrays, from_mlx
from thaw_mlx import session as mlx_session


def full_state(cache) -> list:
    """Every layer's class, offset, meta state and state: arrays whole (capacity included) with dtype and shape."""
    return [(type(c).__name__, getattr(c, "offset", None), getattr(c, "meta_state", None),
             [(k, (v.dtype, v.shape, from_mlx(v).tobytes()) if isinstance(v, mx.array) else v)
              for k, v in tree_flatten(c.state)])
            for c in cache]


@pytest.fixture
def fixed_clock(monkeypatch):
    """The lineage's creation time, the one field two captures of one session do not share."""
    monkeypatch.setattr(mlx_session, "lineage_now", lambda: "2026-01-01T00:00:00Z")


@pytest.mark.parametrize("name", list(CASES))
def test_save_and_load_match_the_two_step_paths(name, session, tmp_path, fixed_clock):
    model, cache, tokens = session(name)
    prompt = len(CASES[name].prompt)
    one, two = tmp_path / "one.thaw", tmp_path / "two.thaw"
    snapshot_id = thaw_mlx.save(one, model, cache, tokens, num_prompt_tokens=prompt)
    assert snapshot_id == thaw_format.save(thaw_mlx.capture(model, cache, tokens, num_prompt_tokens=prompt), two)
    assert one.read_bytes() == two.read_bytes()
    assert thaw_format.verify(one) == snapshot_id

    loaded, snapshot = thaw_mlx.load(one, model)
    restored = thaw_mlx.restore(model, thaw_format.load(two))
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert full_state(loaded) == full_state(restored)
    assert thaw_mlx.snapshot_tokens(snapshot) == tokens and snapshot.id == snapshot_id
    assert list(thaw_mlx.generate(model, loaded, tokens, 6)) == list(thaw_mlx.generate(model, restored, tokens, 6))


def test_save_replaces_a_file_atomically_and_leaves_no_temporary(session, tmp_path):
    model, cache, tokens = session("llama-kv")
    path = tmp_path / "s.thaw"
    path.write_bytes(b"old")
    thaw_mlx.save(path, model, cache, tokens, include_weights=False)
    assert [p.name for p in tmp_path.iterdir()] == ["s.thaw"]
    assert thaw_mlx.snapshot_tokens(thaw_format.load(path)) == tokens


@pytest.mark.parametrize("name,tensor,where", [
    ("llama-kv", "kv/0/k", 0.0),          # first chunk of a paged tensor (checked in the scatter)
    ("llama-kv", "kv/1/v", 0.999),        # its last chunk, the short last page
    ("llama-quantized", "kv/0/k_scales", 0.5),
    ("llama-rotating", "kv/1/k", 0.5),    # a ring buffer: checked before it is built
    ("lfm2-hybrid", "kv/0/state.0", 0.5),  # a recurrent state
    ("llama-kv", "weights", 0.5),         # any weight
])
def test_a_bad_chunk_anywhere_raises_and_gives_no_cache(name, tensor, where, session, tmp_path):
    model, cache, tokens = session(name)
    path = tmp_path / "s.thaw"
    thaw_mlx.save(path, model, cache, tokens)
    with thaw_format.open(path) as f:
        tensor = next(n for n in f.names() if n.startswith(tensor))
        region = f.info(tensor)[2]
    data = bytearray(path.read_bytes())
    data[region.offset + int(where * (region.length - 1))] ^= 0x10
    path.write_bytes(data)
    before = full_state(cache)
    with pytest.raises(CorruptSnapshotError, match=repr(tensor)):
        thaw_mlx.load(path, model)
    assert full_state(cache) == before


FILLED_DTYPES = [("float32", mx.float32), ("bfloat16", mx.bfloat16), ("float16", mx.float16),
                 ("uint32", mx.uint32), ("float64", mx.float64), ("complex64", mx.complex64), ("bool", mx.bool_),
                 ("int8", mx.int8)]


def test_filled_arrays_hold_exactly_what_fill_wrote():
    """Each array gets its own memory, exactly its bytes long, and holds what fill wrote there (bool as 0/1)."""
    specs = [((2, 3, 4), dtype) for dtype, _ in FILLED_DTYPES] + [((1,), "uint8"), ((3, 1, 5), "float32")]
    written = {}

    def fill(i, view):
        pattern = bytes((7 * i + k) % 2 if specs[i][1] == "bool" else (7 * i + k) % 251 for k in range(len(view)))
        view[:] = pattern
        written[i] = pattern

    arrays = filled_arrays(specs, fill)
    assert sorted(written) == list(range(len(specs)))
    for i, (array, (shape, dtype)) in enumerate(zip(arrays, specs)):
        assert (array.dtype, array.shape) == (dict(FILLED_DTYPES + [("uint8", mx.uint8)])[dtype], shape)
        assert from_mlx(array).tobytes() == written[i]
    assert filled_arrays([], fill) == []


def test_filled_arrays_raise_what_fill_raised_and_refuse_bad_specs():
    def bad(i, view):
        view[:] = bytes(len(view))
        if i == 1:
            raise CorruptSnapshotError("chunk 3 is bad")

    with pytest.raises(CorruptSnapshotError, match="chunk 3 is bad"):
        filled_arrays([((4,), "float32")] * 3, bad)
    with pytest.raises(TypeError, match="no dtype"):
        filled_arrays([((2, 2), "float8")], bad)
    for shape in ((), (2, 0), (-1, 4), (2.0, 3)):
        with pytest.raises(ValueError, match="positive dimensions"):
            filled_arrays([(shape, "float32")], bad)
