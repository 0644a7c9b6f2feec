"""Writing: one plan, three sinks — a path (atomic), a stream (one pass, no seeking), a memory buffer.

The writer is deterministic: the same Snapshot always gives the same bytes. A memory buffer or a path can
also take tensors whose bytes do not exist yet (`deferred_tensor`): a `fill` function writes each one straight
into its region and returns the region's chunk CRCs, so an engine's KV pages reach shared memory, or a file
(through a stage buffer kept in cache and pwrite), in one pass.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import io
import math
import mmap
import os
import secrets
import stat
import weakref
from array import array
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, Optional, Union

import numpy

from . import mover
from .container import DEFAULT_CHUNK_SIZE, decode_trailer, encode_header, encode_trailer, plan_layout, content_id
from .document import canonical_json, decode, encode, features, validate
from .dtypes import itemsize
from .errors import CorruptSnapshotError
from .gcpause import gc_paused
from .reader import SnapshotFile
from .snapshot import Snapshot
from .tensor import Tensor

Progress = Optional[Callable[[int], None]]
# Writes one tensor's bytes into the view it is given (its region) and returns the CRC32C of each chunk of
# the given size, computed while writing. A fill that can also write straight into a file has a method
# to_file(fd, offset, chunk_size, progress=None) -> (bytes written, the same CRCs), which EncodedSnapshot.save
# calls instead of staging: it writes the region from `offset` on, and the save is refused unless it wrote the
# region's length; `progress` (None: no hook) takes the bytes written as it goes (what it leaves unreported is
# reported when it returns). A to_file without a `progress` parameter (the three-argument form fills had
# before) is called without one, its region reported whole when it returns.
Fill = Callable[[memoryview, int], array]


def deferred_tensor(dtype: str, shape) -> Tensor:
    """A tensor of this dtype and shape whose bytes a `fill` function will write (see write_into). It is backed
    by anonymous memory that is never touched, so it costs address space, not RAM; reading it gives zeros."""
    nbytes = math.prod(shape) * itemsize(dtype)
    return Tensor(dtype, shape, mmap.mmap(-1, nbytes) if nbytes else b"")


class EncodedSnapshot:
    """A snapshot laid out for writing: header bytes and region plan computed once, data not yet touched."""

    @gc_paused
    def __init__(self, snapshot: Snapshot, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        if not isinstance(snapshot, Snapshot):  # a dict of tensors is save_file's, as in safetensors
            hint = ": for a dict of tensors use thaw_format.save_file" if isinstance(snapshot, Mapping) else ""
            raise TypeError(f"expected a thaw_format.Snapshot, got {type(snapshot).__name__}{hint}")
        if chunk_size < 4096 or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size must be a power of two >= 4096, got {chunk_size}")
        validate(snapshot, ValueError)
        doc, self.tensors = encode(snapshot)
        _check_readable(doc, self.tensors)
        self._plan(snapshot, doc, chunk_size)
        self._for_comparison = False

    @classmethod
    def of(cls, snapshot: Union[Snapshot, "EncodedSnapshot"]) -> "EncodedSnapshot":
        """`snapshot` laid out to be written: itself if it is one already (a writer that read its layout first)."""
        return snapshot if isinstance(snapshot, cls) else cls(snapshot)

    @classmethod
    @gc_paused
    def compared(cls, snapshot: Snapshot) -> "EncodedSnapshot":
        """The header and plan `snapshot` would be written with, without the writer's checks (half the cost of a
        128-page KV header), for comparison only: with bytes a reader accepted, where an equal header means the
        reader's checks passed on this very content (thaw_format.sdk.lent.lent_source). It refuses to be written.
        Content the checks would refuse encodes to another header, or raises the encoder's own error."""
        encoded = cls.__new__(cls)
        doc, encoded.tensors = encode(snapshot)
        encoded._plan(snapshot, doc, DEFAULT_CHUNK_SIZE)
        encoded._for_comparison = True
        return encoded

    def _plan(self, snapshot: Snapshot, doc: dict, chunk_size: int) -> None:
        try:
            json_bytes = canonical_json(doc)
        except UnicodeEncodeError as exc:  # a lone surrogate (from os.fsdecode or a broken decode) has no UTF-8
            near = exc.object[max(exc.start - 40, 0) : exc.end + 40]
            raise ValueError(f"snapshot cannot be written: a string is not valid Unicode ({exc.reason}), in the "
                             f"document near {near!r}") from None
        except (TypeError, ValueError) as exc:  # NaN, bytes, a set: metadata the JSON document cannot hold
            raise type(exc)(f"snapshot cannot be written: every name, metadata and section value must be JSON "
                            f"(str, number, bool, None, list, dict; finite floats): {exc}") from None
        self.layout = plan_layout(len(json_bytes), [t.nbytes for _, t in self.tensors], [chunk_size] * len(self.tensors))
        self.header = encode_header(json_bytes, self.layout, *features(snapshot))

    def _writable(self) -> None:
        if self._for_comparison:
            raise ValueError("an EncodedSnapshot made for comparison (EncodedSnapshot.compared) is never written")

    @property
    def nbytes(self) -> int:
        return self.layout.file_length

    def _finish(self, crcs: array) -> tuple[bytes, str]:
        return _sealed(self.header[: self.layout.header_length], crcs)

    def _check_fill(self, fill: dict) -> None:
        unknown = set(fill) - {name for name, _ in self.tensors}
        if unknown:
            raise ValueError(f"fill names tensors the snapshot does not have: {sorted(unknown)}")

    @gc_paused
    def write_into(self, buffer, fill: Optional[dict[str, Fill]] = None, progress: Progress = None) -> str:
        """Write the snapshot into the first `nbytes` of a writable buffer (bytearray, mmap, shared memory).
        `fill` maps tensor names ("kv/0/k") to functions that write those tensors' bytes themselves."""
        self._writable()
        view = memoryview(buffer).cast("B")
        if len(view) < self.nbytes:
            raise ValueError(f"buffer holds {len(view)} bytes, the snapshot needs {self.nbytes}")
        fill = fill or {}
        self._check_fill(fill)
        view[: len(self.header)] = self.header
        position, crcs = len(self.header), array("I")
        for (name, tensor), region in zip(self.tensors, self.layout.regions):
            view[position : region.offset] = bytes(region.offset - position)
            target = view[region.offset : region.end]
            if name in fill:
                crcs.extend(_checked(name, fill[name](target, region.chunk_size), region))
            else:
                crcs.extend(mover.copy_with_crcs(tensor.data, target, region.chunk_size))
            position = region.end
            if progress:
                progress(region.length)
        view[position : self.layout.trailer_offset] = bytes(self.layout.trailer_offset - position)
        trailer, snapshot_id = self._finish(crcs)
        view[self.layout.trailer_offset : self.nbytes] = trailer
        return snapshot_id

    def write_to(self, stream, progress: Progress = None) -> str:
        """Write in one sequential pass to anything with `write` (a pipe, a socket file, an upload stream)."""
        self._writable()
        _check_binary_stream(stream)
        _write_all(stream, self.header)
        position, crcs = len(self.header), array("I")
        for (_, tensor), region in zip(self.tensors, self.layout.regions):
            _write_all(stream, bytes(region.offset - position))
            crcs.extend(mover.chunk_crcs(tensor.data, region.chunk_size))
            _write_all(stream, tensor.data)
            position = region.end
            if progress:
                progress(region.length)
        _write_all(stream, bytes(self.layout.trailer_offset - position))
        trailer, snapshot_id = self._finish(crcs)
        _write_all(stream, trailer)
        return snapshot_id

    @gc_paused
    def save(self, path, progress: Progress = None, fill: Optional[dict[str, Fill]] = None, *,
             durable: bool = True) -> str:
        """Write atomically: a temporary file beside `path`, fsync, rename over `path`, fsync the directory.

        `fill` (as for write_into) writes each named tensor with its chunk CRCs: a fill with `to_file` writes
        into the file itself (thaw_mlx's: through cache-sized tiles, see mover.gather_pages_to_file) and says
        how many bytes it wrote, a count other than its region's length refusing the save (ValueError); any
        other into a stage buffer of the tensor's size that pwrite then copies to the page cache while the
        next tensor is filled (a shared mapping of the file would take a page fault per 4 KiB page written).
        Staging holds two stages of the largest staged tensor's size, recycled across saves up to
        mover.recycled's budget (larger ones are new memory each save). `progress` advances within a tensor
        (in mover.progress_step's pieces); a staged tensor's bytes are reported by the save's writer thread as
        they go out (one call at a time, never beside another).

        A crash at any point leaves either the old file or the new one at `path`, never a mix. The file is
        never changed in place, so readers and mappings of the old file keep reading the old snapshot. A new
        file's mode follows the umask (0666 & ~umask); a file replaced keeps its mode. A symlink at `path` is
        replaced by the new file (the rename replaces the link, not its target, which is left untouched).

        `durable=False` skips both fsyncs and the writeback started per stage, as mlx-lm's and most savers do:
        the write is still atomic (readers, and a crash of this process, see the old file or the new one),
        but the new file lives in the page cache until the kernel writes it. A power loss or kernel crash
        soon after may then lose it, or, where the filesystem does not order file data before a rename,
        leave a file the reader refuses by its CRCs (CorruptSnapshotError): never one read as valid.
        """
        self._writable()
        self._check_fill(fill or {})  # before the temporary file exists
        path = os.fsdecode(path)  # str, bytes or os.PathLike, as load takes
        directory = _check_target(path)
        fd, tmp = _create_beside(path, directory)
        progress = _hook_of_its_own(progress)
        try:
            if fill:
                snapshot_id = self._write_staged(fd, fill, progress, durable)
            else:
                snapshot_id = self._write_file(fd, progress)
            if durable:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)  # inside the cleanup: a rename refused (path is a directory) leaves nothing
        except BaseException as exc:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)
            if isinstance(exc, OSError):
                raise _naming_target(exc, path, tmp) from None
            raise
        if durable:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        return snapshot_id

    def _write_file(self, fd: int, progress: Progress) -> str:
        mover.pwrite_all(fd, memoryview(self.header), 0)
        regions = [(offset, t.data, chunk_size)
                   for (_, t), (offset, _, chunk_size, _) in zip(self.tensors, self.layout.table.tolist())]
        crcs = array("I")
        for region_crcs in mover.write_regions(fd, regions, progress):
            crcs.extend(region_crcs)
        trailer, snapshot_id = self._finish(crcs)
        mover.pwrite_all(fd, memoryview(trailer), self.layout.trailer_offset)
        return snapshot_id

    def _write_staged(self, fd: int, fill: dict[str, Fill], progress: Progress, durable: bool) -> str:
        # Blocks reserved first: a full disk raises OSError before anything is gathered, and the gaps between
        # regions (never written) read as zeros without leaving holes in the file.
        os.posix_fallocate(fd, 0, self.nbytes)
        names = [name for name, _ in self.tensors]
        crcs: list = [None] * len(names)
        # A fill with to_file writes its region itself, from the tensor's memory into the file in one pass.
        for i in [i for i, name in enumerate(names) if hasattr(fill.get(name), "to_file")]:
            region = self.layout.regions[i]
            crcs[i] = _write_to_file(fd, names[i], fill[names[i]], region, progress)
            if durable:
                mover.start_writeback(fd, region.offset, region.length)
        mover.pwrite_all(fd, memoryview(self.header), 0)
        plain = [i for i, name in enumerate(names) if name not in fill]
        written = mover.write_regions(fd, [(self.layout.regions[i].offset, self.tensors[i][1].data,
                                            self.layout.regions[i].chunk_size) for i in plain], progress)
        for i, region_crcs in zip(plain, written):
            crcs[i] = region_crcs
        filled = [i for i, name in enumerate(names) if name in fill and crcs[i] is None]
        widest = max((self.layout.regions[i].length for i in filled), default=0)
        # Two stages take turns: a tensor is gathered into one while the other's bytes go out by pwrite (which
        # releases the GIL), so the file is written from memory just written, already in cache, and faulted in
        # once per process (mover.recycled), where a shared mapping of the new file costs a fault per page.
        stages, pending = [mover.recycled(widest) for _ in range(2 if filled else 0)], [None, None]
        with ThreadPoolExecutor(1, thread_name_prefix="thaw-save") as writer:
            for turn, i in enumerate(filled):
                region, slot = self.layout.regions[i], turn % 2
                if pending[slot] is not None:
                    pending[slot].result()  # that stage's previous tensor is out
                stage = stages[slot][: region.length]
                crcs[i] = _staged(names[i], fill[names[i]], stage, region)
                pending[slot] = writer.submit(_write_out, fd, stage, region, durable, progress)
            for future in pending:
                if future is not None:
                    future.result()
        trailer, snapshot_id = self._finish(array("I", [c for region_crcs in crcs for c in region_crcs]))
        mover.pwrite_all(fd, memoryview(trailer), self.layout.trailer_offset)
        return snapshot_id


