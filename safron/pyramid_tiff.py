"""Streaming writer of pyramidal, tiled BigTIFF files that OpenSlide, QuPath and ASAP open.

The render engine finalises the output image into a raw RGB canvas file, in full-width stripes,
top to bottom, over minutes to hours. `PyramidTiffWriter` encodes level-0 tiles from that file as
soon as a whole tile row of it is final, so encoding overlaps rendering, and builds the reduced
levels on the side. Its memory is a few blocks of `tile` rows x a few tiles plus tifffile's
compression batch: independent of the image width and height.

* Level 0 is always read from a raw uint8 file, height x width x 3, row-major: either the caller's
  canvas (``canvas=path``; the caller announces final rows with `rows_ready`), or a temporary copy
  the writer makes of the rows given to `write_rows`.
* A background thread waits for each complete tile row and hands its tiles, in order, to tifffile's
  ``TiffWriter.write`` (which compresses them on ``workers`` threads). The tiles come from blocks
  (``tile`` rows x `_BLOCK_TILES` tiles) that a few more threads read back, reduce 2x2 into the
  next level's raw file and cut into tiles, a few blocks ahead. Level k >= 1 is then streamed the
  same way from its raw file, building level k+1.
* Raw files (`raw_image.RawImageFile`) are accessed with plain reads and writes at offsets, never a
  memory map: pages touched through a map count towards the process's resident memory, while a
  block read into its own buffer is freed once encoded.

File layout (what OpenSlide's generic-TIFF reader expects):

* BigTIFF, tiles ``tile`` x ``tile`` (256 by default), RGB, 8 bits per sample.
* One top-level IFD per level: level 0 first, then each reduced level with NewSubfileType = 1.
  Reduced levels are not SubIFDs because OpenSlide ignores SubIFDs.
* Reduced levels halve the previous level until it fits in one tile. Each output pixel is the mean
  of the 2x2 block it covers, rounded to nearest with halves rounded up; for an odd height or
  width the last row/column of the reduced level averages only the 2 (or, in the corner, 1) pixels
  that exist, so a level of h x w pixels gives ceil(h/2) x ceil(w/2).
* JPEG tiles are written with photometric RGB input that tifffile stores as YCbCr with 2x2 chroma
  subsampling (PhotometricInterpretation = YCbCr, as Aperio and libtiff do), one complete JPEG
  stream per tile.
* Partial edge tiles are padded by repeating the last row/column: zero padding would put a hard
  edge inside the last JPEG blocks and ring into the real pixels next to it.
* With ``mpp``, XResolution/YResolution are pixels per centimetre (ResolutionUnit = 3) at each
  level's nominal scale ``mpp * 2**k``, so OpenSlide reports ``openslide.mpp-x == mpp``. Without
  it, tifffile writes the baseline-required X/YResolution = 1 with ResolutionUnit = 1 (no absolute
  unit), which readers treat as "resolution unknown".

The TIFF is written to ``<out_path>.partial`` and renamed onto ``out_path`` only once complete and
synced, so a failed or interrupted render never leaves a file that looks finished; the raw level
files are ``<out_path>.level<k>.raw`` (level 0 only without a canvas). Every temporary file is
removed on close, abort or failure; the caller's canvas is only ever read. Output bytes depend only
on the pixels, the options and the tifffile/imagecodecs versions (not on how rows were announced,
nor on the worker count).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile

from . import _core
from .errors import OutputWriteError, SafronInputError
from .files import partial_path
from .raw_image import RawImageFile, size_problem
from .slide_io import check_free_space, check_output_path

# Our names for the codecs -> tifffile's names. WebP is deliberately absent: OpenSlide cannot
# decode WebP tiles, so such a slide would open nowhere that matters to our users.
_TIFFFILE_COMPRESSION = {"jpeg": "jpeg", "zstd": "zstd", "deflate": "zlib", "none": None}
COMPRESSIONS = tuple(_TIFFFILE_COMPRESSION)

_SAMPLES = 3
_CENTIMETRE_IN_MICRONS = 1e4
# Tiles per block read from a raw level file: wide enough that each row segment is one sizeable
# read (12 KB at 256-pixel tiles; 4 tiles made reading a quarter of the encoder's time in
# syscalls), narrow enough that a block and its reduction stay about 4 MB whatever the image width.
_BLOCK_TILES = 16
# Tiles per encoding worker that tifffile gathers before handing a batch to its thread pool;
# enough to keep every worker busy across a batch, small enough to stay a few MB per worker.
_TILES_BUFFERED_PER_WORKER = 16


class _Aborted(Exception):
    """Raised inside the writer thread to unwind tifffile when the caller aborts."""


def pyramid_shapes(height: int, width: int, tile: int = 256) -> list[tuple[int, int]]:
    """(height, width) of every pyramid level: level 0, then halved (rounding up) until the level
    fits in one tile."""
    shapes = [(height, width)]
    while height > tile or width > tile:
        height, width = -(-height // 2), -(-width // 2)
        shapes.append((height, width))
    return shapes


def scratch_bytes(height: int, width: int, tile: int = 256, *, with_canvas: bool) -> int:
    """Peak bytes of the raw level files a writer keeps next to its output: while level k is encoded, its raw file
    and that of level k+1 (being built) coexist. With a canvas, level 0 is the caller's file and counts nothing."""
    raw = [h * w * _SAMPLES for h, w in pyramid_shapes(height, width, tile)]
    if with_canvas:
        raw[0] = 0
    return max(size + next_size for size, next_size in zip(raw, raw[1:] + [0]))


