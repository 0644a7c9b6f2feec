"""Opening a path for reading: regular files only, refused before a byte is read and without blocking."""

from __future__ import annotations

import os
import stat


def open_regular(path: str, error: type[Exception]) -> int:
    """A read-only descriptor of the regular file at `path`, else `error` naming what the path is.

    O_NONBLOCK makes opening a FIFO return at once (a blocking open waits for a writer forever, and a read
    would wait for data); the descriptor is made blocking again once fstat says it is a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path!r} is {_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "a special file"
