"""The `thaw` command: inspect, verify, log, diff, plus subcommands from the `thaw.cli` entry points.

Every line printed passes through `printable`: names and metadata come from files, and a file must not be
able to move the cursor, recolour the terminal or forge a line of output. `--json` output is escaped by json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .container import MAJOR, MINOR
from .diff import diff as diff_files
from .errors import SnapshotError
from .progress import progress_bar
from .reader import SnapshotFile
from .summary import count, section_lines, size, summarize
from .version import package_version

# C0 and C1 controls, DEL, lone surrogates, and the invisible marks that reorder or hide text (bidi, zero width)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff\ud800-\udfff]")


def printable(text: Any) -> str:
    """`text` with every control or invisible character written as its Python escape (\\x1b, \\n, \\u202e)."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"),
                            str(text))


def say(text: Any = "", *, err: bool = False) -> None:
    print(printable(text), file=sys.stderr if err else sys.stdout)


def say_json(value: Any) -> None:
    print(json.dumps(value, indent=2))  # ensure_ascii (the default) escapes every control character


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]


def _total(f: SnapshotFile) -> int:
    return sum(r.length for r in f.layout.regions)


def _verify(f: SnapshotFile, label: str) -> None:
    with progress_bar(printable(label), _total(f)) as bar:
        f.verify(bar)


# ---------------------------------------------------------------------------------------------------- inspect

def inspect(args) -> int:
    with SnapshotFile(args.path) as f:
        if args.verify:
            _verify(f, "verifying")
        tensors = []
        for name in f.names():
            dtype, shape, region = f.info(name)
            tensors.append({"name": name, "dtype": dtype, "shape": list(shape), "bytes": region.length,
                            "offset": region.offset})
        summary = summarize(f.snapshot(verify=False, copy=False))
        required, optional = f.features
        if args.json:
            say_json({"path": args.path, "id": f.id, "format": f"{f.version[0]}.{f.version[1]}",
                      "features": {"required": required, "optional": optional}, "bytes": f.layout.file_length,
                      "regions": len(f.layout.regions), "chunks": f.layout.total_chunks, "data_verified": args.verify,
                      "sections": summary, **({} if args.brief else {"tensors": tensors})})
            return 0
        say(f"snapshot  {args.path}")
        say(f"id        {f.id}")
        say(f"format    {f.version[0]}.{f.version[1]}  features required 0x{required:x} optional 0x{optional:x}")
        say(f"size      {size(f.layout.file_length)} in {count(len(f.layout.regions), 'region')}, "
            f"{count(f.layout.total_chunks, 'checksummed chunk')}")
        say("data      " + ("verified: every chunk checksum, padding and section rule" if args.verify else
                            "NOT checked (header, table and document only): thaw verify, or inspect --verify"))
        for name, text in section_lines(summary):
            say(f"{name:<9} {text}")
        if tensors and not args.brief:
            rows = [[t["name"], t["dtype"], "[" + ", ".join(map(str, t["shape"])) + "]", size(t["bytes"]),
                     str(t["offset"])] for t in tensors[: args.limit]]
            say()
            for line in _table(rows, ["tensor", "dtype", "shape", "size", "offset"]):
                say(line)
            if len(tensors) > args.limit:
                say(f"... and {len(tensors) - args.limit} more (--limit)")
    return 0


# ---------------------------------------------------------------------------------------------------- verify

def verify(args) -> int:
    """Each file in turn; a bad one is reported and the rest are still checked. Exit: the worst file's code."""
    results, status = [], 0
    for path in args.paths:
        try:
            with SnapshotFile(path) as f:
                _verify(f, f"verifying {Path(path).name}")
                result = {"path": path, "ok": True, "id": f.id, "bytes": f.layout.file_length,
                          "tensors": len(f.layout.regions), "chunks": f.layout.total_chunks}
            if not args.json:
                say(f"OK {result['id']}  {path}  {size(result['bytes'])}, {count(result['tensors'], 'tensor')}, "
                    f"{count(result['chunks'], 'chunk')} verified")
        except (SnapshotError, OSError) as exc:
            code = 1 if isinstance(exc, SnapshotError) else 2
            status = max(status, code)
            result = {"path": path, "ok": False, "error": type(exc).__name__, "message": _message(exc)}
            if not args.json:
                say(f"thaw verify: {type(exc).__name__}: {_message(exc)} (in {path})", err=True)
        results.append(result)
    if args.json:
        say_json(results)
    return status


