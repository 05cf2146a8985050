"""How much of each generator's output is locked to its patch grid (not a test): the grid-lock loss as a diagnostic.

`safron.losses.grid_lock_loss` folds each generated patch, less its local mean, modulo P; what survives the fold
repeats with the patch grid (the dot lattice of a transposed-convolution decoder). This prints its mean over the
patches of the first N training tiles (the seeded tile sequence of safron-train, 492 px: 2 x 2 patches each), for
each generator in eval mode (as a render draws), at each period. Real tissue has no patch grid, so the same fold
of each tile's real 256 px corner is printed as the floor: a generator at or below it shows no grid lock at that
period.

`--fold class` scores the class fold instead (`safron-train --grid-fold class`): each tile's patches pooled, one
fold per mask class over the patches' own masks; its floor folds the real tile's crops at the same positions.

    python bench/grid_lock.py safron/default_model/generator.onnx RUN_DIR CHECKPOINT.safetensors
    python bench/grid_lock.py MODEL.onnx --data ../shared/data/glas/train --tiles 8 --periods 16 32 64
    python bench/grid_lock.py MODEL.onnx --fold class
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="exported .onnx generators, run directories or checkpoints")
    parser.add_argument("--data", default="../shared/data/glas/train", help="training folder (images/, masks/)")
    parser.add_argument("--tiles", type=int, default=8)
    parser.add_argument("--seed", type=int, default=99, help="seed of the tile sequence")
    parser.add_argument("--periods", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fold", choices=("patch", "class"), default="patch",
                        help="patch: each patch on its own, the real floor from the tile's corner; class: the tile's "
                             "patches pooled per mask class, the real floor from the tile's crops at the same places")
    args = parser.parse_args()

    import numpy as np
    import torch

    from safron import geometry, masks
    from safron.checkpoints import load_generator
    from safron.data import TileDataset
    from safron.losses import grid_lock_loss
    from safron.noise import noise_windows
    from safron.stitch import cut_windows
    from safron.train import generator_from_onnx

    torch.set_num_threads(args.threads)
    generators = {}
    for model in args.models:
        generator = generator_from_onnx(model) if Path(model).suffix.lower() == ".onnx" else load_generator(model)
        generators[model] = generator.eval()
    tile = 492
    dataset = TileDataset(args.data, tile, seed=args.seed)
    plan = geometry.plan(tile, tile)
    patch = plan.patch
    scores = {name: {p: [] for p in args.periods} for name in ["real (floor)", *generators]}
    with torch.no_grad():
        for step in range(args.tiles):
            example = dataset.tile_at(step)
            windows = cut_windows(torch.from_numpy(masks.labels_to_model_input(example.context)), plan)
            image = torch.from_numpy(example.image).permute(2, 0, 1).float() / 127.5 - 1
            classes = None
            if args.fold == "class":
                origins = list(zip(*(o.tolist() for o in plan.origins())))
                real = torch.stack([image[:, y:y + patch, x:x + patch] for y, x in origins])
                margin = plan.margin
                labels = torch.stack([torch.from_numpy(example.context[y + margin:y + margin + patch,
                                                                       x + margin:x + margin + patch])
                                      for y, x in origins])
                classes = torch.stack([labels == label for label in masks.MODEL_INPUT_CLASSES], dim=1)
            else:
                real = image[None, :, :patch, :patch]
            # A generator with noise channels reads the canvas noise a render would give the tile's patches.
            ys, xs = plan.origins()
            drawn = {"real (floor)": real} | {
                name: g(windows, torch.from_numpy(noise_windows(plan, ys, xs, g.noise_channels)) if g.noise_channels
                        else None)
                for name, g in generators.items()}
            for name, patches in drawn.items():
                for period in args.periods:
                    scores[name][period].append(grid_lock_loss(patches, period, classes).item())
    width = max(map(len, scores))
    print(f"{'generator':<{width}}  " + "  ".join(f"P {p:>3}" for p in args.periods))
    for name, by_period in scores.items():
        print(f"{name:<{width}}  " + "  ".join(f"{np.mean(by_period[p]):.4f}" for p in args.periods))


if __name__ == "__main__":
    main()
