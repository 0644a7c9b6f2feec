"""Snapshot files of an mlx-lm session in one pass over the KV each way.

    snapshot_id = thaw_mlx.save(path, model, prompt_cache, tokens, info=info)   # capture's options
    cache, snapshot = thaw_mlx.load(path, model, info=info)                      # restore's options

They write and read the same files, and give the same caches, as thaw_format.save(thaw_mlx.capture(...)) and
thaw_mlx.restore(model, thaw_format.load(path)), without the copy in between: save gathers each KV page
straight from MLX's memory into the file's bytes (a stage buffer per tensor, written out by pwrite while the
next is gathered) with its chunk CRCs in the same pass, and stays atomic (temporary file, fsync unless
durable=False, rename); load maps the file once and scatters each KV tensor straight into a new MLX array,
checking each chunk against its CRC as it moves (libthaw's checked scatter: in the same read of its bytes where
the CPU and the rows allow, else just before). Every other tensor (weights, ring and recurrent
states) is checked before anything is built from it, and a bad chunk anywhere raises CorruptSnapshotError
with no cache returned. Load drops each KV tensor's mapped pages once scattered (they stay in the page
cache), so its peak memory is the new cache and about one tensor more.
MLXEngine's capture_shared gathers the same way into a shared-memory segment (deferring + fill_of).
"""

from __future__ import annotations

import functools
import mmap
import os
from typing import Optional

import mlx.nn as nn

from thaw_format import CorruptSnapshotError, EncodedSnapshot, ModelInfo, Snapshot, SnapshotFile
from thaw_format.container import DEFAULT_CHUNK_SIZE
from thaw_format.paths import open_regular
from thaw_format.writer import deferred_tensor

from .identity import check_snapshot_model
from .pages import Expected, PageRun, gather_into, gather_to_file, paged_shape
from .session import capture, cache_of_snapshot, check_cache_layout

PAGED_KINDS = ("attention", "quantized")


def save(path: str | os.PathLike, model: nn.Module, prompt_cache: list, tokens, *,
         chunk_size: int = DEFAULT_CHUNK_SIZE, progress=None, durable: bool = True, **options) -> str:
    """Capture the session into a snapshot file at `path` (atomically); returns the snapshot id.

    `options` are thaw_mlx.capture's (num_prompt_tokens, page_size, include_weights, sampler, label, parent,
    info, finished); `chunk_size`, `progress` and `durable` are thaw_format.save's (`durable=False`: no
    fsync, as mlx-lm's save_prompt_cache; still atomic, but a power loss may lose the file)."""
    fills = {}
    snapshot = capture(model, prompt_cache, tokens, paging=deferring(fills), **options)
    return EncodedSnapshot(snapshot, chunk_size=chunk_size).save(path, progress, fill_of(snapshot, fills),
                                                                 durable=durable)


def deferring(fills: dict):
    """A capture's `paging` that defers each paged tensor: its bytes are gathered later, straight into the
    region a writer gives them (a file's, a shared-memory segment's). `fills` collects what fill_of needs."""

    def defer(runs: list[PageRun], page_size: int):
        tensor = deferred_tensor(*paged_shape(runs, page_size))
        one = len(runs) == 1 and runs[0].first == 0  # a session's own pages: into a file straight from MLX
        fills[id(tensor)] = _PagedFill(runs[0], page_size) if one else functools.partial(gather_into, runs, page_size)
        return tensor

    return defer


class _PagedFill:
    """A deferred paged tensor of one session's pages (thaw_format's Fill): gathered into a buffer, or by to_file
    straight into a file (the writer's choice where it has one). The pages of several sessions are gathered
    into a buffer (gather_into)."""

    def __init__(self, run: PageRun, page_size: int) -> None:
        self.run, self.page_size = run, page_size

    def __call__(self, out, chunk_size: int):
        return gather_into([self.run], self.page_size, out, chunk_size)

    def to_file(self, fd: int, offset: int, chunk_size: int, progress=None):
        return gather_to_file(self.run.x, self.run.num_tokens, self.page_size, fd, offset, chunk_size, progress)


def fill_of(snapshot: Snapshot, fills: dict) -> dict:
    """The writer's `fill` (tensor name -> function) for the tensors a capture deferred (see deferring)."""
    layers = snapshot.kv.layers if snapshot.kv is not None else []
    return {f"kv/{i}/{role}": fills[id(tensor)]
            for i, layer in enumerate(layers) for role, tensor in layer.tensors.items() if id(tensor) in fills}


def load(path: str | os.PathLike, model: nn.Module, *, check_weights: bool = True,
         info: Optional[ModelInfo] = None) -> tuple[list, Snapshot]:
    """(prompt cache, snapshot) from a snapshot file, after the checks thaw_mlx.restore makes.

    The snapshot's tensors are read-only views of the mapped file, each checked by then; its tokens and
    sampler are thaw_mlx.snapshot_tokens(snapshot) and thaw_mlx.sampler_of(snapshot). Like
    thaw_format.load(mmap=True), the views see the file as it is: thaw's saves replace files, never rewrite
    them in place. Each paged KV tensor is checked chunk by chunk as it is scattered into new MLX arrays, every
    other tensor before anything is built, and nothing is returned unless every chunk passed."""
    snapshot, expected = mapped_snapshot(path)
    check_snapshot_model(model, snapshot, check_weights=check_weights, info=info)
    check_cache_layout(model, snapshot)
    return cache_of_snapshot(snapshot, expected), snapshot


def mapped_snapshot(path: str | os.PathLike) -> tuple[Snapshot, list[dict]]:
    """A snapshot file, mapped: its document checked, and every tensor but the paged KV ones, whose chunk CRCs
    it gives per layer (role -> Expected), for the restore that scatters them to check on the way."""
    mapped = _map(os.fspath(path))
    f = SnapshotFile(mapped)
    # The document is checked now; the tensors are views of the mapping, checked below before any use.
    snapshot = f.snapshot(verify=False, copy=False)
    layers = snapshot.kv.layers if snapshot.kv is not None else []
    expected = [{} for _ in layers]
    for i, layer in enumerate(layers):
        for role in layer.tensors if layer.kind in PAGED_KINDS else ():
            name = f"kv/{i}/{role}"
            region = f.info(name)[2]
            expected[i][role] = Expected(name, region.chunk_size, f.chunk_crcs(name),
                                         functools.partial(_drop, mapped, region.offset, region.length))
    paged = {e.name for checks in expected for e in checks.values()}
    for name in f.names():
        if name not in paged:
            f.tensor(name, copy=False)  # checks its chunks (raises CorruptSnapshotError)
    return snapshot, expected


def _map(path: str) -> mmap.mmap:
    """The whole file, mapped read-only (shared with the page cache: nothing is copied until a scatter)."""
    fd = open_regular(path, CorruptSnapshotError)
    try:
        if os.fstat(fd).st_size == 0:
            raise CorruptSnapshotError(f"{path!r} is empty, not a snapshot")
        return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def _drop(mapped: mmap.mmap, offset: int, length: int) -> None:
    """Unmap a region's pages from this process once read (the file's pages stay cached; a later read of the
    snapshot's view maps them again), so a load never holds the file and the new cache whole at once."""
    start = offset - offset % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, offset + length - start)
