"""Pack a training folder small enough to travel to a lent GPU machine (not a test, not part of the package).

The lent machines receive the working tree plus carried folders, 64 MiB in all, and nothing from outside.
GlaS train as PNG is 64 MiB; as JPEG quality 95 with full-resolution chroma (4:4:4) it is 26 MiB, which fits
beside the code. That is a lossy copy (mean absolute error 2.1 grey levels on GlaS train): training on it is what
`bench/gpu_train.sh` does, and a model card must say so. Masks are copied unchanged (labels must stay exact).

    python bench/pack_training_data.py ../shared/data/glas/train .glas     # /.glas/ is in .gitignore
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="training folder with images/ and masks/")
    parser.add_argument("destination", type=Path, help="folder to create (must not exist)")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality of the images (default: %(default)s)")
    args = parser.parse_args()
    if args.destination.exists():
        parser.error(f"{args.destination} exists; remove it first")
    images, masks = args.source / "images", args.source / "masks"
    if not (images.is_dir() and masks.is_dir()):
        parser.error(f"{args.source} has no images/ and masks/ folders")
    (args.destination / "images").mkdir(parents=True)
    shutil.copytree(masks, args.destination / "masks")
    total, errors = 0, []
    for path in sorted(p for p in images.iterdir() if not p.name.startswith(".")):
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        target = args.destination / "images" / f"{path.stem}.jpg"
        rgb.save(target, "JPEG", quality=args.quality, subsampling=0)
        with Image.open(target) as packed:
            errors.append(np.abs(np.asarray(packed, np.int16) - np.asarray(rgb, np.int16)).mean())
        total += target.stat().st_size
    print(f"{len(errors)} images, {total / 2**20:.1f} MiB of JPEG q{args.quality} 4:4:4, mean absolute error "
          f"{np.mean(errors):.2f} grey levels; masks copied")


if __name__ == "__main__":
    main()
