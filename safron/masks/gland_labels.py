"""SAFRON's three classes derived from a binary gland mask (GlaS style) and its H&E image."""

from __future__ import annotations

import numpy as np

from .classes import BACKGROUND, GLAND, STROMA

# Deriving SAFRON's three classes from a binary gland mask (GlaS style: 255 gland, 0 not gland), the one
# rule used by training, tests and benchmarks. Outside glands, a pixel is BACKGROUND when the mean of
# min(R, G, B) over the (2r+1) x (2r+1) square around it is at least BACKGROUND_MIN_CHANNEL, else STROMA.
# Why the darkest channel: haematoxylin and eosin both absorb green strongly and every stained pixel is
# dark in at least one channel, while unstained glass transmits all three; so min(R, G, B) puts pale pink
# stroma (e.g. 235, 180, 225) twice as far from white as the mean brightness does. Why 215: on the 85
# GlaS training images (5x5 mean of the darkest channel, non-gland pixels) unstained areas peak at
# 240-252 and, in the pink-cast scans, still reach 225-235, while the palest stroma (train_14) has its
# median at 184; only 5.5 % of non-gland pixels fall between 200 and 215. The 5x5 mean keeps single
# bright pixels between nuclei from becoming background. The rule uses no per-image statistic, so a crop
# of an image gets the labels of the whole image's crop (up to r px from its edges, where the square is
# cut by the border and filled by repeating the edge pixels). On GlaS train it labels 11.9 % of the
# non-gland area as background (the paper's synthetic masks use 10 %).
BACKGROUND_MIN_CHANNEL = 215
BACKGROUND_SMOOTHING_RADIUS = 2


def labels_from_gland_mask(image_rgb: np.ndarray, gland_mask: np.ndarray) -> np.ndarray:
    """Three-class labels uint8 (H, W) from an H&E image uint8 (H, W, 3) (or RGBA, alpha ignored) and a
    binary gland mask (H, W) of any dtype, nonzero = gland: GLAND where the mask says so; outside glands
    BACKGROUND on bright unstained pixels and STROMA elsewhere (the rule and its constants are above)."""
    image = np.asarray(image_rgb)
    gland = np.asarray(gland_mask)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image_rgb must be uint8 (H, W, 3) or (H, W, 4) (got {image.dtype} {image.shape})")
    if gland.shape != image.shape[:2]:
        raise ValueError(f"gland_mask must be (H, W) = {image.shape[:2]} like the image (got {gland.shape})")
    radius = BACKGROUND_SMOOTHING_RADIUS
    side = 2 * radius + 1
    height, width = gland.shape
    darkest = np.minimum(np.minimum(image[..., 0], image[..., 1]), image[..., 2])
    darkest = np.pad(darkest, radius, mode="edge").astype(np.uint16)  # sums of 25 bytes fit 16 bits
    # Box sums as sums of shifted slices, in integers: the threshold test is exact.
    column_sums = darkest[:height].copy()
    for shift in range(1, side):
        column_sums += darkest[shift:shift + height]
    box = column_sums[:, :width].copy()
    for shift in range(1, side):
        box += column_sums[:, shift:shift + width]
    labels = np.where(box >= BACKGROUND_MIN_CHANNEL * side * side, BACKGROUND, STROMA).astype(np.uint8)
    labels[gland != 0] = GLAND
    return labels
