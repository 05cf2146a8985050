"""render(): plan -> read mask windows -> infer -> accumulate -> write, as overlapping stages.

Stages (each in its own thread, joined by small bounded queues, see `pipeline.prefetch`):
  1. read    mask windows for one batch of patches (`windows`), encoded as the model's ±1 input
  2. infer   the generator on that batch (the backend releases the GIL)
  3. add     patches into the rolling band accumulator (C++), in the caller's thread; when a patch row is
             complete, the rows no later patch can touch are finalised to uint8 straight into the canvas
  4. encode  the pyramidal TIFF writer's own thread compresses those rows while inference goes on
From CHILD_PROCESSES_MIN_PIXELS on, the windows are read and the TIFF encoded by child processes
(`reader_process`, `encoder_process`), so that this interpreter's lock serves inference and the main loop only.

Batches are fixed slices of the raster-order patch sequence, so a resumed render replays exactly the batches
an uninterrupted one would have run, and gets the same numbers even from a backend whose results depend on
batch composition. That is what makes `resume=True` byte-identical.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from . import geometry, masks, windows
from .geometry import BLENDS
from .accumulator import BandAccumulator, StagingBandAccumulator
from .backends import Backend, create_backend
from .canvas import Journal, JournalThread, OutputLock, file_identity, open_canvas, side_paths
from .errors import ModelError, OutputWriteError, SafronInputError, is_storage_error
from .noise import DEFAULT_SEED, MAX_SEED, NoiseBatch
from .pipeline import StageClock, prefetch
from .raw_image import RawImageFile
from .slide_io import check_free_space, check_output_path

# Not the paper's plain average: the embedded generator's patch edges leave a thin line wherever a patch
# starts or ends inside another with "uniform", which the cosine ramp hides (GlaS testA with the step-6741
# generator: FID 235.2 / KID 0.144 cosine against 238.5 / 0.148 uniform, and the lines gone; MODEL_CARD.md).
DEFAULT_BLEND = "cosine"
DEFAULT_OVERLAP = geometry.OVERLAP
DEFAULT_OUTSET = geometry.OUTSET
# A pyramidal BigTIFF is written whatever OUT is called; a name that promises another format would mislead every
# program that trusts it. (.btf and .tf8 are the usual BigTIFF names.)
OUTPUT_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
# Threads beyond a few per core only add contention to work that is CPU-bound; and each thread costs a stack, so a
# typo like --threads 100000 made ONNX Runtime and the encoder spawn threads until memory ran out.
MAX_THREADS_PER_CORE = 4
# From this many pixels on, the TIFF encoder and the mask reader (of a mask file read by region) run in processes of
# their own (`encoder_process`, `reader_process`), off this interpreter's lock, which inference and the main loop need;
# starting each costs about 0.2 s, which smaller images would lose (8192 x 8192 renders in seconds on a GPU).
CHILD_PROCESSES_MIN_PIXELS = 8192 * 8192


def _in_child_processes(height: int, width: int) -> bool:
    """Whether a render of this size reads and encodes in child processes (the threshold read at call time)."""
    return height * width >= CHILD_PROCESSES_MIN_PIXELS


STAGES = ("read", "prepare", "infer", "accumulate", "finalise", "journal", "encode", "wait")
STAGE_MEANINGS = {
    "read": "read the mask windows of a batch (reader thread; for large images, take them from the reader process)",
    "prepare": "encode the windows as the model's input (reader thread)",
    "infer": "run the generator (inference thread)",
    "accumulate": "add patches into the band (main thread)",
    "finalise": "normalise finished blocks to uint8 into the canvas (main thread)",
    "journal": "record finished rows and hand them to the encoder (main thread)",
    "encode": "read tiles back, build reduced levels, compress and write the TIFF (encoder thread, or process for "
              "large images)",
    "wait": "main thread waiting for inference results",
}


@dataclass(frozen=True)
class RenderResult:
    out_path: Path | None
    height: int
    width: int
    patches: int
    mpp: float | None
    backend: str
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)
    # A resume that found the output already complete (its render was killed after the output was renamed into
    # place): nothing was rendered, and the leftover canvas and journal were removed.
    already_complete: bool = False

    @property
    def megapixels_per_second(self) -> float:
        return self.height * self.width / 1e6 / self.seconds if self.seconds else 0.0

    def profile(self) -> str:
        """A per-stage breakdown: where the time went, and the throughput achieved."""
        lines = [f"{self.width} x {self.height} px, {self.patches} patches, {self.seconds:.2f} s wall, "
                 f"{self.megapixels_per_second:.2f} MP/s, backend {self.backend}"]
        for stage, seconds in self.stage_seconds.items():
            share = 100 * seconds / self.seconds if self.seconds else 0.0
            lines.append(f"  {stage:<10} {seconds:9.2f} s  {share:5.1f} %  {STAGE_MEANINGS[stage]}")
        lines.append("  (stages run in parallel threads, so their shares may add up to more than 100 %)")
        return "\n".join(lines)


def default_model_path() -> Path:
    """The generator embedded in the package."""
    path = Path(str(resources.files("safron") / "default_model" / "generator.onnx"))
    if not path.is_file():
        raise ModelError("this build of safron has no embedded default model; pass a generator with --model MODEL.onnx")
    return path


def _resolve_model(model) -> Path:
    path = default_model_path() if model is None else Path(model)
    if not path.exists():
        raise ModelError(f"{path}: model not found")
    return path


def _model_sha256(path: Path) -> str:
    """The hash that pins a model in the resume journal: the ONNX file, or a checkpoint's weights."""
    from .checkpoints import file_sha256, find_checkpoint, is_checkpoint_path

    return file_sha256(find_checkpoint(path).weights if is_checkpoint_path(path) else path)


def max_threads() -> int:
    return MAX_THREADS_PER_CORE * (os.cpu_count() or 1)


