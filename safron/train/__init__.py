"""SAFRON training: a patch generator trained through a tile-level discriminator on stitched tiles.

One step, on one tile (DESIGN.md, "The method"; with tiles_per_step N > 1, on N tiles at once, each cut and stitched
on its own, the generator and the discriminator each run once on the whole batch, and the losses are means over it):
  1. the tile's mask context (real surroundings, the mask mirrored beyond the image border) is cut into the
     generator's windows at the engine's patch positions (`geometry.plan(tile, tile).origins()`);
  2. the generator maps all windows of the tile as one batch; `stitch.stitch` blends the patches exactly as the
     engine's C++ accumulator does, so the loss sees the seams a render will have;
  3. discriminator step: BCE-with-logits of the PatchGAN on (mask, real tile) -> 1 and (mask, stitched) -> 0;
  4. generator step: lambda_l1 * L1(real, stitched) + lambda_adv * BCE(D(mask, stitched) -> 1), the
     non-saturating loss, with the discriminator as updated in step 3;
  5. optional (lambda_shift > 0, not in the paper): one more window at a random position inside the tile goes
     through the generator in the same batch, and lambda_shift * L1(its patch, the stitched tile under it) is
     added to the generator's loss. A render places patches at positions that bear no relation to the image
     content (the grid is spread evenly over each image size), so overlapping patches agree only if the generator
     is shift-consistent. Without this term a small generator learns textures locked to its patch grid (white
     dots every 32 px in uniform regions: the stride of its 8x8 decoder level) that double up where patches
     overlap at another phase.
Adam (lr 1e-4, beta1 0.5) for both. Optional (ema_decay > 0, not in the paper): after each step an exponential
moving average of the generator's weights moves towards them, and the run publishes the average (samples,
RUN_DIR/generator.safetensors, export): it smooths the step-to-step oscillation of GAN training.
Mixed precision (bf16, or fp16 with a gradient scaler) on CUDA only.

Reproducibility: the models are initialised from the seed, tile `k` is a pure function of (seed, k) (see
`safron.data`; step k trains on tiles kN .. kN + N - 1), and the torch RNG (dropout) is reseeded from (seed, k)
before step k. So on a CPU the same seed gives the same losses, and a resumed run continues with exactly the
losses an uninterrupted one would have had.
On CUDA runs are seeded but cuDNN may pick non-deterministic kernels.

A run directory holds
  checkpoints/step-NNNNNNNN.safetensors  generator, discriminator, both Adam states (no pickle) and the average
                                         (if any), with the generator config in its metadata, so `safron-export`
                                         reads it too
  checkpoints/step-NNNNNNNN.json         the training state: configs, step, optimiser settings, grad scaler
  generator.safetensors                  the latest published generator alone (`checkpoints.load_generator(RUN_DIR)`)
  losses.csv, tensorboard/, samples/step-NNNNNNNN.png (mask | real | generated)
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from . import geometry, masks
from .data import SMALL_IMAGES, TileDataset, TrainingTile
from .errors import ModelError, SafronInputError, first_line
from .files import written_atomically
from .losses import (
    GAN_LOSSES, augment_pair, discriminator_loss, feature_matching_loss, generator_adversarial_loss,
    parse_policy, sample_augmentation,
)
from .checkpoints import (
    CONFIG_METADATA_KEY, EMA_PREFIX, GENERATOR_PREFIX, RUN_DIR_CHECKPOINT, load_generator, save_checkpoint,
    tensors_under,
)
from .models import CONTEXTS, UPSAMPLING, Discriminator, Generator, unfold_one_hot
from .pipeline import prefetch
from .stitch import BLENDS, cut_windows, stitch

__all__ = [
    "TrainConfig", "TrainResult", "Trainer", "FourierContextConvolution", "check_config", "train", "load_generator",
    "latest_checkpoint", "training_checkpoint", "to_uint8", "LOSS_NAMES", "SHIFT_LOSS", "FM_LOSS",
]

CHECKPOINT_FORMAT = 1
CHECKPOINTS_FOLDER, SAMPLES_FOLDER, TENSORBOARD_FOLDER = "checkpoints", "samples", "tensorboard"
LOSSES_CSV = "losses.csv"
LOSS_NAMES = ("loss_g", "l1", "adv", "loss_d", "d_real", "d_fake")
SHIFT_LOSS = "shift"  # logged after LOSS_NAMES by runs with lambda_shift > 0
FM_LOSS = "fm"  # logged after them by runs with lambda_fm > 0
_DISCRIMINATOR_PREFIX = "discriminator."
_OPTIMISER_PREFIXES = {"generator": "optimiser.generator.", "discriminator": "optimiser.discriminator."}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_STEPS, DEFAULT_SAVE_EVERY, DEFAULT_SAMPLE_EVERY, DEFAULT_KEEP = 100_000, 500, 100, 3


@dataclass(frozen=True)
class TrainConfig:
    """What defines a run. Stored with every checkpoint and fixed for the run's life (only `data` may move)."""

    data: str
    tile: int | None = None  # None: the dataset's choice (728, or 492 when images are smaller); then stored
    stride: int | None = None  # None: random tile positions
    augment: bool = True
    ngf: int = 64
    ndf: int = 64
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    lambda_l1: float = 100.0
    lambda_adv: float = 1.0
    lambda_shift: float = 0.0  # shift-consistency weight (module docstring, step 5); 0 = the paper's method
    blend: str = "uniform"
    overlap: int = geometry.OVERLAP
    seed: int = 0
    init: str | None = None  # the training checkpoint a fine-tuning run started from (its .json), for the record
    ema_decay: float = 0.0  # > 0: also keep an exponential moving average of the generator, which the run publishes
    tiles_per_step: int = 1  # tiles stitched and judged as one batch per step: step k trains on tiles kN .. kN + N - 1
    # Not in the paper (safron.losses): feature matching on the discriminator's features, the adversarial loss's
    # form, DiffAugment on what the discriminator sees, and the discriminator's own learning rate (None: lr).
    lambda_fm: float = 0.0
    gan_loss: str = "bce"
    diffaugment: str = ""
    lr_d: float | None = None
    # Images smaller than the tile: "mirror" them beyond their border, or "skip" them (safron.data). Checkpoints
    # written before the choice existed skipped them, and load so (`_stored_config`).
    small_images: str = "mirror"
    upsample: str = "transpose"  # the generator's decoder (models.UPSAMPLING); "resize" avoids checkerboard grids
    context: str = "dense"  # how the generator reads the mask context (models.CONTEXTS); "dilated" is cheaper

    @property
    def loss_names(self) -> tuple[str, ...]:
        return LOSS_NAMES + ((SHIFT_LOSS,) if self.lambda_shift else ()) + ((FM_LOSS,) if self.lambda_fm else ())


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    step: int  # steps completed in all
    checkpoint: Path | None  # the latest training checkpoint (.safetensors)
    losses: dict[str, float] | None  # of the last step run in this call, None when none ran


