"""`thaw convert SRC DST`: an mlx-lm prompt-cache file to a snapshot, or a snapshot to one (direction by content).

Registered with the `thaw` command through the `thaw.cli` entry-point group (pyproject.toml).
"""

from __future__ import annotations

import json
from pathlib import Path

import thaw_format
from thaw_format.container import MAGIC

from .identity import checkpoint_info
from .prompt_cache_file import export_prompt_cache, import_prompt_cache
from .session import DEFAULT_PAGE_SIZE


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="mlx-lm prompt-cache file (.safetensors) <-> thaw snapshot; the direction follows SRC's content",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--model", metavar="DIR", help="importing: the model directory the cache is of (its config.json; "
                   "with *.safetensors weights, the checkpoint's identity)")
    p.add_argument("--tokens", metavar="JSON", help="importing: a file holding the JSON list of the cache's token ids")
    p.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="importing: tokens per KV page")
    p.set_defaults(run=convert)


def convert(args) -> int:
    with open(args.src, "rb") as f:
        is_snapshot = f.read(len(MAGIC)) == MAGIC
    if is_snapshot:
        export_prompt_cache(thaw_format.load(args.src), args.dst)
        print(f"wrote mlx-lm prompt cache {args.dst}")
        return 0
    config = json.loads((Path(args.model) / "config.json").read_text()) if args.model else None
    tokens = json.loads(Path(args.tokens).read_text()) if args.tokens else None
    snapshot = import_prompt_cache(args.src, config=config, tokens=tokens, page_size=args.page_size)
    if args.model and any(Path(args.model).glob("*.safetensors")):
        # a checkpoint: named as every engine names it (spec 5.1), as thaw_mlx.model_info(model, checkpoint=) does
        snapshot.model = checkpoint_info(args.model, snapshot.model.dtype)
    thaw_format.save(snapshot, args.dst)
    print(f"wrote snapshot {args.dst}")
    return 0
