"""The on-disk canvas that finished rows are written to, the journal that makes renders resumable, and the lock that
keeps one render at a time on an output.

The canvas is a raw uint8 RGB file (height x width x 3, row-major) next to the output, a `raw_image.RawImageFile`.
The accumulator finalises rows straight into memory-mapped windows of it. Its disk blocks are reserved when it is
opened (posix_fallocate): a store through a memory map that finds the disk full is SIGBUS, which kills the process,
so the disk must be full before the first row is written or not at all (where a filesystem cannot reserve blocks,
rows are written with plain writes, whose failures are ordinary OSErrors; see `raw_image`).

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

import fcntl
import json
import os
import threading
from pathlib import Path

from .errors import SafronInputError
from .raw_image import RawImageFile, size_problem


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


def open_canvas(path: Path, height: int, width: int, *, create: bool) -> RawImageFile:
    """The canvas of a render: created empty, or the existing one of a render being resumed, with its disk blocks
    reserved (`RawImageFile.reserved` says whether the filesystem could). Raises OSError (ENOSPC when the disk cannot
    hold the whole canvas) with nothing reserved."""
    path = Path(path)
    if not create and (problem := size_problem(path, height, width)):
        raise SafronInputError(f"cannot resume: canvas {problem}")
    return RawImageFile(path, height, width, "create" if create else "update", reserve=True)


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
        # Both ways: an entry only one side has (say, the noise seed, left out at its default) differs too.
        for key in sorted(self.header.keys() | saved.keys()):
            if saved.get(key) != self.header.get(key):
                raise SafronInputError(f"cannot resume: {key} differs from the interrupted render "
                                       f"({saved.get(key)!r} != {self.header.get(key)!r})")
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

    def __init__(self, canvas: RawImageFile, journal: Journal):
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