def _checked(name: str, crcs: array, region) -> array:
    """The CRCs a fill returned for the named tensor's region, refused unless there is one per chunk."""
    if len(crcs) != region.num_chunks:
        raise ValueError(f"fill of {name!r} returned {len(crcs)} CRCs for {region.num_chunks} chunks")
    return crcs


def _staged(name: str, fill: Fill, stage: memoryview, region) -> array:
    """The CRCs of a fill into a stage buffer. It writes memory, not the file: an OSError it raises is about
    something of its own, and keeps its name, or its lack of one (_naming_target)."""
    with _not_the_target():
        return _checked(name, fill(stage, region.chunk_size), region)


def _hook_of_its_own(progress: Progress) -> Progress:
    """The user's progress hook, an OSError it raises (a BrokenPipeError printing to a closed pipe) kept its own:
    about no file of the save's, never renamed to the target (_naming_target)."""
    if progress is None:
        return None

    def hook(nbytes: int) -> None:
        with _not_the_target():
            progress(nbytes)

    return hook


@contextlib.contextmanager
def _not_the_target():
    """Marks an OSError raised inside as about something other than the file being saved (_naming_target)."""
    try:
        yield
    except OSError as exc:
        setattr(exc, _NOT_THE_TARGET, True)
        raise


def _write_to_file(fd: int, name: str, fill, region, progress: Progress) -> array:
    """fill.to_file's CRCs for the region it writes itself, refused (ValueError) unless the count of bytes it
    says it wrote is the region's length; what it did not report of the region is reported when it returns. It
    writes the file: an OSError it raises without a name is the target's."""
    reported = [0]

    def report(nbytes: int) -> None:
        reported[0] += nbytes
        progress(nbytes)

    if _takes_progress(fill.to_file):
        written, crcs = fill.to_file(fd, region.offset, region.chunk_size, progress=report if progress else None)
    else:  # a to_file written before fills took the hook: its region is reported when it returns
        written, crcs = fill.to_file(fd, region.offset, region.chunk_size)
    if written != region.length:
        raise ValueError(f"fill of {name!r} wrote {written} bytes into its {region.length}-byte region")
    if progress and reported[0] < region.length:
        progress(region.length - reported[0])
    return _checked(name, crcs, region)


