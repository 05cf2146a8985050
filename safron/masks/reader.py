"""Tissue component masks read from files or arrays: `Mask` (validation, colour snapping, label windows),
`open_mask`, `from_array`, `mirror_index`."""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from ..errors import MaskError
from ..slide_io import ArrayRaster, RasterReader, open_raster
from .classes import CLASS_COLOURS, CLASS_NAMES, GLAND




# Euclidean RGB distance within which a pixel snaps to the nearest class colour. The class colours are
# 360.6 apart, so every blend of two of them (antialiased or resampled edges) lies within 180.3 of one;
# every grey level lies at least 208.2 from all three, black, yellow, cyan and magenta 255, white 360.6.
# 195 sits midway between those two bounds, with about 14 units of margin on each side for noise.
# Measured on blob masks: JPEG with 4:4:4 chroma stays within 121 of the drawn colour down to quality 75.
COLOUR_TOLERANCE = 195.0

# Masks stored with lossy compression (JPEG files, JPEG-compressed TIFFs, vendor slides). JPEG with 4:2:0 chroma
# subsampling (most encoders' default, Pillow's included) stores colour at half resolution, so along a class edge
# it blends the two classes' colours while keeping each pixel's brightness: measured on synthetic masks from
# quality 10 to 95, up to 246 from every class colour, further than mid-grey is. No colour tolerance can take
# those and still refuse grey, so lossy masks are judged by where an off colour is rather than what it is: every
# off colour measured lay within 1 px of a class edge and within SMEAR_RADIUS of a pixel of a class colour, while a
# wrong colour drawn into the mask (a blob, a line more than 2 * SMEAR_RADIUS wide) or an H&E image given as a mask
# has off colours further than that (on the 2967 x 2220 H&E test slide, 69 % of its pixels). Such a pixel is an
# error; the others snap to the nearest class as measured in YCbCr with the brightness difference counted
# LOSSY_LUMA_WEIGHT times, because JPEG keeps brightness at full resolution and blurs colour: on default (quality
# 75, 4:2:0) JPEGs of synthetic masks that labels 99.89 % of pixels as drawn against 99.67 % for the nearest RGB
# colour, and every pixel more than 1 px from a class edge. The pixels right on an edge are ambiguous by nature:
# 4:2:0 may move an edge by a pixel, and a class strip 1 px wide may vanish into its neighbours.
SMEAR_RADIUS = 2
LOSSY_LUMA_WEIGHT = 3.0

_LABEL_LEGEND = ", ".join(f"{label} {name}" for label, name in sorted(CLASS_NAMES.items()))
# Flag set in the colour lookup table on colours beyond the tolerance; the low bits still hold the nearest class.
_OFF_COLOUR = 0x80
_CONVERSION_PIXELS = 1 << 22  # rows are converted in chunks of about this many pixels (bounded temporaries)
_VALIDATE_BYTES = 64 << 20  # raw pixels per band that validate() reads


# ITU-R BT.601 full range, as JPEG (JFIF) uses: (Y, Cb, Cr) = _YCBCR @ (R, G, B), offsets left out.
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


