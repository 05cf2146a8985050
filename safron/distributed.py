"""Many masks on Dask distributed: one render task per mask, on a local cluster or a scheduler's workers.

`render_many(masks, out_dir)` renders each mask to `out_dir/<mask stem>.tif` as `engine.render` would, one task
per mask. Without a client it starts a local cluster of worker processes (one per core, one render thread each);
given `client=` (or `safron-render ... --scheduler ADDRESS`) it uses that cluster's workers, which need safron and
read access to the masks and the output folder at the same paths. Dask schedules and retries; nothing here is a
scheduler of its own.

A job's outcome depends on what its output folder already holds, so a rerun picks up where the last one stopped:
a complete output is skipped, an output with a canvas and journal beside it is resumed (the same bytes as an
uninterrupted render, `engine.render(resume=True)`), anything else is rendered. A mask that fails (a bad colour, an
unreadable file) is reported with its one-line message and the others go on. A worker process that dies mid-job
(killed, out of memory) loses nothing but time: Dask reruns the task on another worker, which resumes from the
journal, since a render's canvas and journal are on disk and its output appears only when complete.

One large mask split into row bands across workers is `engine.render(mask, out, client=...)` (`safron.bands`).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .canvas import side_paths
from .errors import SafronInputError, first_line

__all__ = ["JobOutcome", "STATUSES", "local_client", "output_path", "render_many", "scheduler_client"]

# What happened to each mask: rendered from scratch, resumed from its journal, skipped as complete, or failed.
STATUSES = ("rendered", "resumed", "skipped", "failed")


@dataclass(frozen=True)
class JobOutcome:
    mask: str
    out: str
    status: str  # one of STATUSES
    message: str = ""  # the one-line reason of a failure
    seconds: float = 0.0
    internal: bool = False  # a failure that is our bug (a traceback's worth), not the user's input


def output_path(mask: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Where `render_many` writes the render of `mask`: OUT_DIR/<mask file name without suffix>.tif."""
    return Path(out_dir) / f"{Path(mask).stem}.tif"


def _require_distributed(what: str):
    try:
        import distributed
    except ImportError:
        raise SafronInputError(f"{what} needs Dask distributed: pip install 'safron[distributed]'") from None
    return distributed


@contextlib.contextmanager
def local_client(workers: int):
    """A client of a local cluster of `workers` worker processes with one thread each, closed on exit. Processes with
    nannies: a worker that dies is restarted and its task rerun elsewhere."""
    distributed = _require_distributed("rendering on local workers")
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    try:
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


@contextlib.contextmanager
def scheduler_client(address: str):
    """A client of the Dask scheduler at `address` (e.g. tcp://host:8786), closed on exit; one line if unreachable."""
    distributed = _require_distributed(f"--scheduler {address}")
    try:
        client = distributed.Client(address, timeout="10s")
    except OSError as exc:
        raise SafronInputError(f"--scheduler {address}: cannot connect ({first_line(exc)})") from None
    with client:
        yield client


def _render_one(mask: str, out: str, options: dict) -> JobOutcome:
    """One job, run on a worker: skip, resume or render `mask` to `out` according to what is on disk."""
    from . import engine

    out_path = Path(out)
    canvas, journal = side_paths(out_path)
    started = time.perf_counter()
    if out_path.is_file() and not journal.exists():
        return JobOutcome(mask, out, "skipped")
    resume = journal.exists() and canvas.exists()
    try:
        engine.render(mask, out_path, resume=resume, progress=False, **options)
    except SafronInputError as exc:
        return JobOutcome(mask, out, "failed", first_line(exc), time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001 - one mask's bug must not cost the others their renders
        return JobOutcome(mask, out, "failed", f"internal error: {type(exc).__name__}: {first_line(exc)}",
                          time.perf_counter() - started, internal=True)
    return JobOutcome(mask, out, "resumed" if resume else "rendered", "", time.perf_counter() - started)


def _check_masks(masks: Sequence[str | os.PathLike], out_dir: Path) -> list[tuple[str, str]]:
    if not masks:
        raise SafronInputError("no masks to render")
    pairs, seen = [], {}
    for mask in masks:
        out = output_path(mask, out_dir)
        if out.name in seen:
            raise SafronInputError(f"{mask} and {seen[out.name]} would both be rendered to {out}: rename one")
        seen[out.name] = mask
        pairs.append((str(Path(mask).resolve()), str(out.resolve())))
    return pairs


def render_many(
    masks: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    client=None,
    workers: int | None = None,
    retries: int = 2,
    progress: bool = True,
    **options,
) -> list[JobOutcome]:
    """Render every mask to `output_path(mask, out_dir)` on Dask workers; the outcomes in the order of `masks`.

    `client`: a `distributed.Client` to use; None starts a local cluster of `workers` processes (default: one per
    core, at most one per mask), each rendering with one thread unless `threads` is given. `retries`: how often
    Dask reruns the job of a worker that died. `options` are `engine.render`'s (model, backend, blend, compression,
    quality, threads, ...), the same for every mask; they are checked by the first job to use them.
    """
    as_completed = _require_distributed("rendering many masks").as_completed
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SafronInputError(f"{out_dir}: is a file, not an output folder")
    if workers is not None and workers < 1:
        raise SafronInputError(f"workers must be at least 1, got {workers}")
    pairs = _check_masks(masks, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "model" in options and options["model"] is not None:
        options["model"] = str(Path(options["model"]).resolve())  # workers may start elsewhere

    own = contextlib.ExitStack()
    if client is None:
        if options.get("threads") is None:  # one render thread per worker process: the cores are the workers'
            options["threads"] = 1
        client = own.enter_context(local_client(workers or min(len(pairs), os.cpu_count() or 1)))
    outcomes: dict[str, JobOutcome] = {}
    with own:
        futures = [client.submit(_render_one, mask, out, options, key=f"safron-render-{index}-{Path(mask).name}",
                                 retries=retries, pure=False)
                   for index, (mask, out) in enumerate(pairs)]
        job_of = {future.key: pair for future, pair in zip(futures, pairs)}
        with tqdm(total=len(futures), desc="render", unit="mask", disable=not progress, dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                try:
                    outcome = future.result()
                except Exception as exc:  # noqa: BLE001 - its worker died more often than `retries` allows
                    mask, out = job_of[future.key]
                    outcome = JobOutcome(mask, out, "failed", f"its worker died ({first_line(exc)}); rerun to resume",
                                         internal=True)
                outcomes[outcome.mask] = outcome
                bar.update()
                if outcome.status == "failed":
                    bar.write(f"{Path(outcome.mask).name}: {outcome.message}")
    return [outcomes[mask] for mask, _ in pairs]