class FourierContextConvolution(nn.Conv2d):
    """The generator's context convolution (41x41, stride 1, valid) computed through the FFT, for training.

    Same parameters, same function: a valid cross-correlation of an h x w input never wraps around in a circular
    one of size h x w, so out = irfft2(rfft2(x) * conj(rfft2(w))) cropped to the valid part. Its results differ
    from the direct convolution by float rounding only (about 1e-6 relative). Why: with a 41x41 kernel the direct
    convolution costs 1681 multiply-adds per output and input channel, and its weight gradient is the slowest
    layer of the whole step on CPUs; measured on 4 windows at ngf 32 (2 cores): 12.7 s of the generator's 20 s
    forward + backward directly, about 4 s through the FFT. Inference (ONNX, the torch backend) keeps the
    direct convolution.
    """

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> FourierContextConvolution:
        """A module computing `conv` that shares its parameters (so state-dict keys and optimiser state hold)."""
        if conv.stride != (1, 1) or conv.padding != (0, 0) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError(f"only stride-1 unpadded undilated ungrouped convolutions, got {conv}")
        fourier = cls(conv.in_channels, conv.out_channels, conv.kernel_size, bias=conv.bias is not None,
                      device="meta")
        fourier.weight, fourier.bias = conv.weight, conv.bias
        return fourier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        height, width = features.shape[-2:]
        kernel_h, kernel_w = self.kernel_size
        # FFTs stay in fp32 whatever autocast does around them (cuFFT takes half only at powers of two).
        with torch.autocast(features.device.type, enabled=False):
            spectrum = torch.fft.rfft2(features.float())
            kernels = torch.fft.rfft2(self.weight.float(), s=(height, width)).conj()
            # A sum over the few input channels: einsum would batch tiny matrices per frequency, far slower.
            product = sum(spectrum[:, c, None] * kernels[None, :, c] for c in range(self.in_channels))
            out = torch.fft.irfft2(product, s=(height, width))[..., :height - kernel_h + 1, :width - kernel_w + 1]
            if self.bias is not None:
                out = out + self.bias[:, None, None]
        return out


