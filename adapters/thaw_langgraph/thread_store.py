"""KV-only snapshots of agent threads, one file per thread id, in a directory or under any fsspec URL."""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Optional
from urllib.parse import quote

import thaw_format

# The longest quoted thread id used as a file name as it is. Most filesystems cap a name at 255 bytes, and the
# save's staging name adds 42 (".thaw", "." and 32 hex digits, ".tmp"); a longer id is named by its SHA-256
# (every id that fitted before keeps its file).
# Two ids sharing a file cannot mix threads: a snapshot records its thread id, and durable.load refuses another's.
NAME_LIMIT = 255 - 42


class ThreadStore:
    """`ThreadStore("/var/lib/agent-kv")` or `ThreadStore("s3://bucket/kv")`: save(thread_id, snapshot),
    load(thread_id). A save is atomic: the bytes go to a temporary name that is then moved over the old file."""

    def __init__(self, url: str | os.PathLike) -> None:
        import fsspec

        if not isinstance(url, (str, os.PathLike)):  # str() of anything else is a directory name in the cwd
            raise TypeError(f"a thread store is a directory or an fsspec URL, not {type(url).__name__} {url!r}")
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, thread_id: str) -> str:
        if not thread_id:
            raise ValueError("a thread id must not be empty")
        name = quote(thread_id, safe="")
        if len(name) > NAME_LIMIT:
            name = "sha256-" + hashlib.sha256(thread_id.encode()).hexdigest()
        return f"{self.root.rstrip('/')}/{name}.thaw"

    def save(self, thread_id: str, snapshot: thaw_format.Snapshot) -> str:
        target = self.path(thread_id)
        staging = f"{target}.{uuid.uuid4().hex}.tmp"
        self.fs.pipe_file(staging, thaw_format.dumps(snapshot))
        try:
            self.fs.mv(staging, target)
        except BaseException:
            self.fs.rm(staging)
            raise
        return target

    def load(self, thread_id: str) -> Optional[thaw_format.Snapshot]:
        """The thread's snapshot, checksums verified; None if there is none."""
        try:
            data = self.fs.cat_file(self.path(thread_id))
        except FileNotFoundError:
            return None
        return thaw_format.loads(data)
