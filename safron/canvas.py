"""The on-disk canvas that finished rows are written to, and the journal that makes renders resumable.

The canvas is a raw uint8 RGB file (height x width x 3, row-major) next to the output. The accumulator
finalises rows straight into a memory-mapped window of it; each window is unmapped as soon as it is written,
because mapped pages count in the process's resident memory and a whole-slide canvas is tens of gigabytes.
Its disk blocks are reserved when it is opened (posix_fallocate): a store through a memory map that finds the
disk full is not an error Python can catch but SIGBUS, which kills the process, so the disk must be full before
the first row is written or not at all. Where a filesystem cannot reserve blocks, the rows are written with
plain writes instead, whose failures are ordinary OSErrors.

The journal is a JSON-lines file: a header that pins everything that determines the output bytes (mask
identity, model hash, geometry, blend, batch size), then one line per finished band with the number of rows
that are final on the canvas. A band's line is appended only after the canvas is synced to disk, so after a
crash the journal never claims rows the canvas does not hold. `JournalThread` does the syncing and appending
off the render's main thread: writing a whole-slide band to disk takes as long as the disk needs, and done
inline (an msync per finalised block) it was most of the main thread's time in CPU renders. When every row is
rendered, a last line names the file about to be renamed onto the output (`record_output`); the journal is removed
after the canvas, last of all, so a render killed after the rename leaves a journal that says its output is complete.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import SafronInputError


def side_paths(out_path: Path) -> tuple[Path, Path]:
    """(canvas, journal) paths for a render to `out_path`: next to it, named after it, so users see what they are."""
    return out_path.with_name(out_path.name + ".safron-canvas"), out_path.with_name(out_path.name + ".safron-journal")


def lock_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.name + ".safron-lock")


class OutputLock:
    """An exclusive lock on one output path, held for a whole render: two renders to the same OUT would write the
    same canvas, journal and partial TIFF, and the first to finish would move a mix of both into place.

    The lock is flock(2) on `OUT.safron-lock`, which holds the holder's pid for the message the next process
    prints. flock belongs to the open file, so the kernel releases it whenever the holder exits, however it
    exits (SIGKILL, out of memory, a crash): a lock file left behind by a dead process is not locked and is
    simply taken over. Deciding staleness from the pid instead would be racy and wrong where pids are reused or
    the holder runs on another host. The holder removes the file before releasing the lock; a process that
    opened it just before that then holds a lock on a removed file, so every acquisition checks that the path
    still names the file it locked, and starts again if not.
    """

    def __init__(self, out_path: Path):
        self.out_path, self.path = Path(out_path), lock_path(Path(out_path))
        self._fd = -1

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                # A pseudo filesystem (/proc) passes every earlier check and refuses here: say so, not "no space".
                raise SafronInputError(
                    f"{self.out_path}: cannot create {self.path.name} in {self.path.parent} ({exc.strerror})"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f"process {holder}" if holder else "another process"
                raise SafronInputError(
                    f"{self.out_path}: {who} is rendering to this output (it holds {self.path.name}); "
                    "wait for it to finish or stop it"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(self.path)
            except FileNotFoundError:
                current = None
            opened = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino):
                break
            os.close(fd)  # locked a file its holder had just removed: the path is free again, try once more
        self._fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Remove the lock file and release the lock, in that order (see the class docstring)."""
        if self._fd < 0:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None  # not written yet by a holder that has only just taken the lock


