"""One mask rendered in row bands: on a Dask client's workers, or as one band in this process.

The patch grid is global (`geometry.plan` of the whole mask grown by the render's outset), so a band is just a range
of output rows: its task renders every patch that touches the range, those straddling its edges included, and keeps
its own rows (`engine.render_band`, through `_Renderer.run(rows_end=)`), which are therefore the rows of a
single-process render, value for value. Bands start on chunk boundaries of the Zarr store they write and span whole
chunk rows, so each chunk has one writer and a band rerun by Dask (its worker died, its task failed) rewrites the same
whole chunks.

An OME-Zarr output is built under `OUT.partial` (`zarr_output`): the bands write level 0, then one task per chunk row
of each reduced level halves the level above, level by level, and the store is renamed onto OUT. A TIFF output goes
through a scratch store of level 0 beside OUT, which this process reads back in chunk rows into the same
`PyramidTiffWriter` a single-process render uses, so the TIFF is byte for byte that render's.

Resumable like a render in one process, with the store in the journal's place: it records what decides the pixels
and which bands are done, so after an interruption (Ctrl-C, a worker that died once too often, a full disk)
`resume=True` renders only the bands still missing.

When one band fails for a reason a rerun would meet again (a bad colour), the render stops and its store is removed.
Dask cannot stop a running task, so the bands already running are told instead: a Dask `Event` they look at before
each chunk row they write (`render_band(stop=)`), and the store is removed only after they have returned.

Nothing here imports the engine (which calls in): the band task comes in as `render_band`.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import zarr_output
from .files import partial_path, replace_folder
from .errors import OutputWriteError, SafronInputError, WorkerLostError

# Rows per band by default. Each band renders about one patch row (~236 rows) more than its own, so 4096 rows cost
# ~6 % more inference than one process would spend, in exchange for enough bands to keep workers busy on a slide.
DEFAULT_BAND_ROWS = 4096
# How often Dask reruns a band or level task that raised (an I/O hiccup on a shared disk). A worker that dies is
# Dask's business: its task is rescheduled anyway (up to distributed.scheduler.allowed-failures).
RETRIES = 2
# How long a failed render waits for the bands already running to see its stop signal (each looks once per chunk row,
# seconds to a minute of rendering) before it gives up on them.
STOP_WAIT_SECONDS = 600


@dataclass(frozen=True)
class BandOutcome:
    """What a band task reports: the patches it inferred (with those it recomputed at its edges), its backend, and
    its per-stage seconds (engine.STAGES)."""

    patches: int
    backend: str
    stage_seconds: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BandsResult:
    patches: int
    backend: str
    seconds: float
    stage_seconds: dict
    bands: int


def band_bounds(height: int, band_rows: int) -> list[tuple[int, int]]:
    """Row ranges [y0, y1) of the bands: `band_rows` each (a multiple of the chunk height), the last one shorter."""
    return [(y0, min(y0 + band_rows, height)) for y0 in range(0, height, band_rows)]


def scratch_store(out: Path) -> Path:
    """The level-0 store a TIFF render in bands writes before the TIFF is assembled from it."""
    return out.with_name(out.name + ".safron-bands.zarr")


class _Tasks:
    """Calls run as Dask tasks on `client`, or here, one after another, without one; either way one progress bar, each
    result handed to `on_result` as it comes (which may raise to stop), and the first failure raised after the tasks
    not yet started are cancelled. With `stoppable`, each call also gets `stop=`, an event that it should look at
    while it writes and return early once set: on a failure (Ctrl-C aside) it is set, and `run` raises only after the
    tasks already running have returned, so that nothing writes after it (module docstring)."""

    def __init__(self, client, progress: bool):
        self.client, self.progress = client, progress

    def run(self, function: Callable, calls: list[tuple], *, desc: str, weights: list[int], unit: str,
            on_result: Callable = lambda index, result: None, stoppable: bool = False, **options) -> list:
        from tqdm import tqdm

        results = [None] * len(calls)
        with tqdm(total=sum(weights), desc=desc, unit=unit, disable=not self.progress, dynamic_ncols=True) as bar:
            if self.client is None:
                for index, args in enumerate(calls):
                    results[index] = function(*args, **options)
                    on_result(index, results[index])
                    bar.update(weights[index])
                return results
            from distributed import Event, KilledWorker, as_completed, wait

            stop = Event(f"safron-stop-{uuid.uuid4().hex}", client=self.client) if stoppable else None
            if stop is not None:
                options = dict(options, stop=stop)
            futures = [self.client.submit(function, *args, **options, retries=RETRIES, pure=False,
                                          key=f"safron-{desc.replace(' ', '')}-{index}-{time.time_ns()}")
                       for index, args in enumerate(calls)]
            index_of = {future.key: index for index, future in enumerate(futures)}
            try:
                for future in as_completed(futures):
                    index = index_of[future.key]
                    try:
                        results[index] = future.result()
                    except KilledWorker:
                        raise WorkerLostError(
                            f"a Dask worker died each time it ran {desc} task {index + 1} of {len(calls)} (out of "
                            "memory? see the workers' logs); what is finished is kept: run the same command with "
                            "--resume to continue"
                        ) from None
                    on_result(index, results[index])
                    bar.update(weights[index])
            except Exception:
                if stop is not None:
                    # Tasks not yet started return at once; running ones at their next look.
                    stop.set()
                    # Past the wait, the failure is still what to report (`wait` raises TimeoutError then).
                    with contextlib.suppress(TimeoutError):
                        wait([f for f in futures if not f.done()], timeout=STOP_WAIT_SECONDS)
                raise
            finally:
                # Running tasks finish (Dask cannot stop them), but nothing new starts.
                self.client.cancel([f for f in futures if not f.done()])
        return results


def render_in_bands(
    render_band: Callable,
    mask: str,
    out: Path,
    height: int,
    width: int,
    *,
    mpp: float | None,
    chunk: int,
    band_rows: int,
    client,
    progress: bool,
    band_options: dict,
    tiff_options: dict | None,
    header: dict,
    resume: bool,
) -> BandsResult:
    """Render `mask` to `out`: an OME-Zarr (`tiff_options` None) or a TIFF written with `tiff_options` (those of
    `PyramidTiffWriter`). Without a client the whole mask is one band, rendered here with its own progress bar.

    `header` pins what decides the pixels (mask, model, options; the engine's journal header); the store records it
    with the bands, and each band is marked done in the store as its task reports back. An interrupted render (Ctrl-C,
    a worker that died once too often, a full disk) keeps its store, and `resume=True` renders only the bands not
    marked done, then the levels or the TIFF as always. An input error (a bad colour) removes the store: it would
    come back. Neither this nor a resume of another render's store (another header) is taken for the output."""
    tiff = tiff_options is not None
    store = scratch_store(out) if tiff else partial_path(out)
    bounds = band_bounds(height, band_rows) if client is not None else [(0, height)]
    header = dict(header, chunk=chunk, bands=[list(b) for b in bounds], mpp=mpp, output="tiff" if tiff else "zarr")
    if resume:
        _check_resumable(store, out, header)
        shapes = zarr_output.level_shapes(store)
    else:
        shapes = zarr_output.create(store, height, width, chunk=chunk, mpp=mpp, levels=not tiff, name=Path(mask).name,
                                    header=header)
    done = zarr_output.bands_done(store)
    todo = [(y0, y1) for y0, y1 in bounds if (y0, y1) not in done]
    tasks = _Tasks(client, progress and client is not None)
    started = time.perf_counter()

    def band_finished(index: int, outcome) -> None:
        if isinstance(outcome, SafronInputError):
            raise outcome
        zarr_output.mark_band_done(store, *todo[index])

    try:
        outcomes = tasks.run(render_band, [(mask, str(store), y0, y1) for y0, y1 in todo], desc="bands",
                             weights=[y1 - y0 for y0, y1 in todo], unit="row", on_result=band_finished, stoppable=True,
                             progress=progress and client is None, **band_options)
        for level in range(1, len(shapes)):
            level_bounds = band_bounds(shapes[level][0], chunk)
            tasks.run(zarr_output.build_level_rows, [(store, level, y0, y1) for y0, y1 in level_bounds],
                      desc=f"level {level}", weights=[y1 - y0 for y0, y1 in level_bounds], unit="row")
        if tiff:
            _assemble_tiff(store, out, height, width, chunk, tiff_options)
        else:
            zarr_output.unmark_bands(store)
            replace_folder(store, out)
    except BaseException as exc:
        # What a rerun would meet again (a bad colour) leaves nothing; anything else keeps the bands done so far.
        if isinstance(exc, SafronInputError) and not isinstance(exc, OutputWriteError):
            zarr_output.remove(store)
        raise
    zarr_output.remove(store)  # the TIFF's scratch store; an OME-Zarr's was renamed onto OUT
    stage_seconds: dict = {}
    for outcome in outcomes:
        for stage, seconds in outcome.stage_seconds.items():
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
    backend = outcomes[0].backend if outcomes else ""
    return BandsResult(sum(o.patches for o in outcomes), backend, time.perf_counter() - started, stage_seconds,
                       len(bounds))


def _check_resumable(store: Path, out: Path, header: dict) -> None:
    saved = zarr_output.render_header(store)
    if saved is None:
        raise SafronInputError(f"cannot resume: no interrupted render in bands of {out} (no {store.name}): run without "
                               "--resume to render it")
    # Both ways: an entry only one side has (say, the noise seed, left out at its default) differs too.
    for key in sorted(header.keys() | saved.keys()):
        if saved.get(key) != header.get(key):
            raise SafronInputError(f"cannot resume: {key} differs from the interrupted render ({saved.get(key)!r} != "
                                   f"{header.get(key)!r})")


def _assemble_tiff(store: Path, out: Path, height: int, width: int, chunk: int, tiff_options: dict) -> None:
    """The pyramidal TIFF from level 0 of `store`, one chunk row at a time (bounded memory); renamed onto `out` by
    the writer when complete."""
    from .pyramid_tiff import PyramidTiffWriter

    with PyramidTiffWriter(out, height, width, **tiff_options) as writer:
        for y0 in range(0, height, chunk):
            writer.write_rows(y0, zarr_output.read_rows(store, y0, min(y0 + chunk, height)))