def _message(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


# ---------------------------------------------------------------------------------------------------- log

def _ids_in(directories: list[str]) -> dict[str, list[str]]:
    """id -> paths of every readable snapshot (`*.thaw`, regular files only) in the directories, in search order.

    Files with one id are copies of one snapshot (the id is a SHA-256 over the header and every chunk's
    checksum), so log follows the first and names the others; a copy whose data was damaged since keeps its
    id, and `thaw verify` is what reads the data. One file (device and inode) is listed once, by the first name
    it is found under: reached again through a folder searched twice, spelt two ways ("." and its absolute
    path) or through a symlink, or by a link to the file itself, it is no copy of itself."""
    found: dict[str, list[str]] = {}
    files: set[tuple[int, int]] = set()
    for directory in directories:
        for path in sorted(Path(directory).glob("*.thaw")):
            try:
                st = path.stat()
            except OSError:  # a dangling symlink
                continue
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device named *.thaw would block the open
                continue
            if (st.st_dev, st.st_ino) in files:
                continue
            files.add((st.st_dev, st.st_ino))
            try:
                with SnapshotFile(path) as f:
                    found.setdefault(f.id, []).append(str(path))
            except (SnapshotError, OSError):
                continue
    return found


def log(args) -> int:
    """The snapshot, then its parent, grandparent, ...: found by id among the snapshots in the search folders."""
    search = args.search or [str(Path(args.path).parent)]
    known = None  # the search folders are read only if a parent is named
    path: Optional[str] = args.path
    copies: list[str] = []  # the other files with the id of the one shown, passed over
    entries, seen = [], set()
    while path is not None:
        with SnapshotFile(path) as f:
            snap = f.snapshot(verify=False, copy=False)
            entry = {"id": f.id, "path": path, "copies": copies, "parent": None, "label": None, "created": None,
                     "writer": None}
        if snap.lineage is not None:
            entry.update(parent=snap.lineage.parent, label=snap.lineage.label, created=snap.lineage.created)
        if snap.engine is not None:
            entry["writer"] = f"{snap.engine.name} {snap.engine.version}"
        entries.append(entry)
        seen.add(entry["id"])
        path = None
        if entry["parent"] and entry["parent"] not in seen:
            known = _ids_in(search) if known is None else known
            path, *copies = known.get(entry["parent"], [None])
    if args.json:
        say_json(entries)
        return 0
    for i, e in enumerate(entries):
        say(f"snapshot {e['id']}  {e['path']}")
        if e["copies"]:
            say(f"  copies   {', '.join(e['copies'])} (the same id)")
        say(f"  label    {e['label'] or '-'}")
        say(f"  created  {e['created'] or '-'}")
        say(f"  writer   {e['writer'] or '-'}")
        if e["parent"] is None:
            say("  parent   - (a root)")
        elif i + 1 == len(entries):
            where = ", ".join(search)
            say(f"  parent   {e['parent']} (not found among the *.thaw in {where}: --search DIR)")
        else:
            say(f"  parent   {e['parent']}")
        if i + 1 < len(entries):
            say()
    return 0


# ---------------------------------------------------------------------------------------------------- diff

def diff(args) -> int:
    """Exit 0 when the snapshots hold the same state, 1 when they differ, 2 when one cannot be read (as diff(1))."""
    with SnapshotFile(args.a) as a, SnapshotFile(args.b) as b:
        with progress_bar("comparing", _total(a) + _total(b)) as bar:
            report = diff_files(a, b, bar)
    report["a"]["path"], report["b"]["path"] = args.a, args.b
    if args.json:
        say_json(report)
        return 0 if report["same"] else 1
    say(f"--- {args.a}  {report['a']['id']}")
    say(f"+++ {args.b}  {report['b']['id']}")
    for section, fields in report["sections"].items():
        for name, (va, vb) in fields.items():
            say(f"{section:<9} {name}: {_short(va)} -> {_short(vb)}")
    p = report["pages"]
    if p["only_in_a"] or p["only_in_b"]:
        say(f"pages     {p['shared']} shared, {p['only_in_a']} only in A, {p['only_in_b']} only in B "
            "(a page is its whole token chain)")
    r = report["requests"]
    for rid in r["only_in_a"]:
        say(f"request   - {rid}")
    for rid in r["only_in_b"]:
        say(f"request   + {rid}")
    for rid, fields in r["differ"].items():
        say(f"request   ~ {rid}: " + ", ".join(f"{k} {_short(v[0])} -> {_short(v[1])}" if isinstance(v, list)
                                               else f"{k} {v}" for k, v in fields.items()))
    t = report["tensors"]
    for e in t["only_in_a"]:
        say(f"tensor    - {e['name']}  {e['dtype']} {e['shape']}  crc32c {e['crc32c']}")
    for e in t["only_in_b"]:
        say(f"tensor    + {e['name']}  {e['dtype']} {e['shape']}  crc32c {e['crc32c']}")
    for e in t["differ"]:
        ea, eb = e["a"], e["b"]
        what = (f"crc32c {ea['crc32c']} -> {eb['crc32c']}" if ea["dtype"] == eb["dtype"] and ea["shape"] == eb["shape"]
                else f"{ea['dtype']} {ea['shape']} -> {eb['dtype']} {eb['shape']}")
        say(f"tensor    ~ {e['name']}  {what}")
    say(f"tensors   {t['same']} identical, {len(t['differ'])} differ, {len(t['only_in_a'])} only in A, "
        f"{len(t['only_in_b'])} only in B")
    say("same state" if report["same"] else "snapshots differ")
    return 0 if report["same"] else 1


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thaw", description="Inspect, check and compare thaw snapshots.")
    parser.add_argument("--version", action="version",
                        version=f"thaw {package_version()} (snapshot format {MAJOR}.{MINOR})")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, what: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=what, description=what[:1].upper() + what[1:] + ".")

    p = command("inspect", "sections, tensors, sizes, identity and lineage of a snapshot")
    p.add_argument("path")
    p.add_argument("--brief", action="store_true", help="sections only, no tensor table")
    p.add_argument("--limit", type=whole_number(0), default=50, help="tensor rows to show (default 50)")
    p.add_argument("--verify", action="store_true", help="also check every chunk checksum (reads the whole file)")
    p.add_argument("--json", action="store_true", help="one JSON object (every tensor unless --brief)")
    p.set_defaults(run=inspect)
    p = command("verify", "check every checksum and structural rule; non-zero exit on any problem")
    p.add_argument("paths", nargs="+", metavar="path")
    p.add_argument("--json", action="store_true", help="a JSON list, one object per file")
    p.set_defaults(run=verify)
    p = command("log", "lineage: the snapshot, its parent, its parent's parent ... (who, when, label)")
    p.add_argument("path")
    p.add_argument("--search", action="append", metavar="DIR", type=_folder,
                   help="folder whose *.thaw files may be parents (repeatable; default: the file's folder)")
    p.add_argument("--json", action="store_true", help="a JSON list, newest first")
    p.set_defaults(run=log)
    p = command("diff", "model, pages, requests and tensors (by name and checksum) that differ; "
                        "exit 1 when they differ, 2 when one cannot be read")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(run=diff)
    for ep in entry_points(group="thaw.cli"):
        try:
            ep.load()(sub)
        except ImportError as exc:  # a plugin whose engine is not installed must not break inspect/verify
            # prefix_chars no argument starts with: "--help" and the plugin's options are arguments too, so every
            # use of the command says why it is unavailable, not "unrecognized arguments"
            p = sub.add_parser(ep.name, help=f"unavailable here: {exc}", add_help=False, prefix_chars="\0")
            p.add_argument("arguments", nargs=argparse.REMAINDER)
            p.set_defaults(run=lambda args, name=ep.name, why=str(exc): _unavailable(name, why))
    return parser


