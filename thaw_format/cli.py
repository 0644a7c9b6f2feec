"""The `thaw` command: `thaw inspect PATH`, `thaw verify PATH`, plus subcommands from the `thaw.cli` entry points."""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import entry_points
from typing import Optional, Sequence

from .errors import SnapshotError
from .reader import SnapshotFile
from .snapshot import PAGED_KINDS, Snapshot


class Progress:
    """A one-line progress meter on stderr, redrawn at most ten times a second, silent when not a terminal."""

    def __init__(self, label: str, total: int, stream=sys.stderr) -> None:
        self.label, self.total, self.done, self.stream = label, total, 0, stream
        self.enabled = stream.isatty() and total > 0
        self.started = self.last = time.monotonic()

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.started, 1e-9) / 1e9
            self.stream.write(f"\r{self.label} {100 * self.done / self.total:5.1f}%  {_size(self.done)}  {rate:.2f} GB/s")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _sections(snap: Snapshot) -> list[tuple[str, str]]:
    """One line per section, from the decoded (so already section-checked) snapshot; tensors are lazy views."""
    rows = []
    if (m := snap.model) is not None:
        rows.append(("model", f"{m.architecture}  dtype {m.dtype}  config {m.config_digest}"
                              f"  weights {m.weights_digest or '-'}"))
    if (w := snap.weights) is not None:
        total = sum(t.nbytes for t in w.tensors.values())
        rows.append(("weights", f"{len(w.tensors)} tensors, {_size(total)}"
                                + (f"; refers to weights {w.ref.weights_digest}" if w.ref else "")))
    if (kv := snap.kv) is not None:
        kinds: dict[str, int] = {}
        for layer in kv.layers:
            kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        total = sum(t.nbytes for layer in kv.layers for t in layer.tensors.values())
        paged = [layer for layer in kv.layers if layer.kind in PAGED_KINDS and layer.tensors]
        pages = next(iter(paged[0].tensors.values())).shape[0] if paged else 0
        rows.append(("kv", f"{len(kv.layers)} layers ({', '.join(f'{k} x{c}' for k, c in kinds.items())}), "
                           f"dtype {kv.dtype}, page size {kv.page_size}, {pages} pages, {_size(total)}"))
    if (p := snap.prefix) is not None:
        h = p.hash
        rows.append(("prefix", f"{len(p.parents)} pages, {sum(map(len, p.tokens))} tokens"
                               + (f"; native hash {h.algorithm} ({h.tokens_per_hash} tokens/hash)" if h else "")))
    if (s := snap.scheduler) is not None:
        reqs = s.requests
        detail = ", ".join(f"{r.id} {r.status} ({len(r.prompt_token_ids)}+{len(r.output_token_ids)} tokens)"
                           for r in reqs[:4])
        rows.append(("scheduler", f"{len(reqs)} requests" + (f": {detail}" if reqs else "") + (" ..." if len(reqs) > 4 else "")))
    if (e := snap.engine) is not None:
        rows.append(("engine", f"{e.name} {e.version}  attention {e.attention_backend or '-'}  "
                               f"layout {e.native_kv_layout or '-'}  tp {e.tp_rank}/{e.tp_size}"))
    if (g := snap.lineage) is not None:
        rows.append(("lineage", f"parent {g.parent or '-'}  label {g.label or '-'}  created {g.created or '-'}"))
    if snap.metadata:
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in sorted(snap.metadata.items()))))
    return rows


def inspect(args) -> int:
    with SnapshotFile(args.path) as f:
        required, optional = f.features
        print(f"snapshot  {args.path}")
        print(f"id        {f.id}")
        print(f"format    {f.version[0]}.{f.version[1]}  features required 0x{required:x} optional 0x{optional:x}")
        print(f"size      {_size(f.layout.file_length)} in {len(f.layout.regions)} regions, "
              f"{f.layout.total_chunks} checksummed chunks")
        for name, text in _sections(f.snapshot(verify=False, copy=False)):
            print(f"{name:<9} {text}")
        names = f.names()
        if names and not args.brief:
            rows = []
            for name in names[: args.limit]:
                dtype, shape, region = f.info(name)
                rows.append([name, dtype, "[" + ", ".join(map(str, shape)) + "]", _size(region.length), str(region.offset)])
            print()
            print(_table(rows, ["tensor", "dtype", "shape", "size", "offset"]))
            if len(names) > args.limit:
                print(f"... and {len(names) - args.limit} more (--limit)")
    return 0


def verify(args) -> int:
    with SnapshotFile(args.path) as f:
        meter = Progress("verifying", sum(r.length for r in f.layout.regions))
        try:
            f.verify(meter)
        finally:
            meter.close()
        print(f"OK {f.id}  {_size(f.layout.file_length)}, {len(f.layout.regions)} tensors, "
              f"{f.layout.total_chunks} chunks verified")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thaw", description="Inspect and check thaw snapshots.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="sections, tensors, sizes, identity and lineage of a snapshot")
    p.add_argument("path")
    p.add_argument("--brief", action="store_true", help="sections only, no tensor table")
    p.add_argument("--limit", type=int, default=50, help="tensor rows to show (default 50)")
    p.set_defaults(run=inspect)
    p = sub.add_parser("verify", help="check every checksum and structural rule; non-zero exit on any problem")
    p.add_argument("path")
    p.set_defaults(run=verify)
    unavailable = []
    for ep in entry_points(group="thaw.cli"):
        try:
            ep.load()(sub)
        except ImportError as exc:  # a plugin whose engine is not installed must not break inspect/verify
            unavailable.append(f"{ep.name} ({exc})")
    if unavailable:
        parser.epilog = "unavailable here: " + "; ".join(unavailable)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except SnapshotError as exc:
        print(f"thaw {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"thaw {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