def _step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence((seed, step)).generate_state(1, np.uint64)[0])


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> uint8 (H, W, 3), rounded as the engine's accumulator rounds (accumulate.h)."""
    levels = torch.clamp(torch.floor((image.detach().float() + 1) * 127.5 + 0.5), 0, 255)
    return levels.to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def _flatten_optimiser(prefix: str, state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser state dict as flat tensors (for safetensors) plus the JSON-able rest."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}state.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimiser(prefix: str, tensors: dict[str, torch.Tensor], stored: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix) + len("state."):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in stored["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [dict(group, betas=tuple(group["betas"])) for group in stored["param_groups"]]
    return {"state": state, "param_groups": groups}


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The training-state JSON of the run's latest complete checkpoint, or None."""
    folder = Path(run_dir) / CHECKPOINTS_FOLDER
    if not folder.is_dir():
        return None
    complete = [p for p in folder.glob("step-*.json") if p.with_suffix(".safetensors").is_file()]
    return max(complete, key=lambda p: p.name, default=None)


def training_checkpoint(path: str | os.PathLike) -> Path:
    """The training-state JSON that `path` names: a run directory (its latest checkpoint), or a checkpoint's
    .json or .safetensors (both must be there)."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise SafronInputError(f"{path}: no training checkpoint in this run directory "
                                   f"(expected {CHECKPOINTS_FOLDER}/step-*.json)")
        return found
    state = path.with_suffix(".json")
    if path.suffix in (".json", ".safetensors") and state.is_file() and state.with_suffix(".safetensors").is_file():
        return state
    raise SafronInputError(f"{path}: not a run directory or a training checkpoint (a {CHECKPOINTS_FOLDER}/step-N.json "
                           f"beside its .safetensors)")


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable training checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: not a safron training checkpoint of format {CHECKPOINT_FORMAT}")
    return state


def _stored_config(state_path: Path) -> TrainConfig:
    training = _read_state(state_path).get("training")
    if isinstance(training, dict):
        training = {"small_images": "skip", **training}  # what runs did before the setting existed
    try:
        return TrainConfig(**training)
    except TypeError as exc:
        raise ModelError(f"{state_path}: training settings not understood ({exc})") from None


def generator_from_onnx(path: str | os.PathLike) -> Generator:
    """The generator of a safron-exported ONNX file (the embedded default model, say), in a form that trains: a
    folded context convolution is unfolded (`models.unfold_one_hot`). Fine-tuning starts from it with `init`: this
    is how training continues from a shipped model whose training run is gone."""
    from .backends.torch_backend import load_onnx_generator

    generator = unfold_one_hot(load_onnx_generator(path))
    return generator.train().requires_grad_(True)


def _is_onnx(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise SafronInputError(f"unknown device {device!r} (choose cpu, cuda or auto)")
    if device == "cuda" and not torch.cuda.is_available():
        raise SafronInputError("device cuda: no CUDA GPU is usable (or this PyTorch build has no CUDA)")
    return torch.device(device)


def _resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise SafronInputError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    if device.type != "cuda":
        # bf16 autocast runs on CPUs too (oneDNN, AMX/AVX-512 BF16 where present); fp16 would need loss scaling.
        if precision == "fp16":
            raise SafronInputError("precision fp16 needs a CUDA device; on the CPU choose fp32 or bf16")
        return "bf16" if precision == "bf16" else "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def check_config(config: TrainConfig) -> None:
    """A one-line SafronInputError for the first setting of `config` that cannot train."""
    if config.blend not in BLENDS:
        raise SafronInputError(f"unknown blend {config.blend!r} (choose from {', '.join(BLENDS)})")
    if config.tile is not None and config.tile < geometry.PATCH:
        raise SafronInputError(f"tile {config.tile} is smaller than the generator's {geometry.PATCH} px patch")
    if config.stride is not None and config.stride < 1:
        raise SafronInputError(f"stride must be at least 1, got {config.stride}")
    if not 0 <= config.overlap < geometry.PATCH:
        raise SafronInputError(f"overlap must be in [0, {geometry.PATCH}), got {config.overlap}")
    if not (isinstance(config.seed, int) and config.seed >= 0):
        raise SafronInputError(f"seed must be an integer >= 0, got {config.seed!r}")
    if not config.lr > 0:
        raise SafronInputError(f"lr must be positive, got {config.lr}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(config, name) < 1:
            raise SafronInputError(f"{name} must be in [0, 1), got {getattr(config, name)}")
    if not (config.lambda_l1 >= 0 and config.lambda_adv >= 0 and config.lambda_fm >= 0
            and config.lambda_l1 + config.lambda_adv + config.lambda_fm > 0):
        raise SafronInputError(
            f"lambda_l1, lambda_adv and lambda_fm must be >= 0 and not all 0, got {config.lambda_l1}, "
            f"{config.lambda_adv} and {config.lambda_fm}"
        )
    if config.gan_loss not in GAN_LOSSES:
        raise SafronInputError(f"unknown GAN loss {config.gan_loss!r} (choose from {', '.join(GAN_LOSSES)})")
    try:
        parse_policy(config.diffaugment)
    except ValueError as exc:
        raise SafronInputError(str(exc)) from None
    if config.context not in CONTEXTS:
        raise SafronInputError(f"context must be one of {', '.join(CONTEXTS)}, got {config.context!r}")
    if config.upsample not in UPSAMPLING:
        raise SafronInputError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {config.upsample!r}")
    if config.small_images not in SMALL_IMAGES:
        raise SafronInputError(f"small_images must be one of {', '.join(SMALL_IMAGES)}, got {config.small_images!r}")
    if config.lr_d is not None and not config.lr_d > 0:
        raise SafronInputError(f"lr_d must be positive, got {config.lr_d}")
    if not config.lambda_shift >= 0:
        raise SafronInputError(f"lambda_shift must be >= 0, got {config.lambda_shift}")
    if not 0 <= config.ema_decay < 1:
        raise SafronInputError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    if not (isinstance(config.tiles_per_step, int) and config.tiles_per_step >= 1):
        raise SafronInputError(f"tiles_per_step must be an integer >= 1, got {config.tiles_per_step!r}")


class Trainer:
    """The models, optimisers and step counter of one run, and the training step itself."""

    def __init__(self, config: TrainConfig, dataset: TileDataset, device: torch.device, precision: str = "fp32"):
        check_config(config)
        self.config, self.dataset, self.device, self.precision = config, dataset, device, precision
        torch.manual_seed(config.seed)
        self.generator = Generator(ngf=config.ngf, upsample=config.upsample, context=config.context).to(device)
        if config.context == "dense":
            self.generator.context = FourierContextConvolution.replacing(self.generator.context)
        self.discriminator = Discriminator(ndf=config.ndf).to(device)
        margin = (self.generator.window - self.generator.patch) // 2
        if dataset.tile < self.generator.patch or dataset.margin != margin:
            raise ValueError(
                f"a {dataset.tile} px tile with margin {dataset.margin} does not fit the generator's "
                f"{self.generator.patch} px patch with margin {margin}"
            )
        self.plan = geometry.plan(dataset.tile, dataset.tile, self.generator.patch, margin, config.overlap)
        self._origins = self.plan.origins()
        betas = (config.beta1, config.beta2)
        self.optimiser_g = torch.optim.Adam(self.generator.parameters(), lr=config.lr, betas=betas)
        self.optimiser_d = torch.optim.Adam(self.discriminator.parameters(), lr=self._lr_d, betas=betas)
        self._augmentations = parse_policy(config.diffaugment)
        self._autocast_type = _AUTOCAST_TYPES.get(precision)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.step = 0
        self.last_output: torch.Tensor | None = None
        self.generator_ema = self._new_average() if config.ema_decay else None

    @property
    def _lr_d(self) -> float:
        return self.config.lr if self.config.lr_d is None else self.config.lr_d

    def _new_average(self) -> Generator:
        """A copy of the generator, outside autograd, that `_update_average` moves towards it after each step."""
        average = copy.deepcopy(self.generator).requires_grad_(False)
        return average.eval()

    @torch.no_grad()
    def _update_average(self) -> None:
        weight = 1 - self.config.ema_decay
        for average, current in zip(self.generator_ema.parameters(), self.generator.parameters()):
            average.lerp_(current.detach(), weight)

    @property
    def published_generator(self) -> Generator:
        """The generator the run publishes (samples, RUN_DIR/generator.safetensors, export): the moving average
        when the run keeps one."""
        return self.generator_ema if self.generator_ema is not None else self.generator

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self._autocast_type, enabled=self._autocast_type is not None)

    def _tensors(self, tile: TrainingTile) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask context [3, T + 2 margin, T + 2 margin], mask tile [1, 3, T, T], real tile [1, 3, T, T])."""
        context = torch.from_numpy(masks.labels_to_model_input(tile.context)).to(self.device)
        margin, size = self.plan.margin, self.plan.height
        mask_tile = context[None, :, margin:margin + size, margin:margin + size]
        real = torch.from_numpy(tile.image).to(self.device).permute(2, 0, 1)[None].float() / 127.5 - 1
        return context, mask_tile, real

    def _stitched(self, windows: torch.Tensor, generator: Generator | None = None,
                  tiles: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(`tiles` tiles [tiles, 3, T, T], each stitched from its plan's windows, which come first in `windows`,
        tile after tile; the patches of the windows after them), by `generator` (default: the one being trained)."""
        with self._autocast():
            patches = (generator or self.generator)(windows)
        ys, xs = self._origins
        count = len(ys)
        stitched = torch.stack([
            stitch(patches[k * count:(k + 1) * count], ys, xs, self.plan.height, self.plan.width, self.config.blend,
                   self.plan.overlap)
            for k in range(tiles)
        ])
        return stitched, patches[tiles * count:]

    def train_step(self, tiles: TrainingTile | Sequence[TrainingTile]) -> dict[str, float]:
        """One D step and one G step on `tiles` (one tile, or a batch of tiles of the same size, usually
        `config.tiles_per_step` of them); returns the losses (`config.loss_names`, means over the batch) and keeps
        the first tile's stitched output in `last_output` ([3, T, T], detached)."""
        config = self.config
        tiles = [tiles] if isinstance(tiles, TrainingTile) else list(tiles)
        torch.manual_seed(_step_seed(config.seed, self.step))
        self.generator.train()
        self.discriminator.train()
        contexts, mask_tiles, reals = zip(*(self._tensors(tile) for tile in tiles))
        mask_tile, real = torch.cat(mask_tiles), torch.cat(reals)
        # Every tile's windows in one generator batch: InstanceNorm is per patch, so batching changes nothing.
        windows = torch.cat([cut_windows(context, self.plan) for context in contexts])
        if config.lambda_shift:
            # Any position, so that patterns locked to the patch grid at any period disagree with the stitched
            # tile; drawn from the step's seed, in the first tile, and in the same batch.
            y, x = torch.randint(0, self.plan.height - self.plan.patch + 1, (2,)).tolist()
            window = self.plan.window
            windows = torch.cat([windows, contexts[0][None, :, y:y + window, x:x + window]])
        fake, extra = self._stitched(windows, tiles=len(tiles))

        # One draw of DiffAugment per tile, applied alike to its real and generated pair (and again in the G step),
        # so that feature matching compares identically augmented images.
        augmentation = None
        if self._augmentations:
            augmentation = sample_augmentation(self._augmentations, len(tiles), *real.shape[-2:], self.device)

        def judged(mask: torch.Tensor, image: torch.Tensor, copies: int = 1):
            if augmentation is None:
                return mask, image
            return augment_pair(mask, image, augmentation.repeat(copies))

        # Real and fake go through the discriminator as one batch: InstanceNorm keeps them independent.
        n = len(tiles)
        with self._autocast():
            logits = self.discriminator(*judged(mask_tile.repeat(2, 1, 1, 1), torch.cat([real, fake.detach()]), 2))
            d_real, d_fake = discriminator_loss(config.gan_loss, logits[:n], logits[n:])
            loss_d = d_real + d_fake
        self.optimiser_d.zero_grad(set_to_none=True)
        self.scaler.scale(loss_d).backward()
        self.scaler.step(self.optimiser_d)

        self.discriminator.requires_grad_(False)
        try:
            with self._autocast():
                if config.lambda_fm:
                    # The real tiles' features by the discriminator as just updated, the one the fake is judged by.
                    with torch.no_grad():
                        _, real_features = self.discriminator.logits_and_features(*judged(mask_tile, real))
                    fake_logits, fake_features = self.discriminator.logits_and_features(*judged(mask_tile, fake))
                else:
                    fake_logits = self.discriminator(*judged(mask_tile, fake))
                adv = generator_adversarial_loss(config.gan_loss, fake_logits)
            l1 = (fake - real).abs().mean()
            loss_g = config.lambda_l1 * l1 + config.lambda_adv * adv
            extra_losses = []
            if config.lambda_shift:
                patch = self.plan.patch
                shift = (extra[0].float() - fake[0, :, y:y + patch, x:x + patch]).abs().mean()
                loss_g = loss_g + config.lambda_shift * shift
                extra_losses.append(shift)
            if config.lambda_fm:
                matching = feature_matching_loss(fake_features, real_features)
                loss_g = loss_g + config.lambda_fm * matching
                extra_losses.append(matching)
            self.optimiser_g.zero_grad(set_to_none=True)
            self.scaler.scale(loss_g).backward()
            self.scaler.step(self.optimiser_g)
            self.scaler.update()
        finally:
            self.discriminator.requires_grad_(True)
        if self.generator_ema is not None:
            self._update_average()
        self.step += 1
        self.last_output = fake.detach()[0]
        values = (loss_g, l1, adv, loss_d, d_real, d_fake, *extra_losses)
        return dict(zip(config.loss_names, torch.stack([v.detach().float() for v in values]).tolist()))

    @torch.no_grad()
    def generate(self, tile: TrainingTile) -> torch.Tensor:
        """The stitched image [3, T, T] of `tile`'s mask by the published generator, in eval mode (no dropout), as
        a render would make it."""
        generator = self.published_generator
        mode = generator.training
        generator.eval()
        try:
            return self._stitched(cut_windows(self._tensors(tile)[0], self.plan), generator)[0][0]
        finally:
            generator.train(mode)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors for safetensors, JSON-able training state) of the current step."""
        tensors = {GENERATOR_PREFIX + k: v for k, v in self.generator.state_dict().items()}
        if self.generator_ema is not None:
            tensors |= {EMA_PREFIX + k: v for k, v in self.generator_ema.state_dict().items()}
        tensors |= {_DISCRIMINATOR_PREFIX + k: v for k, v in self.discriminator.state_dict().items()}
        optimisers = {}
        for name, optimiser in (("generator", self.optimiser_g), ("discriminator", self.optimiser_d)):
            flat, rest = _flatten_optimiser(_OPTIMISER_PREFIXES[name], optimiser.state_dict())
            tensors |= flat
            optimisers[name] = rest
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "training": dataclasses.asdict(self.config),
            "generator": self.generator.config(),
            "discriminator": self.discriminator.config(),
            "optimisers": optimisers,
            "grad_scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }
        return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, state

    def save(self, run_dir: Path, keep: int = DEFAULT_KEEP) -> Path:
        """Write the checkpoint of the current step (and RUN_DIR/generator.safetensors); keep the newest `keep`."""
        folder = run_dir / CHECKPOINTS_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        tensors, state = self.state()
        weights = folder / f"step-{self.step:08d}.safetensors"
        metadata = {CONFIG_METADATA_KEY: json.dumps(self.generator.config(), sort_keys=True)}
        with written_atomically(weights) as temporary:  # a checkpoint is either complete or absent
            save_file(tensors, str(temporary), metadata=metadata)
        published = {"safron.step": str(self.step)}
        if self.generator_ema is not None:
            published["safron.ema_decay"] = repr(self.config.ema_decay)
        save_checkpoint(self.published_generator, run_dir / RUN_DIR_CHECKPOINT, metadata=published)
        # The JSON goes last: it is what marks the checkpoint complete.
        text = json.dumps(state, indent=2, sort_keys=True) + "\n"
        with written_atomically(weights.with_suffix(".json")) as temporary:
            temporary.write_text(text, encoding="utf-8")
        for old in sorted(folder.glob("step-*.json"))[:-keep]:
            old.unlink()
            old.with_suffix(".safetensors").unlink(missing_ok=True)
        return weights

    def start_from(self, generator: Generator) -> None:
        """Take `generator`'s weights (e.g. of an exported ONNX file, `generator_from_onnx`) as this run's starting
        point; the discriminator and both optimisers start fresh, the moving average (if any) at the generator."""
        if generator.config() != self.generator.config():
            theirs, ours = generator.config(), self.generator.config()
            differing = ", ".join(f"{key} {theirs.get(key)!r} there, {ours.get(key)!r} here"
                                  for key in ours if theirs.get(key) != ours[key])
            raise SafronInputError(f"the initial generator does not fit this run ({differing})")
        self.generator.load_state_dict(generator.state_dict())
        if self.generator_ema is not None:
            self.generator_ema.load_state_dict(generator.state_dict())

    def _difference(self, state: dict, failure: BaseException) -> str:
        """What makes a checkpoint's models differ from this run's: the settings, else the loader's message."""
        differing = [
            f"{name} {key} {stored[key]!r} there, {value!r} here"
            for name, model in (("generator", self.generator), ("discriminator", self.discriminator))
            for stored in [state.get(name) or {}]
            for key, value in model.config().items()
            if key in stored and stored[key] != value
        ]
        return "; ".join(differing) or first_line(failure)

    def load(self, state_path: Path, restore_step: bool = True) -> int:
        """Restore models, optimisers, scaler and (with `restore_step`) the step from a checkpoint written by
        `save`; return the checkpoint's step. The optimisers keep this run's learning rate and betas: a
        fine-tuning run may change them."""
        state = _read_state(state_path)
        weights = state_path.with_suffix(".safetensors")
        try:
            tensors = load_file(str(weights), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ModelError(f"{weights}: unreadable checkpoint ({first_line(exc)})") from None
        try:
            for prefix, model in ((GENERATOR_PREFIX, self.generator), (_DISCRIMINATOR_PREFIX, self.discriminator)):
                model.load_state_dict(tensors_under(tensors, prefix))
            if self.generator_ema is not None:
                # A checkpoint of a run without an average (fine-tuning with --init) starts it at its generator.
                self.generator_ema.load_state_dict(tensors_under(tensors, EMA_PREFIX) or self.generator.state_dict())
            for name, optimiser in (("generator", self.optimiser_g), ("discriminator", self.optimiser_d)):
                optimiser.load_state_dict(
                    _unflatten_optimiser(_OPTIMISER_PREFIXES[name], tensors, state["optimisers"][name])
                )
        except (KeyError, RuntimeError, ValueError) as exc:
            difference = self._difference(state, exc)
            raise ModelError(f"{weights}: does not fit the models of this run ({difference})") from None
        betas = (self.config.beta1, self.config.beta2)
        for optimiser, lr in ((self.optimiser_g, self.config.lr), (self.optimiser_d, self._lr_d)):
            for group in optimiser.param_groups:
                group["lr"], group["betas"] = lr, betas
        if state["grad_scaler"] is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["grad_scaler"])
        if restore_step:
            self.step = int(state["step"])
        return int(state["step"])


def _sample_grid(trainer: Trainer, rows: list[tuple[TrainingTile, torch.Tensor]]) -> np.ndarray:
    """uint8 image: one row per (tile, generated image), each mask | real | generated, on a white background."""
    margin, size = trainer.plan.margin, trainer.plan.height
    gap = 8
    grid = np.full((len(rows) * (size + gap) - gap, 3 * size + 2 * gap, 3), 255, np.uint8)
    for row, (tile, generated) in enumerate(rows):
        panels = (
            masks.labels_to_colour(tile.context[margin:margin + size, margin:margin + size]),
            tile.image,
            to_uint8(generated),
        )
        top = row * (size + gap)
        for column, panel in enumerate(panels):
            left = column * (size + gap)
            grid[top:top + size, left:left + size] = panel
    return grid


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
            f"{'the' if config.small_images == 'skip' else 'half the'} {dataset.tile} px tile ({examples}{', ...' if len(dataset.skipped) > 3 else ''})"
        )
    config = dataclasses.replace(config, tile=dataset.tile)
    trainer = Trainer(config, dataset, torch_device, precision)
    if state_path is not None:
        trainer.load(state_path)
    elif init_generator is not None:
        trainer.start_from(init_generator)
        note(f"starting from the generator of {init_path} (new discriminator and optimisers)")
    elif init_path is not None:
        init_step = trainer.load(init_path, restore_step=False)
        note(f"starting from {init_path} (step {init_step} of its run)")
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


if __name__ == "__main__":  # python -m safron.train: the same as safron-train
    from .cli.train import main

    sys.exit(main())
