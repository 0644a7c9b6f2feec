"""thaw_mlx.save / thaw_mlx.load, the one-pass file paths: the same file bytes as capture + thaw_format.save and
the same caches as thaw_format.load + restore, for every cache kind; a bad chunk anywhere raises
CorruptSnapshotError and gives no cache. And the helper that lets a restore write into a new MLX array."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest

import thaw_format
import thaw_mlx
from sessions import CASES, full_state
from thaw_format import CorruptSnapshotError
from thaw_format.container import DEFAULT_CHUNK_SIZE
from thaw_format.mlx import from_mlx, sole_view, writable_arrays
from thaw_mlx import session as mlx_session
import sync_counts


@pytest.fixture
def fixed_clock(monkeypatch):
    """The lineage's creation time, the one field two captures of one session do not share."""
    monkeypatch.setattr(mlx_session, "lineage_now", lambda: "2026-01-01T00:00:00Z")


# 4 KiB chunks: chunks end inside pages, and inside a short last page (whose CRCs continue the full pages')
@pytest.mark.parametrize("chunk_size", [DEFAULT_CHUNK_SIZE, 4096])
@pytest.mark.parametrize("name", list(CASES))
def test_save_and_load_match_the_two_step_paths(name, chunk_size, session, tmp_path, fixed_clock):
    model, cache, tokens = session(name)
    prompt = len(CASES[name].prompt)
    one, two = tmp_path / "one.thaw", tmp_path / "two.thaw"
    snapshot_id = thaw_mlx.save(one, model, cache, tokens, num_prompt_tokens=prompt, chunk_size=chunk_size)
    assert snapshot_id == thaw_format.save(thaw_mlx.capture(model, cache, tokens, num_prompt_tokens=prompt), two,
                                           chunk_size=chunk_size)
    assert one.read_bytes() == two.read_bytes()
    assert thaw_format.verify(one) == snapshot_id

    loaded, snapshot = thaw_mlx.load(one, model)
    restored = thaw_mlx.restore(model, thaw_format.load(two))
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert full_state(loaded) == full_state(restored)
    assert thaw_mlx.snapshot_tokens(snapshot) == tokens and snapshot.id == snapshot_id
    assert list(thaw_mlx.generate(model, loaded, tokens, 6)) == list(thaw_mlx.generate(model, restored, tokens, 6))


def test_save_reports_each_kv_tensor_as_it_goes_and_writes_the_same_bytes(session, tmp_path, fixed_clock,
                                                                          monkeypatch):
    """With a progress hook, a KV tensor gathered straight into the file is written in groups of pages reported
    one by one (mover's piece set to two 4 KiB chunks: two pages of 4 KiB here, where the tensors hold 40 KiB),
    its chunk CRCs running on across the groups, and the short last page after them."""
    from thaw_format import mover

    monkeypatch.setattr(mover, "_PROGRESS_PIECE_BYTES", 8192)
    model, cache, tokens = session("llama-kv-long")
    one, two = tmp_path / "one.thaw", tmp_path / "two.thaw"
    calls = []
    thaw_mlx.save(one, model, cache, tokens, include_weights=False, chunk_size=4096, progress=calls.append)
    thaw_format.save(thaw_mlx.capture(model, cache, tokens, include_weights=False), two, chunk_size=4096)
    assert one.read_bytes() == two.read_bytes()
    with thaw_format.open(one) as f:
        lengths = [f.info(name)[2].length for name in f.names()]
        kv = max(f.info(name)[2].length for name in f.names() if name.startswith("kv/"))
    assert sum(calls) == sum(lengths) and max(calls) <= 8192 < kv, (calls, lengths)


def test_save_replaces_a_file_atomically_and_leaves_no_temporary(session, tmp_path):
    model, cache, tokens = session("llama-kv")
    path = tmp_path / "s.thaw"
    path.write_bytes(b"old")
    thaw_mlx.save(path, model, cache, tokens, include_weights=False)
    assert [p.name for p in tmp_path.iterdir()] == ["s.thaw"]
    assert thaw_mlx.snapshot_tokens(thaw_format.load(path)) == tokens


