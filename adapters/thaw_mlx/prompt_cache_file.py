"""mlx-lm prompt-cache files (`save_prompt_cache`: the caches' state in safetensors, string metadata) <-> snapshots.

mlx-lm's files name neither the model nor the token ids, and a snapshot needs both. Exporting writes them into
the file's metadata under "thaw_*" keys, so a file exported by thaw converts back whole; a file made by mlx-lm
itself needs them from the caller: the model's config.json and the token ids the cache was built from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from thaw_format import CorruptSnapshotError, IncompatibleSnapshotError, ModelInfo, Snapshot, config_digest
from thaw_format.document import decode
from thaw_format.writer import temporary_beside

from .identity import checkpoint_config
from .session import DEFAULT_PAGE_SIZE, cache_of_snapshot, session_request, snapshot_of_cache

# mlx-lm nests metadata keys at dots, so these have none
MODEL_KEY, TOKENS_KEY, PROMPT_KEY, SNAPSHOT_KEY = "thaw_model", "thaw_tokens", "thaw_num_prompt_tokens", "thaw_snapshot"


def export_prompt_cache(snapshot: Snapshot, path: str | os.PathLike) -> None:
    """Write the snapshot's KV as an mlx-lm prompt-cache file (atomically), with its model and tokens."""
    request = session_request(snapshot)  # its one request, or an idle engine's one prefix chain (no requests)
    tokens = request.prompt_token_ids + request.output_token_ids
    metadata = {TOKENS_KEY: json.dumps(tokens), PROMPT_KEY: str(len(request.prompt_token_ids))}
    cache = cache_of_snapshot(snapshot)
    if snapshot.model is not None:
        metadata[MODEL_KEY] = json.dumps(dataclasses.asdict(snapshot.model))
    if snapshot.id is not None:
        metadata[SNAPSHOT_KEY] = snapshot.id
    path = os.fsdecode(path)
    # the writer's temporary name, which fits beside the longest name `path` may have; mlx-lm appends
    # .safetensors to a name that does not end with it
    partial = Path(temporary_beside(path, os.path.dirname(path) or ".", ".safetensors"))
    try:
        save_prompt_cache(str(partial), cache, metadata)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def import_prompt_cache(
    path: str | os.PathLike,
    *,
    config: Optional[dict] = None,
    tokens: Optional[Sequence[int]] = None,
    page_size: int = DEFAULT_PAGE_SIZE,
) -> Snapshot:
    """A snapshot of an mlx-lm prompt-cache file. `config` (the model's config.json) and `tokens` are needed
    when the file was not exported by thaw; given, they take precedence over what the file says."""
    try:
        cache, metadata = load_prompt_cache(str(path), return_metadata=True)
    except (ValueError, RuntimeError, KeyError, AttributeError) as exc:  # what mlx and mlx-lm raise on other files
        raise IncompatibleSnapshotError(f"{path} is not an mlx-lm prompt-cache file: {exc!r}") from exc
    num_prompt_tokens = None
    if tokens is None:
        if TOKENS_KEY not in metadata:
            raise IncompatibleSnapshotError(f"{path} does not record its token ids (not written by thaw): give "
                                            "them (tokens=, or thaw convert --tokens FILE)")
        tokens = _recorded(path, metadata, TOKENS_KEY, "a JSON list of token ids", is_token_list)
        num_prompt_tokens = _recorded(path, metadata, PROMPT_KEY, f"a JSON integer from 0 to {len(tokens)}",
                                      lambda v: type(v) is int and 0 <= v <= len(tokens))
    if config is None:  # the recorded identity, checked before the cache is paged
        if MODEL_KEY not in metadata:
            raise IncompatibleSnapshotError(f"{path} does not say which model it belongs to: give the model's "
                                            "config (config=, or thaw convert --model DIR)")
        fields = _recorded(path, metadata, MODEL_KEY, "JSON", lambda v: True)
        try:  # the reader's checks of a model section: its members and their types
            model = decode({"model": fields}, None, []).model
        except CorruptSnapshotError as exc:
            raise CorruptSnapshotError(f"{path}: its {MODEL_KEY} metadata is not a model's identity: {exc}") from None
    snapshot = snapshot_of_cache(cache, tokens, model=None, num_prompt_tokens=num_prompt_tokens, page_size=page_size)
    if config is not None:
        canonical = checkpoint_config(config)
        model = ModelInfo(canonical["model_type"], config_digest(canonical), snapshot.kv.dtype, config=canonical)
    snapshot.model = model
    return snapshot


def is_token_list(value: Any) -> bool:
    """A list of token ids as JSON gives them: ints of 0 or more (a recorded list, or thaw convert --tokens')."""
    return isinstance(value, list) and all(type(t) is int and t >= 0 for t in value)


def _recorded(path, metadata: dict, key: str, what: str, fits: Callable[[Any], bool]) -> Any:
    """The JSON value a thaw export recorded under `key`: these metadata are strings anyone can edit, so a value
    that is not JSON or does not fit is refused naming the key, not met later as a TypeError (or 1.5 read as 1)."""
    try:
        value = json.loads(metadata[key])
        fit = fits(value)
    except ValueError:  # not JSON
        fit = False
    if not fit:
        raise CorruptSnapshotError(f"{path}: its {key} metadata is not {what}: {metadata[key]!r:.200}")
    return value