def _check_integer(value, name: str, low: int, high: int | None = None, why: str = "") -> int:
    """`value` as an int in [low, high]; anything else (a float, a bool, a string) is one line naming the option."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
        high is not None and value > high
    ):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise SafronInputError(f"{name} must be an integer {bounds}{why} (got {value!r})")
    return int(value)


def _check_threads(threads):
    """None (the default: every core) or a thread count within reason."""
    if threads is None:
        return None
    return _check_integer(threads, "threads", 1, max_threads(),
                          f", at most {MAX_THREADS_PER_CORE} per CPU core ({os.cpu_count() or 1} cores here)")


def _check_render_options(batch_size, blend, overlap, threads, seed=DEFAULT_SEED, outset=DEFAULT_OUTSET) -> None:
    """What render and render_array take alike, checked before a model is loaded or a file created. What depends
    on the model (a fixed batch, overlap below its patch size) is checked once it is loaded."""
    if blend not in BLENDS:
        raise SafronInputError(f"unknown blend {blend!r} (choose from {', '.join(BLENDS)})")
    if batch_size is not None:
        _check_integer(batch_size, "batch size", 1)
    _check_integer(overlap, "overlap", 0)
    _check_integer(outset, "outset", 0)
    _check_threads(threads)
    _check_integer(seed, "seed", 0, MAX_SEED)


def _check_colour_tolerance(colour_tolerance) -> float:
    if isinstance(colour_tolerance, bool) or not isinstance(colour_tolerance, (int, float, np.integer, np.floating)) \
            or not colour_tolerance >= 0:  # NaN too
        raise SafronInputError(
            f"colour tolerance must be a number >= 0, inf to snap every colour to the nearest class (got "
            f"{colour_tolerance!r})"
        )
    return float(colour_tolerance)


def _check_output_options(compression, quality, mpp) -> None:
    from .pyramid_tiff import COMPRESSIONS

    if compression not in COMPRESSIONS:
        reason = " (OpenSlide cannot read WebP tiles)" if str(compression).lower() == "webp" else ""
        raise SafronInputError(f"unknown compression {compression!r}{reason} (choose from {', '.join(COMPRESSIONS)})")
    _check_integer(quality, "quality", 1, 100)
    if mpp is not None and (
        isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.integer, np.floating))
        or not (np.isfinite(mpp) and mpp > 0)
    ):
        raise SafronInputError(f"mpp must be a positive number of microns per pixel (got {mpp!r})")


@dataclass
class _Batch:
    indices: np.ndarray  # raster patch indices
    ys: np.ndarray
    xs: np.ndarray
    rows: np.ndarray  # patch row of each index
    inputs: np.ndarray | None = None
    outputs: np.ndarray | None = None
    finite: _DeviceFiniteCheck | None = None  # device patches only: read back by the main thread


class _Renderer:
    """One render of one mask with one backend; the sink decides where finalised rows go."""

    def __init__(self, mask, backend, batch_size, blend, overlap, threads, mask_file=None, seed=DEFAULT_SEED,
                 outset=DEFAULT_OUTSET):
        """`mask_file`: (path, colour tolerance) of `mask` to read its windows in a child process instead of a thread
        (`reader_process`); None to read them here. `seed`: of the noise a model with noise channels reads.
        `outset`: how far the patch grid reaches beyond each border of the image (`geometry.OUTSET`).

        Coordinates: `plan` is the grid over the image grown by `outset` on every side, so its row y is image row
        y - outset. Mask windows and noise are read at image coordinates, sinks receive image rows and columns
        only, and everything between (patch origins, the accumulator) is in grid coordinates."""
        _check_render_options(batch_size, blend, overlap, threads, seed, outset)
        self.seed, self.outset = seed, outset
        self._scratch_buffer = None
        self.height, self.width = mask.height, mask.width
        sig = backend.signature
        if sig.fixed_batch is not None:
            if batch_size not in (None, sig.fixed_batch):
                raise SafronInputError(f"the model was exported with a fixed batch of {sig.fixed_batch}; "
                                       f"got --batch-size {batch_size}")
            batch_size = sig.fixed_batch
        self.mask, self.backend, self.mask_file = mask, backend, mask_file
        self.batch_size = batch_size or backend.default_batch_size
        if not 0 <= overlap < sig.patch:
            raise SafronInputError(f"overlap must be in [0, {sig.patch}) for this model (got {overlap})")
        if outset > sig.patch:
            raise SafronInputError(f"outset must be in [0, {sig.patch}] for this model (got {outset})")
        self.plan = geometry.render_plan(mask.height, mask.width, outset, patch=sig.patch, margin=sig.margin,
                                         overlap=overlap)
        self.accumulator = backend.band_accumulator(self.plan, blend)
        if not isinstance(self.accumulator, BandAccumulator):
            raise TypeError(f"{type(backend).__name__}.band_accumulator returned a {type(self.accumulator).__name__}, "
                            "not a safron.accumulator.BandAccumulator")
        self.clock = StageClock(STAGES)
        if threads:
            self.accumulator.set_num_threads(threads)

    # -- stage 1: read ---------------------------------------------------------------------------------------
    def _batches(self, first_batch: int, patches_end: int):
        plan = self.plan
        ys, xs = plan.origins()
        for idx in windows.batch_indices(plan, self.batch_size, first_batch, patches_end):
            yield _Batch(idx, ys[idx], xs[idx], idx // plan.cols)

    def _timed_read(self, batch: _Batch, reader) -> _Batch:
        with self.clock("read"):
            if reader is None:
                n = self.backend.signature.fixed_batch or len(batch.indices)
                window = self.plan.window
                labels = windows.label_windows(self.mask, self.plan, batch.ys - self.outset, batch.xs - self.outset,
                                               np.empty((n, window, window), np.uint8))
            else:
                labels = reader.next_windows()
        with self.clock("prepare"):
            channels = self.backend.signature.noise_channels
            # Noise as a function of canvas coordinates (safron.noise): what every band and resume reads alike. The
            # backend draws it, on the host or on its GPU.
            noise = None
            if channels:  # as many windows as labels: a fixed batch pads past the patches
                noise = NoiseBatch.of(self.plan, batch.ys - self.outset, batch.xs - self.outset, channels, self.seed,
                                      count=len(labels))
            # (A backend for noise-free models may take the labels only, as before noise existed.)
            batch.inputs = self.backend.prepare(labels) if noise is None else self.backend.prepare(labels, noise)
        return batch

    # -- stage 2: infer --------------------------------------------------------------------------------------
    def _infer(self, batches):
        for batch in batches:
            with self.clock("infer"):
                batch.outputs = self.backend.infer(batch.inputs)[: len(batch.indices)]
                self._check_finite(batch)
            batch.inputs = None
            yield batch

    def _check_finite(self, batch: _Batch) -> None:
        """A NaN or an infinity in a patch would be finalised as black or white with no word, so it is refused.
        Host patches are checked here: 0.6 ms per batch of 8, against 1.2 s for the embedded model to infer it on 2
        threads (0.05 %, measured on this project's 2-core VM). Device patches get a check queued on the GPU that
        the main thread reads back (`_DeviceFiniteCheck`); opaque patches of other backends are left to them."""
        outputs = batch.outputs
        if isinstance(outputs, np.ndarray):
            if not np.isfinite(outputs).all():
                bad = ~np.isfinite(outputs.reshape(len(outputs), -1)).all(axis=1)
                raise self._nonfinite_error(batch, int(np.flatnonzero(bad)[0]))
        elif _is_cuda_tensor(getattr(outputs, "tensor", None)):
            batch.finite = _DeviceFiniteCheck(outputs)

    def _raise_if_device_patches_nonfinite(self, batch: _Batch) -> None:
        if batch.finite is not None:
            first = batch.finite.first_bad()
            batch.finite = None
            if first is not None:
                raise self._nonfinite_error(batch, first)

    def _nonfinite_error(self, batch: _Batch, k: int) -> ModelError:
        # Not our bug but the model's: it breaks the contract (output in [-1, 1]), and it will again on a rerun, so it
        # is an input error (exit 2) that names the model's backend and where, not a traceback.
        return ModelError(
            f"the model's output holds NaN or infinite values (backend {self.backend.name}, patch at "
            f"y={int(batch.ys[k]) - self.outset}, x={int(batch.xs[k]) - self.outset}); a generator must return "
            "finite values in [-1, 1]"
        )

    # -- stage 3: accumulate and finalise --------------------------------------------------------------------
    def _grid_rows(self, rows_done: int, rows_end: int | None) -> tuple[int, int]:
        """Image rows [rows_done, rows_end) (rows_end None: to the last) as grid rows. The grid's rows beyond the image
        lie outside the range, so they are rendered only as far as patches straddling the image need, and dropped."""
        return rows_done + self.outset, (self.height if rows_end is None else rows_end) + self.outset

    def _span(self, rows_done: int, rows_end: int | None):
        """What rendering image rows [rows_done, rows_end) takes: (stop row, first and last patch row, first patch,
        patch end, first batch), rows in grid coordinates."""
        plan = self.plan
        rows_done, stop = self._grid_rows(rows_done, rows_end)
        first_row = plan.first_row_touching(rows_done) if rows_done < stop else plan.rows
        # The last patch row touching row stop - 1: the patch rows after it start at stop or below.
        last_row = int(np.searchsorted(plan.ys, stop, side="left")) - 1
        first_patch = first_row * plan.cols
        patches_end = (last_row + 1) * plan.cols if first_row < plan.rows else first_patch
        return stop, first_row, last_row, first_patch, patches_end, first_patch // self.batch_size

    def start_window_reader(self, rows_done: int = 0, rows_end: int | None = None):
        """Start the reader process for `run(rows_done, rows_end=rows_end, reader=...)`, if this render reads its
        windows in one (`mask_file`); None otherwise. It starts in the background: `run` waits for it to be ready and
        reads in a thread if it could not start. Whoever starts it closes it (`run` does, once given it)."""
        _, _, _, _, patches_end, first_batch = self._span(rows_done, rows_end)
        if self.mask_file is None or first_batch * self.batch_size >= patches_end:
            return None
        from .reader_process import WindowReaderProcess

        path, tolerance = self.mask_file
        try:
            return WindowReaderProcess(path, tolerance, self.plan, self.outset, self.batch_size,
                                       self.backend.signature.fixed_batch is not None, first_batch, patches_end)
        except OSError:  # no room for its shared buffer, or no process to be had: read in a thread, as small images
            return None

    def run(self, sink, rows_done: int = 0, progress: bool = True, desc: str = "", rows_end: int | None = None,
            reader=None):
        """Render rows [rows_done, rows_end) (default: to the last row) into `sink`; rows below rows_done are already
        final there (a resume), rows from rows_end on are another band's (`render_band`). Every patch touching the
        range is rendered, those straddling its edges included, so its pixels are those of a whole render. `reader`:
        what `start_window_reader` gave for the same rows, closed here; None reads windows in a thread."""
        from tqdm import tqdm

        plan = self.plan
        stop, first_row, last_row, first_patch, patches_end, first_batch = self._span(rows_done, rows_end)
        rows_done, _ = self._grid_rows(rows_done, rows_end)  # from here on, rows are the grid's
        # Rows are finalised (or, below rows_done, discarded) contiguously from the first row the replayed
        # patches touch, so no band slot is left holding partial sums. Within a patch row, column blocks are
        # finalised as soon as the patches to their right no longer touch them.
        final_done = int(plan.ys[first_row]) if first_row < plan.rows else rows_done
        cols_done = added = 0
        if reader is not None:
            try:
                ready = reader.wait_ready()
            except BaseException:
                reader.close()
                raise
            if not ready:
                reader.close()
                reader = None
        reads = prefetch((self._timed_read(b, reader) for b in self._batches(first_batch, patches_end)), depth=2,
                         name="safron-read")
        outputs = prefetch(self._infer(reads), depth=2, name="safron-infer")
        bar = tqdm(
            total=patches_end, initial=first_patch, unit="patch", desc=desc, disable=not progress,
            dynamic_ncols=True, file=sys.stderr,
        )
        try:
            for batch in self._timed_waits(outputs):
                # Patches of rows already final, or of rows past the band (run only to keep batch composition), are
                # not added.
                keep = (batch.rows >= first_row) & (batch.rows <= last_row)
                for row in np.unique(batch.rows[keep]):
                    row = int(row)
                    # A batch is a raster-order run of patches, so each row's share is a contiguous slice:
                    # a view, on the host or on a device, never a gather.
                    found = np.flatnonzero((batch.rows == row) & keep)
                    sel = slice(int(found[0]), int(found[-1]) + 1)
                    with self.clock("accumulate"):
                        self.accumulator.add(batch.outputs[sel], batch.ys[sel], batch.xs[sel], plan.height)
                    last_col = int(batch.indices[sel.stop - 1] % plan.cols)
                    rows_end = plan.final_rows_end(row)
                    cols_final = self._final_columns(last_col)
                    if cols_final > cols_done:
                        self._finalise(sink, final_done, rows_end, cols_done, cols_final, rows_done, stop)
                        cols_done = cols_final
                    if last_col == plan.cols - 1:  # the patch row is complete: its rows are final everywhere
                        if rows_end > rows_done:
                            with self.clock("journal"):
                                sink.rows_final(min(rows_end, stop) - self.outset)
                        final_done, cols_done = rows_end, 0
                self._raise_if_device_patches_nonfinite(batch)
                bar.update(int(keep.sum()))
                added += int(keep.sum())
        finally:
            bar.close()
            if reader is not None:
                reader.stop()  # first: a read stage waiting for the child would keep the stages from being joined
            outputs.close()
            if reader is not None:
                reader.close()
        if min(final_done, stop) != stop:
            raise RuntimeError(f"internal error: rows up to {final_done} of {stop} finalised")
        return added

    def _final_columns(self, last_col: int) -> int:
        """Columns [0, end) of the current rows that no later patch of this row touches, rounded down to
        the accumulator's column blocks so that each block's band memory is released whole."""
        plan = self.plan
        if last_col == plan.cols - 1:
            return plan.width
        block = self.accumulator.block_cols
        return int(plan.xs[last_col + 1]) // block * block

    def _finalise(self, sink, y0: int, y1: int, x0: int, x1: int, rows_done: int, stop: int) -> None:
        """Finalise grid rows [y0, y1) x columns [x0, x1) (whole accumulator blocks) and hand the image's part of them
        to `sink`. On resume, rows below rows_done are on disk already; in a band, rows from `stop` on are the next
        band's; the grid's rows above the image are below rows_done and those under it from `stop` on. The partial
        sums of all these are dropped."""
        accumulator = self.accumulator
        if y0 < rows_done:
            accumulator.discard(y0, min(y1, rows_done), x0, x1)
            y0 = min(y1, rows_done)
        if y0 < min(y1, stop):
            with self.clock("finalise"):
                self._finalise_kept(sink, y0, min(y1, stop), x0, x1)
        if y1 > stop:
            accumulator.discard(max(y0, stop), y1, x0, x1)

    def _finalise_kept(self, sink, y0: int, y1: int, x0: int, x1: int) -> None:
        """Finalise grid rows [y0, y1) x columns [x0, x1), all of them image rows, into `sink`, dropping the columns
        beyond the image. The accumulator finalises whole blocks only: the blocks straddling the image's left or
        right border go through a scratch buffer, the others straight into the sink (a canvas's memory map)."""
        accumulator, outset = self.accumulator, self.outset
        image_end = outset + self.width
        if isinstance(accumulator, StagingBandAccumulator):
            # A GPU accumulator's pixels arrive in a host buffer of its own: written from there, not copied into
            # a memory map (page faults made that most of the main thread's time on the GPU).
            pixels, uncovered = accumulator.finalise_staged(y0, y1, x0, x1)
            _check_covered(uncovered, y0, y1)
            self._write_inside(sink, y0, x0, pixels)
            return
        block = accumulator.block_cols
        inside_from, inside_to = -(-outset // block) * block, image_end // block * block  # whole blocks inside
        for a, b in ((x0, min(x1, inside_from)), (max(x0, inside_from), min(x1, inside_to)),
                     (max(x0, inside_from, inside_to), x1)):
            if a >= b:
                continue
            if outset <= a and b <= image_end:
                with sink.block(y0 - outset, y1 - outset, a - outset, b - outset) as out:
                    _check_covered(accumulator.finalise(y0, y1, out, a, b), y0, y1)
                continue
            pixels = self._scratch(y1 - y0, b - a)
            _check_covered(accumulator.finalise(y0, y1, pixels, a, b), y0, y1)
            self._write_inside(sink, y0, a, pixels)

    def _write_inside(self, sink, y0: int, x0: int, pixels: np.ndarray) -> None:
        """Hand `sink` the image's columns of finalised `pixels` whose top-left is grid (y0, x0); the columns beyond
        the image's side borders are dropped."""
        left = max(x0, self.outset)
        right = min(x0 + pixels.shape[1], self.outset + self.width)
        if left < right:
            sink.write(y0 - self.outset, left - self.outset, pixels[:, left - x0:right - x0])

    def _scratch(self, rows: int, cols: int) -> np.ndarray:
        """A (rows, cols, 3) uint8 buffer for finalised pixels, reused from call to call (a sink copies them out
        before the next): fresh memory each time would cost a page fault per 4 KiB. It holds no more than the
        blocks straddling the image's side borders."""
        size = rows * cols * 3
        if self._scratch_buffer is None or self._scratch_buffer.size < size:
            self._scratch_buffer = np.empty(size, np.uint8)
        return self._scratch_buffer[:size].reshape(rows, cols, 3)

    def _timed_waits(self, outputs):
        """Yield inference results, timing how long the main thread waits for each."""
        while True:
            with self.clock("wait"):
                batch = next(outputs, None)
            if batch is None:
                return
            yield batch


class _ArraySink:
    """Where a render's pixels go, in image coordinates: `block(y0, y1, x0, x1)` is a context giving a writable view
    of a block to finalise into, `write(y, x, pixels)` copies final pixels from elsewhere to row y, column x, and
    `rows_final(y1)` says that rows [.., y1) are complete."""

    def __init__(self, height, width):
        self.image = np.empty((height, width, 3), dtype=np.uint8)

    def block(self, y0, y1, x0, x1):
        return contextlib.nullcontext(self.image[y0:y1, x0:x1])

    def write(self, y, x, pixels):
        self.image[y:y + len(pixels), x:x + pixels.shape[1]] = pixels

    def rows_final(self, y1):
        pass


class _BandStopped(Exception):
    """The render a band belongs to was stopped (`bands` module docstring): the band writes no more."""


class _ChunkRowSink:
    """A band's rows [y0, y1), gathered into whole chunk rows of its Zarr store and written as each one completes, so
    that a band writes only whole chunks (y0 is a chunk boundary) and never another band's. The buffer holds one chunk
    row plus the most rows one patch row can finalise beyond it."""

    def __init__(self, store, y0: int, y1: int, width: int, chunk: int, patch: int, stop=None):
        self.store, self.start, self.end, self.chunk, self.stop = store, y0, y1, chunk, stop
        self.buffer = np.empty((chunk + patch, width, 3), dtype=np.uint8)

    def block(self, y0, y1, x0, x1):
        return contextlib.nullcontext(self.buffer[y0 - self.start:y1 - self.start, x0:x1])

    def write(self, y, x, pixels):
        self.buffer[y - self.start:y - self.start + len(pixels), x:x + pixels.shape[1]] = pixels

    def rows_final(self, y1):
        from . import zarr_output

        while y1 - self.start >= self.chunk or self.start < y1 == self.end:
            if self.stop is not None and self.stop.is_set():
                raise _BandStopped
            rows = min(self.chunk, y1 - self.start)
            zarr_output.write_rows(self.store, self.start, self.buffer[:rows])
            # Rows past this chunk row (finalised with it, as part of the same patch row) move to the front.
            self.buffer[:y1 - self.start - rows] = self.buffer[rows:y1 - self.start]
            self.start += rows


class _FileSink:
    """Finished blocks go into the canvas; whole finished rows are journalled (in the background) and handed to
    the encoder, which reads its tiles back from the canvas (so no stage holds full-width rows in memory)."""

    def __init__(self, canvas: RawImageFile, journal: JournalThread, writer):
        self.canvas, self.journal, self.writer = canvas, journal, writer

    def block(self, y0, y1, x0, x1):
        return self.canvas.block(y0, y1, x0, x1)

    def write(self, y, x, pixels):
        self.canvas.write_block(y, x, pixels)

    def rows_final(self, y1):
        self.journal.submit(y1)
        self.writer.rows_ready(y1)


def _check_covered(uncovered: int, y0: int, y1: int) -> None:
    if uncovered:
        raise RuntimeError(f"internal error: {uncovered} pixels of rows {y0}..{y1} were covered by no patch")


def _is_cuda_tensor(value) -> bool:
    return getattr(value, "is_cuda", False) is True


class _DeviceFiniteCheck:
    """Whether a batch of device patches (cuda_band.DevicePatches) is all finite, found on the GPU.

    Queued by the inference thread on a side stream that waits for the patches' `ready` event, so that the
    inference stream is never held up; one flag per patch comes back to pinned memory. The main thread reads it
    (`first_bad`) after it has queued the batch's accumulation, which waits for the same inference anyway.
    """

    _streams: dict = {}

    def __init__(self, patches):
        import torch

        tensor = patches.tensor
        stream = self._streams.get(tensor.device)
        if stream is None:
            stream = self._streams[tensor.device] = torch.cuda.Stream(device=tensor.device)
        stream.wait_event(patches.ready)
        with torch.inference_mode(), torch.cuda.stream(stream):
            # The tensor was allocated on the inference stream: without this its memory could be handed to the next
            # batch while the check still reads it (as in CudaBand.add).
            tensor.record_stream(stream)
            bad = torch.isfinite(tensor).logical_not().flatten(1).any(dim=1)
            # Pinned, so that the copy is asynchronous: into pageable memory it would block this thread until the
            # inference of this batch is done, and the next batch would be launched only then.
            self._bad = torch.empty(bad.shape, dtype=torch.bool, pin_memory=True)
            self._bad.copy_(bad, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record(stream)

    def first_bad(self) -> int | None:
        self._done.synchronize()
        flags = self._bad.numpy()
        return int(np.flatnonzero(flags)[0]) if flags.any() else None


def render_array(
    mask,
    model=None,
    backend: str | Backend = "auto",
    batch_size: int | None = None,
    blend: str = DEFAULT_BLEND,
    overlap: int = DEFAULT_OVERLAP,
    threads: int | None = None,
    progress: bool = False,
    colour_tolerance: float = masks.COLOUR_TOLERANCE,
    seed: int = DEFAULT_SEED,
    outset: int = DEFAULT_OUTSET,
) -> np.ndarray:
    """Render an in-memory mask (labels HxW or colour HxWx3, uint8) to an HxWx3 uint8 RGB image.

    `backend` is a name (then `model` and `threads` open it, and it is closed afterwards) or an open `Backend`
    (e.g. from `safron.backends.create_backend`), which is used as it is and left open, so that many small masks
    can share one loaded model. `colour_tolerance`: see `safron.masks.COLOUR_TOLERANCE`. `seed`: of the noise a
    model with noise channels reads (`safron.noise`); other models ignore it. `outset`: how far the patch grid
    reaches beyond the image's borders (`safron.geometry.OUTSET`; 0 renders as versions before it did).
    """
    _check_render_options(batch_size, blend, overlap, threads, seed, outset)
    source = masks.from_array(np.asarray(mask), colour_tolerance=_check_colour_tolerance(colour_tolerance))
    engine = (backend if isinstance(backend, Backend)
              else create_backend(backend, _resolve_model(model), threads=threads))
    try:
        renderer = _Renderer(source, engine, batch_size, blend, overlap, threads, seed=seed, outset=outset)
        sink = _ArraySink(source.height, source.width)
        renderer.run(sink, progress=progress)
        return sink.image
    finally:
        if engine is not backend:
            engine.close()


def render_band(mask_path: str, store: str, y0: int, y1: int, *, model: str, backend: str, batch_size, blend: str,
                overlap: int, threads, colour_tolerance: float, progress: bool = False, seed: int = DEFAULT_SEED,
                outset: int = DEFAULT_OUTSET, stop=None):
    """One band's task, on a Dask worker or in this process: rows [y0, y1) of the render of the mask at `mask_path`,
    written to level 0 of the Zarr `store` in whole chunk rows. A `bands.BandOutcome`; an input error (a bad colour,
    a model that breaks the contract) or a full disk is returned rather than raised, as one line, so that Dask does
    not retry what would fail the same way again. `stop`: an event (anything with `is_set()`) looked at before each
    chunk row is written; once it is set the band returns None, whatever it has not written unwritten."""
    from .bands import BandOutcome
    from .zarr_output import chunk_rows

    if stop is not None and stop.is_set():
        return None
    try:
        with masks.open_mask(Path(mask_path), colour_tolerance=colour_tolerance) as source:
            engine = create_backend(backend, Path(model), threads=threads)
            try:
                renderer = _Renderer(source, engine, batch_size, blend, overlap, threads, seed=seed, outset=outset)
                sink = _ChunkRowSink(Path(store), y0, y1, source.width, chunk_rows(Path(store)), renderer.plan.patch,
                                     stop)
                patches = renderer.run(sink, rows_done=y0, rows_end=y1, progress=progress, desc=Path(mask_path).name)
            finally:
                engine.close()
    except _BandStopped:
        return None
    except SafronInputError as exc:
        return exc
    except OSError as exc:
        if not is_storage_error(exc):
            raise
        return OutputWriteError(f"{store}: cannot write the Zarr store: {os.strerror(exc.errno)}", errno=exc.errno)
    return BandOutcome(patches, engine.name, dict(renderer.clock.seconds))


def _check_paths(mask_path: Path, out_path: Path) -> None:
    from .zarr_output import ZARR_SUFFIX, check_output, is_zarr_path

    if is_zarr_path(out_path):
        check_output(out_path)  # an OME-Zarr, a folder: only one that safron wrote may be replaced
        return
    if out_path.suffix.lower() not in OUTPUT_SUFFIXES and not out_path.is_dir():
        raise SafronInputError(
            f"{out_path}: the output is a pyramidal BigTIFF, so its name must end in "
            f"{', '.join(OUTPUT_SUFFIXES[:-1])} or {OUTPUT_SUFFIXES[-1]}, or an OME-Zarr, named {ZARR_SUFFIX}"
        )
    check_output_path(out_path)
    if out_path.exists() and mask_path.exists() and out_path.resolve() == mask_path.resolve():
        raise SafronInputError(f"{out_path}: output would overwrite the mask")


def _check_disk_space(out_path: Path, height: int, width: int, compression: str, canvas_path: Path | None) -> None:
    """Everything the render will put next to OUT at its peak: the canvas (on resume, only what it has not yet
    allocated), the TIFF writer's scratch files for the reduced levels, and the TIFF at the codec's ratio (JPEG
    ~1/8, the others counted uncompressed)."""
    from .pyramid_tiff import scratch_bytes, uncompressed_tiff_bytes

    canvas = height * width * 3
    if canvas_path is not None:  # resuming: the blocks it already holds need no more room
        with contextlib.suppress(OSError):
            canvas = max(0, canvas - os.stat(canvas_path).st_blocks * 512)
    output = uncompressed_tiff_bytes(height, width) // (8 if compression == "jpeg" else 1)
    needed = canvas + scratch_bytes(height, width, with_canvas=True) + output
    check_free_space(out_path, needed, "the canvas, the scratch files and the output")


def _write_error(exc: BaseException, out_path: Path, resumable: bool) -> BaseException:
    """A disk's refusal (full, quota, I/O error) as one line that says what to do next; other exceptions as they are."""
    if isinstance(exc, OutputWriteError):
        message = str(exc)
    elif is_storage_error(exc):
        message = f"{out_path}: cannot write the render's canvas or journal: {os.strerror(exc.errno)}"
    else:
        return exc
    if resumable:
        remedy = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
        message += f"; its canvas and journal are kept: {remedy} and run the same command with --resume"
    return OutputWriteError(message, errno=exc.errno)


def render(
    mask_path,
    out_path,
    model=None,
    backend: str = "auto",
    batch_size: int | None = None,
    blend: str = DEFAULT_BLEND,
    compression: str = "jpeg",
    quality: int = 90,
    mpp: float | None = None,
    resume: bool = False,
    progress: bool = True,
    threads: int | None = None,
    overlap: int = DEFAULT_OVERLAP,
    colour_tolerance: float = masks.COLOUR_TOLERANCE,
    client=None,
    band_rows: int | None = None,
    chunk: int | None = None,
    seed: int = DEFAULT_SEED,
    outset: int = DEFAULT_OUTSET,
) -> RenderResult:
    """Render the mask at `mask_path` to a pyramidal tiled BigTIFF at `out_path`, or to an OME-Zarr when `out_path`
    ends in .zarr (`safron.zarr_output`; zstd chunks whatever `compression` says).

    The output replaces `out_path` only when complete. Finished rows go to a canvas file next to it with a
    journal, so an interrupted render continues with `resume=True` and yields the same bytes. Every argument is
    checked before any file is created, and one render at a time may write to `out_path` (`canvas.OutputLock`).
    `colour_tolerance`: see `safron.masks.COLOUR_TOLERANCE`.

    `client`: a `distributed.Client` whose workers render the mask in bands of `band_rows` rows (default
    `bands.DEFAULT_BAND_ROWS`), each a multiple of the Zarr `chunk` side (default `zarr_output.DEFAULT_CHUNK`);
    workers need safron and the same paths to the mask, the model and OUT's folder (`safron.bands`). The pixels are
    a single-process render's, and a TIFF is byte for byte the same. An interrupted render in bands (or to OME-Zarr)
    keeps its store of finished bands beside OUT, and `resume=True` renders the others (`bands.render_in_bands`).

    `seed`: of the noise a model with noise channels reads (`safron.noise`): the same mask, model and seed give the
    same image, another seed another texture. Models without noise ignore it.

    `outset`: how far the patch grid reaches beyond each border of the image, rendered from the mirrored mask and
    cropped, so that border pixels are blended like any seam (`safron.geometry.OUTSET`; 0 renders as before it).
    """
    mask_path, out_path = Path(mask_path), Path(out_path)
    _check_render_options(batch_size, blend, overlap, threads, seed, outset)
    _check_output_options(compression, quality, mpp)
    # Not pinned in the journal: a colour that snaps at all snaps to the same class whatever the tolerance (which
    # only decides whether a colour is refused), so a resume under another tolerance writes the same bytes.
    colour_tolerance = _check_colour_tolerance(colour_tolerance)
    _check_paths(mask_path, out_path)
    bands_layout = _check_band_options(out_path, client, band_rows, chunk, resume)
    model_path = _resolve_model(model)
    if bands_layout is not None:
        band_options = dict(model=str(model_path.resolve()), backend=backend, batch_size=batch_size, blend=blend,
                            overlap=overlap, threads=threads, colour_tolerance=colour_tolerance, seed=seed,
                            outset=outset)
        tiff_options = dict(compression=compression, quality=int(quality), workers=threads)
        return _render_in_bands(mask_path, out_path, client, *bands_layout, mpp, resume, progress, band_options,
                                tiff_options)
    canvas_path, journal_path = side_paths(out_path)
    with OutputLock(out_path):
        if resume and not journal_path.exists():
            # Not "already complete" (exit 0), although a finished render leaves just this: its journal goes last, so
            # one killed after its output was renamed into place still has a journal that says so (below). Without
            # one, nothing ties OUT to this command: it may be an older render that a render killed before it made
            # its journal was about to replace, and exit 0 would pass it off as this command's result.
            existing = f"; {out_path.name} exists, but nothing says it is this render's" if out_path.exists() else ""
            raise SafronInputError(
                f"cannot resume: no interrupted render of {out_path} (no {journal_path.name}){existing}: run without "
                "--resume to render it"
            )
        with masks.open_mask(mask_path, colour_tolerance=colour_tolerance) as source:
            engine = create_backend(backend, model_path, threads=threads)
            try:
                height, width = source.height, source.width
                in_child = _in_child_processes(height, width) and not source.in_memory
                renderer = _Renderer(source, engine, batch_size, blend, overlap, threads,
                                     mask_file=(mask_path, colour_tolerance) if in_child else None, seed=seed,
                                     outset=outset)
                mpp = mpp if mpp is not None else source.mpp
                header = {
                    "format": 1,
                    **_mask_identity(mask_path),
                    "size": [height, width],
                    "model_sha256": _model_sha256(model_path),
                    "geometry": [renderer.plan.patch, renderer.plan.margin, renderer.plan.overlap],
                    "blend": blend,
                    "batch_size": renderer.batch_size,
                    **_seed_entry(seed),
                    **_outset_entry(outset),
                }
                # Plain numbers (not numpy's, which the checks accept): the journal records these as JSON.
                output_options = dict(compression=compression, quality=int(quality),
                                      mpp=None if mpp is None else float(mpp))
                if resume and _remove_if_complete(out_path, header, output_options):
                    return RenderResult(out_path, height, width, 0, mpp, engine.name, already_complete=True)
                _check_disk_space(out_path, height, width, compression, canvas_path if resume else None)
                writer_options = dict(output_options, workers=threads)
                seconds = _render_to_files(renderer, out_path, header, resume, writer_options, progress,
                                           desc=mask_path.name)
            finally:
                engine.close()
    return RenderResult(
        out_path, height, width, renderer.plan.count, mpp, engine.name, seconds, dict(renderer.clock.seconds)
    )


def _seed_entry(seed: int) -> dict:
    """The noise seed's entry in a journal's or band store's header: none for the default, so that the headers of
    renders from before the seed existed (all of them the default's) still match, and a resume under another seed,
    which would mix two textures, is refused."""
    return {} if seed == DEFAULT_SEED else {"noise_seed": int(seed)}


def _outset_entry(outset: int) -> dict:
    """The outset's entry in a journal's or band store's header: always there, so that a resume of a render from before
    the outset existed (whose header lacks it, and whose pixels near the borders differ) is refused."""
    return {"outset": int(outset)}


def _mask_identity(mask_path: Path) -> dict:
    """What ties a resume to the mask it started from, for a journal or a band store's header."""
    stat = mask_path.stat()
    return {"mask": str(mask_path.resolve()), "mask_bytes": stat.st_size, "mask_mtime_ns": stat.st_mtime_ns}


def _check_band_options(out_path: Path, client, band_rows, chunk, resume: bool) -> tuple[int, int] | None:
    """(chunk side, band rows) for a render in bands (a client, or an OME-Zarr output), checked; None for a render in
    one process."""
    from .bands import DEFAULT_BAND_ROWS
    from .zarr_output import DEFAULT_CHUNK, is_zarr_path, require_zarr

    in_bands = client is not None or is_zarr_path(out_path)
    if not in_bands:
        if band_rows is not None or chunk is not None:
            raise SafronInputError("band rows and chunk are for a render in bands (a Dask client: --workers or "
                                   "--scheduler) or to an OME-Zarr (OUT named .zarr)")
        return None
    if band_rows is not None and client is None:
        raise SafronInputError("band rows split a render across Dask workers: give a client (--workers or "
                               "--scheduler), or leave them out")
    chunk = _check_integer(DEFAULT_CHUNK if chunk is None else chunk, "chunk", 16)
    if chunk % 16:
        raise SafronInputError(f"chunk must be a multiple of 16 (got {chunk})")
    if band_rows is None:
        band_rows = -(-DEFAULT_BAND_ROWS // chunk) * chunk
    band_rows = _check_integer(band_rows, "band rows", chunk)
    if band_rows % chunk:
        raise SafronInputError(f"band rows must be a multiple of the chunk side {chunk}, so that no two bands write "
                               f"one chunk (got {band_rows})")
    require_zarr()
    return chunk, band_rows


def _render_in_bands(mask_path: Path, out_path: Path, client, chunk: int, band_rows: int, mpp, resume: bool,
                     progress: bool, band_options: dict, tiff_options: dict) -> RenderResult:
    from . import bands
    from .zarr_output import is_zarr_path

    with OutputLock(out_path):
        # The size and pixel size only: the workers read the mask itself.
        with masks.open_mask(mask_path, colour_tolerance=band_options["colour_tolerance"]) as source:
            height, width = source.height, source.width
            mpp = mpp if mpp is not None else source.mpp
        mpp = None if mpp is None else float(mpp)
        # Like the journal's header, without what only the model knows (its geometry, its default batch): the model's
        # hash pins them. Colour tolerance and threads change no pixel (see `render`).
        header = {"format": 1, **_mask_identity(mask_path), "size": [height, width],
                  "model_sha256": _model_sha256(Path(band_options["model"])),
                  **{key: band_options[key] for key in ("backend", "batch_size", "blend", "overlap")},
                  **_seed_entry(band_options["seed"]), **_outset_entry(band_options["outset"])}
        # Level 0 uncompressed and, for a TIFF, the writer's scratch files too: a bound, since chunks are compressed.
        check_free_space(out_path, height * width * 3 * (1 if is_zarr_path(out_path) else 2),
                         "the Zarr store and the writer's temporary files")
        result = bands.render_in_bands(
            render_band, str(mask_path.resolve()), out_path, height, width, mpp=mpp, chunk=chunk,
            band_rows=band_rows, client=client, progress=progress,
            band_options=band_options,
            tiff_options=None if is_zarr_path(out_path) else dict(tiff_options, mpp=mpp), header=header, resume=resume,
        )
    return RenderResult(out_path, height, width, result.patches, mpp, result.backend, result.seconds,
                        result.stage_seconds)


def _remove_if_complete(out_path: Path, header: dict, output_options: dict) -> bool:
    """Whether the render to resume had finished: killed after its output was renamed into place, before its canvas
    and journal were removed. Then they are removed now. A journal of another render is refused (SafronInputError).

    Exit 0 rather than an error: OUT is exactly what `--resume` would have written (the journal pins the mask, the
    model and every option that changes a byte, and names the very file that became OUT), so a job that resumes
    after being killed gets the same answer whether the kill came before the rename or after it. Asked for other
    output options (another compression), the render resumes from its canvas as after any other interruption."""
    canvas_path, journal_path = side_paths(out_path)
    journal = Journal(journal_path, header, resume=True)
    journal.close()
    if not journal.output_is(out_path, output_options):
        return False
    canvas_path.unlink(missing_ok=True)
    journal.remove()
    return True


def _render_to_files(renderer: _Renderer, out_path: Path, header: dict, resume: bool, writer_options: dict,
                     progress: bool, desc: str) -> float:
    """Run `renderer` into the canvas, journal and TIFF of `out_path`; the seconds it took. On failure, keep or
    remove the canvas and journal depending on whether a resume could use them."""
    from .encoder_process import PyramidTiffProcess
    from .files import partial_path
    from .pyramid_tiff import PyramidTiffWriter

    canvas_path, journal_path = side_paths(out_path)
    height, width = renderer.height, renderer.width
    encoder = PyramidTiffProcess if _in_child_processes(height, width) else PyramidTiffWriter
    journal = canvas = writer = recorder = reader = None
    try:
        journal = Journal(journal_path, header, resume=resume)
        canvas = open_canvas(canvas_path, height, width, create=not resume)
        # The reader's child starts first, so that it boots while this thread waits for the encoder's.
        reader = renderer.start_window_reader(journal.rows_done)
        try:
            writer = encoder(out_path, height, width, canvas=canvas.path, **writer_options)
        except OSError:  # no child process to be had (out of processes or memory): encode in a thread
            writer = PyramidTiffWriter(out_path, height, width, canvas=canvas.path, **writer_options)
        started = time.perf_counter()
        recorder = JournalThread(canvas, journal)
        # The TIFF is always rewritten whole; on resume the finished rows are read from the canvas.
        if journal.rows_done:
            writer.rows_ready(journal.rows_done)
        window_reader, reader = reader, None  # run closes it from here on
        renderer.run(_FileSink(canvas, recorder, writer), journal.rows_done, progress, desc=desc, reader=window_reader)
        recorder.close(record_pending=False)  # complete: canvas and journal are removed below
        # The writer's last step renames its temporary TIFF, <OUT>.partial, onto OUT, and a rename keeps the file's
        # identity: named in the journal first, it tells a resume after a kill between that rename and the clean-up
        # below that OUT is complete.
        output_options = {key: writer_options[key] for key in ("compression", "quality", "mpp")}
        journal.record_output(file_identity(partial_path(out_path)), output_options)
        writer.close()
        seconds = time.perf_counter() - started
        renderer.clock.seconds["encode"] = writer.busy_seconds
    except BaseException as exc:
        if reader is not None:
            reader.close()
        if writer is not None:
            writer.abort()
        # Journal what is on the canvas so far, so that a resume loses as little as possible; a failure of the
        # journal itself (the disk that just filled up) must not hide the exception being handled.
        if recorder is not None:
            with contextlib.suppress(Exception):
                recorder.close()
        if journal is not None:
            journal.close()
        if canvas is not None:
            canvas.close()
        # A fresh render that did not get as far as a canvas has nothing to resume.
        resumable = resume or canvas is not None
        error = _write_error(exc, out_path, resumable)
        # A user error (bad colour found mid-mask, a model's NaN) will recur on resume: keep nothing. An
        # interruption, a full disk or an internal error keeps canvas and journal so that `resume=True` continues;
        # and a resume refused before it began (another blend, say) leaves them as they were.
        user_error = isinstance(error, SafronInputError) and not isinstance(error, OutputWriteError)
        if not resumable or (user_error and (not resume or recorder is not None)):
            journal_path.unlink(missing_ok=True)
            canvas_path.unlink(missing_ok=True)
        if error is not exc:
            raise error from exc
        raise
    canvas.remove()
    journal.remove()  # last: while it exists, it says what the other files are
    return seconds