@functools.lru_cache(maxsize=4)
def _colour_lookup(tolerance: float, lossy: bool) -> np.ndarray:
    """Class label for each of the 2**24 RGB colours, indexed by r << 16 | g << 8 | b, plus _OFF_COLOUR where no class
    colour lies within `tolerance`. The nearest class is measured in RGB, or for `lossy` masks in luma-weighted YCbCr
    (see SMEAR_RADIUS).

    An exact table is 16 MiB and turns snapping into one gather, about 9 times faster than computing
    distances to the three class colours for every pixel (measured: 130 vs 15 Mpx/s on one core).
    """
    table = np.empty(1 << 24, np.uint8)
    levels = np.arange(256, dtype=np.int32)
    green, blue = np.meshgrid(levels, levels, indexing="ij")
    classes = [(np.uint8(label), np.array(rgb, np.int32)) for label, rgb in CLASS_COLOURS.items()]
    if lossy:
        # Under a quadratic distance |W Y (p - c)|^2 the nearest class minimises c'Qc - 2 p'Qc with Q = Y'W^2 Y: a
        # linear function of the pixel p per class, whose green and blue terms are the same for every red level.
        weights = np.diag([LOSSY_LUMA_WEIGHT ** 2, 1.0, 1.0])
        quadratic = _YCBCR.T @ weights @ _YCBCR
        linear = [(rgb @ quadratic @ rgb, rgb @ quadratic) for _, rgb in classes]
        green_blue = [offset - 2 * (green * q[1] + blue * q[2]) for offset, q in linear]
    limit = tolerance * tolerance
    for red in range(256):
        nearest = np.empty(green.shape, np.uint8)
        for k, (label, (r, g, b)) in enumerate(classes):
            distance2 = (red - r) ** 2 + (green - g) ** 2 + (blue - b) ** 2
            score = green_blue[k] - 2 * red * linear[k][1][0] if lossy else distance2
            if k == 0:
                nearest[:], best, closest = label, score, distance2
            else:
                better = score < best
                nearest[better] = label
                best = np.where(better, score, best)
                closest = np.minimum(closest, distance2)
        nearest[closest > limit] |= _OFF_COLOUR
        table[red << 16:(red + 1) << 16] = nearest.ravel()
    return table


def _within(near: np.ndarray, radius: int) -> np.ndarray:
    """Where a True of `near` lies within `radius` pixels (chessboard distance): a square maximum filter."""
    height, width = near.shape
    padded = np.pad(near, radius)
    across = np.zeros((height + 2 * radius, width), bool)
    for shift in range(2 * radius + 1):
        across |= padded[:, shift:shift + width]
    found = np.zeros((height, width), bool)
    for shift in range(2 * radius + 1):
        found |= across[shift:shift + height]
    return found