def _level_path(out_path: Path, level: int) -> Path:
    return out_path.with_name(f"{out_path.name}.level{level}.raw")


def temporary_paths(out_path, height: int, width: int, tile: int = 256, *, with_canvas: bool) -> list[Path]:
    """Every temporary file a writer of out_path may create (the caller's canvas is never one): for whoever must
    clean up after a writer that could not (`encoder_process`, when its child dies)."""
    out_path = Path(out_path)
    first_level = 1 if with_canvas else 0
    levels = range(first_level, len(pyramid_shapes(height, width, tile)))
    return [partial_path(out_path)] + [_level_path(out_path, level) for level in levels]


def uncompressed_tiff_bytes(height: int, width: int, tile: int = 256) -> int:
    """The size of the pyramid's tiles uncompressed (partial edge tiles are stored whole)."""
    tile_bytes = tile * tile * _SAMPLES
    return sum(math.ceil(h / tile) * math.ceil(w / tile) * tile_bytes for h, w in pyramid_shapes(height, width, tile))


def halve(band: np.ndarray) -> np.ndarray:
    """2x2 mean of a uint8 (h, w, 3) band, rounded to nearest (halves up), ceil(h/2) x ceil(w/2).

    An odd last row/column counts as repeated, which gives exactly the mean over the pixels that exist
    (e.g. (2a + 2b + 2) >> 2 == (a + b + 1) >> 1), so edges need no separate formula. In the C++ core
    (csrc/cpu/pyramid.cpp), with the GIL released: in numpy it was the encoder's largest cost.
    """
    return _core.halve_rgb(band)


def _full_tile(block: np.ndarray, tile: int) -> np.ndarray:
    """A tile x tile x 3 array from a block at most that size, padded by edge repetition.

    A full tile is a view of its block, not a copy: the block is freed once tifffile has taken all of its tiles,
    which holds as much memory as copies would, without the copying.
    """
    missing_rows, missing_columns = tile - block.shape[0], tile - block.shape[1]
    if missing_rows or missing_columns:
        return np.pad(block, ((0, missing_rows), (0, missing_columns), (0, 0)), mode="edge")
    return block


class ClosedOnExit:
    """`with` for the TIFF writers (this module's and `encoder_process`'s): leaving the block normally finishes the
    file (`close`), leaving it by an exception aborts it (`abort`). They keep their state in `_state`."""

    _state: str

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()


