"""Regenerate the files in examples/ (run from the repository root; needs the `onnx` package).

example_mask.png  a 1000 x 750 colour mask: elliptical glands (green) in stroma (red) with background
                  (blue) spots, drawn from a fixed seed. It stands in until `safron-masks` (the synthetic
                  mask generator calibrated on GlaS statistics) replaces it.
centre_crop.onnx  the geometry-check generator: it returns the centre 256x256 of each 296x296 mask window,
                  so a render must reproduce the mask's colours exactly.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python_tests"))
import onnx_models  # noqa: E402

from safron import masks  # noqa: E402


def example_labels(height=750, width=1000, seed=2022):
    rng = np.random.default_rng(seed)
    labels = np.full((height, width), masks.STROMA, np.uint8)
    yy, xx = np.mgrid[:height, :width]
    for _ in range(rng.poisson(0.25 * height * width / 10_000)):  # background spots, then glands on top
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(4, 25)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = masks.BACKGROUND
    for _ in range(int(height * width / 9_000)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        a, b, theta = rng.uniform(12, 45), rng.uniform(8, 25), rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
        v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
        labels[(u / a) ** 2 + (v / b) ** 2 < 1] = masks.GLAND
    return labels


if __name__ == "__main__":
    Image.fromarray(masks.labels_to_colour(example_labels())).save(HERE / "example_mask.png", optimize=True)
    onnx_models.centre_crop(HERE / "centre_crop.onnx")
    print("wrote", HERE / "example_mask.png", "and", HERE / "centre_crop.onnx")
