"""A tensor-parallel rank's share of a snapshot's KV pages: the KV heads it holds, and its moves to and from pages
over all heads. Engine-neutral: each adapter says which rank it is and how many heads it holds.

Under tensor parallelism every rank holds the same pages (one scheduler's decisions) but only its share of the KV
heads: rank r of N holds heads [r*h, (r+1)*h) of H = N*h. A snapshot stays engine-independent: its pages are
token-major over all H heads ([page_size, H, head_dim]), as a one-rank engine holds them, so in each token row of a
page a rank's heads are one slab of h*head_dim elements at r*h*head_dim. A capture has every rank write its slab of
every row into the one segment its first rank published with thaw_format.writer.unwritten fills (`put_share`, once
it has checked the regions the first rank laid out against its own tensors: `check_regions`), and the first rank
checksum the final bytes after all have written (thaw_format.writer.reseal); a restore has every rank read its slab
of every row (`take_share`). Where an engine replicates or pads heads (fewer KV heads than ranks, or a count they do
not divide), no rank's share is a slab of whole heads: refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy
from thaw_format import mover


@dataclass(frozen=True)
class HeadShare:
    rank: int  # tensor-parallel rank
    ranks: int  # tensor-parallel size
    heads: int  # KV heads this rank holds
    total_heads: int  # KV heads of the model: a page's
    head_dim: int
    itemsize: int

    @property
    def whole(self) -> bool:
        """One rank holds every head: a page is the rank's own."""
        return self.ranks == 1

    @property
    def slab_bytes(self) -> int:
        return self.heads * self.head_dim * self.itemsize

    def slab_offsets(self, num_pages: int, page_size: int) -> numpy.ndarray:
        """Byte offset of this rank's slab in every token row of `num_pages` pages over all heads."""
        row_bytes = self.total_heads * self.head_dim * self.itemsize
        return numpy.arange(num_pages * page_size, dtype=numpy.int64) * row_bytes + self.rank * self.slab_bytes


def head_share(adapter: str, rank: int, ranks: int, heads: int, total_heads: int, head_dim: int, itemsize: int,
               other: dict[str, int] | None = None) -> HeadShare:
    """Rank `rank` of `ranks` holding `heads` of the model's `total_heads`; NotImplementedError, naming `adapter` and
    what it does not map: parallelism besides tensor parallelism (`other`: each such size that is not 1, by the
    engine's name for it), or KV heads that do not divide evenly between the ranks."""
    if other:
        raise NotImplementedError(f"{adapter} maps tensor parallelism only; this engine has "
                                  f"{', '.join(f'{name}={size}' for name, size in other.items())}")
    held = heads * ranks
    if held != total_heads:
        why = ("the engine replicates them: fewer KV heads than ranks" if total_heads < ranks
               else f"the engine pads them to {held}, a multiple of the ranks" if held > total_heads
               else f"not the model's {total_heads}")
        raise NotImplementedError(f"tensor_parallel_size={ranks} over {total_heads} KV heads: each rank holds {heads}, "
                                  f"{held} in all ({why}); {adapter} maps tensor parallelism only where the KV heads "
                                  "divide evenly between the ranks")
    return HeadShare(rank, ranks, heads, total_heads, head_dim, itemsize)


class RegionsError(ValueError):
    """The KV regions of a tensor-parallel capture the first rank published are not this rank's KV tensors' byte
    ranges."""


def check_regions(regions: dict, size: int, nbytes: dict[str, int]) -> None:
    """RegionsError, naming the tensor, unless `regions` (each tensor's bytes [start, end) in the published segment of
    `size` bytes, by name) names exactly the tensors of `nbytes`, each within the segment and holding as many bytes
    as this rank's own tensor of that name: checked before a rank writes its heads into any."""
    if set(regions) != set(nbytes):
        missing, unknown = sorted(set(nbytes) - set(regions)), sorted(set(regions) - set(nbytes))
        wrong = [f"{what} {names}" for what, names in (("lack", missing), ("name", unknown)) if names]
        raise RegionsError(f"the published KV regions {' and '.join(wrong)}, not this rank's tensors")
    for name, (start, end) in regions.items():
        if not 0 <= start <= end <= size:
            raise RegionsError(f"{name}: the published region [{start}, {end}) lies outside the {size}-byte segment")
        if end - start != nbytes[name]:
            raise RegionsError(f"{name}: the published region holds {end - start} bytes; this rank expects "
                               f"{nbytes[name]}")


def put_share(local_pages, out, share: HeadShare, offsets: numpy.ndarray) -> None:
    """Write a rank's pages over its own heads ([num_pages, page_size, heads, head_dim]) into their slabs of
    `out`, pages over all heads, at `offsets` (share.slab_offsets of those pages, one per token row)."""
    mover.scatter(local_pages, out, offsets, share.slab_bytes)


def take_share(pages, share: HeadShare, offsets: numpy.ndarray, out) -> memoryview:
    """A rank's pages over its own heads, read from its slabs of `pages` over all heads at `offsets` (as
    put_share's; a remote view is read here first, whole) into `out` (len(offsets) * share.slab_bytes bytes: a
    restore reuses one buffer for every layer, its scatters copying out of it)."""
    mover.gather(mover.fetched(pages), offsets, share.slab_bytes, out)
    return out