class PyramidTiffWriter(ClosedOnExit):
    """Writes a pyramidal tiled BigTIFF from an image that becomes final top to bottom.

    Two ways to feed it, one per writer:

    * ``canvas=path``: the caller writes the level-0 pixels into its own raw uint8 file (height x
      width x 3, row-major, already of that size) and calls `rows_ready(y)` whenever rows [0, y)
      are final there. The writer only reads that file and never removes it.
    * no canvas: the caller hands the rows over with `write_rows`, which copies them into a
      temporary raw file next to the output.

    Use as a context manager: leaving the block normally finishes the file, leaving it by an
    exception removes every temporary file and leaves `out_path` as it was::

        with PyramidTiffWriter("slide.tif", height, width, mpp=0.5) as writer:
            for y0, stripe in stripes:
                writer.write_rows(y0, stripe)

    `compression` is one of "jpeg" (lossy, `quality` 1..100), "zstd" or "deflate" (lossless, with
    the horizontal predictor) or "none"; `quality` is ignored by the lossless ones. `mpp` is the
    level-0 pixel size in micrometres, one number or (mpp_x, mpp_y). `workers` is the number of
    tile-compression threads (None: tifffile's default, half the CPU cores up to 32).
    `description` (7-bit ASCII) becomes level 0's ImageDescription (OpenSlide's
    "openslide.comment").

    Neither `rows_ready` nor `write_rows` waits for the encoder, which simply lags behind; `close`
    waits for it. Memory: about one block of `tile` rows x 16 tiles (with its reduction and tiles)
    per block-preparing thread and as many again prepared ahead, plus 16 tiles per worker buffered
    by tifffile, whatever the image size (tifffile also keeps 16 bytes per tile for the offset
    tables). `workers` // 2 threads (at least one) prepare blocks.
    Errors: a path that cannot be written, a disk that cannot hold the temporary files, or a canvas
    that is missing or of the wrong size raises `SafronInputError` here. Any failure of the
    background thread is raised by the next `rows_ready`, `write_rows` or `close`, after the
    temporary files have been removed; an I/O error (the disk filling up) becomes a one-line
    `OutputWriteError` (a `SafronInputError`). Calls out of order, with malformed rows, or meant
    for the other mode raise `ValueError` and change nothing.
    """

    def __init__(
        self,
        out_path: str | os.PathLike[str],
        height: int,
        width: int,
        *,
        compression: str = "jpeg",
        quality: int = 90,
        mpp: float | tuple[float, float] | None = None,
        tile: int = 256,
        workers: int | None = None,
        description: str | None = None,
        canvas: str | os.PathLike[str] | None = None,
    ) -> None:
        self.out_path = Path(out_path)
        self.height = _positive_int(height, "height")
        self.width = _positive_int(width, "width")
        self._tile = _positive_int(tile, "tile")
        if self._tile % 16:
            raise ValueError(f"tile must be a multiple of 16 (TIFF tiles), got {tile}")
        self._compression = self._check_compression(compression)
        self._quality = self._check_quality(quality)
        self._mpp = self._check_mpp(mpp)
        self._workers = None if workers is None else _positive_int(workers, "workers")
        if description is not None and not description.isascii():
            raise ValueError("description must be 7-bit ASCII (TIFF ASCII tag)")
        self._description = description

        self.level_shapes = pyramid_shapes(self.height, self.width, self._tile)
        self._partial_path = partial_path(self.out_path)
        self._level_paths = {level: _level_path(self.out_path, level) for level in range(len(self.level_shapes))}
        self._owns_level0 = canvas is None
        if canvas is not None:
            self._level_paths[0] = Path(canvas)
            self._check_canvas()
        self._tiff_file = self._open_partial_file()
        self._level0_writer: RawImageFile | None = None
        self._level0_reader: RawImageFile | None = None
        try:
            if self._owns_level0:
                self._level0_writer = RawImageFile(self._level_paths[0], self.height, self.width, "create")
            self._level0_reader = RawImageFile(self._level_paths[0], self.height, self.width, "read")
        except OSError as error:
            self._tiff_file.close()
            self._remove_temporaries()
            raise SafronInputError(
                f"{self.out_path}: cannot open {self._level_paths[0]}: {error.strerror}"
            ) from error

        self._rows_ready = 0
        self._rows_ready_changed = threading.Condition()
        self._idle_seconds = self._thread_seconds = 0.0
        self._abort_requested = threading.Event()
        self._failure: BaseException | None = None
        self._state = "open"
        self._thread = threading.Thread(
            target=self._write_pyramid, name=f"PyramidTiffWriter({self.out_path.name})", daemon=True
        )
        self._thread.start()

    # ----------------------------------------------------------------------------- public API

    def rows_ready(self, y: int) -> None:
        """Canvas mode: rows [0, y) of the canvas are final. `y` never decreases; returns at once."""
        self._require_open()
        self._raise_if_writer_failed()
        if self._owns_level0:
            raise ValueError(f"{self.out_path}: rows_ready is for a writer given a canvas; use write_rows")
        y = _index(y, "y")
        if not self._rows_ready <= y <= self.height:
            raise ValueError(
                f"{self.out_path}: rows_ready({y}) must lie between the rows already ready "
                f"({self._rows_ready}) and the image height ({self.height})"
            )
        self._announce(y)

    def write_rows(self, y0: int, rows: np.ndarray) -> None:
        """Append rows y0 .. y0+h-1: uint8 (h, width, 3), h >= 1, y0 == rows written so far.

        The rows are copied to the writer's level-0 file before this returns, so `rows` may be a
        reused buffer or a view into a memory-mapped canvas.
        """
        self._require_open()
        self._raise_if_writer_failed()
        if not self._owns_level0:
            raise ValueError(f"{self.out_path}: write_rows is for a writer without a canvas; use rows_ready")
        y0 = _index(y0, "y0")
        if y0 != self._rows_ready:
            raise ValueError(
                f"{self.out_path}: rows must arrive in order: expected y0={self._rows_ready}, got {y0}"
            )
        if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8:
            raise ValueError(f"rows must be a uint8 numpy array, got {getattr(rows, 'dtype', type(rows))}")
        if rows.ndim != 3 or rows.shape[1:] != (self.width, _SAMPLES) or rows.shape[0] < 1:
            raise ValueError(f"rows must have shape (h >= 1, {self.width}, 3), got {rows.shape}")
        y1 = y0 + rows.shape[0]
        if y1 > self.height:
            raise ValueError(f"rows {y0}..{y1 - 1} run past the image height {self.height}")
        try:
            self._level0_writer.write_block(y0, 0, rows)
            if y1 == self.height:
                self._level0_writer.close()
        except OSError as error:
            self._fail(error)
        self._announce(y1)

    def close(self) -> None:
        """Finish the file: wait for every level, then rename the temporary TIFF onto out_path."""
        if self._state == "closed":
            return
        self._require_open()
        self._raise_if_writer_failed()
        if self._rows_ready != self.height:
            self.abort()
            raise ValueError(
                f"{self.out_path}: closed after {self._rows_ready} of {self.height} rows; "
                "nothing was written"
            )
        self._thread.join()
        self._raise_if_writer_failed()
        self._tiff_file.close()
        try:
            os.replace(self._partial_path, self.out_path)
        except OSError as error:
            self._partial_path.unlink(missing_ok=True)
            self._state = "failed"
            raise SafronInputError(
                f"{self.out_path}: cannot move the finished TIFF into place: {error.strerror}"
            ) from error
        self._state = "closed"

    def abort(self) -> None:
        """Stop writing and remove every temporary file; out_path (and a canvas) are left as they were."""
        if self._state != "open":
            return
        self._discard()
        self._state = "aborted"

    # ------------------------------------------------------------------------- caller side

    def _check_compression(self, compression: str) -> str:
        if compression not in _TIFFFILE_COMPRESSION:
            reason = " (OpenSlide cannot read WebP tiles)" if str(compression).lower() == "webp" else ""
            raise SafronInputError(
                f"{self.out_path}: compression {compression!r} is not supported{reason}; "
                f"valid: {', '.join(COMPRESSIONS)}"
            )
        return compression

    def _check_quality(self, quality: int) -> int:
        if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not (
            1 <= quality <= 100
        ):
            raise SafronInputError(f"{self.out_path}: JPEG quality must be an integer 1..100, got {quality!r}")
        return int(quality)

    def _check_mpp(self, mpp) -> tuple[float, float] | None:
        if mpp is None:
            return None
        mpp_xy = (mpp, mpp) if np.isscalar(mpp) else tuple(mpp)
        try:
            mpp_xy = tuple(float(value) for value in mpp_xy)
        except (TypeError, ValueError):
            mpp_xy = ()
        if len(mpp_xy) != 2 or not all(math.isfinite(v) and v > 0 for v in mpp_xy):
            raise SafronInputError(
                f"{self.out_path}: mpp must be a positive number or (mpp_x, mpp_y), got {mpp!r}"
            )
        return mpp_xy

    def _check_canvas(self) -> None:
        problem = size_problem(self._level_paths[0], self.height, self.width)
        if problem:
            raise SafronInputError(f"canvas {problem}")

    def _open_partial_file(self) -> BinaryIO:
        check_output_path(self.out_path)
        check_free_space(self.out_path, self._disk_space_needed(), "the TIFF and its temporary files")
        try:
            return open(self._partial_path, "wb")  # noqa: SIM115 - owned until close/abort
        except OSError as error:
            raise SafronInputError(
                f"{self.out_path}: cannot create {self._partial_path.name}: {error.strerror}"
            ) from error

    def _disk_space_needed(self) -> int:
        """Bytes known in advance: the two raw level files that coexist while a level is encoded
        (a canvas already exists, so it counts as taking nothing more), plus, uncompressed, the
        TIFF itself. Compressed sizes are unknowable up front; running out later is reported when
        it happens."""
        temporaries = scratch_bytes(self.height, self.width, self._tile, with_canvas=not self._owns_level0)
        if self._compression != "none":
            return temporaries
        return temporaries + uncompressed_tiff_bytes(self.height, self.width, self._tile)

    def _announce(self, rows_ready: int) -> None:
        with self._rows_ready_changed:
            self._rows_ready = rows_ready
            self._rows_ready_changed.notify()

    def _require_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"{self.out_path}: the writer is {self._state}")

    def _raise_if_writer_failed(self) -> None:
        if self._failure is not None:
            self._fail(self._failure)

    def _fail(self, failure: BaseException) -> None:
        """Clean up after `failure` (of either thread) and raise it, I/O errors as `OutputWriteError`s."""
        self._stop_thread()
        code = failure.errno if isinstance(failure, OSError) else None
        if isinstance(failure, OSError) and code is None:
            code = self._errno_of_a_short_write()
        self._tiff_file.close()
        self._remove_temporaries()
        self._state = "failed"
        if isinstance(failure, OSError):
            reason = os.strerror(code) if code else str(failure)
            raise OutputWriteError(
                f"{self.out_path}: cannot write the TIFF or its temporary files: {reason}", errno=code
            ) from failure
        raise failure

    def _errno_of_a_short_write(self) -> int | None:
        """Why a write came up short. tifffile writes tiles with numpy's tofile, whose error on a full disk says only
        "N requested and M written", with no errno; one more write to the end of the partial TIFF, which is removed
        next, gets the system's reason (ENOSPC, EDQUOT, EFBIG). None if that write succeeds after all."""
        try:
            fd = self._tiff_file.fileno()
            os.pwrite(fd, bytes(1 << 16), os.fstat(fd).st_size)
        except OSError as exc:
            return exc.errno
        except ValueError:  # already closed
            pass
        return None

    def _discard(self) -> None:
        """Stop the writer thread and delete the partial TIFF and the raw level files."""
        self._stop_thread()
        self._tiff_file.close()
        self._remove_temporaries()

    def _stop_thread(self) -> None:
        self._abort_requested.set()
        with self._rows_ready_changed:
            self._rows_ready_changed.notify()
        self._thread.join()

    def _remove_temporaries(self) -> None:
        for level0_file in (self._level0_writer, self._level0_reader):
            if level0_file is not None:
                level0_file.close()
        self._partial_path.unlink(missing_ok=True)
        for level, path in self._level_paths.items():
            if level > 0 or self._owns_level0:
                path.unlink(missing_ok=True)

    # ------------------------------------------------------------------------- writer thread

    @property
    def busy_seconds(self) -> float:
        """Seconds the encoder thread spent working (reading, reducing, compressing, writing) rather than
        waiting for rows: what `--profile` reports as encode time."""
        return self._thread_seconds - self._idle_seconds

    def _write_pyramid(self) -> None:
        started = time.perf_counter()
        try:
            # Not closed on failure: closing would append pending IFDs to a file that is about to
            # be deleted, and could raise over the error that matters.
            tiff = tifffile.TiffWriter(self._tiff_file, bigtiff=True, imagej=False, ome=False, shaped=False)
            self._write_levels(tiff)
            tiff.close()
            self._tiff_file.flush()
            # Durable before the rename: after a crash out_path must not name a half-flushed file.
            os.fsync(self._tiff_file.fileno())
        except _Aborted:
            pass
        except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
            self._failure = error
        finally:
            self._thread_seconds = time.perf_counter() - started

    def _write_levels(self, tiff: tifffile.TiffWriter) -> None:
        source = self._level0_reader
        # Reading blocks back, reducing them and copying out their tiles is numpy and file I/O that releases the
        # GIL: done on its own threads, it overlaps tifffile's compression instead of running between its batches
        # (on one thread it capped the encoder at about 40 MP/s whatever the number of compression workers).
        preparers = ThreadPoolExecutor(max_workers=self._preparer_count(), thread_name_prefix="safron-tiff-blocks")
        try:
            for level, (height, width) in enumerate(self.level_shapes):
                reduced = None
                if level + 1 < len(self.level_shapes):
                    reduced = RawImageFile(self._level_paths[level + 1], *self.level_shapes[level + 1], "create")
                try:
                    tiff.write(
                        self._tiles(level, source, reduced, preparers),
                        shape=(height, width, _SAMPLES),
                        dtype=np.uint8,
                        **self._write_options(level),
                    )
                finally:
                    source.close()
                    # The file just built is the next level's source; reading through the handle
                    # that wrote it sees every byte.
                    source = reduced
                if level > 0 or self._owns_level0:
                    self._level_paths[level].unlink()
        finally:
            preparers.shutdown(wait=True, cancel_futures=True)
            if source is not None:
                source.close()

    def _preparer_count(self) -> int:
        """Threads that prepare blocks for the compression workers: half as many, at least one (which still
        overlaps preparing with compressing)."""
        return max(1, (self._workers or tifffile.TIFF.MAXWORKERS) // 2)

    def _write_options(self, level: int) -> dict:
        options = dict(
            tile=(self._tile, self._tile),
            photometric="rgb",
            planarconfig="contig",
            compression=_TIFFFILE_COMPRESSION[self._compression],
            subfiletype=1 if level > 0 else 0,
            metadata=None,
            software="safron",
            maxworkers=self._workers,
        )
        workers = self._workers or tifffile.TIFF.MAXWORKERS
        options["buffersize"] = _TILES_BUFFERED_PER_WORKER * workers * self._tile**2 * _SAMPLES
        if self._compression == "jpeg":
            options["compressionargs"] = {"level": self._quality}
        elif self._compression in ("zstd", "deflate"):
            options["predictor"] = "horizontal"
        if self._mpp is not None:
            scale = 2**level
            options["resolution"] = tuple(_CENTIMETRE_IN_MICRONS / (m * scale) for m in self._mpp)
            options["resolutionunit"] = "CENTIMETER"
        if level == 0 and self._description is not None:
            options["description"] = self._description
        return options

    def _tiles(
        self, level: int, source: RawImageFile, reduced: RawImageFile | None, preparers: ThreadPoolExecutor
    ) -> Iterator[np.ndarray]:
        """The level's tiles in TIFF order (tile rows top to bottom, left to right), writing the
        2x2 reduction of each block into `reduced` on the way.

        Blocks are prepared on `preparers`, a few ahead of the one being yielded (bounded memory); the tiles come
        out in order whatever order the blocks finish in."""
        height, width = self.level_shapes[level]
        block_columns = _BLOCK_TILES * self._tile
        ahead = self._preparer_count() + 1  # one block in the works per thread, and one ready
        pending: deque = deque()
        try:
            for y0 in range(0, height, self._tile):
                y1 = min(y0 + self._tile, height)
                if level == 0 and self._rows_ready < y1:
                    # Hand over what is prepared before waiting for the renderer, not after.
                    while pending:
                        yield from pending.popleft().result()
                    self._wait_for_rows(y1)
                elif self._abort_requested.is_set():
                    raise _Aborted
                for x0 in range(0, width, block_columns):
                    pending.append(preparers.submit(self._prepare_block, source, reduced, y0, y1, x0,
                                                    min(x0 + block_columns, width)))
                    if len(pending) > ahead:
                        yield from pending.popleft().result()
            # Every block is reduced before its tiles are yielded, and the last tiles come from the last block:
            # tifffile stops pulling after the last tile, so nothing may be left to do after the final yield.
            while pending:
                yield from pending.popleft().result()
        finally:
            # Aborted or failed: blocks still being prepared must finish before their files are closed.
            for future in pending:
                future.cancel()
            for future in pending:
                if not future.cancelled():
                    future.exception()

    def _prepare_block(
        self, source: RawImageFile, reduced: RawImageFile | None, y0: int, y1: int, x0: int, x1: int
    ) -> list[np.ndarray]:
        block = source.read_block(y0, y1, x0, x1)
        # Blocks start on even rows and columns, so each one's reduction is exactly its part of the reduced level.
        if reduced is not None:
            reduced.write_block(y0 // 2, x0 // 2, halve(block))
        return [_full_tile(block[:, tile_x0 : tile_x0 + self._tile], self._tile)
                for tile_x0 in range(0, block.shape[1], self._tile)]

    def _wait_for_rows(self, rows: int) -> None:
        started = time.perf_counter()
        with self._rows_ready_changed:
            while self._rows_ready < rows and not self._abort_requested.is_set():
                self._rows_ready_changed.wait()
        self._idle_seconds += time.perf_counter() - started
        if self._abort_requested.is_set():
            raise _Aborted


def _positive_int(value, name: str) -> int:
    value = _index(value, name)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _index(value, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return int(value.__index__())
    except AttributeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
