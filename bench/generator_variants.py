"""Speed of the generator's variants side by side (not a test): CPU inference per patch and one training step.

Each variant (context reader x decoder, `models.CONTEXTS` x `models.UPSAMPLING`) is built at the same width,
exported the way safron-export does (dense contexts folded), and timed with ONNX Runtime on batches of random
one-hot windows; then one training step on a synthetic 492 px tile each. Rounds alternate between the variants
in one process, so that other jobs on a shared machine slow them alike; the ratios are against the first variant
(the paper's: dense context, transposed decoder). Quality is not measured here: see safron-eval --report.

    python bench/generator_variants.py                 # ngf 16, 1 thread, 3 rounds
    python bench/generator_variants.py --ngf 32 --threads 2 --precision bf16
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--ndf", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help="of the training step")
    args = parser.parse_args()

    import onnxruntime as ort
    import torch
    from PIL import Image

    from safron import export, masks, synthesis
    from safron.data import TileDataset
    from safron.models import CONTEXTS, UPSAMPLING, Generator, count_parameters
    from safron.train import TrainConfig, Trainer

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="safron-variants-"))
    (work / "data" / "images").mkdir(parents=True)
    (work / "data" / "masks").mkdir()
    labels = synthesis.synthesize(560, 560, seed=1)
    palette = np.array([[235, 230, 240], [220, 150, 190], [150, 80, 160]], np.float32)
    noise = np.random.default_rng(0).normal(0, 12, labels.shape + (3,))
    Image.fromarray(np.clip(palette[labels] + noise, 0, 255).astype(np.uint8)).save(work / "data" / "images" / "a.png")
    Image.fromarray(masks.labels_to_colour(labels)).save(work / "data" / "masks" / "a.png")
    dataset = TileDataset(work / "data", 492, augment=False)

    variants = list(itertools.product(CONTEXTS, UPSAMPLING))
    sessions, trainers, parameters = {}, {}, {}
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    for context, upsample in variants:
        torch.manual_seed(0)
        generator = Generator(ngf=args.ngf, context=context, upsample=upsample).eval()
        parameters[context, upsample] = count_parameters(generator)
        run = work / f"{context}-{upsample}"
        run.mkdir()
        export.save_checkpoint(generator, run / export.RUN_DIR_CHECKPOINT)
        out = export.export_onnx(run, run / "g.onnx", check_samples=1).out_path
        sessions[context, upsample] = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        config = TrainConfig(data=str(work / "data"), tile=492, ngf=args.ngf, ndf=args.ndf, context=context,
                             upsample=upsample)
        trainers[context, upsample] = Trainer(config, dataset, torch.device("cpu"), args.precision)

    windows = export.random_masks(args.batch, 296, seed=3)
    patch_seconds = {v: [] for v in variants}
    step_seconds = {v: [] for v in variants}
    for variant in variants:  # warm-up: kernel selection, allocator
        sessions[variant].run(None, {"mask": windows})
        trainers[variant].train_step(dataset.tile_at(0))
    for round_ in range(args.rounds):
        for variant in variants:
            started = time.perf_counter()
            sessions[variant].run(None, {"mask": windows})
            patch_seconds[variant].append((time.perf_counter() - started) / args.batch)
            started = time.perf_counter()
            trainers[variant].train_step(dataset.tile_at(round_ + 1))
            step_seconds[variant].append(time.perf_counter() - started)

    print(f"ngf {args.ngf}, ndf {args.ndf}, {args.threads} thread(s), ONNX Runtime batch {args.batch}, training "
          f"{args.precision} on 492 px tiles; medians of {args.rounds} alternating rounds")
    first = variants[0]
    base_patch, base_step = statistics.median(patch_seconds[first]), statistics.median(step_seconds[first])
    print(f"{'context':>8} {'decoder':>10} {'parameters':>11} {'s/patch':>8} {'speed-up':>8} {'s/step':>7} "
          f"{'speed-up':>8}")
    for variant in variants:
        patch, step = statistics.median(patch_seconds[variant]), statistics.median(step_seconds[variant])
        print(f"{variant[0]:>8} {variant[1]:>10} {parameters[variant]:>11,} {patch:>8.3f} {base_patch / patch:>7.2f}x "
              f"{step:>7.2f} {base_step / step:>7.2f}x")


if __name__ == "__main__":
    main()