class Mask:
    """A tissue component mask read region by region as class labels.

    `height`, `width`, `mpp` (microns per pixel or None), `kind` ('labels' for single-channel masks,
    'colour' for RGB/RGBA), `path`, `colour_tolerance`, `lossy` (stored with lossy compression: off colours near
    class colours are taken for the codec's smear, see SMEAR_RADIUS).
    """

    def __init__(self, raster: RasterReader, *, colour_tolerance: float = COLOUR_TOLERANCE):
        tolerance = float(colour_tolerance)
        if math.isnan(tolerance) or tolerance < 0:
            raise ValueError(f"colour_tolerance must be >= 0 (got {colour_tolerance})")
        self._raster = raster
        self.path = raster.path
        self.height, self.width, self.mpp = raster.height, raster.width, raster.mpp
        self.kind = "labels" if raster.channels == 1 else "colour"
        self.lossy = bool(raster.lossy)
        if self.kind == "labels" and self.lossy:
            raster.close()  # refused: nobody else will close it
            # Labels 0, 1, 2 are three adjacent grey levels: a lossy codec's error of a level or two turns gland into
            # stroma or stroma into background with no trace of it, and where it strays above 2 the mask is refused
            # anyway. A colour mask survives lossy compression (its classes are far apart); labels cannot.
            raise MaskError(
                f"{self.path}: a label mask stored with lossy compression (JPEG) has lost its labels, as its class "
                "values 0, 1, 2 differ by one grey level: save label masks as PNG or TIFF (or as a colour mask)"
            )
        self.colour_tolerance = tolerance
        self._lookup = _colour_lookup(tolerance, self.lossy) if self.kind == "colour" else None
        # Whether an off colour is smear depends on the pixels around it: regions are read this much larger.
        self._context = SMEAR_RADIUS if self.kind == "colour" and self.lossy else 0

    @property
    def in_memory(self) -> bool:
        """Whether the whole mask is held in memory (an array, or a PNG or JPEG decoded whole) rather than read by
        region from its file."""
        return isinstance(self._raster, ArrayRaster)

    def read_labels(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Class labels of rows [y0, y0+h) and columns [x0, x0+w) as uint8 (h, w). The region may
        extend beyond the mask, or lie wholly outside it: there the mask is mirrored about its border
        (`mirror_index`). That is safron's border convention, the same in training and inference, so
        patches at the slide edge see the kind of context they were trained with. Raises MaskError at
        the first pixel that is not a class."""
        y0, x0, h, w = (int(v) for v in (y0, x0, h, w))
        if h < 0 or w < 0:
            raise ValueError(f"region size must be non-negative (got h={h}, w={w})")
        if h == 0 or w == 0:
            return np.empty((h, w), np.uint8)
        if y0 >= 0 and x0 >= 0 and y0 + h <= self.height and x0 + w <= self.width:
            return self._labels_inside(y0, x0, h, w)
        top, bottom = max(y0, 0), min(y0 + h, self.height)
        left, right = max(x0, 0), min(x0 + w, self.width)
        pads = ((top - y0, y0 + h - bottom), (left - x0, x0 + w - right))
        if _pad_mirrors(pads[0], top, bottom, self.height) and _pad_mirrors(pads[1], left, right, self.width):
            # Every patch row's first and last windows come here. Padding copies slices; gathering the whole
            # region with index arrays (below) took 50 times as long.
            inside = self._labels_inside(top, left, bottom - top, right - left)
            return np.pad(inside, pads, mode="symmetric")
        rows = mirror_index(np.arange(y0, y0 + h), self.height)
        cols = mirror_index(np.arange(x0, x0 + w), self.width)
        # Mirroring folds the region onto the mask: the rows and columns it needs span no more than it does.
        top, left = int(rows.min()), int(cols.min())
        bottom, right = int(rows.max()) + 1, int(cols.max()) + 1
        inside = self._labels_inside(top, left, bottom - top, right - left)
        return inside[np.ix_(rows - top, cols - left)]

    def validate(self) -> None:
        """Check every pixel, band by band (memory bounded by _VALIDATE_BYTES whatever the mask size)."""
        row_bytes = self.width * self._raster.channels
        rows = max(1, _VALIDATE_BYTES // row_bytes)
        for top in range(0, self.height, rows):
            self.read_labels(top, 0, min(rows, self.height - top), self.width)

    def _labels_inside(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Labels of a region inside the mask. A lossy colour mask is read with a frame of SMEAR_RADIUS pixels
        (within the mask), so that each pixel is judged by the same neighbourhood whichever region it is read in."""
        context = self._context
        if not context:
            return self._labels_of(self._raster.read(y0, x0, h, w), y0, x0)
        top, left = max(y0 - context, 0), max(x0 - context, 0)
        bottom, right = min(y0 + h + context, self.height), min(x0 + w + context, self.width)
        inside = (slice(y0 - top, y0 - top + h), slice(x0 - left, x0 - left + w))
        framed = self._labels_of(self._raster.read(top, left, bottom - top, right - left), top, left, inside)
        return np.ascontiguousarray(framed[inside])

    def _labels_of(self, raw: np.ndarray, y0: int, x0: int, judged: tuple[slice, slice] | None = None) -> np.ndarray:
        """Labels of the pixels `raw` read at (y0, x0). In a lossy colour mask, only the pixels in `judged` are
        checked, the others being the frame that gives them their neighbourhood."""
        if self.kind == "labels":
            if raw.max() > GLAND:
                y, x = np.unravel_index(np.argmax(raw > GLAND), raw.shape)
                raise MaskError(
                    f"{self.path}: label value {raw[y, x]} at (y={y0 + y}, x={x0 + x}) is not a class "
                    f"({_LABEL_LEGEND})"
                )
            return raw
        labels = np.empty(raw.shape[:2], np.uint8)
        rows = max(1, _CONVERSION_PIXELS // raw.shape[1])
        for top in range(0, raw.shape[0], rows):
            chunk = raw[top:top + rows]
            index = chunk[..., 0].astype(np.uint32) << 16
            index |= chunk[..., 1].astype(np.uint32) << 8
            index |= chunk[..., 2]
            np.take(self._lookup, index, out=labels[top:top + rows])
        if labels.max() < _OFF_COLOUR:
            return labels
        off = labels >= _OFF_COLOUR
        if self.lossy:
            stray = np.zeros_like(off)
            stray[judged] = off[judged] & ~_within(~off, SMEAR_RADIUS)[judged]
            if not stray.any():
                labels &= ~np.uint8(_OFF_COLOUR)
                return labels
            off = stray
        y, x = np.unravel_index(np.argmax(off), off.shape)
        colour = tuple(int(v) for v in raw[y, x, :3])
        if self.lossy:
            hint = (f"; it is more than {SMEAR_RADIUS} px from every class colour, so not the smear lossy "
                    "compression leaves along class edges")
        elif self._between_classes(labels, y, x):
            hint = ("; it lies on a class edge, as lossy compression leaves them: if the mask was once a JPEG, "
                    "raise the colour tolerance (inf snaps every colour to the nearest class)")
        else:
            hint = ""
        raise MaskError(
            f"{self.path}: colour {colour} at (y={y0 + y}, x={x0 + x}) is not a class colour "
            f"(gland green, stroma red, background blue; tolerance {self.colour_tolerance:g}){hint}"
        )

    @staticmethod
    def _between_classes(labels: np.ndarray, y: int, x: int) -> bool:
        """Whether pixels of two different classes lie within 2 px: the bad colour then sits on a class
        edge, where lossy codecs smear colours (unlike, say, an H&E image passed as a mask)."""
        nearby = labels[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3]
        return np.unique(nearby[nearby < _OFF_COLOUR]).size >= 2

    def close(self) -> None:
        self._raster.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Mask({self.path!r}, {self.height}x{self.width}, kind={self.kind!r}, mpp={self.mpp})"


def _pad_mirrors(pad: tuple[int, int], begin: int, end: int, size: int) -> bool:
    """Whether numpy's "symmetric" padding of mask pixels [begin, end) by `pad` along an axis of `size` equals
    `mirror_index`: when each pad reflects only pixels inside the span (so they are the mask's own edge pixels),
    or the span is the whole axis (numpy then repeats the reflection, as mirror_index does)."""
    span = end - begin
    return span > 0 and (max(pad) <= span or (begin, end) == (0, size))


def mirror_index(index: np.ndarray, size: int) -> np.ndarray:
    """The mask pixel that stands for position `index` along an axis of `size` pixels: itself inside, the
    mirror image about the nearest border outside (half-sample symmetric, as numpy.pad's "symmetric": positions
    -1, -2 show pixels 0, 1 and positions size, size + 1 show size - 1, size - 2), repeating with period
    2 * size however far out. Why a mirror and not the background class, which the original method pads with: a
    generator learns that next to background, tissue fades to unstained white, so a background frame around
    the mask drew a bright rim along every image border (measured in bench/glas_eval.py's "rim excess"); the
    mirrored mask continues the tissue the image shows."""
    folded = np.mod(index, 2 * size)
    return np.where(folded < size, folded, 2 * size - 1 - folded)


def open_mask(path: str | os.PathLike, *, colour_tolerance: float = COLOUR_TOLERANCE) -> Mask:
    """Open a mask file (TIFF, vendor slide, PNG, JPEG, ...) for reading labels by region."""
    return Mask(open_raster(path), colour_tolerance=colour_tolerance)


def from_array(array: np.ndarray, *, mpp: float | None = None, name: str = "<array>",
               colour_tolerance: float = COLOUR_TOLERANCE) -> Mask:
    """A mask in memory: labels uint8 (H, W) or colour uint8 (H, W, 3|4). `name` stands for the
    path in error messages."""
    return Mask(ArrayRaster(array, path=name, mpp=mpp), colour_tolerance=colour_tolerance)