# Whether a to_file function takes the progress hook, held weakly: a save of many tensors asked inspect once per
# tensor, and a bound method is looked up by its function (one per class); a to_file made per fill (a closure) is
# a new key each time and must not be kept alive with what it holds (a cache's arrays).
_TAKES_PROGRESS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _takes_progress(to_file) -> bool:
    function = getattr(to_file, "__func__", to_file)
    remembered = inspect.isfunction(function)  # other callables (a partial, a builtin) are asked each time
    takes = _TAKES_PROGRESS.get(function) if remembered else None
    if takes is None:
        parameters = inspect.signature(to_file).parameters
        takes = "progress" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        if remembered:
            _TAKES_PROGRESS[function] = takes
    return takes


def _write_out(fd: int, data: memoryview, region, durable: bool, progress: Progress) -> None:
    """pwrite all of data at the region's offset, in mover.progress_step's pieces reported as each is written
    (with a hook), and for a durable save start the disk on each (the save's fsync then finds it under way)."""
    step = mover.progress_step(region.chunk_size) if progress else max(len(data), 1)
    for start in range(0, len(data), step):
        piece = data[start : start + step]
        mover.pwrite_all(fd, piece, region.offset + start)
        if durable:
            mover.start_writeback(fd, region.offset + start, len(piece))
        if progress:
            progress(len(piece))


