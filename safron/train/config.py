"""A training run's settings: TrainConfig (what defines a run, stored with each checkpoint), TrainResult,
the run directory's names and the defaults of safron-train."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import geometry
from ..data import SMALL_IMAGES
from ..errors import SafronInputError
from ..losses import GAN_LOSSES, GRID_FOLDS, grid_periods, parse_policy
from ..models import CONTEXTS, MIN_U_NET_LEVELS, U_NET_LEVELS, UPSAMPLING
from ..stitch import BLENDS


CHECKPOINT_FORMAT = 1
CHECKPOINTS_FOLDER, SAMPLES_FOLDER, TENSORBOARD_FOLDER = "checkpoints", "samples", "tensorboard"
LOSSES_CSV = "losses.csv"
LOSS_NAMES = ("loss_g", "l1", "adv", "loss_d", "d_real", "d_fake")
SHIFT_LOSS = "shift"  # logged after LOSS_NAMES by runs with lambda_shift > 0
FM_LOSS = "fm"  # logged after them by runs with lambda_fm > 0
GRID_LOSS = "grid"  # logged after them by runs with lambda_grid > 0
TEXTURE_LOSS = "texture"  # logged after them by runs with lambda_texture > 0
COLOUR_LOSS = "colour"  # logged after them by runs with lambda_colour > 0
GRID_PERIODS = grid_periods(geometry.PATCH, geometry.PATCH)  # what --grid-period may be
_DISCRIMINATOR_PREFIX = "discriminator."
_OPTIMISER_PREFIXES = {"generator": "optimiser.generator.", "discriminator": "optimiser.discriminator."}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_NOISE_CHANNELS = 16  # a few are enough for texture; many would only slow the context layer
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
    # The shift-consistency loss compares PX x PX block means (1: pixels): with PX > 1 only structures larger than
    # the blocks (lumens, the epithelium) must agree wherever the patch grid falls, and fine texture may differ.
    shift_scale: int = 1
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
    levels: int = U_NET_LEVELS  # the generator's U-Net depth (models.U_NET_LEVELS); fewer keep its decisions local
    # Grid lock (losses.grid_lock_loss): each generated patch folded modulo grid_period must be flat. 64, the largest
    # fold that still averages four repeats each way: at 32 a CPU fine-tune moved its lattice to period 64.
    lambda_grid: float = 0.0
    grid_period: int = 64
    # "patch": each patch folded on its own; "class": all patches of the step pooled, one fold per mask class (less
    # texture left in the fold, and a lattice drawn only inside one class is seen whole). Older checkpoints: "patch".
    grid_fold: str = "patch"
    # Channels of uniform noise the generator reads beside the mask (models.Generator, safron.noise); 0: none.
    noise_channels: int = 0
    # Texture loss (safron.texture_loss): per mask class, the distributions of EfficientNet-Lite0 features of the
    # generated and the real tile must match (sliced Wasserstein); 0: off.
    lambda_texture: float = 0.0
    # Colour loss (losses.colour_loss): per mask class, the distributions of the generated and the real tile's RGB
    # colours must match (sliced Wasserstein); 0: off.
    lambda_colour: float = 0.0

    @property
    def loss_names(self) -> tuple[str, ...]:
        return (LOSS_NAMES + ((SHIFT_LOSS,) if self.lambda_shift else ()) + ((FM_LOSS,) if self.lambda_fm else ())
                + ((GRID_LOSS,) if self.lambda_grid else ()) + ((TEXTURE_LOSS,) if self.lambda_texture else ())
                + ((COLOUR_LOSS,) if self.lambda_colour else ()))


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    step: int  # steps completed in all
    checkpoint: Path | None  # the latest training checkpoint (.safetensors)
    losses: dict[str, float] | None  # of the last step run in this call, None when none ran




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
    if not (isinstance(config.levels, int) and MIN_U_NET_LEVELS <= config.levels <= U_NET_LEVELS):
        raise SafronInputError(f"levels must be an integer in [{MIN_U_NET_LEVELS}, {U_NET_LEVELS}], "
                               f"got {config.levels!r}")
    if config.upsample not in UPSAMPLING:
        raise SafronInputError(f"upsample must be one of {', '.join(UPSAMPLING)}, got {config.upsample!r}")
    if config.small_images not in SMALL_IMAGES:
        raise SafronInputError(f"small_images must be one of {', '.join(SMALL_IMAGES)}, got {config.small_images!r}")
    if config.lr_d is not None and not config.lr_d > 0:
        raise SafronInputError(f"lr_d must be positive, got {config.lr_d}")
    if not config.lambda_shift >= 0:
        raise SafronInputError(f"lambda_shift must be >= 0, got {config.lambda_shift}")
    if not (isinstance(config.shift_scale, int) and 1 <= config.shift_scale <= geometry.PATCH):
        raise SafronInputError(f"shift_scale must be an integer in [1, {geometry.PATCH}], got {config.shift_scale!r}")
    if not config.lambda_texture >= 0:
        raise SafronInputError(f"lambda_texture must be >= 0, got {config.lambda_texture}")
    if not config.lambda_colour >= 0:
        raise SafronInputError(f"lambda_colour must be >= 0, got {config.lambda_colour}")
    if not config.lambda_grid >= 0:
        raise SafronInputError(f"lambda_grid must be >= 0, got {config.lambda_grid}")
    if config.grid_period not in GRID_PERIODS:
        raise SafronInputError(f"grid_period must be one of {', '.join(map(str, GRID_PERIODS))} (it divides the "
                               f"{geometry.PATCH} px patch and fits into it three times), got {config.grid_period!r}")
    if config.grid_fold not in GRID_FOLDS:
        raise SafronInputError(f"grid_fold must be one of {', '.join(GRID_FOLDS)}, got {config.grid_fold!r}")
    if not (isinstance(config.noise_channels, int) and 0 <= config.noise_channels <= MAX_NOISE_CHANNELS):
        raise SafronInputError(f"noise_channels must be an integer in [0, {MAX_NOISE_CHANNELS}], got "
                               f"{config.noise_channels!r}")
    if not 0 <= config.ema_decay < 1:
        raise SafronInputError(f"ema_decay must be in [0, 1), got {config.ema_decay}")
    if not (isinstance(config.tiles_per_step, int) and config.tiles_per_step >= 1):
        raise SafronInputError(f"tiles_per_step must be an integer >= 1, got {config.tiles_per_step!r}")
