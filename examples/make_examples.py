"""Regenerate the files in examples/ (run from the repository root; needs the `onnx` package).

example_mask.png  a 1000 x 750 colour mask drawn by safron's synthetic mask generator (`safron.synthesis`,
                  calibrated on the GlaS training masks; seed 2022): glands (green) as dense and as large as
                  the default model saw in training, stroma (red), background (blue) spots. It replaced a
                  hand-drawn mask of small ellipses in mostly stroma, which was unlike any training image.
centre_crop.onnx  the geometry-check generator: it returns the centre 256x256 of each 296x296 mask window,
                  so a render must reproduce the mask's colours exactly.
"""

import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python_tests"))
import onnx_models  # noqa: E402

from safron import masks, synthesis  # noqa: E402


def example_labels(height=750, width=1000, seed=2022):
    return synthesis.synthesize(height, width, seed=seed)


if __name__ == "__main__":
    Image.fromarray(masks.labels_to_colour(example_labels())).save(HERE / "example_mask.png", optimize=True)
    onnx_models.centre_crop(HERE / "centre_crop.onnx")
    print("wrote", HERE / "example_mask.png", "and", HERE / "centre_crop.onnx")
