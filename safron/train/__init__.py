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
     overlap at another phase. The pixel-wise term also pulls texture towards its average (the two patches draw
     their own nuclei), so `shift_scale` PX > 1 compares PX x PX block means instead: lumens and epithelium must
     agree wherever the grid falls, texture finer than the blocks may differ.
  6. optional (lambda_grid > 0, not in the paper): lambda_grid * losses.grid_lock_loss(all patches of the step,
     grid_period): each patch folded modulo the period must be flat, which removes patterns that repeat with the
     patch grid (the lattice of dots a transposed-convolution decoder draws) and nothing else. grid_fold "class"
     pools all patches of the step into one fold per mask class instead.
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

# The package, by job: config (TrainConfig, the run's names and defaults), checkpointing (training checkpoints),
# trainer (one step: the Trainer), loop (train(), logs and samples). Every public name is importable from here.

from __future__ import annotations

from ..checkpoints import load_generator
from .checkpointing import generator_from_onnx, latest_checkpoint, portable_checkpoint, training_checkpoint
from .config import (
    CHECKPOINT_FORMAT, CHECKPOINTS_FOLDER, DEFAULT_KEEP, DEFAULT_SAMPLE_EVERY, DEFAULT_SAVE_EVERY, DEFAULT_STEPS,
    FM_LOSS, GRID_LOSS, GRID_PERIODS, LOSS_NAMES, LOSSES_CSV, PRECISIONS, SAMPLES_FOLDER, SHIFT_LOSS,
    TENSORBOARD_FOLDER, TrainConfig, TrainResult, check_config,
)
from .loop import train
from .trainer import FourierContextConvolution, Trainer, to_uint8

__all__ = [
    "TrainConfig", "TrainResult", "Trainer", "FourierContextConvolution", "check_config", "train", "load_generator",
    "latest_checkpoint", "training_checkpoint", "portable_checkpoint", "to_uint8", "LOSS_NAMES", "SHIFT_LOSS",
    "FM_LOSS", "GRID_LOSS", "GRID_PERIODS",
    "generator_from_onnx", "CHECKPOINT_FORMAT", "CHECKPOINTS_FOLDER", "SAMPLES_FOLDER", "TENSORBOARD_FOLDER",
    "LOSSES_CSV", "PRECISIONS", "DEFAULT_STEPS", "DEFAULT_SAVE_EVERY", "DEFAULT_SAMPLE_EVERY", "DEFAULT_KEEP",
]
