"""Gland and background statistics of the GlaS training masks and of synthetic masks (calibration).

    python bench/mask_statistics.py [--glas ../shared/data/glas/train] [--masks 60]

prints a markdown table comparing GlaS train (gland masks as given, background derived from the images
by `safron.masks.labels_from_gland_mask`) with synthetic masks from `safron.synthesis.GLAS_RECIPE`,
measured the same way on windows of GlaS's usual size (522 x 775), so that glands cut by the window
border count alike. This is how the recipe's defaults were calibrated: change them, rerun, compare.
Needs scipy (connected components); safron itself does not.

Definitions (4-connected components of the gland class):
* gland fraction: gland pixels / all pixels.
* glands per 100x100 px: components per 10^4 px, including those cut by the window border.
* whole gland area p10/p50/p90, major axis p50, minor/major p50: over components that touch no border;
  axes are those of the ellipse with the component's second moments (4 sqrt(eigenvalue)).
* gland component area p50/p90: over all components, cut ones included; "half the gland area in
  components above": the area-weighted median (large glands touch the border more often than not).
* background / non-gland: background pixels / pixels that are not gland; "in spots" counts only
  background components under 30 000 px, leaving out the large empty areas beyond the tissue edge that
  some GlaS images show (synthetic masks model tissue interior only).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safron import masks, synthesis  # noqa: E402

GLAS_TRAIN = ROOT.parent / "shared" / "data" / "glas" / "train"
GLAS_SHAPE = (522, 775)
LARGE_EMPTY_AREA = 30_000


def _components(binary: np.ndarray):
    labelled, count = ndimage.label(binary)
    areas = np.bincount(labelled.ravel(), minlength=count + 1)[1:]
    on_border = np.zeros(count + 1, bool)
    for edge in (labelled[0], labelled[-1], labelled[:, 0], labelled[:, -1]):
        on_border[edge] = True
    return labelled, areas, on_border[1:]


def _axes(labelled: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(major, minor) axis lengths of the components flagged in `keep`."""
    axes = []
    for index, region in enumerate(ndimage.find_objects(labelled)):
        if region is None or not keep[index]:
            continue
        ys, xs = np.nonzero(labelled[region] == index + 1)
        if ys.size < 3:
            continue
        eigenvalues = np.linalg.eigvalsh(np.cov(np.stack((ys, xs)).astype(float)))
        axes.append(4 * np.sqrt(np.maximum(eigenvalues[::-1], 0)))
    return np.array(axes).reshape(-1, 2)


def statistics(label_masks) -> dict:
    """The figures above for an iterable of label arrays (uint8, safron's classes)."""
    pixels = gland_pixels = background_pixels = spot_pixels = 0
    whole_areas, all_areas, axes = [], [], []
    for labels in label_masks:
        gland = labels == masks.GLAND
        labelled, areas, on_border = _components(gland)
        pixels += labels.size
        gland_pixels += int(gland.sum())
        all_areas.append(areas)
        whole_areas.append(areas[~on_border])
        axes.append(_axes(labelled, ~on_border))
        background = labels == masks.BACKGROUND
        background_pixels += int(background.sum())
        _, background_areas, _ = _components(background)
        spot_pixels += int(background_areas[background_areas < LARGE_EMPTY_AREA].sum())
    whole_areas, all_areas, axes = np.concatenate(whole_areas), np.concatenate(all_areas), np.concatenate(axes)
    ordered = np.sort(all_areas)
    p10, p50, p90 = np.percentile(whole_areas, [10, 50, 90])
    return {
        "gland fraction": gland_pixels / pixels,
        "glands per 100x100 px": all_areas.size / pixels * 1e4,
        "whole gland area p10 (px)": p10,
        "whole gland area p50 (px)": p50,
        "whole gland area p90 (px)": p90,
        "gland component area p50 (px)": float(np.median(all_areas)),
        "gland component area p90 (px)": float(np.percentile(all_areas, 90)),
        "half the gland area in components above (px)": float(
            ordered[np.searchsorted(np.cumsum(ordered), ordered.sum() / 2)]),
        "whole gland major axis p50 (px)": float(np.median(axes[:, 0])),
        "whole gland minor/major p50": float(np.median(axes[:, 1] / axes[:, 0])),
        "background / non-gland": background_pixels / (pixels - gland_pixels),
        "background in spots / non-gland": spot_pixels / (pixels - gland_pixels),
    }


def glas_labels(folder: Path = GLAS_TRAIN):
    """Three-class labels of every GlaS image/mask pair in `folder` (images/, masks/)."""
    for image_path in sorted((folder / "images").glob("*.png")):
        image = np.asarray(Image.open(image_path).convert("RGB"))
        gland = np.asarray(Image.open(folder / "masks" / image_path.name))
        yield masks.labels_from_gland_mask(image, gland)


def synthetic_labels(count: int, recipe: synthesis.Recipe = synthesis.GLAS_RECIPE, shape=GLAS_SHAPE):
    """`count` independent GlaS-sized synthetic masks (seeds 0 .. count-1)."""
    for seed in range(count):
        yield synthesis.synthesize(*shape, seed, recipe=recipe)


def _format(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:,.0f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glas", type=Path, default=GLAS_TRAIN, help="GlaS folder with images/ and masks/")
    parser.add_argument("--masks", type=int, default=60, help="synthetic masks to measure")
    args = parser.parse_args(argv)
    glas = statistics(glas_labels(args.glas))
    synthetic = statistics(synthetic_labels(args.masks))
    print(f"| statistic | GlaS train ({len(list((args.glas / 'images').glob('*.png')))} images) "
          f"| synthetic, defaults ({args.masks} masks of {GLAS_SHAPE[0]}x{GLAS_SHAPE[1]}) |")
    print("|---|---:|---:|")
    for name in glas:
        print(f"| {name} | {_format(glas[name])} | {_format(synthetic[name])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
