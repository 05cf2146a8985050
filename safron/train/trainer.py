"""The Trainer: one training step (stitch, discriminator step, generator step), its models and optimisers, and
the state a checkpoint holds."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from .. import geometry, masks
from ..data import TileDataset, TrainingTile
from ..errors import ModelError, SafronInputError, first_line
from ..files import written_atomically
from ..losses import (
    augment_pair, colour_loss, discriminator_loss, feature_matching_loss, generator_adversarial_loss, grid_lock_loss,
    parse_policy, sample_augmentation,
)
from ..checkpoints import (
    CONFIG_METADATA_KEY, EMA_PREFIX, GENERATOR_PREFIX, METADATA_LOSS_NETWORKS, RUN_DIR_CHECKPOINT, save_checkpoint,
    tensors_under,
)
from ..models import Discriminator, Generator, resize_decoder, with_noise
from ..noise import uniform_noise
from ..stitch import cut_windows, stitch
from ..texture_loss import TEXTURE_NETWORK, texture_features, texture_loss
from .checkpointing import _flatten_optimiser, _unflatten_optimiser, read_checkpoint
from .config import (
    CHECKPOINTS_FOLDER, CHECKPOINT_FORMAT, DEFAULT_KEEP, PRECISIONS, TrainConfig, _AUTOCAST_TYPES,
    _DISCRIMINATOR_PREFIX, _OPTIMISER_PREFIXES, check_config,
)


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




class Trainer:
    """The models, optimisers and step counter of one run, and the training step itself."""

    def __init__(self, config: TrainConfig, dataset: TileDataset, device: torch.device, precision: str = "fp32"):
        check_config(config)
        self.config, self.dataset, self.device, self.precision = config, dataset, device, precision
        torch.manual_seed(config.seed)
        self.generator = Generator(ngf=config.ngf, upsample=config.upsample, context=config.context,
                                   levels=config.levels, noise_channels=config.noise_channels).to(device)
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
        # Frozen, outside the optimisers and the checkpoint: the same pretrained weights every time.
        self.texture_features = texture_features(device) if config.lambda_texture else None

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

    def _tensors(self, tile: TrainingTile, generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mask context [3 + noise channels, T + 2 margin, T + 2 margin], mask tile [1, 3, T, T], real tile
        [1, 3, T, T]). The context's noise channels (if the generator reads any) are one fresh draw for the whole
        tile, from `generator` (default: torch's global one, which each step seeds), so that overlapping patches
        read the same noise where they overlap, as in a render."""
        context = torch.from_numpy(masks.labels_to_model_input(tile.context)).to(self.device)
        margin, size = self.plan.margin, self.plan.height
        mask_tile = context[None, :, margin:margin + size, margin:margin + size]
        channels = self.generator.noise_channels
        if channels:
            context = torch.cat([context, uniform_noise(channels, *context.shape[1:], generator).to(self.device)])
        real = torch.from_numpy(tile.image).to(self.device).permute(2, 0, 1)[None].float() / 127.5 - 1
        return context, mask_tile, real

    def _stitched(self, windows: torch.Tensor, generator: Generator | None = None,
                  tiles: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(`tiles` tiles [tiles, 3, T, T], each stitched from its plan's windows, which come first in `windows`,
        tile after tile; the patches of all windows), by `generator` (default: the one being trained)."""
        generator = generator or self.generator
        with self._autocast():
            if generator.noise_channels:  # the windows carry the tile's noise after the mask
                classes = generator.in_channels
                patches = generator(windows[:, :classes], windows[:, classes:])
            else:
                patches = generator(windows)
        ys, xs = self._origins
        count = len(ys)
        stitched = torch.stack([
            stitch(patches[k * count:(k + 1) * count], ys, xs, self.plan.height, self.plan.width, self.config.blend,
                   self.plan.overlap)
            for k in range(tiles)
        ])
        return stitched, patches

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
        fake, patches = self._stitched(windows, tiles=len(tiles))
        extra = patches[len(tiles) * len(self._origins[0]):]

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
                difference = extra[0].float() - fake[0, :, y:y + patch, x:x + patch]
                if config.shift_scale > 1:
                    difference = nn.functional.avg_pool2d(difference[None], config.shift_scale)
                shift = difference.abs().mean()
                loss_g = loss_g + config.lambda_shift * shift
                extra_losses.append(shift)
            if config.lambda_fm:
                matching = feature_matching_loss(fake_features, real_features)
                loss_g = loss_g + config.lambda_fm * matching
                extra_losses.append(matching)
            if config.lambda_grid:
                # On the patches as drawn, in their own coordinates, where a grid-locked pattern keeps its phase.
                classes = None
                if config.grid_fold == "class":
                    # Each patch's own mask: the centre of its window, +-1 one-hot -> 0/1.
                    margin, patch = self.plan.margin, self.plan.patch
                    mask_channels = len(masks.MODEL_INPUT_CLASSES)  # the noise channels, if any, come after
                    classes = windows[:, :mask_channels, margin:margin + patch, margin:margin + patch] > 0
                grid = grid_lock_loss(patches, config.grid_period, classes)
                loss_g = loss_g + config.lambda_grid * grid
                extra_losses.append(grid)
            if config.lambda_texture:
                # On the stitched tiles as the discriminator sees them (before DiffAugment), per mask class.
                with self._autocast():
                    texture = texture_loss(self.texture_features, fake, real, mask_tile > 0)
                loss_g = loss_g + config.lambda_texture * texture
                extra_losses.append(texture)
            if config.lambda_colour:
                # On the stitched tiles too, per mask class: how often each colour occurs, not where.
                colour = colour_loss(fake, real, mask_tile > 0)
                loss_g = loss_g + config.lambda_colour * colour
                extra_losses.append(colour)
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
            # A fixed noise draw: the samples of successive checkpoints differ by the generator only.
            noise = torch.Generator().manual_seed(0)
            return self._stitched(cut_windows(self._tensors(tile, noise)[0], self.plan), generator)[0][0]
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
        # Both files say which pretrained network a loss read: export copies it into the ONNX metadata.
        networks = {METADATA_LOSS_NETWORKS: TEXTURE_NETWORK} if self.config.lambda_texture else {}
        metadata = {CONFIG_METADATA_KEY: json.dumps(self.generator.config(), sort_keys=True), **networks}
        with written_atomically(weights) as temporary:  # a checkpoint is either complete or absent
            save_file(tensors, str(temporary), metadata=metadata)
        published = {"safron.step": str(self.step), **networks}
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

    def widens(self, generator_config: dict) -> bool:
        """Whether a starting generator of this config (a noise-free one leaves noise_channels out) reads fewer noise
        channels than this run's, so that it starts with zero weights on the others (`models.with_noise`)."""
        return generator_config.get("noise_channels", 0) < self.generator.noise_channels

    def refits(self, upsample: str | None) -> bool:
        """Whether a starting generator with this decoder becomes this run's by `models.resize_decoder`."""
        return upsample == "transpose" and self.generator.upsample == "resize"

    def start_from(self, generator: Generator) -> None:
        """Take `generator`'s weights (e.g. of an exported ONNX file, `generator_from_onnx`) as this run's starting
        point; the discriminator and both optimisers start fresh, the moving average (if any) at the generator.
        A transposed-convolution decoder starts a resizing one as its nearest checkerboard-free fit."""
        if self.refits(generator.upsample):
            generator = resize_decoder(generator)
        if self.widens(generator.config()):
            generator = with_noise(generator, self.generator.noise_channels)
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
        # A noise-free generator's config leaves noise_channels out (models.Generator.config).
        implied = {"generator": {"noise_channels": 0}, "discriminator": {}}
        differing = [
            f"{name} {key} {stored[key]!r} there, {value!r} here"
            for name, model in (("generator", self.generator), ("discriminator", self.discriminator))
            for stored in [{**implied[name], **(state.get(name) or {})}]
            for key, value in {**implied[name], **model.config()}.items()
            if key in stored and stored[key] != value
        ]
        return "; ".join(differing) or first_line(failure)

    def load(self, state_path: Path, restore_step: bool = True) -> int:
        """Restore models, optimisers, scaler and (with `restore_step`) the step from a checkpoint written by
        `save` (or its portable copy: models only, in fp16); return the checkpoint's step. The optimisers keep
        this run's learning rate and betas: a fine-tuning run may change them."""
        state, tensors = read_checkpoint(state_path)
        weights = state_path.with_suffix(".safetensors")
        # Starting a resizing decoder from a transposed one (init only: a resumed run keeps its decoder): both
        # generators are converted (`resize_decoder`) and the generator's optimiser, whose moments belong to the
        # transposed kernels, starts afresh.
        # Likewise a generator reading fewer noise channels than this run's: it gains zero weights for the others
        # (`with_noise`), and the generator's optimiser starts afresh.
        stored_generator = state.get("generator") or {}
        refits = not restore_step and self.refits(stored_generator.get("upsample"))
        widens = not restore_step and self.widens(stored_generator)
        converts = refits or widens

        def generator_tensors(stored: dict) -> dict:
            if not converts or not stored:
                return stored
            source = Generator.from_config(state["generator"])
            source.load_state_dict(stored)
            if refits:
                source = resize_decoder(source)
            return with_noise(source, self.generator.noise_channels).state_dict()

        try:
            self.generator.load_state_dict(generator_tensors(tensors_under(tensors, GENERATOR_PREFIX)))
            self.discriminator.load_state_dict(tensors_under(tensors, _DISCRIMINATOR_PREFIX))
            if self.generator_ema is not None:
                # A checkpoint of a run without an average (fine-tuning with --init) starts it at its generator.
                self.generator_ema.load_state_dict(generator_tensors(tensors_under(tensors, EMA_PREFIX))
                                                   or self.generator.state_dict())
            # A portable checkpoint (`portable_checkpoint`) has no optimiser states: Adam then starts afresh.
            for name, optimiser in (("generator", self.optimiser_g), ("discriminator", self.optimiser_d)):
                if state["optimisers"] is not None and not (converts and name == "generator"):
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