def _check_target(path: str) -> str:
    """The folder to save `path` in, as spelt (dirname, never normalised: the kernel resolves "x/.." through x,
    a symlink's ".." to its target's parent, as the final rename will). Refused, before a byte is written: a
    target that rename would refuse (a directory at `path`, a name that is "", "." or ".."), a folder that does
    not exist ("~" is not expanded, as in `open`) or is not a folder. Each error names the user's path or the
    folder as the user wrote it, never the temporary file beside it."""
    if not path:  # as open(""): else the temporary would go to the current folder's parent
        raise FileNotFoundError(errno.ENOENT, "an empty path names no snapshot file", path)
    if os.path.basename(path) in ("", ".", ".."):  # "new.thaw/", "new.thaw/.": the rename would target a folder
        raise IsADirectoryError(errno.EISDIR, "a path ending in a separator, '.' or '..' names a folder, "
                                "not a snapshot file", path)
    if os.path.isdir(path) and not os.path.islink(path):  # a link at path is replaced, whatever it points to
        raise IsADirectoryError(errno.EISDIR, "cannot save a snapshot over a directory", path)
    directory = os.path.dirname(path) or "."
    try:
        is_folder = stat.S_ISDIR(os.stat(directory).st_mode)  # follows a symlink to a folder, as rename does
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "the folder to save the snapshot in does not exist",
                                directory) from None
    except NotADirectoryError:  # "file.txt/sub": a part of the folder's path is a file
        raise NotADirectoryError(errno.ENOTDIR, "a part of the path to the folder to save the snapshot in is not a "
                                 "folder", directory) from None
    if not is_folder:
        raise NotADirectoryError(errno.ENOTDIR, "the folder to save the snapshot in exists but is not a folder",
                                 directory)
    return directory