def test_a_save_that_is_not_durable_writes_the_same_file_without_fsync(session, tmp_path, fixed_clock, monkeypatch):
    model, cache, tokens = session("llama-kv")
    durable, quick = tmp_path / "durable.thaw", tmp_path / "quick.thaw"
    snapshot_id = thaw_mlx.save(durable, model, cache, tokens)
    syncs = sync_counts.count(monkeypatch)
    assert thaw_mlx.save(quick, model, cache, tokens, durable=False) == snapshot_id
    assert syncs == {"fsync": 0, "writeback": 0} and quick.read_bytes() == durable.read_bytes()


@pytest.mark.parametrize("name,tensor,where", [
    ("llama-kv", "kv/0/k", 0.0),          # first chunk of a paged tensor (checked in the scatter)
    ("llama-kv", "kv/1/v", 0.999),        # its last chunk, the short last page
    ("llama-kv-hd32", "kv/1/k", 0.5),     # rows of whole 128-byte steps: moved and checked in one read
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


def test_a_file_truncated_inside_a_kv_tensor_raises_and_gives_no_cache(session, tmp_path):
    model, cache, tokens = session("llama-kv-long")
    path = tmp_path / "s.thaw"
    thaw_mlx.save(path, model, cache, tokens)
    with thaw_format.open(path) as f:
        region = f.info("kv/1/k")[2]
    os.truncate(path, region.offset + region.length // 2)
    with pytest.raises(CorruptSnapshotError):
        thaw_mlx.load(path, model)


def test_writable_arrays_give_each_array_its_own_memory():
    dtypes = (("float32", mx.float32), ("bfloat16", mx.bfloat16), ("uint32", mx.uint32), ("bool", mx.bool_))
    made = writable_arrays([((2, 3, 4), dtype) for dtype, _ in dtypes])
    for (array, view), (_, mlx_dtype) in zip(made, dtypes):
        assert (array.dtype, array.shape, len(view)) == (mlx_dtype, (2, 3, 4), array.nbytes)
    fills = [bytes((i * 7 + k) % 2 if dtype == "bool" else (i * 7 + k) % 256 for k in range(len(view)))
             for i, ((_, view), (dtype, _)) in enumerate(zip(made, dtypes))]
    for (_, view), fill in zip(made, fills):  # every byte written, as a loader does
        view[:] = fill
        view.release()
    for (array, _), fill in zip(made, fills):
        assert from_mlx(array).tobytes() == fill  # no two arrays share memory
    assert writable_arrays([]) == []


EXIT_AFTER_RESTORE = """
import sys
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.llama import Model, ModelArgs
import thaw_mlx
from thaw_format.mlx import writable_arrays

mx.random.seed(0)
model = Model(ModelArgs.from_dict(dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                       num_attention_heads=2, num_key_value_heads=2, rms_norm_eps=1e-5,
                                       vocab_size=64, rope_theta=10000.0, tie_word_embeddings=False)))
cache = make_prompt_cache(model)
model(mx.array([list(range(1, 40))]), cache=cache)
restored = thaw_mlx.restore(model, thaw_mlx.capture(model, cache, list(range(1, 40))))
kept = writable_arrays([((4, 4), "float32")] * 3)
print("restored", restored[0].offset, flush=True)
"""


def test_a_process_exits_cleanly_after_restoring(tmp_path):
    """MLX's loader read the arrays on its own threads: a process that exits right after (arrays alive, views
    unreleased) must end normally, every time (a reader dropped by MLX during exit would abort it)."""
    script = tmp_path / "exit_after_restore.py"
    script.write_text(EXIT_AFTER_RESTORE)
    for _ in range(6):
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert (done.returncode, done.stdout, done.stderr) == (0, "restored 39\n", "")


def test_writable_array_refuses_what_it_cannot_hand_out():
    with pytest.raises(TypeError, match="no dtype"):
        writable_arrays([((2, 2), "float32"), ((2, 2), "float8")])
    for shape in ((), (2, 0), (-1, 4), (2.0, 3)):
        with pytest.raises(ValueError, match="positive dimensions"):
            writable_arrays([(shape, "float32")])
    x = mx.arange(16, dtype=mx.float32).reshape(4, 4)
    for shared in (mx.broadcast_to(mx.array([1.0]), (4, 4)), x.T, x[:, :2]):  # memory not its own bytes
        with pytest.raises(ValueError, match="not writable in place"):
            sole_view(shared)
    assert len(sole_view(x)) == 64
