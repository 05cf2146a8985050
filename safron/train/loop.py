"""train(): the run loop around the Trainer: data, logs (losses.csv, TensorBoard, samples), checkpoints every N
steps, and a Ctrl-C that finishes the current step and saves."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .. import geometry
from ..data import TileDataset
from ..errors import SafronInputError
from ..pipeline import prefetch
from .checkpointing import (
    _is_onnx, _read_state, _stored_config, generator_from_onnx, latest_checkpoint, training_checkpoint,
)
from .config import (
    CHECKPOINTS_FOLDER, DEFAULT_KEEP, DEFAULT_SAMPLE_EVERY, DEFAULT_SAVE_EVERY, DEFAULT_STEPS, LOSSES_CSV,
    SAMPLES_FOLDER, TENSORBOARD_FOLDER, TrainConfig, TrainResult, check_config,
)
from .trainer import Trainer, _resolve_device, _resolve_precision, _sample_grid

_NOISE_NOTE = "; zero weights on the noise channels it did not read"
_REFIT_NOTE = "; its transposed decoder refitted as resizing and 3x3 convolutions (models.resize_decoder)"


class _Logs:
    """losses.csv, TensorBoard events (when tensorboard is installed) and sample PNGs of one run."""

    def __init__(self, run_dir: Path, start_step: int, loss_names: tuple[str, ...], note: Callable[[str], None]):
        self.run_dir = run_dir
        csv_path = run_dir / LOSSES_CSV
        # Rows beyond the checkpoint we resume from (a run killed between checkpoints) are replaced by the rerun.
        kept = []
        if start_step and csv_path.is_file():
            with open(csv_path, newline="", encoding="utf-8") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= start_step]
        self._csv_file = open(csv_path, "w", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=("step", *loss_names, "seconds"))
        self._csv.writeheader()
        self._csv.writerows(kept)
        self._csv_file.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._events = None
            note("tensorboard is not installed: losses go to losses.csv only (pip install tensorboard for event files)")
        else:
            self._events = SummaryWriter(str(run_dir / TENSORBOARD_FOLDER), purge_step=start_step + 1)

    def losses(self, step: int, losses: dict[str, float], seconds: float) -> None:
        self._csv.writerow({"step": step, **{k: f"{v:.6g}" for k, v in losses.items()}, "seconds": f"{seconds:.3f}"})
        self._csv_file.flush()
        if self._events is not None:
            for name, value in losses.items():
                self._events.add_scalar(f"loss/{name}", value, step)

    def sample(self, step: int, grid: np.ndarray) -> Path:
        folder = self.run_dir / SAMPLES_FOLDER
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{step:08d}.png"
        Image.fromarray(grid).save(path)
        if self._events is not None:
            self._events.add_image("samples", grid, step, dataformats="HWC")
        return path

    def close(self) -> None:
        self._csv_file.close()
        if self._events is not None:
            self._events.close()


@contextlib.contextmanager
def _finish_step_on_interrupt(note: Callable[[str], None]):
    """Yields an Event set by the first Ctrl-C, so that the loop stops between steps, where the state is
    consistent and can be saved; a second Ctrl-C interrupts at once. Only the main thread receives signals."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        note("interrupted: finishing this step and saving a checkpoint (Ctrl-C again to stop at once, unsaved)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _stderr_note(text: str) -> None:
    print(f"safron-train: {text}", file=sys.stderr, flush=True)


