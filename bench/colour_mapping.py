"""How much of a generator's whole-image FID on GlaS testA is per-class colour (an experiment, not a test).

Prints colour by class (`evaluation.colour_by_class`) of the real GlaS train and testA images, so the shift between
the two sets shows. Then it fits, on renders of the train masks against the train images, a quantile mapping per mask
class and colour channel, and applies it to the renders of the testA masks, blending the classes with a Gaussian of
`--sigma` px so that no class edge becomes a step. It prints FID and KID on whole images and crops, plain and mapped,
with the paired difference. The mapping is fitted on train only, so testA stays unseen.

    python bench/colour_mapping.py --glas ../shared/data/glas [--model generator.onnx] [--threads 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _train_pairs(glas: Path):
    from safron.data import read_pair

    for path in sorted((glas / "train" / "images").glob("*.png")):
        yield read_pair(path, glas / "train" / "masks" / path.name)


def _luts(real_hist: np.ndarray, synthetic_hist: np.ndarray) -> np.ndarray:
    """[class, channel, 256] levels: each synthetic level to the real level at the same place in the distribution."""
    luts = np.zeros(real_hist.shape)
    for index in np.ndindex(real_hist.shape[:2]):
        synthetic = synthetic_hist[index] / synthetic_hist[index].sum()
        real_cdf = np.cumsum(real_hist[index]) / real_hist[index].sum()
        luts[index] = np.interp(np.cumsum(synthetic) - synthetic / 2, real_cdf, np.arange(256))
    return luts


def _mapped(image: np.ndarray, labels: np.ndarray, luts: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    weights = np.stack([gaussian_filter((labels == k).astype(float), sigma) for k in range(len(luts))])
    weights /= weights.sum(axis=0, keepdims=True)
    out = np.zeros(image.shape)
    for k in range(len(luts)):
        for channel in range(3):
            out[..., channel] += weights[k] * luts[k, channel][image[..., channel]]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glas", type=Path, required=True, help="GlaS folder with train/ and testA/")
    parser.add_argument("--model", type=Path, help="generator ONNX (default: the embedded model)")
    parser.add_argument("--sigma", type=float, default=3.0, help="class blending, px (default: %(default)s)")
    parser.add_argument("--resamples", type=int, default=100, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from safron import engine, evaluation
    from safron.backends import create_backend

    torch.set_num_threads(args.threads)
    backend = create_backend("onnxruntime", args.model or engine.default_model_path(), threads=args.threads)
    cases = evaluation.load_testa(args.glas)
    classes = len(evaluation.CLASS_NAMES)
    real_hist, synthetic_hist = np.zeros((classes, 3, 256)), np.zeros((classes, 3, 256))
    train_images, train_labels = [], []
    try:
        for image, labels in _train_pairs(args.glas):
            synthetic = engine.render_array(labels, backend=backend)
            for k in range(classes):
                for channel in range(3):
                    real_hist[k, channel] += np.bincount(image[labels == k][:, channel], minlength=256)
                    synthetic_hist[k, channel] += np.bincount(synthetic[labels == k][:, channel], minlength=256)
            train_images.append(image), train_labels.append(labels)
        plain = [engine.render_array(c.labels, backend=backend) for c in cases]
    finally:
        backend.close()
    luts = _luts(real_hist, synthetic_hist)
    mapped = [_mapped(image, c.labels, luts, args.sigma) for image, c in zip(plain, cases)]

    real, labels = [c.image for c in cases], [c.labels for c in cases]
    for name, images, masks_ in (("train, real", train_images, train_labels), ("testA, real", real, labels),
                                 ("testA, synthetic", plain, labels), ("testA, mapped", mapped, labels)):
        for cls, stats in evaluation.colour_by_class(images, masks_).items():
            grey = " / ".join(f"{v:.0f}" for v in stats["grey_percentiles"].values())
            print(f"{name:17} {cls:10} mean RGB ({', '.join(f'{v:.0f}' for v in stats['mean_rgb'])}), grey {grey}")
    for protocol, crop in (("whole", None), ("crops", evaluation.CROP)):
        features = [evaluation._grouped_features(images, crop, False, "") for images in (real, plain, mapped)]
        plain_scores = evaluation.bootstrap_scores(features[0], features[1], args.resamples)
        mapped_scores = evaluation.bootstrap_scores(features[0], features[2], args.resamples)
        difference = evaluation.paired_difference(features[0], features[2], features[1], args.resamples)
        print(f"{protocol}: plain FID {plain_scores.fid.value:.1f} / KID {plain_scores.kid.value:.4f}, mapped FID "
              f"{mapped_scores.fid.value:.1f} / KID {mapped_scores.kid.value:.4f}; mapped - plain ΔFID "
              f"{difference.fid.value:+.1f} [{difference.fid.low:+.1f}, {difference.fid.high:+.1f}], ΔKID "
              f"{difference.kid.value:+.4f}: {difference.verdict}")


if __name__ == "__main__":
    main()