_TMP_STEM_BYTES = 200


def temporary_beside(path: str, directory: str, suffix: str = "") -> str:
    """A fresh name for a temporary file in `directory` (the folder of `path`), that a save renames over `path`:
    hidden, `path`'s name cut to its first 200 bytes so that the 23 added (and `suffix`, up to 32) fit the 255 a
    file name may have, as `path`'s own name does, and random, so concurrent saves never share one."""
    if len(os.fsencode(suffix)) > 32:
        raise ValueError(f"a temporary's suffix has at most 32 bytes, got {suffix!r}")
    stem = os.path.basename(path)[:_TMP_STEM_BYTES]
    while len(os.fsencode(stem)) > _TMP_STEM_BYTES:
        stem = stem[:-1]
    return os.path.join(directory, f".{stem}.{secrets.token_hex(6)}.thaw-tmp{suffix}")


def _create_beside(path: str, directory: str) -> tuple[int, str]:
    """A new temporary file in `directory` (read-write: a fill maps it), with the mode the snapshot at `path`
    will have: that of the regular file it replaces, else 0666 less the umask (applied by the kernel at
    creation, as for `open`)."""
    try:
        existing = os.lstat(path)
        keep = stat.S_IMODE(existing.st_mode) if stat.S_ISREG(existing.st_mode) else None
    except FileNotFoundError:
        keep = None
    for _ in range(100):
        tmp = temporary_beside(path, directory)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as exc:  # a folder the user may not write in, a read-only or full filesystem
            raise _naming_target(exc, path, tmp) from None
        if keep is not None:
            try:
                os.fchmod(fd, keep)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {path!r}")


# Set on an OSError a staged fill or the progress hook raised: about their own affairs, never the file being saved.
_NOT_THE_TARGET = "_thaw_not_the_target"


def _naming_target(exc: OSError, path: str, tmp: str) -> OSError:
    """`exc`, when it names the temporary file (or no file: a write's ENOSPC), as the same error with the same
    errno and strerror naming the user's `path`, raised from the same frames: the temporary is gone, and its name
    means nothing to them. An error of a class not built in (a fill's RemoteReadError: its own constructor), or
    one a staged fill or the progress hook raised (_not_the_target: about no file of the save's, its missing name
    is no cue), is `exc` itself."""
    if exc.errno is None or exc.filename not in (None, tmp) or type(exc).__module__ != "builtins" \
            or getattr(exc, _NOT_THE_TARGET, False):
        return exc
    return type(exc)(exc.errno, exc.strerror, path).with_traceback(exc.__traceback__)


