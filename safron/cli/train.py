"""safron-train: train a SAFRON generator (PyTorch, an optional dependency, is imported only when used)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .common import (
    EXIT_USAGE, Parser, exit_status_help, non_negative_float, non_negative_int, positive_float, positive_int, run_main,
)


def _augmentation_policy(text):
    from ..losses import check_policy

    try:
        return check_policy(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# CLI options that define a run (TrainConfig fields); they default to None so that --resume can tell the ones given.
_RUN_OPTIONS = ("data", "tile", "stride", "ngf", "ndf", "lr", "beta1", "lambda_l1", "lambda_adv", "lambda_shift",
                "ema_decay", "blend", "seed", "tiles_per_step", "lambda_fm", "gan_loss", "diffaugment", "lr_d",
                "small_images", "upsample", "context", "shift_scale", "levels", "lambda_grid", "grid_period",
                "grid_fold", "noise_channels", "lambda_texture", "lambda_colour")


def train_parser() -> argparse.ArgumentParser:
    from ..data import SMALL_IMAGES
    from ..losses import GAN_LOSSES, GRID_FOLDS
    from ..models import CONTEXTS, UPSAMPLING
    from ..stitch import BLENDS
    from ..train import (
        DEFAULT_KEEP, DEFAULT_SAMPLE_EVERY, DEFAULT_SAVE_EVERY, DEFAULT_STEPS, GRID_PERIODS, PRECISIONS, TrainConfig,
    )

    defaults = TrainConfig(data="")
    p = Parser(
        prog="safron-train",
        description=(
            "Train a SAFRON generator on a folder holding images/ (H&E) and masks/ with matching file names. Masks "
            "may be colour masks (gland green, stroma red, background blue), label masks (0 background, 1 stroma, "
            "2 gland) or binary gland masks (0/255, GlaS style: background and stroma are then derived from the "
            "image). Each step stitches the generator's patches of one tile exactly as safron-render does."
        ),
        epilog=(
            "RUN_DIR gets checkpoints/ (safetensors + JSON), generator.safetensors (for safron-export), losses.csv, "
            "tensorboard/ and samples/ (mask | real | generated). Ctrl-C finishes the current step, saves and exits "
            "130; --resume continues. " + exit_status_help(sigterm=False)
        ),
    )
    p.add_argument("--data", metavar="DIR",
                   help="training folder with images/ and masks/ (taken from the run on --resume)")
    p.add_argument("--out", metavar="RUN_DIR", required=True, help="run directory for checkpoints, logs and samples")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, metavar="N",
                   help="train until N steps are done in all (default: %(default)s)")
    p.add_argument("--tile", type=positive_int, metavar="T",
                   help="tile side in pixels, at least 256 (default: 728, or 492 when images are smaller)")
    p.add_argument("--stride", type=positive_int, metavar="S",
                   help="visit tile positions on a grid with this step (default: random positions)")
    p.add_argument("--no-augment", action="store_true", help="no random flips and 90-degree rotations")
    p.add_argument("--small-images", choices=SMALL_IMAGES,
                   help="images smaller than the tile: mirror image and mask beyond their border (down to half the "
                        "tile), or skip them (default: mirror; runs from before this option skipped them)")
    p.add_argument("--ngf", type=positive_int, metavar="C",
                   help=f"generator width (default: {defaults.ngf}, the paper's)")
    p.add_argument("--upsample", choices=UPSAMPLING,
                   help="how the generator's decoder doubles resolution: transpose (pix2pix's 4x4 stride-2 transposed "
                        "convolution) or resize (nearest-neighbour, then 3x3 convolution: no checkerboard grids) "
                        f"(default: {defaults.upsample})")
    p.add_argument("--context", choices=CONTEXTS,
                   help="how the generator reads the mask around its patch: dense (one 41x41 convolution, the "
                        "paper's) or dilated (3x3 convolutions with dilations 1, 2, 4, 8, 5: the same reach, about a "
                        f"sixth of the work at width 16) (default: {defaults.context})")
    p.add_argument("--levels", type=positive_int, metavar="L",
                   help=f"the generator's U-Net depth: {defaults.levels} (the paper's) goes down to a 1 x 1 bottleneck "
                        "that sees the whole patch, so a patch can decide its look as a whole and show as a block; "
                        f"fewer (4 or more) keep decisions local (default: {defaults.levels})")
    p.add_argument("--noise-channels", type=non_negative_int, metavar="K",
                   help="channels of per-pixel noise the generator reads beside the mask (safron-render draws "
                        "them from canvas coordinates, so renders stay seamless and reproducible): a source of "
                        "texture other than the patch's position, which is all a noise-free generator has inside a "
                        "wide region of one class. With --init, a generator reading fewer starts with zero weights "
                        f"on the new ones (default: {defaults.noise_channels})")
    p.add_argument("--ndf", type=positive_int, metavar="C", help=f"discriminator width (default: {defaults.ndf})")
    p.add_argument("--lr", type=positive_float, metavar="LR", help=f"Adam learning rate (default: {defaults.lr:g})")
    p.add_argument("--beta1", type=non_negative_float, metavar="B", help=f"Adam beta1 (default: {defaults.beta1:g})")
    p.add_argument("--lambda-l1", type=non_negative_float, metavar="W",
                   help=f"L1 loss weight (default: {defaults.lambda_l1:g})")
    p.add_argument("--lambda-adv", type=non_negative_float, metavar="W",
                   help=f"adversarial loss weight (default: {defaults.lambda_adv:g})")
    p.add_argument("--lambda-fm", type=non_negative_float, metavar="W",
                   help=f"weight of pix2pixHD's feature-matching loss: L1 between the discriminator's hidden features "
                        f"of the real and the generated tile (e.g. 10; default: {defaults.lambda_fm:g}, off)")
    p.add_argument("--gan-loss", choices=GAN_LOSSES,
                   help=f"adversarial loss: bce (non-saturating, the paper's) or hinge (default: {defaults.gan_loss})")
    p.add_argument("--diffaugment", type=_augmentation_policy, metavar="POLICY",
                   help="DiffAugment on what the discriminator sees, real and generated alike: a comma-separated "
                        "subset of color,translation,cutout (geometry moves mask and image together; colour touches "
                        "the image only); helps a discriminator on few images (default: none)")
    p.add_argument("--lr-d", type=positive_float, metavar="LR",
                   help="the discriminator's Adam learning rate (default: --lr)")
    p.add_argument("--lambda-shift", type=non_negative_float, metavar="W",
                   help=f"weight of the shift-consistency loss: one extra patch at a random position must match the "
                        f"stitched tile under it; suppresses textures locked to the patch grid (default: "
                        f"{defaults.lambda_shift:g}, off, as in the paper)")
    p.add_argument("--shift-scale", type=positive_int, metavar="PX",
                   help="compare the shifted patch with the stitched tile as means over PX x PX blocks: structures "
                        "larger than the blocks (lumens, epithelium) must agree wherever the patch grid falls, finer "
                        "texture may differ, so the term no longer pulls texture towards its average "
                        f"(default: {defaults.shift_scale}, pixel by pixel)")
    p.add_argument("--lambda-grid", type=non_negative_float, metavar="W",
                   help="weight of the grid-lock loss: each generated patch averaged over all positions with the same "
                        "phase modulo --grid-period must be flat, which removes patterns repeating with the patch grid "
                        "(the dot lattices of transposed convolutions) and leaves texture free "
                        f"(default: {defaults.lambda_grid:g}, off)")
    p.add_argument("--grid-period", type=positive_int, metavar="P",
                   help="the grid-lock loss's fold: catches every period dividing it; one of "
                        f"{', '.join(map(str, GRID_PERIODS))} (default: {defaults.grid_period})")
    p.add_argument("--grid-fold", choices=GRID_FOLDS,
                   help="patch: fold each patch on its own; class: pool all patches of a step, one fold per mask "
                        "class, which leaves less texture in the fold and sees a lattice drawn only inside one class "
                        f"(say, large glands) whole (default: {defaults.grid_fold})")
    p.add_argument("--lambda-texture", type=non_negative_float, metavar="W",
                   help="weight of the texture loss: within each mask class, the distribution of a frozen "
                        "EfficientNet-Lite0's features (strides 4-16) of the generated tile must match the real "
                        "tile's (sliced Wasserstein), which asks for real texture without asking for it in the same "
                        "place; not the Inception network safron-eval scores with. About 0.2 s more per 728 px "
                        f"step on one CPU core (default: {defaults.lambda_texture:g}, off)")
    p.add_argument("--lambda-colour", "--lambda-color", dest="lambda_colour", type=non_negative_float, metavar="W",
                   help="weight of the colour loss: within each mask class, the distribution of the generated tile's "
                        "RGB colours must match the real tile's (sliced Wasserstein), which asks for the darkest "
                        "nuclei and the whitest goblet cells as often as the real tile has them, anywhere "
                        f"(default: {defaults.lambda_colour:g}, off)")
    p.add_argument("--ema-decay", type=non_negative_float, metavar="D",
                   help="also keep an exponential moving average of the generator's weights (e.g. 0.999) and publish "
                        "it: samples, RUN_DIR/generator.safetensors and safron-export use it (default: 0, off)")
    p.add_argument("--blend", choices=BLENDS,
                   help=f"weights of overlapping patches, as safron-render --blend (default: {defaults.blend})")
    p.add_argument("--tiles-per-step", type=positive_int, metavar="N",
                   help=f"tiles stitched and judged as one batch in each step; more keeps a GPU busy (default: "
                        f"{defaults.tiles_per_step}, the paper's)")
    p.add_argument("--seed", type=non_negative_int, metavar="S",
                   help=f"seed of initialisation, tiles and dropout (default: {defaults.seed})")
    p.add_argument("--save-every", type=non_negative_int, default=DEFAULT_SAVE_EVERY, metavar="N",
                   help="checkpoint every N steps, 0 = only at the end (default: %(default)s)")
    p.add_argument("--sample-every", type=non_negative_int, default=DEFAULT_SAMPLE_EVERY, metavar="N",
                   help="write a sample PNG every N steps, 0 = never (default: %(default)s)")
    p.add_argument("--keep", type=positive_int, default=DEFAULT_KEEP, metavar="K",
                   help="training checkpoints kept, newest first (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its latest checkpoint")
    p.add_argument("--init", metavar="RUN_OR_CHECKPOINT",
                   help="start this new run from another run's models and optimiser states (its run directory or a "
                        "checkpoints/step-N.json), with its settings unless given here: to fine-tune. A "
                        "safron-exported .onnx generator (e.g. safron/default_model/generator.onnx) gives the "
                        "generator and its width only; discriminator and optimisers start fresh. With --upsample "
                        "resize, a transposed decoder is refitted as resizing and 3x3 convolutions")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto = bf16 (or fp16) mixed precision on CUDA, fp32 on the CPU; bf16 works on CPUs too, "
                        "fastest with AVX-512 BF16 or AMX (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or notes")
    return p


def _config_from_args(args):
    """The TrainConfig the options give, or None on --resume without options (the run's own)."""
    from ..train import TrainConfig, generator_from_onnx, latest_checkpoint, training_checkpoint
    from ..train.checkpointing import _is_onnx, _stored_config

    given = {name: getattr(args, name) for name in _RUN_OPTIONS if getattr(args, name) is not None}
    if args.no_augment:
        given["augment"] = False
    if args.init is not None and not args.resume:  # with --resume too, train() says they exclude each other
        if _is_onnx(args.init):
            # The file fixes the generator's architecture; everything else is this run's (defaults or given).
            generator = generator_from_onnx(args.init)
            given.setdefault("ngf", generator.ngf)
            given.setdefault("upsample", generator.upsample)
            given.setdefault("context", generator.context_kind)
            given.setdefault("levels", generator.levels)
            given.setdefault("noise_channels", generator.noise_channels)
            return TrainConfig(**given)
        return dataclasses.replace(_stored_config(training_checkpoint(args.init)), **given)
    if args.resume:
        if not given:
            return None
        stored = latest_checkpoint(args.out)
        if stored is None:  # train() reports it
            return None
        return dataclasses.replace(_stored_config(stored), **given)
    return TrainConfig(**given)


def main(argv=None) -> int:
    """safron-train. PyTorch is an optional dependency, so its absence is a one-line usage error."""
    try:
        from ..train import train
        from ..train.loop import _stderr_note
    except ImportError as exc:
        print(
            f"safron-train: error: training needs PyTorch and safetensors ({exc.name} is not installed): "
            "pip install torch==2.13.0 'safron[train]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    parser = train_parser()
    args = parser.parse_args(argv)
    if args.data is None and not (args.resume or args.init):
        parser.error("--data DIR is required for a new run (or --init, to take it from another run)")

    def command() -> None:
        result = train(
            args.out, _config_from_args(args), steps=args.steps, resume=args.resume, save_every=args.save_every,
            sample_every=args.sample_every, keep=args.keep, device=args.device, precision=args.precision,
            threads=args.threads, progress=not args.quiet, note=None if args.quiet else _stderr_note, init=args.init,
        )
        if not args.quiet:
            _stderr_note(f"step {result.step}; checkpoint {result.checkpoint}")

    # train() itself saves the finished step on Ctrl-C (and says so) before the KeyboardInterrupt reaches here.
    return run_main("safron-train", command)


if __name__ == "__main__":
    sys.exit(main())
