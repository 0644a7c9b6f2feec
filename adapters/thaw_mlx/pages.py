"""mlx-lm cache objects <-> the format's KV layers.

mlx-lm keeps one sequence per cache as [batch=1, kv_heads, tokens, head_dim]. The format keeps token-major
pages [num_pages, page_size, kv_heads, head_dim] (so MLX and vLLM snapshots of one prompt hold comparable KV):
    KVCache           -> "attention": tokens 0..offset-1 in pages, the last page zero-padded
    QuantizedKVCache  -> "quantized": the packed values, scales and biases paged the same way
    RotatingKVCache   -> "ring": the buffer in physical order, [1, capacity, kv_heads, head_dim], with the
                         write index and offset needed to carry on writing exactly where it stood
    ArraysCache       -> "recurrent": the state arrays (convolution, SSM) of hybrid models, "state.0", ...
Paged layers move in libthaw (thaw_format.mover.gather_pages / scatter_pages): one multi-threaded pass per
array between MLX's head-major memory and the token-major pages, no intermediate copy. A capture gathers into
a new buffer or straight into a file's region (thaw_mlx.save, with the chunk CRCs in the same pass); a
restore scatters into fresh MLX arrays' own memory (thaw_format.mlx.writable_arrays, made in one call for a
whole cache: each call is an MLX load), checking each chunk of a file against its CRC on the way when loading
(thaw_mlx.load: every tensor of the cache in one libthaw call, fill_checked), or over arrays of the cache it
replaces that nothing else holds (MLXEngine.restore and restore_source: no allocation, their pages already
faulted in).
"""

from __future__ import annotations

import functools
import math
from array import array
from typing import Callable, NamedTuple, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache, RotatingKVCache

from thaw_format import CorruptSnapshotError, IncompatibleSnapshotError, KVLayer, Tensor, mover
from thaw_format.mlx import dtype_name, from_mlx, owned_view, to_mlx, writable_array, writable_arrays
from thaw_format.sdk import remote

from . import _internals

QUANTIZED_PARTS = ("", "_scales", "_biases")
QUANTIZED_BITS = (2, 3, 4, 5, 6, 8)
QUANTIZED_GROUPS = (32, 64, 128)
SUPPORTED = (KVCache, QuantizedKVCache, RotatingKVCache, ArraysCache)