def train(
    run_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    resume: bool = False,
    save_every: int = DEFAULT_SAVE_EVERY,
    sample_every: int = DEFAULT_SAMPLE_EVERY,
    keep: int = DEFAULT_KEEP,
    device: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    note: Callable[[str], None] | None = _stderr_note,
    init: str | os.PathLike | None = None,
) -> TrainResult:
    """Train until `steps` steps are done in all, checkpointing into `run_dir`.

    A new run needs `config` and a `run_dir` without checkpoints. `resume=True` continues the run's latest
    checkpoint; a `config` given then must equal the stored one except for `data`. Checkpoints are written every
    `save_every` steps (0: only at the end) and when training stops, Ctrl-C included (the step under way is
    finished first; KeyboardInterrupt is then re-raised); sample grids every `sample_every` steps (0: never).
    `note` receives one-line remarks (None: silence). `init` starts a new run from the models and optimiser
    states of another run's checkpoint (a run directory or a checkpoint file; `training_checkpoint`), to
    fine-tune it with `config`: same widths, any other settings. Its step count starts again at 0. An `init`
    ending in .onnx (a safron-exported generator, such as the embedded default) gives the generator only; the
    discriminator and the optimisers then start fresh.
    """
    note = note or (lambda text: None)
    run_dir = Path(run_dir)
    for name, value, least in (("steps", steps, 1), ("save_every", save_every, 0), ("sample_every", sample_every, 0),
                               ("keep", keep, 1)):
        if not (isinstance(value, int) and value >= least):
            raise SafronInputError(f"{name} must be an integer >= {least}, got {value!r}")
    if threads is not None:
        if threads < 1:
            raise SafronInputError(f"threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    torch_device = _resolve_device(device)
    precision = _resolve_precision(precision, torch_device)
    if run_dir.exists() and not run_dir.is_dir():
        raise SafronInputError(f"{run_dir}: run directory path is a file")

    state_path = latest_checkpoint(run_dir)
    init_path, init_generator = None, None
    if init is not None:
        if resume:
            raise SafronInputError("init starts a new run from another run's checkpoint and resume continues this "
                                   "one: give one of them")
        if _is_onnx(init):
            init_path = Path(init).resolve()
            init_generator = generator_from_onnx(init_path)
        else:
            init_path = training_checkpoint(init).resolve()
        if config is not None:
            config = dataclasses.replace(config, init=str(init_path))
    if resume:
        if state_path is None:
            raise SafronInputError(f"{run_dir}: no checkpoint to resume (expected {CHECKPOINTS_FOLDER}/step-*.json)")
        stored = _stored_config(state_path)
        if config is not None:
            for field in dataclasses.fields(TrainConfig):
                given, kept = getattr(config, field.name), getattr(stored, field.name)
                # The data folder may have moved; tile None means "the dataset's choice", which the run stored.
                unchecked = field.name == "data" or (field.name == "tile" and given is None)
                if not unchecked and given != kept:
                    raise SafronInputError(
                        f"{run_dir}: the run was trained with {field.name}={kept!r}, not {given!r}; resume with its "
                        f"settings or start a new run"
                    )
            stored = dataclasses.replace(stored, data=config.data)
        config = stored
    elif state_path is not None:
        raise SafronInputError(f"{run_dir}: already holds a run; resume it or choose another run directory")
    elif config is None:
        raise SafronInputError("a new run needs a training config (at least the data folder)")
    check_config(config)
    # Stored absolute, so that --resume works from any working directory.
    config = dataclasses.replace(config, data=str(Path(config.data).resolve()))

    dataset = TileDataset(
        config.data, config.tile, margin=geometry.MARGIN, stride=config.stride, seed=config.seed,
        augment=config.augment, small_images=config.small_images,
    )
    if dataset.skipped:
        examples = ", ".join(f"{p.image.name} {p.height} x {p.width}" for p in dataset.skipped[:3])
        note(
            f"left out {len(dataset.skipped)} of {len(dataset.all_pairs)} images smaller than "
            f"{'the' if config.small_images == 'skip' else 'half the'} {dataset.tile} px tile "
            f"({examples}{', ...' if len(dataset.skipped) > 3 else ''})"
        )
    config = dataclasses.replace(config, tile=dataset.tile)
    trainer = Trainer(config, dataset, torch_device, precision)
    if state_path is not None:
        trainer.load(state_path)
    elif init_generator is not None:
        trainer.start_from(init_generator)
        refit = _REFIT_NOTE if trainer.refits(init_generator.upsample) else ""
        if trainer.widens(init_generator.config()):
            refit += _NOISE_NOTE
        note(f"starting from the generator of {init_path} (new discriminator and optimisers{refit})")
    elif init_path is not None:
        init_step = trainer.load(init_path, restore_step=False)
        init_state = _read_state(init_path)
        fresh = "; a portable checkpoint: new optimisers" if init_state.get("portable") else ""
        stored_generator = init_state.get("generator") or {}
        changes = (_REFIT_NOTE if trainer.refits(stored_generator.get("upsample")) else "") + (
            _NOISE_NOTE if trainer.widens(stored_generator) else "")
        if changes and not fresh:
            fresh = f"; a new generator optimiser{changes}"
        note(f"starting from {init_path} (step {init_step} of its run{fresh})")
    run_dir.mkdir(parents=True, exist_ok=True)
    if trainer.step >= steps:
        note(f"{run_dir}: already at step {trainer.step} of {steps}; nothing to do")
        return TrainResult(run_dir, trainer.step, state_path.with_suffix(".safetensors"), None)

    preview = dataset.preview()
    logs = _Logs(run_dir, trainer.step, config.loss_names, note)
    checkpoint, losses, saved_step = None, None, None
    per_step = config.tiles_per_step
    batches = prefetch(
        ([dataset.tile_at(step * per_step + k) for k in range(per_step)] for step in range(trainer.step, steps)),
        depth=2, name="safron-tiles",
    )
    bar = tqdm(total=steps, initial=trainer.step, unit="step", desc="train", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    try:
        with _finish_step_on_interrupt(note) as interrupted:
            for batch in batches:
                if interrupted.is_set():
                    break
                started = time.perf_counter()
                losses = trainer.train_step(batch)
                logs.losses(trainer.step, losses, time.perf_counter() - started)
                bar.set_postfix({k: f"{losses[k]:.3g}" for k in ("l1", "adv", "loss_d")}, refresh=False)
                bar.update()
                if sample_every and trainer.step % sample_every == 0:
                    logs.sample(trainer.step, _sample_grid(
                        trainer, [(preview, trainer.generate(preview)), (batch[0], trainer.last_output)]
                    ))
                if save_every and trainer.step % save_every == 0:
                    checkpoint, saved_step = trainer.save(run_dir, keep), trainer.step
            if saved_step != trainer.step:
                checkpoint = trainer.save(run_dir, keep)
            if interrupted.is_set():
                note(f"saved step {trainer.step} to {checkpoint}; continue with --resume")
                raise KeyboardInterrupt
    finally:
        bar.close()
        batches.close()
        logs.close()
    return TrainResult(run_dir, trainer.step, checkpoint, losses)
