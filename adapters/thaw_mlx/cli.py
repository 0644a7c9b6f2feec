"""`thaw convert SRC DST`: an mlx-lm prompt-cache file to a snapshot, or a snapshot to one (direction by content).

Registered with the `thaw` command through the `thaw.cli` entry-point group (pyproject.toml).
"""

from __future__ import annotations

import argparse
import errno
import json
from pathlib import Path

import thaw_format
from thaw_format import CorruptSnapshotError, IncompatibleSnapshotError, SnapshotFile
from thaw_format.cli import say, whole_number
from thaw_format.container import MAGIC
from thaw_format.progress import progress_bar

from .identity import checkpoint_info
from .prompt_cache_file import export_prompt_cache, import_prompt_cache, is_token_list
from .session import DEFAULT_PAGE_SIZE


def register(subparsers) -> None:
    what = "mlx-lm prompt-cache file (.safetensors) <-> thaw snapshot; the direction follows SRC's content"
    p = subparsers.add_parser("convert", help=what, description=what)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--model", metavar="DIR", type=_model_dir, help="importing: the model directory the cache is of "
                   "(its config.json; with *.safetensors weights, the checkpoint's identity)")
    p.add_argument("--tokens", metavar="JSON", type=_token_ids,
                   help="importing: a file holding the JSON list of the cache's token ids")
    p.add_argument("--page-size", type=whole_number(1, "tokens"), default=DEFAULT_PAGE_SIZE,
                   help=f"importing: tokens per KV page (default {DEFAULT_PAGE_SIZE})")
    p.add_argument("--durable", action=argparse.BooleanOptionalAction, default=True,
                   help="importing: fsync the snapshot and its folder (default); --no-durable skips the fsyncs "
                   "as mlx-lm does: still atomic, but a power loss may lose the file. Exporting ignores it: the "
                   "mlx-lm file is written as mlx-lm writes it (atomic, no fsync)")
    p.set_defaults(run=convert)


def convert(args) -> int:
    src, dst = Path(args.src), Path(args.dst)
    # checked first: both writers would fail only after the whole read (Path("") is ".", a folder)
    if dst.is_dir() and not dst.is_symlink():
        raise IsADirectoryError(errno.EISDIR, "the destination is a folder; name the file to write", args.dst)
    if not dst.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the destination's folder does not exist", str(dst.parent))
    with open(src, "rb") as f:
        head = f.read(max(len(MAGIC), 9))
    if head.startswith(MAGIC):
        with SnapshotFile(src) as f, progress_bar("reading", sum(r.length for r in f.layout.regions)) as bar:
            snapshot = f.snapshot(progress=bar)
        export_prompt_cache(snapshot, dst)
        say(f"wrote mlx-lm prompt cache {dst}")
        return 0
    if not _looks_like_safetensors(head, src.stat().st_size):
        raise CorruptSnapshotError(f"{src} is neither a thaw snapshot (no {MAGIC!r} magic) nor a safetensors file "
                                   "(an mlx-lm prompt cache)")
    model_dir, config = args.model or (None, None)
    try:
        snapshot = import_prompt_cache(src, config=config, tokens=args.tokens, page_size=args.page_size)
    except ValueError as exc:  # --tokens or --page-size that do not fit the file's cache: say so, no traceback
        raise IncompatibleSnapshotError(f"{src}: {exc}") from None
    if model_dir and any(Path(model_dir).glob("*.safetensors")):
        # a checkpoint: named as every engine names it (spec 5.1), as thaw_mlx.model_info(model, checkpoint=) does
        snapshot.model = checkpoint_info(model_dir, snapshot.model.dtype)
    total = sum(t.nbytes for layer in snapshot.kv.layers for t in layer.tensors.values())
    with progress_bar("writing", total) as bar:
        thaw_format.save(snapshot, dst, progress=bar, durable=args.durable)
    say(f"wrote snapshot {dst}")
    return 0


def _json_file(path: str) -> object:
    """A file's JSON value; an unreadable or malformed file is an argument error (usage, exit 2), not a traceback."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise argparse.ArgumentTypeError(f"{path!r} is not JSON: {exc}") from None


def _model_dir(path: str) -> tuple[str, dict]:
    """--model DIR: the folder and its config.json, read while the arguments are parsed."""
    config = _json_file(str(Path(path) / "config.json"))
    if not isinstance(config, dict):
        raise argparse.ArgumentTypeError(f"{path!r}: config.json holds a {type(config).__name__}, not a JSON object")
    return path, config


def _token_ids(path: str) -> list[int]:
    """--tokens FILE: a JSON list of token ids (integers >= 0)."""
    tokens = _json_file(path)
    if not is_token_list(tokens):
        raise argparse.ArgumentTypeError(f"{path!r} must hold a JSON list of token ids (integers >= 0)")
    return tokens


def _looks_like_safetensors(head: bytes, file_size: int) -> bool:
    """safetensors: an 8-byte little-endian header length that fits the file, then a JSON object."""
    return len(head) == 9 and int.from_bytes(head[:8], "little") <= file_size - 8 and head[8:9] == b"{"