def _check_readable(doc: dict, tensors: list) -> None:
    """Run the reader's document checks on what is about to be written (member types and ranges, e.g. a
    number past binary64 or checkpoint names that are not strings), so a writer never emits a file its
    reader refuses."""
    by_name = dict(tensors)
    try:
        decode(doc, by_name.__getitem__, list(by_name))
    except CorruptSnapshotError as exc:
        raise ValueError(f"snapshot cannot be written: {exc}") from None


def _check_binary_stream(stream) -> None:
    """Refuse, before the first write, a path (save's) and a text stream (it takes str, not bytes)."""
    if isinstance(stream, (str, bytes, os.PathLike)):
        raise TypeError(f"write() streams to a binary file object, got a path ({type(stream).__name__}): "
                        "use thaw_format.save(snapshot, path)")
    if isinstance(stream, io.TextIOBase):
        raise TypeError("write() needs a binary stream, got a text stream: use sys.stdout.buffer, or open the file "
                        "with 'wb'")
    if not callable(getattr(stream, "write", None)):
        raise TypeError(f"write() needs a stream with a write method, got {type(stream).__name__}")


def _write_all(stream, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = stream.write(view)
        if written is None:  # a non-blocking raw stream that could not take anything yet
            continue
        view = view[written:]


def unwritten(target, chunk_size: int):
    """A fill (EncodedSnapshot.write_into) that leaves its region as it is, for other writers to put in place,
    and returns zero checksums: placeholders, which reseal replaces once the region is written (a tensor-parallel
    engine's ranks), or which a reader that verified the file would refuse (a remote source's KV, read from its
    sender)."""
    return numpy.zeros(-(-len(target) // chunk_size), numpy.uint32)


def reseal(buffer, names) -> str:
    """Checksum anew the named tensors of the snapshot written in `buffer`, from the bytes their regions hold
    now, and write its trailer again; return the snapshot's id. For tensors that other writers put in place after
    write_into, their fills having written nothing and returned placeholder checksums (a tensor-parallel engine's
    ranks, each writing its KV heads' share of every page): one more pass over those bytes."""
    view = memoryview(buffer).cast("B")
    with SnapshotFile(view) as snapshot_file:  # header and trailer checked
        layout = snapshot_file.layout
        regions = [snapshot_file.info(name)[2] for name in names]
    crcs = decode_trailer(view[layout.trailer_offset : layout.file_length], layout)
    for region in regions:
        crcs[region.first_chunk : region.first_chunk + region.num_chunks] = mover.chunk_crcs(
            view[region.offset : region.end], region.chunk_size)
    trailer, snapshot_id = _sealed(bytes(view[: layout.header_length]), crcs)
    view[layout.trailer_offset : layout.file_length] = trailer
    return snapshot_id


def _sealed(header: bytes, crcs: array) -> tuple[bytes, str]:
    """The trailer of a snapshot's chunk checksums, and the snapshot's id (its header and trailer digested)."""
    trailer = encode_trailer(crcs)
    return trailer, content_id(header, trailer)


def save(snapshot: Snapshot, path, *, chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress = None,
         durable: bool = True) -> str:
    """Write `snapshot` to `path` atomically; returns the snapshot id and sets `snapshot.id`.

    The new file is renamed over `path`: a crash leaves the old snapshot or the new one. Its mode is that of
    the regular file it replaces, else 0666 less the umask. A symlink at `path` is replaced by the new file;
    the link's target is not written (pass `os.path.realpath(path)` to write through the link).
    `durable=False` skips the fsyncs: still atomic, but a power loss may lose the new file (see
    EncodedSnapshot.save)."""
    snapshot.id = EncodedSnapshot(snapshot, chunk_size=chunk_size).save(path, progress, durable=durable)
    return snapshot.id


def write(snapshot: Snapshot, stream, *, chunk_size: int = DEFAULT_CHUNK_SIZE, progress: Progress = None) -> str:
    """Stream `snapshot` to `stream` in one pass; returns the snapshot id and sets `snapshot.id`."""
    snapshot.id = EncodedSnapshot(snapshot, chunk_size=chunk_size).write_to(stream, progress)
    return snapshot.id


def dumps(snapshot: Snapshot, *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes:
    """The snapshot's bytes, identical to what `save` writes to disk."""
    encoded = EncodedSnapshot(snapshot, chunk_size=chunk_size)
    buffer = bytearray(encoded.nbytes)
    snapshot.id = encoded.write_into(buffer)
    return bytes(buffer)