def write_at(fd: int, data: np.ndarray, offset: int) -> None:
    """Write all of the contiguous array `data` at `offset` of file `fd` (pwrite: positional, so threads may write
    one file at once; it releases the GIL). A write may be short (the disk filling up); the next one then raises
    the OSError."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def write_block_at(fd: int, block: np.ndarray, y0: int, x0: int, width: int) -> None:
    """Write a (rows, cols, 3) uint8 block at row y0, column x0 of a raw row-major RGB file `width` pixels wide:
    one write when the block spans whole rows (they lie back to back in the file), else one per row."""
    row_bytes = width * 3
    if block.shape[1] == width:
        write_at(fd, np.ascontiguousarray(block), y0 * row_bytes)
    else:
        for row in range(block.shape[0]):
            write_at(fd, np.ascontiguousarray(block[row]), (y0 + row) * row_bytes + x0 * 3)


# posix_fallocate's answers for "this filesystem cannot reserve blocks" (glibc emulates it where the kernel says
# EOPNOTSUPP, but not everywhere: O_APPEND, some FUSE and network filesystems).
_CANNOT_RESERVE = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENODEV})


class Canvas:
    """`reserved` says whether the file's blocks are allocated, so that rows may be written through memory maps.
    Opening raises OSError (ENOSPC when the disk cannot hold the whole canvas) with nothing reserved."""

    def __init__(self, path: Path, height: int, width: int, *, create: bool):
        self.path, self.height, self.width = Path(path), height, width
        self.row_bytes = width * 3
        self.size = height * self.row_bytes
        if create:
            with open(self.path, "wb") as f:
                f.truncate(self.size)
        elif not self.path.is_file() or self.path.stat().st_size != self.size:
            raise SafronInputError(f"cannot resume: canvas {self.path} is missing or has the wrong size")
        self._fd = os.open(self.path, os.O_RDWR)
        try:
            # Also on resume: the canvas may come from a render whose disk could not reserve it, or have been copied
            # sparsely. Blocks already allocated keep their bytes.
            os.posix_fallocate(self._fd, 0, self.size)
            self.reserved = True
        except OSError as exc:
            if exc.errno not in _CANNOT_RESERVE:
                self.close()
                raise
            self.reserved = False

    @contextmanager
    def rows(self, y0: int, y1: int):
        """A writable (y1-y0, width, 3) view of canvas rows, stored on exit (not synced: see `sync`)."""
        with self.block(y0, y1, 0, self.width) as view:
            yield view

    @contextmanager
    def block(self, y0: int, y1: int, x0: int, x1: int):
        """A writable (y1-y0, x1-x0, 3) view of a block of the canvas, stored on exit unless an exception leaves
        the block (not synced: see `sync`). A window of a memory map (unmapped on exit) when the canvas is
        reserved; otherwise a buffer written with plain writes, whose failures raise OSError instead of SIGBUS."""
        if self.reserved:
            view = np.memmap(self.path, dtype=np.uint8, mode="r+", offset=y0 * self.row_bytes,
                             shape=(y1 - y0, self.width, 3))
            try:
                yield view[:, x0:x1]
            finally:
                del view
            return
        buffer = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        yield buffer
        write_block_at(self._fd, buffer, y0, x0, self.width)

    def write(self, y0: int, x0: int, pixels: np.ndarray) -> None:
        """Write a (rows, cols, 3) uint8 block at row y0, column x0 with plain writes (not synced: see `sync`).

        For pixels that already sit in a buffer of their own (a GPU accumulator's pinned staging memory): a
        write(2) of whole rows costs about 1 ns a pixel, copying into a fresh memory map about 8 (page faults).
        Whole-width blocks go in one call."""
        rows, cols = pixels.shape[:2]
        if pixels.dtype != np.uint8 or pixels.shape[2:] != (3,) or y0 + rows > self.height or x0 + cols > self.width:
            raise ValueError(f"cannot write {pixels.dtype} {pixels.shape} at ({y0}, {x0}) into a {self.height} x "
                             f"{self.width} canvas")
        write_block_at(self._fd, pixels, y0, x0, self.width)

    def sync(self) -> None:
        """Write every row written so far to disk (pages written through unmapped windows included)."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def file_identity(path: Path) -> list[int]:
    """(device, inode) of a file: what a rename keeps and no other file shares while this one exists."""
    info = os.stat(path)
    return [info.st_dev, info.st_ino]


class Journal:
    """Append-only record of finished bands; `header` must match exactly for a resume to be allowed.

    `rows_done`: rows final on the canvas. `output`: what `record_output` last recorded, else None."""

    def __init__(self, path: Path, header: dict, *, resume: bool):
        self.path = Path(path)
        self.header = header
        self.rows_done = 0
        self.output: dict | None = None
        if resume:
            self.rows_done, self.output = self._load()
        else:
            with open(self.path, "w") as f:
                f.write(json.dumps(header, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._file = open(self.path, "a")

    def _load(self) -> int:
        try:
            lines = self.path.read_text().splitlines()
            saved = json.loads(lines[0])
        except (OSError, IndexError, ValueError):
            raise SafronInputError(f"cannot resume: no readable journal at {self.path}") from None
        for key, value in self.header.items():
            if saved.get(key) != value:
                raise SafronInputError(
                    f"cannot resume: {key} differs from the interrupted render ({saved.get(key)!r} != {value!r})"
                )
        rows_done, output = 0, None
        for line in lines[1:]:
            try:
                entry = json.loads(line)
                if "output" in entry:
                    output = {"output": [int(value) for value in entry["output"]], "options": entry["options"]}
                else:
                    rows_done = int(entry["rows_done"])
            except (ValueError, KeyError, TypeError):
                break  # a line torn by the crash: everything before it is valid
        return rows_done, output

    def record(self, rows_done: int) -> None:
        self._append({"rows_done": rows_done})
        self.rows_done = rows_done

    def record_output(self, identity: list[int], options: dict) -> None:
        """Say, durably, that the file with this `file_identity`, written with these output `options` (those that the
        header leaves out because the canvas does not depend on them), becomes the output once renamed into place:
        whoever finds the output with that identity knows it complete, the rename being the writer's last step."""
        entry = {"output": identity, "options": options}
        self._append(entry)
        self.output = json.loads(json.dumps(entry))  # as _load would read it back

    def output_is(self, out_path: Path, options: dict) -> bool:
        """Whether `out_path` is the file `record_output` named, written with `options`: then the render finished,
        even if its clean-up did not."""
        if self.output is None or self.output["options"] != json.loads(json.dumps(options)):
            return False
        try:
            return file_identity(out_path) == self.output["output"]
        except OSError:
            return False

    def _append(self, entry: dict) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


class JournalThread:
    """Records finished rows from a background thread: sync the canvas, then append the journal line.

    `submit(rows_done)` returns at once. Requests that arrive while a sync runs collapse into the latest, so a
    slow disk costs resume granularity, never render speed. An error in the thread (a full disk) is raised by
    the next `submit` or by `close`, which records the last request first unless told the journal is no longer
    wanted (a finished render deletes it, so syncing the canvas then would be wasted disk work).
    """

    def __init__(self, canvas: Canvas, journal: Journal):
        self._canvas, self._journal = canvas, journal
        self._pending: int | None = None
        self._closing = False
        self._error: BaseException | None = None
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="safron-journal", daemon=True)
        self._thread.start()

    def submit(self, rows_done: int) -> None:
        with self._wake:
            self._raise_error()
            self._pending = rows_done
            self._wake.notify()

    def close(self, record_pending: bool = True) -> None:
        with self._wake:
            if not record_pending:
                self._pending = None
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._closing:
                    self._wake.wait()
                rows_done, self._pending = self._pending, None
                if rows_done is None:
                    return
            try:
                self._canvas.sync()
                self._journal.record(rows_done)
            except BaseException as exc:  # noqa: BLE001 - handed to the render thread by submit/close
                with self._wake:
                    self._error = exc
                return