def whole_number(minimum: int, of: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number of `minimum` or more (`of` names its unit), refused as the arguments are
    parsed, exit 2 (a negative --limit would slice rows off the end; a --page-size of 0 was refused only after the
    file was read, as an incompatible snapshot)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number{f' of {of}' if of else ''} of {minimum} or "
                                             f"more, got {text!r}")
        return value
    return parse


def _folder(text: str) -> str:
    """A folder to search (a missing one, a typo, would be searched as empty, and no parent found, silently)."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return text


def _unavailable(name: str, why: str) -> int:
    """A subcommand whose plugin could not be imported: say what to install, rather than 'invalid choice'."""
    say(f"thaw {name}: this command is unavailable here: {why}", err=True)
    return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.run(args)
        if sys.stdout is not None:  # None when started with descriptor 1 closed (`thaw verify F >&-`)
            sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return status
    except BrokenPipeError:
        # The reader went away (`thaw inspect F | head -1`): stop quietly with the shell's code for SIGPIPE.
        # stdout is pointed at /dev/null so the interpreter's final flush cannot fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except KeyboardInterrupt:
        return 130
    except SnapshotError as exc:
        say(f"thaw {args.command}: {type(exc).__name__}: {exc}", err=True)
        return 2 if args.command == "diff" else 1  # diff's 1 means "they differ"; trouble is 2, as diff(1)'s
    except OSError as exc:
        say(f"thaw {args.command}: {exc}", err=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
