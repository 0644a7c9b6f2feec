"""A snapshot's sections as plain JSON-able values: what `thaw inspect` prints (as text or `--json`) and
`thaw diff` compares. Tensors are described by count and size, never read."""

from __future__ import annotations

import dataclasses
from typing import Any

from .snapshot import PAGED_KINDS, Snapshot


def summarize(snap: Snapshot) -> dict[str, Any]:
    """One entry per section present, in the spec's section order."""
    out: dict[str, Any] = {}
    if (m := snap.model) is not None:
        out["model"] = {"architecture": m.architecture, "dtype": m.dtype, "config_digest": m.config_digest,
                        "weights_digest": m.weights_digest}
    if (w := snap.weights) is not None:
        out["weights"] = {"tensors": len(w.tensors), "bytes": sum(t.nbytes for t in w.tensors.values()),
                          "ref": dataclasses.asdict(w.ref) if w.ref else None}
    if (kv := snap.kv) is not None:
        kinds: dict[str, int] = {}
        for layer in kv.layers:
            kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        paged = [layer for layer in kv.layers if layer.kind in PAGED_KINDS and layer.tensors]
        out["kv"] = {"layers": len(kv.layers), "kinds": kinds, "dtype": kv.dtype, "page_size": kv.page_size,
                     "pages": next(iter(paged[0].tensors.values())).shape[0] if paged else 0,
                     "bytes": sum(t.nbytes for layer in kv.layers for t in layer.tensors.values())}
    if (p := snap.prefix) is not None:
        out["prefix"] = {"pages": len(p.parents), "tokens": sum(map(len, p.tokens)),
                         "hash": {"algorithm": p.hash.algorithm, "tokens_per_hash": p.hash.tokens_per_hash}
                         if p.hash else None}
    if (s := snap.scheduler) is not None:
        out["scheduler"] = {"requests": [{"id": r.id, "status": r.status, "prompt_tokens": len(r.prompt_token_ids),
                                          "output_tokens": len(r.output_token_ids)} for r in s.requests]}
    if (e := snap.engine) is not None:
        out["engine"] = dataclasses.asdict(e)
    if (g := snap.lineage) is not None:
        out["lineage"] = dataclasses.asdict(g)
    if snap.metadata:
        out["metadata"] = dict(snap.metadata)
    return out


def count(n: int, noun: str) -> str:
    """A count for people: 1 tensor, 2 tensors."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def size(n: float) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 2.0 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def section_lines(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(section, one line of text) for each section of `summarize`'s result."""
    rows = []
    if m := summary.get("model"):
        rows.append(("model", f"{m['architecture']}  dtype {m['dtype']}  config {m['config_digest']}"
                              f"  weights {m['weights_digest'] or '-'}"))
    if w := summary.get("weights"):
        ref = f"; refers to weights {w['ref']['weights_digest']}" if w["ref"] else ""
        rows.append(("weights", f"{count(w['tensors'], 'tensor')}, {size(w['bytes'])}{ref}"))
    if kv := summary.get("kv"):
        kinds = ", ".join(f"{k} x{c}" for k, c in kv["kinds"].items())
        rows.append(("kv", f"{count(kv['layers'], 'layer')} ({kinds}), dtype {kv['dtype']}, "
                           f"page size {kv['page_size']}, {count(kv['pages'], 'page')}, {size(kv['bytes'])}"))
    if p := summary.get("prefix"):
        h = p["hash"]
        rows.append(("prefix", f"{count(p['pages'], 'page')}, {count(p['tokens'], 'token')}"
                               + (f"; native hash {h['algorithm']} ({h['tokens_per_hash']} tokens/hash)" if h else "")))
    if (s := summary.get("scheduler")) is not None:
        reqs = s["requests"]
        detail = ", ".join(f"{r['id']} {r['status']} ({r['prompt_tokens']}+{r['output_tokens']} tokens)"
                           for r in reqs[:4])
        rows.append(("scheduler", count(len(reqs), "request") + (f": {detail}" if reqs else "")
                     + (" ..." if len(reqs) > 4 else "")))
    if e := summary.get("engine"):
        rows.append(("engine", f"{e['name']} {e['version']}  attention {e['attention_backend'] or '-'}  "
                               f"layout {e['native_kv_layout'] or '-'}  tp {e['tp_rank']}/{e['tp_size']}"))
    if (g := summary.get("lineage")) is not None:
        rows.append(("lineage", f"parent {g['parent'] or '-'}  label {g['label'] or '-'}  created {g['created'] or '-'}"))
    if md := summary.get("metadata"):
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in sorted(md.items()))))
    return rows
