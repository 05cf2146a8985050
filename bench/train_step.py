"""Training-step benchmark (not a test): seconds and peak memory of one SAFRON training step per tile size.

Each tile size runs in its own process (a fresh peak), on a synthetic image/mask pair, after one warm-up
step. The paper reports constant training memory (0.35 GB); here every window of a tile is generated as
one batch and stitched with gradients, so memory grows with the number of windows (4 at 492, 9 at 728,
25 at 1200) — this measures by how much.

    python bench/train_step.py                        # CPU, tiles 492 728 1200, ngf 32
    python bench/train_step.py --device cuda --ngf 64 # on a GPU: also reports torch's peak allocation
    python bench/train_step.py --tiles 492 --tiles-per-step 1 4 8   # tiles per second with batches of tiles
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile

_ONE_TILE = r"""
import json, re, sys, tempfile, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from safron import masks, synthesis
from safron.data import TileDataset
from safron.train import TrainConfig, Trainer

tile, ngf, ndf, steps, device, threads, per_step = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                                    int(sys.argv[4]), sys.argv[5], int(sys.argv[6]), int(sys.argv[7]))
torch.set_num_threads(threads)
root = Path(tempfile.mkdtemp())
(root / "images").mkdir(); (root / "masks").mkdir()
labels = synthesis.synthesize(tile + 64, tile + 64, seed=1)
rng = np.random.default_rng(0)
palette = np.array([[235, 230, 240], [220, 150, 190], [150, 80, 160]], np.float32)  # background, stroma, gland
image = np.clip(palette[labels] + rng.normal(0, 12, labels.shape + (3,)), 0, 255).astype(np.uint8)
Image.fromarray(image).save(root / "images" / "a.png")
Image.fromarray(masks.labels_to_colour(labels)).save(root / "masks" / "a.png")
dataset = TileDataset(root, tile=tile, augment=False)
config = TrainConfig(data=str(root), tile=tile, ngf=ngf, ndf=ndf, tiles_per_step=per_step)
trainer = Trainer(config, dataset, torch.device(device))
batch = lambda step: [dataset.tile_at(step * per_step + k) for k in range(per_step)]
trainer.train_step(batch(0))  # warm-up: allocator and kernel selection
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
for step in range(steps):
    trainer.train_step(batch(step + 1))
if device == "cuda":
    torch.cuda.synchronize()
seconds = (time.perf_counter() - start) / steps
peak_rss = int(re.search(r"VmHWM:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
gpu = torch.cuda.max_memory_allocated() if device == "cuda" else None
print(json.dumps({"windows": trainer.plan.count, "seconds": seconds, "peak_rss": peak_rss, "gpu_peak": gpu}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, nargs="+", default=[492, 728, 1200])
    parser.add_argument("--ngf", type=int, default=32)
    parser.add_argument("--ndf", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tiles-per-step", type=int, nargs="+", default=[1],
                        help="safron-train --tiles-per-step values to time (default: 1)")
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, device {args.device}, ngf {args.ngf}, ndf {args.ndf}, "
          f"{args.threads} threads, mean of {args.steps} steps after a warm-up")
    print(f"{'tile':>6} {'per step':>8} {'windows':>8} {'s/step':>8} {'tiles/s':>8} {'peak RSS':>10} {'GPU peak':>10}")
    for tile, per_step in itertools.product(args.tiles, args.tiles_per_step):
        proc = subprocess.run(
            [sys.executable, "-c", _ONE_TILE, str(tile), str(args.ngf), str(args.ndf), str(args.steps), args.device,
             str(args.threads), str(per_step)],
            capture_output=True, text=True, cwd=tempfile.gettempdir(),
        )
        if proc.returncode:
            raise SystemExit(f"tile {tile}, {per_step} per step failed:\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        gpu = f"{r['gpu_peak'] / 2**30:8.2f} G" if r["gpu_peak"] is not None else "       -"
        print(f"{tile:>6} {per_step:>8} {r['windows'] * per_step:>8} {r['seconds']:>8.2f} "
              f"{per_step / r['seconds']:>8.2f} {r['peak_rss'] / 2**30:8.2f} G {gpu:>10}")
    print("paper: constant training memory, 0.35 GB")


if __name__ == "__main__":
    main()
