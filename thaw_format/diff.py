"""What differs between two snapshots (`thaw diff A B`): model identity, engine, lineage and metadata fields,
prefix pages, requests, and tensors by name and checksum. Every tensor's chunks are verified while its checksum is taken."""

from __future__ import annotations

from typing import Any, Callable, Optional

from . import mover
from .reader import SnapshotFile
from .snapshot import Snapshot
from .summary import summarize

Progress = Optional[Callable[[int], None]]


def tensor_checksums(f: SnapshotFile, progress: Progress = None) -> dict[str, dict[str, Any]]:
    """name -> dtype, shape and the CRC32C of the tensor's bytes (hex), over the file's mapping (no copy), read
    in pieces and reported as it goes (a file of one huge tensor does not sit at 0 until its end)."""
    out = {}
    for name in f.names():
        dtype, shape, _ = f.info(name)
        crc = 0
        for piece in f.verified_pieces(name):
            crc = mover.crc32c(piece, crc)
            if progress:
                progress(len(piece))
        out[name] = {"dtype": dtype, "shape": list(shape), "crc32c": f"{crc:08x}"}
    return out


def _fields(a: Optional[dict], b: Optional[dict]) -> dict[str, list]:
    """field -> [value in A, value in B] for every field that differs (a missing section is all None)."""
    a, b = a or {}, b or {}
    return {k: [a.get(k), b.get(k)] for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)}


def _pages(snap: Snapshot) -> set[tuple[int, ...]]:
    """Each prefix page as the whole token chain that leads to it: equal chains mean the same cached context."""
    p = snap.prefix
    return {tuple(p.chain_tokens(i)) for i in range(len(p.parents))} if p is not None else set()


def _requests(snap: Snapshot) -> dict[str, list[int]]:
    """id -> the request's whole token sequence (prompt and output)."""
    reqs = snap.scheduler.requests if snap.scheduler is not None else []
    return {r.id: r.prompt_token_ids + r.output_token_ids for r in reqs}


def _request_change(a: Snapshot, b: Snapshot, rid: str) -> dict[str, Any]:
    """The fields of one request that differ, token sequences by length and the first position they part."""
    ra, rb = (next(r for r in s.scheduler.requests if r.id == rid) for s in (a, b))
    small = [{"status": r.status, "prompt_tokens": len(r.prompt_token_ids), "output_tokens": len(r.output_token_ids),
              "num_computed_tokens": r.num_computed_tokens} for r in (ra, rb)]
    change = _fields(*small)
    ta, tb = ra.prompt_token_ids + ra.output_token_ids, rb.prompt_token_ids + rb.output_token_ids
    if ta != tb:
        change["tokens_part_at"] = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
    return change


def diff(a: SnapshotFile, b: SnapshotFile, progress: Progress = None) -> dict[str, Any]:
    """A JSON-able report; `same` is True when nothing below differs."""
    sa, sb = a.snapshot(verify=False, copy=False), b.snapshot(verify=False, copy=False)
    suma, sumb = summarize(sa), summarize(sb)
    sections = {k: d for k in ("model", "engine", "lineage", "metadata") if (d := _fields(suma.get(k), sumb.get(k)))}
    pa, pb = _pages(sa), _pages(sb)
    ra, rb = _requests(sa), _requests(sb)
    changed = {i: _request_change(sa, sb, i) for i in ra if i in rb and _request_change(sa, sb, i)}
    ta, tb = tensor_checksums(a, progress), tensor_checksums(b, progress)
    tensors = {
        "only_in_a": [{"name": n, **ta[n]} for n in ta if n not in tb],
        "only_in_b": [{"name": n, **tb[n]} for n in tb if n not in ta],
        "differ": [{"name": n, "a": ta[n], "b": tb[n]} for n in ta if n in tb and ta[n] != tb[n]],
        "same": sum(1 for n in ta if n in tb and ta[n] == tb[n]),
    }
    report = {
        "a": {"id": a.id}, "b": {"id": b.id},
        "sections": sections,
        "pages": {"shared": len(pa & pb), "only_in_a": len(pa - pb), "only_in_b": len(pb - pa)},
        "requests": {"only_in_a": [i for i in ra if i not in rb], "only_in_b": [i for i in rb if i not in ra],
                     "differ": changed},
        "tensors": tensors,
    }
    report["same"] = not (sections or pa ^ pb or ra.keys() ^ rb.keys() or changed
                          or tensors["only_in_a"] or tensors["only_in_b"] or tensors["differ"])
    return report

