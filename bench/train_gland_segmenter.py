"""Train the gland segmenter of the evaluation protocol on GlaS train and export it as ONNX (not a test).

A small U-Net, trained on random crops of GlaS `train` (flips, 90-degree rotations, mild colour jitter;
Dice + BCE loss, Adam, cosine learning rate over a wall-clock budget). About 10 train images are held out
for validation and the checkpoint with the best validation Dice is exported to
`safron/default_model/gland_segmenter.onnx` (opset 17, dynamic batch, height and width), checked against
PyTorch with ONNX Runtime, and scored on the held-out images and on GlaS testA with
`safron.gland_segmentation` itself, so the figures are those of the shipped file. testA is scored only: it
picks neither the checkpoint nor any setting.

The network does its own preprocessing (2 x 2 average downscaling, normalisation) and upsamples its logits
back to the input size: it takes the image as it is, RGB 0..255 at 20x, in training and in the exported
graph alike, so there is nothing for inference to get wrong. PyTorch is needed here only.

    nice -n 10 python bench/train_gland_segmenter.py                  # 25 minutes, 1 thread
    nice -n 10 python bench/train_gland_segmenter.py --minutes 5 --out bench/_work/try.onnx

The best state dict and a JSON summary (figures, per-image testA Dice) go to bench/_work/gland_segmenter/,
named after the output file.

Needs the GlaS data in ../shared/data/glas (research use only; never commit it) and the `train` extra.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safron.gland_segmentation import (  # noqa: E402
    INPUT_NAME, OUTPUT_NAME, SEGMENTER_PATH, STRIDE_METADATA_KEY, open_segmenter, dice, pad_to_stride,
    segment_glands,
)
from safron.export import store_weights_as_float16  # noqa: E402

GLAS = ROOT.parent / "shared" / "data" / "glas"
WORK = ROOT / "bench" / "_work" / "gland_segmenter"
OPSET = 17
MAX_FILE_BYTES = 5 << 20  # the project keeps files over 5 MB to the embedded generator
# Per-channel mean and standard deviation of the GlaS train images (RGB, 0..255), rounded: the network's
# first normalisation. Fixed constants in the graph, not statistics of whatever it is shown.
RGB_MEAN = (201.0, 131.0, 200.0)
RGB_STD = (43.0, 63.0, 34.0)


def build_model(widths: tuple[int, ...], downscale: int):
    """The U-Net: `widths` channels at each of its levels (len(widths) - 1 poolings), after downscaling the
    input by `downscale`. Its `stride` is what input height and width must be multiples of."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    def block(channels_in: int, channels_out: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out),
            nn.ReLU(inplace=True),
        )

    class GlandUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.downscale = downscale
            self.stride = downscale * 2 ** (len(widths) - 1)
            self.register_buffer("mean", torch.tensor(RGB_MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(RGB_STD).view(1, 3, 1, 1))
            self.encoders = nn.ModuleList(block(c_in, c_out) for c_in, c_out in zip((3, *widths[:-1]), widths))
            self.ups = nn.ModuleList(nn.ConvTranspose2d(wide, narrow, 2, stride=2)
                                     for narrow, wide in zip(widths[:-1], widths[1:]))
            self.decoders = nn.ModuleList(block(2 * narrow, narrow) for narrow in widths[:-1])
            self.head = nn.Conv2d(widths[0], 1, 1)

        def forward(self, image):
            x = image
            if self.downscale > 1:
                x = F.avg_pool2d(x, self.downscale)
            x = (x - self.mean) / self.std
            skips = []
            for level, encoder in enumerate(self.encoders):
                if level:
                    x = F.max_pool2d(x, 2)
                x = encoder(x)
                skips.append(x)
            x = skips.pop()
            for up, decoder in zip(reversed(self.ups), reversed(self.decoders)):
                x = decoder(torch.cat([up(x), skips.pop()], 1))
            logit = self.head(x)
            if self.downscale > 1:
                # Bilinear logits: smooth gland outlines at full resolution, not staircase blocks.
                logit = F.interpolate(logit, scale_factor=float(self.downscale), mode="bilinear",
                                      align_corners=False)
            return logit

    return GlandUNet()


def read_pairs(folder: Path, names: list[str] | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, uint8 RGB image, bool gland mask) of each image in `folder`/images with its mask in `folder`/masks."""
    from PIL import Image

    pairs = []
    for path in sorted((folder / "images").glob("*.png")):
        if names is not None and path.stem not in names:
            continue
        with Image.open(path) as image, Image.open(folder / "masks" / path.name) as mask:
            pairs.append((path.stem, np.asarray(image.convert("RGB")), np.asarray(mask.convert("L")) > 127))
    if not pairs:
        raise SystemExit(f"no images in {folder / 'images'}")
    return pairs


def sample_batch(rng: np.random.Generator, pairs, batch: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """`batch` random crops (float32 [B, 3, crop, crop] RGB 0..255, float32 [B, 1, crop, crop] mask) with a
    random rotation by a multiple of 90 degrees, a random flip and mild colour jitter (stain and scanner
    variation: per-channel gain, brightness offset, saturation)."""
    images = np.empty((batch, 3, crop, crop), np.float32)
    masks = np.empty((batch, 1, crop, crop), np.float32)
    for index in range(batch):
        _, image, mask = pairs[rng.integers(len(pairs))]
        y0 = rng.integers(image.shape[0] - crop + 1)
        x0 = rng.integers(image.shape[1] - crop + 1)
        image = image[y0:y0 + crop, x0:x0 + crop].astype(np.float32)
        mask = mask[y0:y0 + crop, x0:x0 + crop]
        turns = int(rng.integers(4))
        image, mask = np.rot90(image, turns), np.rot90(mask, turns)
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        grey = image.mean(axis=2, keepdims=True)
        image = grey + (image - grey) * rng.uniform(0.8, 1.2)
        image = image * rng.uniform(0.92, 1.08, size=3).astype(np.float32) + rng.uniform(-12, 12)
        images[index] = np.clip(image, 0, 255).transpose(2, 0, 1)
        masks[index, 0] = mask
    return images, masks


def predict_torch(model, image: np.ndarray) -> np.ndarray:
    """Float32 (H, W) logits of one uint8 image, padded as `segment_glands` pads it."""
    import torch

    height, width = image.shape[:2]
    padded = pad_to_stride(image, model.stride)
    batch = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32))
    with torch.no_grad():
        return model(batch)[0, 0, :height, :width].numpy()


def mean_dice(masks, pairs) -> float:
    return float(np.mean([dice(predicted, truth) for predicted, (_, _, truth) in zip(masks, pairs)]))


def validate(model, pairs) -> float:
    model.eval()
    score = mean_dice([predict_torch(model, image) > 0 for _, image, _ in pairs], pairs)
    model.train()
    return score


def export_onnx(model, out: Path, metadata: dict[str, str]) -> None:
    import onnx
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".partial")
    sample = torch.zeros(1, 3, 2 * model.stride, 3 * model.stride)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(model, (sample,), str(temporary), dynamo=False, opset_version=OPSET,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: dynamic, OUTPUT_NAME: dynamic})
    graph = onnx.load(str(temporary))
    # fp16 weights, each cast to fp32 in the graph (ONNX Runtime folds the casts): half the file, the same as
    # safron-export --weights float16; main() rounds the PyTorch model alike, so parity is checked against it.
    store_weights_as_float16(graph)
    for key, value in {STRIDE_METADATA_KEY: str(model.stride), **metadata}.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(graph)
    onnx.save(graph, str(temporary))
    os.replace(temporary, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=GLAS, help="GlaS folder with train/ and testA/")
    parser.add_argument("--out", type=Path, default=SEGMENTER_PATH, help="the ONNX file to write")
    parser.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget of the training steps "
                        "and validations (export and the final scoring come after)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--widths", default="16,32,64,128,192", help="channels at each U-Net level")
    parser.add_argument("--downscale", type=int, default=2, help="the network's own input downscaling")
    parser.add_argument("--crop", type=int, default=384, help="training crop side at 20x (a multiple of the stride)")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--validation-images", type=int, default=10, help="train images held out")
    parser.add_argument("--validate-every", type=float, default=60.0, help="seconds between validations")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="of the training steps' autocast (validation and export are fp32); bf16 halves a "
                        "step's time on a CPU with AMX or AVX512-BF16")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    widths = tuple(int(w) for w in args.widths.split(","))
    model = build_model(widths, args.downscale)
    if args.crop % model.stride:
        raise SystemExit(f"--crop {args.crop} is not a multiple of the network's stride {model.stride}")
    parameters = sum(p.numel() for p in model.parameters())

    train_all = read_pairs(args.data / "train")
    held_out = set(rng.choice([name for name, _, _ in train_all], args.validation_images, replace=False).tolist())
    train = [pair for pair in train_all if pair[0] not in held_out]
    validation = [pair for pair in train_all if pair[0] in held_out]
    print(f"{parameters:,} parameters, stride {model.stride}; {len(train)} training images, validation: "
          f"{', '.join(sorted(held_out))}", flush=True)

    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    budget = args.minutes * 60.0
    started = time.monotonic()
    best = (-1.0, 0, None)  # (validation Dice, step, state)
    next_validation = args.validate_every
    step, losses = 0, []
    while True:
        elapsed = time.monotonic() - started
        if elapsed >= next_validation or elapsed >= budget:
            score = validate(model, validation)
            if score > best[0]:
                best = (score, step, copy.deepcopy(model.state_dict()))
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  loss {np.mean(losses[-50:]):.4f}  "
                  f"validation Dice {score:.4f}  best {best[0]:.4f} (step {best[1]})", flush=True)
            next_validation = time.monotonic() - started + args.validate_every
            if elapsed >= budget:
                break
        # Cosine decay over the budget's time, not a step count: the machine's speed varies with its load.
        fraction = min(elapsed / budget, 1.0)
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * fraction)))
        for group in optimiser.param_groups:
            group["lr"] = lr
        images, masks = (torch.from_numpy(a) for a in sample_batch(rng, train, args.batch, args.crop))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = model(images)
        logits = logits.float()
        probabilities = torch.sigmoid(logits)
        soft_dice = (2 * (probabilities * masks).sum() + 1) / (probabilities.sum() + masks.sum() + 1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks) + 1 - soft_dice
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        step += 1
    train_seconds = time.monotonic() - started

    best_dice, best_step, state = best
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():  # the weights as the file stores them (export_onnx), so that the figures below are its own
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    # Named after the output, so that a trial run (--out elsewhere) leaves the shipped model's records alone.
    WORK.mkdir(parents=True, exist_ok=True)
    torch.save(state, WORK / f"{args.out.stem}.best.pt")
    export_onnx(model, args.out, {
        "safron.segmenter.widths": ",".join(map(str, widths)),
        "safron.segmenter.downscale": str(args.downscale),
        "safron.segmenter.step": str(best_step),
        "safron.segmenter.seed": str(args.seed),
        "safron.segmenter.training_data": "GlaS train (research use only), validation images held out: "
                                          + ",".join(sorted(held_out)),
    })
    size = args.out.stat().st_size
    sha256 = hashlib.sha256(args.out.read_bytes()).hexdigest()

    # Parity on the logits (not only the masks): ONNX Runtime's session as segment_glands opens it, fed the
    # padded image exactly as segment_glands feeds it.
    session, stride = open_segmenter(args.out, args.threads)
    parity = []
    for _, image, _ in validation[:2]:
        expected = predict_torch(model, image)
        padded = pad_to_stride(image, stride)
        (logit,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(
            padded.transpose(2, 0, 1)[None], dtype=np.float32)})
        got = logit[0, 0, :image.shape[0], :image.shape[1]]
        parity.append((float(np.abs(got - expected).max()), float(np.mean((got > 0) != (expected > 0)))))
    worst_difference = max(d for d, _ in parity)
    worst_disagreement = max(m for _, m in parity)
    print(f"ONNX Runtime vs PyTorch on 2 validation images: max |logit difference| {worst_difference:.2e}, "
          f"mask pixels that differ {worst_disagreement:.2e}", flush=True)

    scoring_started = time.monotonic()
    validation_onnx = mean_dice(segment_glands([im for _, im, _ in validation], model=args.out,
                                               threads=args.threads), validation)
    test = read_pairs(args.data / "testA")
    test_dice = [dice(m, t) for m, (_, _, t) in zip(
        segment_glands([im for _, im, _ in test], model=args.out, threads=args.threads), test)]
    scoring_seconds = time.monotonic() - scoring_started
    summary = {
        "parameters": parameters, "widths": widths, "downscale": args.downscale, "stride": model.stride,
        "steps": step, "best_step": best_step, "train_minutes": train_seconds / 60,
        "validation_dice_torch": best_dice, "validation_dice_onnx": validation_onnx,
        "testA_dice": float(np.mean(test_dice)), "testA_dice_min": float(np.min(test_dice)),
        "testA_per_image": {name: d for (name, _, _), d in zip(test, test_dice)},
        "validation_images": sorted(held_out), "file_bytes": size, "sha256": sha256,
        "parity_max_logit_difference": worst_difference, "parity_mask_disagreement": worst_disagreement,
        "scoring_seconds": scoring_seconds, "argv": sys.argv[1:] if argv is None else argv,
    }
    (WORK / f"{args.out.stem}.summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{step} steps in {train_seconds / 60:.1f} min; best validation Dice {best_dice:.4f} at step {best_step} "
          f"(ONNX: {validation_onnx:.4f}); testA Dice {np.mean(test_dice):.4f} over {len(test)} images "
          f"(min {np.min(test_dice):.4f}); {args.out}: {size:,} bytes, sha256 {sha256}", flush=True)
    if size > MAX_FILE_BYTES:
        print(f"warning: {args.out} is over {MAX_FILE_BYTES:,} bytes", file=sys.stderr)
    if worst_difference > 1e-3:
        print("error: ONNX Runtime and PyTorch disagree by more than 1e-3", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