class PageRun(NamedTuple):
    """Pages of one sequence's [1, heads, capacity, d] array that a paged tensor holds: from page `first` up to
    the one holding token num_tokens - 1 (the pages before `first` are a sequence's written before it)."""

    x: mx.array
    first: int
    num_tokens: int

    def num_pages(self, page_size: int) -> int:
        return -(-self.num_tokens // page_size) - self.first


# How encode_layer makes a paged tensor of runs, one after the other, in pages of page_size: gathered now
# (to_pages), or deferred until a file's region is there to gather into (thaw_mlx.save).
Paging = Callable[[list[PageRun], int], Tensor]


class Expected(NamedTuple):
    """A tensor's bytes as a file holds them, still to check: the chunk size and the CRC each chunk must have,
    the name that a CorruptSnapshotError reports, and what to call once its bytes are in MLX (to let go of a
    mapped file's pages), if anything: where there is, fill_checked has libthaw unmap the tensor's pages of
    the mapping itself as soon as the tensor has moved, where libthaw can (mover.RELEASES_PAGES), and calls it
    after the whole batch elsewhere."""

    name: str
    chunk_size: int
    crcs: object
    done: Optional[Callable[[], None]] = None


def num_cached_tokens(prompt_cache: list) -> int:
    """How many tokens the cache holds, as its attention layers count them (recurrent layers do not)."""
    offsets = {c.offset for c in prompt_cache if not isinstance(c, ArraysCache)}
    if not offsets:
        raise ValueError("no layer of the cache says how many tokens it holds (thaw_mlx needs an attention layer)")
    if len(offsets) != 1:
        raise ValueError(f"the cache layers disagree on how many tokens they hold: {sorted(offsets)}")
    return offsets.pop()


def paged_kind(cache) -> Optional[tuple]:
    """What a KVCache or QuantizedKVCache layer's paged tensors are made of (class, quantization, each array's
    dtype, heads and head size): layers of several sequences share paged tensors only where it is the same.
    None for other layers (ring, recurrent: a state per sequence) and for an empty one."""
    buffers = _internals.paged_buffers(cache)
    if not buffers:
        return None
    return (type(cache).__name__, getattr(cache, "group_size", None), getattr(cache, "bits", None),
            *((a.dtype, a.shape[1], a.shape[3]) for a in buffers))


def encode_layer(caches: list, firsts: list[int], page_size: int, paging: Optional[Paging] = None) -> KVLayer:
    """One layer's cache as a KVLayer; refuses caches thaw does not know and batches of more than one. `caches`
    is the layer of each sequence the snapshot holds, whose paged tensors hold the pages of cache j from page
    firsts[j] on (one after the other: a prefix tree's pages); a ring or recurrent layer holds one sequence.
    `paging` makes the paged tensors (default: to_pages, gathered now)."""
    to_paged = paging or to_pages
    cache = caches[0]
    if not isinstance(cache, SUPPORTED):
        raise TypeError(f"thaw_mlx cannot capture a {type(cache).__name__} (supported: "
                        f"{', '.join(c.__name__ for c in SUPPORTED)})")
    if cache.empty():
        raise ValueError("a layer's cache is empty: nothing to capture")
    if len(caches) > 1 and (paged_kind(cache) is None or any(paged_kind(c) != paged_kind(cache) for c in caches)):
        raise ValueError(f"the {type(cache).__name__} layers of {len(caches)} sequences cannot share paged tensors "
                         "(a ring or recurrent layer holds one sequence; paged layers must be alike)")
    if isinstance(cache, ArraysCache):
        states, left_padding, lengths = _internals.arrays_state(cache)
        if left_padding is not None or lengths is not None or any(s is None for s in states):
            raise ValueError("a recurrent layer's cache is mid-batch (padding or lengths set) or partly empty")
        _check_single(states[0])
        return KVLayer("recurrent", {f"state.{i}": from_mlx(state) for i, state in enumerate(states)})
    if isinstance(cache, KVCache):
        states = [_internals.kv_state(c) for c in caches]
        keys, values, _ = states[0]
        for state in states:
            _check_single(state[0])

        def paged(part):
            return to_paged([PageRun(state[part], first, state[2]) for state, first in zip(states, firsts)],
                            page_size)

        return KVLayer(
            "attention",
            {"k": paged(0), "v": paged(1)},
            num_kv_heads=keys.shape[1],
            head_dim=keys.shape[3],
            # DeepSeek's MLA runs in mlx-lm as plain attention with a V head smaller than K's
            params={} if values.shape[3] == keys.shape[3] else {"v_head_dim": values.shape[3]},
        )
    if isinstance(cache, QuantizedKVCache):
        states = [_internals.quantized_state(c) for c in caches]
        keys, _, _, group_size, bits = states[0]
        for state in states:
            _check_single(state[0][0])
        tensors = {}
        for r, role in enumerate(("k", "v")):
            for p, suffix in enumerate(QUANTIZED_PARTS):
                tensors[role + suffix] = to_paged([PageRun(state[r][p], first, state[2])
                                                   for state, first in zip(states, firsts)], page_size)
        return KVLayer(
            "quantized",
            tensors,
            num_kv_heads=keys[0].shape[1],
            head_dim=keys[1].shape[3] * group_size,
            params={"bits": bits, "group_size": group_size},
        )
    keys, values, offset, keep, max_size, write_index = _internals.ring_state(cache)
    _check_single(keys)
    return KVLayer(
        "ring",
        {"k": from_mlx(keys.transpose(0, 2, 1, 3)), "v": from_mlx(values.transpose(0, 2, 1, 3))},
        num_kv_heads=keys.shape[1],
        head_dim=keys.shape[3],
        params={"window": max_size, "keep": keep, "write_index": [write_index], "offset": [offset]},
    )


def paged_targets(layer: KVLayer, pages: list[int]) -> list[tuple[str, tuple, str]]:
    """(role, shape, dtype) of each new MLX array decode_layer scatters the layer's paged tensors into (none for
    ring and recurrent layers): the arrays for a whole cache are made in one writable_arrays call, where one
    call per array would cost an MLX load each."""
    if layer.kind not in ("attention", "quantized"):
        return []
    roles = ("k", "v") if layer.kind == "attention" else [r + s for r in ("k", "v") for s in QUANTIZED_PARTS]
    return [(role, *restored_shape(layer.tensors[role], pages)) for role in roles]


def decode_layer(layer: KVLayer, pages: list[int], num_tokens: int, expected: Optional[dict] = None,
                 targets: Optional[dict] = None, filled: frozenset = frozenset()):
    """A new cache object for one layer: paged layers take `pages` (in order), which hold num_tokens tokens.
    `expected` maps a paged tensor's role to its Expected CRCs (a file's bytes, checked as they are scattered);
    the layer's other tensors must have been checked already. `targets` maps each role of paged_targets to the
    (array, writable view) to scatter into (scatter_targets); the roles in `filled` are there already
    (fill_checked)."""
    expected, targets = expected or {}, targets or {}

    def paged(role):
        tensor = layer.tensors[role]
        return from_pages(tensor, pages, num_tokens, expected.get(role), targets.get(role), role in filled)

    if layer.kind == "attention":
        return _internals.make_kv(paged("k"), paged("v"), num_tokens)
    if layer.kind == "quantized":
        keys, values = (tuple(paged(role + suffix) for suffix in QUANTIZED_PARTS) for role in ("k", "v"))
        return _internals.make_quantized(keys, values, num_tokens, layer.params["group_size"], layer.params["bits"])
    if layer.kind == "recurrent":
        return _internals.make_arrays([to_mlx(layer.tensors[f"state.{i}"]) for i in range(len(layer.tensors))])
    p = layer.params
    keys, values = (mx.contiguous(to_mlx(layer.tensors[r]).transpose(0, 2, 1, 3)) for r in ("k", "v"))
    return _internals.make_ring(keys, values, p["offset"][0], p["keep"], p["window"], p["write_index"][0])


def check_layer(i: int, layer: KVLayer, pages: list[int], num_tokens: int, page_size: int) -> None:
    """Refuse a layer decode_layer could not turn into a working cache, before any cache is built."""
    where = f"kv.layers[{i}] ({layer.kind})"
    roles = {"attention": ["k", "v"], "ring": ["k", "v"],
             "quantized": sorted(r + s for r in ("k", "v") for s in QUANTIZED_PARTS),
             "recurrent": sorted(f"state.{i}" for i in range(len(layer.tensors)))}.get(layer.kind)
    if roles is None:
        raise IncompatibleSnapshotError(f"{where}: thaw_mlx restores attention, quantized, ring and recurrent "
                                        "layers only")
    if sorted(layer.tensors) != roles:
        raise IncompatibleSnapshotError(f"{where}: must hold tensors {roles}, has {sorted(layer.tensors)}")
    why = {"attention": _paged_problem, "quantized": _quantized_problem, "ring": _ring_problem,
           "recurrent": _recurrent_problem}[layer.kind](layer, pages, num_tokens, page_size)
    if why:
        raise IncompatibleSnapshotError(f"{where}: {why}")


def _same_leading_dims(layer: KVLayer) -> bool:
    """Every tensor is [pages or sequences, tokens, heads, d] with the same first three dimensions."""
    shapes = [t.shape for t in layer.tensors.values()]
    return all(len(s) == 4 and s[:3] == shapes[0][:3] for s in shapes) and shapes[0][2] == layer.num_kv_heads


def _paged_problem(layer: KVLayer, pages: list[int], num_tokens: int, page_size: int):
    num_pages = layer.tensors["k"].shape[0]
    if not _same_leading_dims(layer):
        return f"tensors must be [pages, page_size, num_kv_heads={layer.num_kv_heads}, d] alike"
    if not (len(pages) - 1) * page_size < num_tokens <= len(pages) * page_size:
        return f"{len(pages)} pages of {page_size} cannot hold exactly {num_tokens} computed tokens"
    if pages and not (0 <= min(pages) and max(pages) < num_pages):  # ints, as the document's decoder checked
        return f"the session's pages {pages} are not all among its {num_pages} pages"
    return None


def _quantized_problem(layer: KVLayer, pages: list[int], num_tokens: int, page_size: int):
    bits, group_size = layer.params.get("bits"), layer.params.get("group_size")
    if bits not in QUANTIZED_BITS or group_size not in QUANTIZED_GROUPS or not isinstance(layer.head_dim, int):
        return f"bits {bits!r}, group_size {group_size!r}, head_dim {layer.head_dim!r} are not what MLX quantizes"
    paged = _paged_problem(layer, pages, num_tokens, page_size)
    if paged:
        return paged
    for role in ("k", "v"):
        packed, scales = layer.tensors[role], layer.tensors[role + "_scales"]
        if packed.dtype != "uint32" or packed.shape[3] * 32 != layer.head_dim * bits or \
                scales.shape[3] * group_size != layer.head_dim:
            return (f"{role} packed {packed.dtype}{list(packed.shape)} and scales {list(scales.shape)} do not "
                    f"quantize head_dim {layer.head_dim} at {bits} bits in groups of {group_size}")
    return None


def _ring_problem(layer: KVLayer, pages: list[int], num_tokens: int, page_size: int):
    p = layer.params
    int_lists = all(isinstance(p.get(k), list) and all(isinstance(x, int) for x in p[k])
                    for k in ("write_index", "offset"))
    if not int_lists or not all(isinstance(p.get(k), int) for k in ("window", "keep")):
        return "params must hold integers window and keep, and lists write_index and offset"
    if not _same_leading_dims(layer) or layer.tensors["k"].shape != layer.tensors["v"].shape:
        return f"k and v must both be [sequences, capacity, num_kv_heads={layer.num_kv_heads}, head_dim]"
    sequences, capacity = layer.tensors["k"].shape[:2]
    if len(p["write_index"]) != 1 or len(p["offset"]) != 1 or sequences != 1:
        return f"MLX caches hold one sequence, this layer holds {sequences}"
    if p["offset"] != [num_tokens]:
        return f"offset {p['offset']} but the session computed {num_tokens} tokens"
    if not p["window"] < 2**31:  # MLX array dimensions are 32-bit: no ring buffer can be larger
        return f"window {p['window']} is beyond what an MLX cache can hold (2**31 - 1)"
    if not (0 <= p["keep"] <= p["window"] and 0 <= p["write_index"][0] <= capacity):
        return (f"keep {p['keep']}, window {p['window']}, write index {p['write_index']} do not fit a buffer of "
                f"{capacity}")
    return None


def _recurrent_problem(layer: KVLayer, pages: list[int], num_tokens: int, page_size: int):
    if not layer.tensors or any(not t.shape or t.shape[0] != 1 for t in layer.tensors.values()):
        return "MLX caches hold one sequence: every state must be [1, ...]"
    return None


def layer_dtype(layer: KVLayer) -> str:
    """The activation dtype the layer was written in (for quantized layers, that of its scales)."""
    role = {"quantized": "k_scales", "recurrent": "state.0"}.get(layer.kind, "k")
    return layer.tensors[role].dtype


def _check_single(keys: mx.array) -> None:
    if keys.shape[0] != 1:
        raise ValueError(f"thaw_mlx captures one sequence per cache; this cache holds a batch of {keys.shape[0]}")


@functools.lru_cache(maxsize=64)
def _sequence_layout(tokens: int, heads: int, capacity: int, dim: int, itemsize: int) -> mover.PageLayout:
    """A page of `tokens` tokens read token-major out of [heads, capacity, dim]: a row of dim per token and head."""
    t, h, d = np.meshgrid(np.arange(tokens), np.arange(heads), np.arange(dim), indexing="ij")
    return mover.page_layout((h * capacity + t) * dim + d, itemsize)


def _page_moves(num_tokens: int, page_size: int, heads: int, capacity: int, dim: int, itemsize: int):
    """(layout, number of tokens) of the full pages and of a short last page, if any."""
    full, rest = divmod(num_tokens, page_size)
    moves = [(_sequence_layout(page_size, heads, capacity, dim, itemsize), full)]
    if rest:
        moves.append((_sequence_layout(rest, heads, capacity, dim, itemsize), 1))
    return moves


def to_pages(runs: list[PageRun], page_size: int) -> Tensor:
    """Runs of [1, heads, capacity, d] pages -> Tensor [pages, page_size, heads, d], each run's short last page
    zero-padded, gathered into a buffer of its own (mover.recycled: one that an earlier capture let go, where
    there is one)."""
    dtype, shape = paged_shape(runs, page_size)
    out = mover.recycled(math.prod(shape) * _itemsize(runs[0].x))
    gather_into(runs, page_size, out)
    return Tensor(dtype, shape, out)


def paged_shape(runs: list[PageRun], page_size: int) -> tuple[str, tuple]:
    """The format dtype and [pages, page_size, heads, d] shape of the paged tensor of the runs."""
    _, heads, _, dim = runs[0].x.shape
    return dtype_name(runs[0].x.dtype), (sum(run.num_pages(page_size) for run in runs), page_size, heads, dim)


def gather_into(runs: list[PageRun], page_size: int, out, chunk_size: int = 0) -> Optional[array]:
    """Write the pages of the runs into `out` (exactly their bytes long), one after the other: a libthaw gather
    per run from MLX's memory (a row of d per token and head), with the CRC32C of each chunk_size chunk of `out`
    when chunk_size > 0 (a file region: thaw_mlx.save): summed in the gather of one run, after the gathers of
    several (a run after the first starts mid-chunk)."""
    target = np.frombuffer(out, np.uint8)
    start, crcs = 0, None
    for run in runs:
        size = run.num_pages(page_size) * page_size * _token_bytes(run.x)
        crcs = _gather_run(run, page_size, target[start : start + size], chunk_size if len(runs) == 1 else 0)
        start += size
    if chunk_size and len(runs) > 1:
        crcs = mover.chunk_crcs(out, chunk_size)
    return crcs


def _gather_run(run: PageRun, page_size: int, target: np.ndarray, chunk_size: int) -> Optional[array]:
    x, first, num_tokens = run
    source = from_mlx(x)  # the array's bytes, shared with MLX
    _, heads, capacity, dim = x.shape
    itemsize = _itemsize(x)
    page_bytes = page_size * heads * dim * itemsize
    tokens = num_tokens - first * page_size  # the run's own
    target[tokens * heads * dim * itemsize :] = 0  # a short last page's padding (token-major: its tail)
    crcs, page = None, 0
    for layout, count in _page_moves(tokens, page_size, heads, capacity, dim, itemsize):
        offsets = (np.arange(count, dtype=np.int64) + first + page) * page_size * dim * itemsize  # its first token
        got = mover.gather_pages(source.data, offsets, layout, target[page * page_bytes :], chunk_size)
        crcs = got if crcs is None else crcs
        page += count
    if chunk_size and tokens % page_size:
        # A short last page moves with a layout of its own, whose CRCs would start mid-chunk: the chunks from
        # the one it starts in are summed again (at most one chunk and a page, just written: in cache).
        first_chunk = (page - 1) * page_bytes // chunk_size
        crcs = crcs[:first_chunk] + mover.chunk_crcs(target[first_chunk * chunk_size :], chunk_size)
    return crcs


def _token_bytes(x: mx.array) -> int:
    """The bytes of one token's row of every head in a page."""
    return x.shape[1] * x.shape[3] * _itemsize(x)


def gather_to_file(x: mx.array, num_tokens: int, page_size: int, fd: int, offset: int, chunk_size: int,
                   progress: Optional[Callable[[int], None]] = None) -> tuple[int, array]:
    """gather_into's bytes written into a file at `offset` (thaw_mlx.save): (bytes written, the CRC32C of each
    chunk_size chunk). The full pages by one libthaw call that writes each piece from a cache-sized tile (no
    buffer of the tensor's size), a call per group of pages of about mover.progress_step's bytes with a
    `progress` hook (told each group's bytes), a short last page and its zero padding from a buffer of one page,
    its CRCs continuing the chunk the full pages end in. Each write writes all it is given or raises."""
    source = from_mlx(x)
    _, heads, capacity, dim = x.shape
    itemsize = _itemsize(x)
    token_bytes = dim * itemsize  # one token of one head in MLX's memory
    full, rest = divmod(num_tokens, page_size)
    written, crcs = 0, array("I")
    if full:
        layout = _sequence_layout(page_size, heads, capacity, dim, itemsize)
        offsets = np.arange(full, dtype=np.int64) * page_size * token_bytes
        group = _pages_per_report(layout.page_bytes, chunk_size) if progress else full
        for first in range(0, full, group):
            part = offsets[first : first + group]  # starts on a chunk boundary: its CRCs follow the last group's
            crcs += mover.gather_pages_to_file(fd, offset + written, source.data, part, layout, chunk_size)
            written += len(part) * layout.page_bytes
            if progress:
                progress(len(part) * layout.page_bytes)
    if rest:
        layout = _sequence_layout(rest, heads, capacity, dim, itemsize)
        last = memoryview(bytearray(page_size * heads * token_bytes))  # zeros past the rest tokens: padding
        mover.gather_pages(source.data, [full * page_size * token_bytes], layout, last)
        start = full * len(last)  # in the region
        joined = min(-start % chunk_size, len(last))  # bytes that complete the chunk the full pages end in
        if joined:
            crcs[-1] = mover.crc32c(last[:joined], crcs[-1])
        crcs.extend(mover.chunk_crcs(last[joined:], chunk_size) if joined < len(last) else array("I"))
        mover.pwrite_all(fd, last, offset + start)
        written += len(last)
        if progress:
            progress(len(last))
    return written, crcs


def _pages_per_report(page_bytes: int, chunk_size: int) -> int:
    """Full pages per progress report: about mover.progress_step's bytes, a whole number of chunks (so that each
    group's CRCs start on a chunk of their own)."""
    unit = math.lcm(page_bytes, chunk_size) // page_bytes
    return max(unit, mover.progress_step(chunk_size) // page_bytes // unit * unit)


def moved_buffers(caches: list[list], wanted: list[list[tuple[tuple, str]]]) -> list[list[Optional[tuple]]]:
    """What a restore may write over (scatter_targets' `spare`): for each array it writes, per layer in `wanted`
    as its (shape, dtype) (paged_targets), the memory of an array of that shape and dtype that a KVCache or
    QuantizedKVCache layer of `caches` (prompt caches the restore replaces) keeps its tokens in, moved into a new
    array only this call holds, with a writable view of it (thaw_format.mlx.owned_view); else None. Arrays no
    wanted one takes are let go of, never moved: the restore copies nothing it will not write over (another
    session's arrays that a caller holds keep their memory, and cost no copy).

    `caches` is emptied, and its caller must hold no other reference to them. Each array taken is then moved by
    MLX's own copy (mx.array), which takes over the buffer of an array nothing else holds (no byte moves) and copies
    any other: one that an array of someone else's shares (a slice, as a layer's `state` is, a reshape), that a
    computation not yet evaluated reads, or whose layer object or cache list someone kept. Python references
    cannot tell: a view holds the buffer, not the array. So whatever anyone holds keeps its bytes. An array whose
    memory is not its own row-major bytes is not taken (None)."""
    moved = [[None if a is None else mx.array(a) for a in taken] for taken in _taken(caches, wanted)]
    caches.clear()  # before the moves are evaluated: then nothing here holds an old array
    mx.eval([a for taken in moved for a in taken if a is not None])
    return [[None if a is None else _owned(a) for a in taken] for taken in moved]


def _taken(caches: list[list], wanted: list[list[tuple[tuple, str]]]) -> list[list[Optional[mx.array]]]:
    """Per layer, for each wanted (shape, dtype), the first of the caches' paged arrays of that layer of that
    shape and dtype that no wanted one before took, or None."""
    taken = []
    for i, shapes in enumerate(wanted):
        free = [a for cache in caches for a in _internals.paged_buffers(cache[i])]
        layer = []
        for shape, dtype in shapes:
            fits = [j for j, a in enumerate(free) if tuple(a.shape) == shape and dtype_name(a.dtype) == dtype]
            layer.append(free.pop(fits[0]) if fits else None)
        taken.append(layer)
    return taken


def _owned(array: mx.array) -> Optional[tuple[mx.array, memoryview]]:
    try:
        return array, owned_view(array)
    except ValueError:  # not its own row-major memory
        return None


def restored_shape(tensor: Tensor, pages: list[int]) -> tuple[tuple, str]:
    """The shape [1, heads, capacity, d] and dtype of the array from_pages makes of these pages: capacity is
    the tokens they cover rounded up as mlx-lm grows its buffers."""
    _, page_size, heads, dim = tensor.shape
    capacity = -(-len(pages) * page_size // _internals.CACHE_STEP) * _internals.CACHE_STEP
    return (1, heads, capacity, dim), tensor.dtype


def scatter_targets(layers: list[KVLayer], chains: list[list[int]],
                    spare: Optional[Callable[[list[list[tuple[tuple, str]]]], list[list]]] = None) -> list[list[dict]]:
    """Per chain of pages (a cache each), per layer, decode_layer's `targets`: for each paged role, an array to be
    written over, every byte, with a writable view of it: `spare`'s (moved_buffers of the caches being replaced,
    asked once for an array of each role's shape and dtype, per layer those of every chain), else a new one; the
    new ones of all the caches made in one writable_arrays call. Over a spare array the source must have been
    checked whole before (a bad chunk found mid-scatter would leave it half written)."""
    paged = [[paged_targets(layer, pages) for layer in layers] for pages in chains]  # [chain][layer]
    per_layer = [[(shape, dtype) for roles in paged for _, shape, dtype in roles[i]] for i in range(len(layers))]
    spares = spare(per_layer) if spare is not None else None
    targets, wanted = [[{} for _ in layers] for _ in chains], []
    for i in range(len(layers)):
        taken = iter(spares[i]) if spares is not None else None
        for c, roles in enumerate(paged):
            for role, shape, dtype in roles[i]:
                chosen = next(taken) if taken is not None else None
                if chosen is not None:
                    targets[c][i][role] = chosen
                else:
                    wanted.append((c, i, role, shape, dtype))
    for (c, i, role, _, _), made in zip(wanted, writable_arrays([(shape, dtype) for *_, shape, dtype in wanted])):
        targets[c][i][role] = made
    return targets


def check_whole(layers: list[KVLayer], expected: list[dict]) -> None:
    """Check every paged tensor of `expected` (per layer, role -> Expected) against its CRCs, whole: a file's
    tensors whose pages several caches share, checked once before any is scattered."""
    for layer, checks in zip(layers, expected):
        for role, check in checks.items():
            _check_tensor(layer.tensors[role], check)


def _check_tensor(tensor: Tensor, expected: Expected) -> None:
    bad = mover.check_buffer(tensor.data, [(0, tensor.nbytes, expected.chunk_size, 0)], expected.crcs)
    _raise_bad(expected, bad[1] if bad else None)


def fill_checked(layers: list[KVLayer], pages: list[int], expected: list[dict], targets: list[dict]) -> list[frozenset]:
    """Scatter every paged tensor whose file bytes from_pages would check as it scatters them (the pages are
    the whole tensor, in order) into its target (scatter_targets), the whole cache in one libthaw call: its
    threads woken once for all the tensors, where a call per tensor woke them per tensor and waited on the
    Python between; each tensor's pages of a mapped file (an Expected with `done`) are unmapped as soon as it
    has moved, so the whole file is never mapped at once. A bad chunk or a file truncated under its mapping
    raises CorruptSnapshotError naming the tensor (the targets are then dropped with the cache never made).
    Per layer, the roles filled, for decode_layer."""
    scatters, checked, filled = [], [], []  # checked[i]: the Expected of scatters[i]
    for layer, checks, chosen in zip(layers, expected, targets):
        roles = []
        for role, check in (checks or {}).items():
            scatter = _checked_scatter(layer.tensors[role], pages, chosen[role][1], check)
            if scatter is not None:
                scatters.append((*scatter, check.done is not None and mover.RELEASES_PAGES))
                checked.append(check)
                roles.append(role)
        filled.append(frozenset(roles))
    try:
        failed = mover.scatter_pages_checked_batch(scatters)
    except mover.PagesFaulted as exc:  # a tensor is a view of a mapped file, truncated under it
        raise CorruptSnapshotError(f"tensor {checked[exc.index].name!r}: {exc}") from exc
    if failed is not None:
        _raise_bad(checked[failed[0]], failed[1])
    if not mover.RELEASES_PAGES:  # libthaw cannot unmap them here: let go of the file's pages as from_pages would
        for check in checked:
            if check.done is not None:
                check.done()
    return filled


def _checked_scatter(tensor: Tensor, pages: list[int], out: memoryview, expected: Optional[Expected]):
    """mover.scatter_pages_checked's arguments for a file's tensor whose pages are the whole tensor in order (as
    thaw_mlx writes them: one run, checked in the scatter itself), into `out`; else None."""
    if expected is None or pages != list(range(tensor.shape[0])):
        return None
    layout, offsets = _scatter_layout(tensor, pages)
    return tensor.data[: len(pages) * layout.page_bytes], out, offsets(0, len(pages)), layout, expected.chunk_size, \
        expected.crcs


def _scatter_layout(tensor: Tensor, pages: list[int]):
    """The layout of the tensor's pages in the array from_pages makes, and offsets(start, run): the block
    offsets of `run` of them from pages[start]."""
    _, page_size, heads, dim = tensor.shape
    itemsize = tensor.nbytes // max(math.prod(tensor.shape), 1)
    capacity = restored_shape(tensor, pages)[0][2]

    def offsets(start: int, run: int):
        return (np.arange(run, dtype=np.int64) + start) * page_size * dim * itemsize

    return _sequence_layout(page_size, heads, capacity, dim, itemsize), offsets


def from_pages(tensor: Tensor, pages: list[int], num_tokens: int, expected: Optional[Expected] = None,
               target: Optional[tuple] = None, filled: bool = False) -> mx.array:
    """Tensor [pages, page_size, heads, d] -> a [1, heads, capacity, d] MLX array (restored_shape): the
    given pages scattered by libthaw straight into the array's own (uninitialised) memory, every page with the
    same layout (a short last page's padding lands past num_tokens and is zeroed after, with the rest of the
    capacity). `target` is that array and a writable view of it (scatter_targets), made here if not given;
    `filled`: the pages are in it already (fill_checked), checked.

    With `expected`, the tensor's bytes are a file's, checked against their CRCs before they are used: in the
    scatter itself, chunk by chunk, when the pages are the whole tensor in order (as thaw_mlx writes them),
    else in a pass of their own first. A bad chunk, or a file truncated under the mapping the tensor views
    (the scatter's SIGBUS caught by libthaw), raises CorruptSnapshotError; the new array is then dropped."""
    _, _, heads, _ = tensor.shape
    shape, dtype = restored_shape(tensor, pages)
    capacity = shape[2]
    result, out = target if target is not None else writable_array(shape, dtype)
    if not filled:
        _scatter_into(tensor, pages, out, expected)
    # The array's memory is uninitialised (or a replaced cache's): past num_tokens (a short last page's padding,
    # the capacity mlx-lm grows in steps) it is zeroed, as mlx-lm's own buffers are.
    if capacity > num_tokens:
        np.frombuffer(out, np.uint8).reshape(heads, capacity, -1)[:, num_tokens:] = 0
    out.release()  # nothing may write into the array once MLX can see it
    if expected is not None and expected.done is not None and not filled:  # (fill_checked let go of them)
        expected.done()
    return result


def _scatter_into(tensor: Tensor, pages: list[int], out: memoryview, expected: Optional[Expected]) -> None:
    """from_pages's scatter: one checked scatter (_checked_scatter), else the pages checked first where they
    are a file's, then scattered run by run."""
    whole = _checked_scatter(tensor, pages, out, expected)
    if whole is not None:
        try:
            bad = mover.scatter_pages_checked(*whole)
        except EOFError as exc:  # the tensor is a view of a mapped file, truncated under it
            raise CorruptSnapshotError(f"tensor {expected.name!r}: {exc}") from exc
        _raise_bad(expected, bad)
        return
    if expected is not None:
        _check_tensor(tensor, expected)
    # A remote source's tensor (never checked here: it carries no checksums) is read where it lies, by the scatter.
    data = remote.scatter_view(tensor)
    layout, offsets = _scatter_layout(tensor, pages)
    in_order = pages == list(range(tensor.shape[0]))  # the whole tensor: one run
    for first, run, start in [(0, len(pages), 0)] if in_order else mover.consecutive_runs(pages):  # a slice each
        source = data[first * layout.page_bytes : (first + run) * layout.page_bytes]
        mover.scatter_pages(source, out, offsets(start, run), layout)


def _raise_bad(expected: Expected, chunk: Optional[int]) -> None:
    if chunk is not None:
        raise CorruptSnapshotError(f"tensor {expected.name!r}: checksum mismatch in chunk {chunk} "
                                   f"(chunks of {expected.chunk_size} bytes)")


def _itemsize(x: mx.array) -> int:
    return x.dtype.size
