"""A raw uint8 RGB image in a file: height x width x 3, row-major, no header. The render's canvas (`canvas.open_canvas`)
and the pyramid writer's scratch level files (`pyramid_tiff`) are both one, read and written by blocks.

Reads and writes are positional (pread/pwrite), never seek + read: the pyramid writer reads and reduces blocks on
several threads at once, each at its own offsets of the same file, and the calls release the GIL. A file whose disk
blocks are reserved (`reserve=True`, posix_fallocate) may also be written through memory-mapped windows (`block`):
a store through a memory map that finds the disk full is not an error Python can catch but SIGBUS, which kills the
process, so a file is mapped only when the disk cannot fill up under it. Each window is unmapped as soon as it is
written, because mapped pages count in the process's resident memory and a whole-slide image is tens of gigabytes.
Where a filesystem cannot reserve blocks, `block` writes with plain writes instead, whose failures are ordinary
OSErrors.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

_SAMPLES = 3

# posix_fallocate's answers for "this filesystem cannot reserve blocks" (glibc emulates it where the kernel says
# EOPNOTSUPP, but not everywhere: O_APPEND, some FUSE and network filesystems).
_CANNOT_RESERVE = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.ENODEV})

# "create": a new file of the image's size (sparse until written; an existing one is emptied), read and written;
# "update": an existing file, read and written; "read": an existing file, read only.
_OPEN_FLAGS = {
    "create": os.O_RDWR | os.O_CREAT | os.O_TRUNC,
    "update": os.O_RDWR,
    "read": os.O_RDONLY,
}


def size_problem(path: str | os.PathLike[str], height: int, width: int) -> str | None:
    """Why the file at `path` cannot be a height x width raw image (missing, or another size), or None."""
    path, expected = Path(path), height * width * _SAMPLES
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != expected:
        return f"{path} holds {size} bytes, not {height} x {width} x {_SAMPLES} = {expected}"
    return None


def reserve(fd: int, size: int) -> bool:
    """Allocate the disk blocks of the first `size` bytes of the open file `fd`, so that writing them through a
    memory map cannot fail (a write the disk cannot take kills the writer with SIGBUS). False where the filesystem
    cannot reserve blocks; OSError (ENOSPC) where it has no room for them."""
    try:
        os.posix_fallocate(fd, 0, size)
        return True
    except OSError as exc:
        if exc.errno not in _CANNOT_RESERVE:
            raise
        return False


class RawImageFile:
    """An open raw image file (see the module docstring). `reserved` says whether its disk blocks are allocated, so
    that `block` may hand out memory-mapped windows. Opening raises OSError (with `reserve`, ENOSPC when the disk
    cannot hold the whole image) and leaves no file descriptor open; what it created stays for the caller."""

    def __init__(self, path: str | os.PathLike[str], height: int, width: int, mode: str, *, reserve: bool = False):
        self.path, self.height, self.width = Path(path), height, width
        self.row_bytes = width * _SAMPLES
        self.size = height * self.row_bytes
        self._fd = os.open(self.path, _OPEN_FLAGS[mode], 0o666)
        self.reserved = False
        try:
            if mode == "create":
                os.ftruncate(self._fd, self.size)
            if reserve:
                self._reserve()
        except BaseException:
            self.close()
            raise

    def _reserve(self) -> None:
        # Also for a file that exists (a canvas resumed): it may come from a render whose disk could not reserve it,
        # or have been copied sparsely. Blocks already allocated keep their bytes.
        self.reserved = reserve(self._fd, self.size)

    def read_block(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """A fresh (y1-y0, x1-x0, 3) array of the pixels of a block: one read when it spans whole rows (they lie
        back to back in the file), else one per row."""
        block = np.empty((y1 - y0, x1 - x0, _SAMPLES), np.uint8)
        if x1 - x0 == self.width:
            self._read_into(self._offset(y0, 0), block)
        else:
            for row in range(y1 - y0):
                self._read_into(self._offset(y0 + row, x0), block[row])
        return block

    def write_block(self, y0: int, x0: int, pixels: np.ndarray) -> None:
        """Write a (rows, cols, 3) uint8 block at row y0, column x0 with plain writes (not synced: see `sync`): one
        write when the block spans whole rows, else one per row.

        Also for pixels that already sit in a buffer of their own (a GPU accumulator's pinned staging memory): a
        write(2) of whole rows costs about 1 ns a pixel, copying into a fresh memory map about 8 (page faults)."""
        rows, cols = pixels.shape[:2]
        if pixels.dtype != np.uint8 or pixels.shape[2:] != (_SAMPLES,) or y0 + rows > self.height or (
                x0 + cols > self.width):
            raise ValueError(f"cannot write {pixels.dtype} {pixels.shape} at ({y0}, {x0}) into a {self.height} x "
                             f"{self.width} image ({self.path})")
        if cols == self.width:
            self._write_from(self._offset(y0, 0), np.ascontiguousarray(pixels))
        else:
            for row in range(rows):
                self._write_from(self._offset(y0 + row, x0), np.ascontiguousarray(pixels[row]))

    @contextmanager
    def block(self, y0: int, y1: int, x0: int, x1: int):
        """A writable (y1-y0, x1-x0, 3) view of a block of the image, stored by exit (not synced: see `sync`). A
        window of a memory map (unmapped on exit) when the file is reserved, where what was written before an
        exception stays written; otherwise a buffer written with plain writes on a normal exit only, whose failures
        raise OSError instead of SIGBUS."""
        if self.reserved:
            view = np.memmap(self.path, dtype=np.uint8, mode="r+", offset=y0 * self.row_bytes,
                             shape=(y1 - y0, self.width, _SAMPLES))
            try:
                yield view[:, x0:x1]
            finally:
                del view
            return
        buffer = np.empty((y1 - y0, x1 - x0, _SAMPLES), np.uint8)
        yield buffer
        self.write_block(y0, x0, buffer)

    def sync(self) -> None:
        """Write everything written so far to disk (pages written through unmapped windows included)."""
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def _offset(self, y: int, x: int) -> int:
        return y * self.row_bytes + x * _SAMPLES

    def _read_into(self, offset: int, destination: np.ndarray) -> None:
        view = memoryview(destination).cast("B")
        end = offset + len(view)
        while view:
            count = os.preadv(self._fd, [view], offset)
            if not count:
                raise RuntimeError(f"{self.path}: raw image file ends before byte {end} (truncated?)")
            view, offset = view[count:], offset + count

    def _write_from(self, offset: int, data: np.ndarray) -> None:
        """Write all of the contiguous array `data` at `offset`. A write may be short (the disk filling up); the next
        one then raises the OSError."""
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written
