"""Synthetic tissue component masks: SAFRON's recipe, calibrated to GlaS, any size, region by region.

The paper's recipe: "3 to 7 elliptical glands per 100x100 area at random positions and sizes; the rest
stroma, with background spots drawn with probability 0.1". At GlaS's scale (20x, about 0.62 um/px),
3 to 7 glands per 100 x 100 px would be 15 to 30 times GlaS's density (0.23 per 100 x 100 px), so the
recipe is kept and its scale calibrated: the plane is cut into square cells of `Recipe.cell_size` px
and each cell receives 3 to 7 glands. The defaults (`GLAS_RECIPE`) make the gland area fraction, the
number of glands per area, and the gland area and axis distributions match the GlaS training masks;
`bench/mask_statistics.py` measures both and prints the comparison table (reproduced in the README).

The model, for a `seed`:

* Glands. Each cell (row, col) of the infinite plane draws its glands from its own random generator,
  seeded by (seed, row, col): centre uniform in the cell; major axis length log-normal with log-sd
  `gland_length_spread` around a median of `gland_length`, or, with probability
  `large_gland_probability`, of `large_gland_length` (GlaS mixes benign crypts with the much larger
  glands of adenocarcinoma: half its gland area lies in components over 40 000 px), capped at
  `gland_length_max`; minor/major ratio uniform in `gland_ratio`; orientation uniform; a priority.
  A gland is dropped when its centre lies inside a gland of higher priority enlarged `gland_exclusion`
  times, so no gland sits inside another and few are cut to slivers. Real glands do not overlap: they
  press against each other with stroma in between. So where ellipses overlap or come close, each pixel
  goes to the gland it lies deepest inside, and a band of stroma `gland_gap` px wide separates
  neighbours (wider where their outlines diverge, narrower only where three glands meet): pixel (y, x)
  is gland when d1 < 0 and d2 - d1 >= gland_gap, where d1 <= d2 are its two smallest signed distances
  to the glands' outlines, each estimated as (rho - 1) / |grad rho| with rho = sqrt((u/a)**2 + (v/b)**2)
  in the ellipse's axes (exact along the axes and near the outline).
* Background spots. The paper draws each pixel as background with probability 0.1 (the official code
  samples white noise). GlaS's background, derived from bright unstained pixels by
  `safron.masks.labels_from_gland_mask`, is not noise but spots and cracks of all sizes, and 12 % of
  its non-gland area is background, close to the paper's 0.1. So we keep 0.1 as the probability that a
  stroma pixel is background (`background_fraction`) and realise it as elliptical spots placed
  independently of the glands, with areas between the `spot_area` bounds spread so that every octave
  of area holds the same share of background (density proportional to 1/A**2, roughly as on GlaS), at
  the density that makes the spots cover that fraction of the plane. Glands are drawn over spots.

Locality and determinism: a pixel's label depends only on the seed, the recipe and the glands and spots
of the cells within `Recipe.reach` of it, never on the size of the mask or the region requested. So any
region of a gigapixel mask is generated on its own and equals the same region of a whole-image
synthesis byte for byte, and a mask of height H and width W is the top-left corner of every larger mask
with the same seed. Random numbers come from numpy's PCG64 seeded through numpy's SeedSequence; pixels
are computed with plain IEEE float operations, identical whichever region or block they are computed in.
The same seed gives the same bytes on every run with a given numpy (numpy keeps its generators' streams
stable in practice but does not promise it across versions).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import SafronInputError
from .files import written_atomically
from .masks.classes import BACKGROUND, GLAND, STROMA, labels_to_colour
from .slide_io import check_output_path

__all__ = ["Recipe", "GLAS_RECIPE", "MaskSynthesizer", "synthesize", "write_mask", "PNG_MAX_PIXELS"]

# A PNG is encoded (and, by safron's readers, decoded) whole: beyond this, masks are written as TIFF.
PNG_MAX_PIXELS = 1 << 26
_TIFF_SUFFIXES = (".tif", ".tiff")
_CLASSIC_TIFF_MAX_BYTES = 2**31  # below this uncompressed size every offset fits classic TIFF
_CENTIMETRE_IN_MICRONS = 1e4
# read_labels works through large regions in blocks of this size, so its float temporaries stay near
# 10 MB whatever the region size (a pixel's label does not depend on the block it is computed in).
_BLOCK_ROWS, _BLOCK_COLUMNS = 512, 2048


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass(frozen=True)
class Recipe:
    """Parameters of the synthetic mask model; lengths in pixels, areas in square pixels. The defaults
    (GLAS_RECIPE) are calibrated on the GlaS training masks (20x); `scaled` adapts them to other
    magnifications.

    cell_size                side of the square cells that each receive `glands_per_cell` glands
    glands_per_cell          inclusive range of glands drawn per cell (uniform), the paper's 3 to 7
    gland_length             median major axis length (2a) of a drawn gland
    gland_length_spread      sd of the natural log of the major axis length
    large_gland_probability  probability that a gland is drawn around `large_gland_length` instead
    large_gland_length       median major axis length of those large glands
    gland_length_max         cap on any gland's major axis length
    gland_ratio              range of minor/major axis ratios (uniform)
    gland_exclusion          a gland whose centre lies inside a higher-priority gland enlarged this
                             many times is dropped (at least 1: no gland inside another)
    gland_gap                width of the stroma between glands that would touch or overlap
    background_fraction      probability that a stroma pixel is background (the paper's 0.1)
    spot_area                range of background spot areas
    spot_ratio               range of spot minor/major axis ratios (uniform)
    """

    cell_size: float = 420.0
    glands_per_cell: tuple[int, int] = (3, 7)
    gland_length: float = 170.0
    gland_length_spread: float = 0.3
    large_gland_probability: float = 0.25
    large_gland_length: float = 380.0
    gland_length_max: float = 800.0
    gland_ratio: tuple[float, float] = (0.4, 0.95)
    gland_exclusion: float = 1.2
    gland_gap: float = 6.0
    background_fraction: float = 0.1
    spot_area: tuple[float, float] = (20.0, 3000.0)
    spot_ratio: tuple[float, float] = (0.3, 1.0)

    def __post_init__(self) -> None:
        def require(name, condition, expected):
            if not condition:
                raise SafronInputError(f"recipe {name} must be {expected} (got {getattr(self, name)!r})")

        def pair(name, low, high):
            value = getattr(self, name)
            ok = isinstance(value, tuple) and len(value) == 2 and all(_is_number(v) for v in value) \
                and low <= value[0] <= value[1] <= high
            require(name, ok, f"a pair low <= high within [{low}, {high}]")

        for name in ("cell_size", "gland_length", "large_gland_length", "gland_length_max", "gland_gap"):
            value = getattr(self, name)
            require(name, _is_number(value) and value > 0, "a positive number")
        low, high = self.glands_per_cell if isinstance(self.glands_per_cell, tuple) else (None, None)
        require("glands_per_cell", isinstance(low, int) and isinstance(high, int) and 0 <= low <= high,
                "a pair of integers 0 <= low <= high")
        spread = self.gland_length_spread
        require("gland_length_spread", _is_number(spread) and 0 <= spread <= 2, "in [0, 2]")
        probability = self.large_gland_probability
        require("large_gland_probability", _is_number(probability) and 0 <= probability <= 1, "in [0, 1]")
        exclusion = self.gland_exclusion
        require("gland_exclusion", _is_number(exclusion) and 1 <= exclusion <= 10, "in [1, 10]")
        fraction = self.background_fraction
        require("background_fraction", _is_number(fraction) and 0 <= fraction < 1, "in [0, 1)")
        pair("gland_ratio", 0.01, 1.0)
        pair("spot_ratio", 0.01, 1.0)
        pair("spot_area", 1.0, 1e12)

    def scaled(self, factor: float) -> Recipe:
        """The same tissue at `factor` times the magnification (e.g. 2 for 40x from the 20x defaults):
        lengths times factor, areas times factor squared, fractions and counts per cell unchanged."""
        if not (_is_number(factor) and factor > 0):
            raise SafronInputError(f"scale factor must be a positive number (got {factor!r})")
        return dataclasses.replace(
            self,
            cell_size=self.cell_size * factor,
            gland_length=self.gland_length * factor,
            large_gland_length=self.large_gland_length * factor,
            gland_length_max=self.gland_length_max * factor,
            gland_gap=self.gland_gap * factor,
            spot_area=(self.spot_area[0] * factor**2, self.spot_area[1] * factor**2),
        )

    @property
    def spots_per_pixel(self) -> float:
        """Spot density that covers `background_fraction` of the plane: independent spots of mean
        area E[A] at density n cover 1 - exp(-n E[A]) of it."""
        low, high = self.spot_area
        mean_area = low if low == high else math.log(high / low) / (1 / low - 1 / high)
        return -math.log1p(-self.background_fraction) / mean_area

    @property
    def reach(self) -> float:
        """How far beyond its cell a cell's glands and spots can affect labels, gap included."""
        spot_radius = math.sqrt(self.spot_area[1] / (math.pi * self.spot_ratio[0]))
        return max(self.gland_length_max / 2 + self.gland_gap, spot_radius) + 1


GLAS_RECIPE = Recipe()

# Columns of the per-cell arrays.
_CY, _CX, _A, _B, _COS, _SIN, _PRIORITY = range(7)


def _zigzag(index: int) -> int:
    """Signed cell index -> non-negative integer (SeedSequence takes only those), one to one."""
    return 2 * index if index >= 0 else -2 * index - 1


def _draw_cell(seed: int, recipe: Recipe, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
    """All glands (before thinning) and spots drawn in one cell: float64 arrays (n, 7) and (m, 6)
    with columns cy, cx, a, b, cos, sin (and a priority for glands)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence((seed, _zigzag(row), _zigzag(col)))))
    size = recipe.cell_size
    low, high = recipe.glands_per_cell
    count = low + int(rng.integers(0, high - low + 1))
    glands = np.empty((count, 7))
    glands[:, _CY] = (row + rng.random(count)) * size
    glands[:, _CX] = (col + rng.random(count)) * size
    large = rng.random(count) < recipe.large_gland_probability
    median = np.where(large, recipe.large_gland_length, recipe.gland_length)
    length = median * np.exp(recipe.gland_length_spread * rng.standard_normal(count))
    glands[:, _A] = np.minimum(length, recipe.gland_length_max) / 2
    glands[:, _B] = glands[:, _A] * rng.uniform(*recipe.gland_ratio, count)
    angle = rng.uniform(0, np.pi, count)
    glands[:, _COS], glands[:, _SIN] = np.cos(angle), np.sin(angle)
    glands[:, _PRIORITY] = rng.random(count)

    expected = recipe.spots_per_pixel * size * size
    count = int(expected) + int(rng.random() < expected - int(expected))
    spots = np.empty((count, 6))
    spots[:, _CY] = (row + rng.random(count)) * size
    spots[:, _CX] = (col + rng.random(count)) * size
    low, high = recipe.spot_area
    area = 1 / (1 / low - rng.random(count) * (1 / low - 1 / high))  # density proportional to 1/A**2
    ratio = rng.uniform(*recipe.spot_ratio, count)
    spots[:, _A] = np.sqrt(area / (np.pi * ratio))
    spots[:, _B] = spots[:, _A] * ratio
    angle = rng.uniform(0, np.pi, count)
    spots[:, _COS], spots[:, _SIN] = np.cos(angle), np.sin(angle)
    return glands, spots


def _thin(glands: np.ndarray, others: np.ndarray, exclusion: float) -> np.ndarray:
    """The glands whose centre lies inside none of `others` (all glands near them, themselves included)
    of higher priority, enlarged `exclusion` times."""
    dy = glands[:, None, _CY] - others[None, :, _CY]
    dx = glands[:, None, _CX] - others[None, :, _CX]
    u = dx * others[None, :, _COS] + dy * others[None, :, _SIN]
    v = dy * others[None, :, _COS] - dx * others[None, :, _SIN]
    inside = (u / others[None, :, _A]) ** 2 + (v / others[None, :, _B]) ** 2 < exclusion**2
    outranked = others[None, :, _PRIORITY] > glands[:, None, _PRIORITY]
    return glands[~(inside & outranked).any(axis=1)]


def _half_extents(shapes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half height and half width of each rotated ellipse's bounding box."""
    a, b, cos, sin = shapes[:, _A], shapes[:, _B], shapes[:, _COS], shapes[:, _SIN]
    return np.hypot(a * sin, b * cos), np.hypot(a * cos, b * sin)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SafronInputError(f"seed must be a non-negative integer (got {seed!r})")
    return int(seed)


class MaskSynthesizer:
    """The synthetic mask of one seed over the whole plane, read region by region like `safron.masks.Mask`.

    `read_labels(y0, x0, h, w)` returns the labels of any region (coordinates may be negative or huge);
    the labels of a pixel never depend on which region they were read with.
    """

    def __init__(self, seed: int = 0, recipe: Recipe = GLAS_RECIPE):
        if not isinstance(recipe, Recipe):
            raise TypeError(f"recipe must be a safron.synthesis.Recipe (got {type(recipe).__name__})")
        self.seed = _check_seed(seed)
        self.recipe = recipe
        # Cells drawn and thinned, kept for the next request: consecutive bands or tiles share most of
        # their cells. Each cache holds twice the cells of the latest request, so memory follows the
        # request size (a band: its width), never the number of requests.
        self._drawn: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._survivors: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._capacity = 0
        self._lock = threading.Lock()

    def read_labels(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Labels uint8 (h, w) of rows [y0, y0+h) and columns [x0, x0+w): GLAND, STROMA or BACKGROUND."""
        y0, x0, h, w = (int(v) for v in (y0, x0, h, w))
        if h < 0 or w < 0:
            raise ValueError(f"region size must be non-negative (got h={h}, w={w})")
        labels = np.empty((h, w), np.uint8)
        if h == 0 or w == 0:
            return labels
        glands, spots = self._shapes_near(y0, x0, h, w)
        for top in range(y0, y0 + h, _BLOCK_ROWS):
            bottom = min(top + _BLOCK_ROWS, y0 + h)
            for left in range(x0, x0 + w, _BLOCK_COLUMNS):
                right = min(left + _BLOCK_COLUMNS, x0 + w)
                block = labels[top - y0:bottom - y0, left - x0:right - x0]
                block.fill(STROMA)
                block[spots.pixels(top, left, bottom, right)] = BACKGROUND
                block[glands.pixels(top, left, bottom, right)] = GLAND
        return labels

    def _shapes_near(self, y0: int, x0: int, h: int, w: int) -> tuple[_Glands, _Spots]:
        """Surviving glands and spots of every cell that can reach the region."""
        size, reach = self.recipe.cell_size, self.recipe.reach
        rows = range(math.floor((y0 - reach) / size), math.floor((y0 + h + reach) / size) + 1)
        cols = range(math.floor((x0 - reach) / size), math.floor((x0 + w + reach) / size) + 1)
        rings = math.ceil(self.recipe.gland_exclusion * self.recipe.gland_length_max / 2 / size)
        with self._lock:
            self._capacity = 2 * (len(rows) + 2 * rings) * (len(cols) + 2 * rings)
            glands = np.concatenate([self._surviving_glands(r, c, rings) for r in rows for c in cols])
            spots = np.concatenate([self._cell(r, c)[1] for r in rows for c in cols])
        return _Glands(glands, self.recipe.gland_gap), _Spots(spots)

    def _cell(self, row: int, col: int) -> tuple[np.ndarray, np.ndarray]:
        return self._cached(self._drawn, (row, col), lambda: _draw_cell(self.seed, self.recipe, row, col))

    def _surviving_glands(self, row: int, col: int, rings: int) -> np.ndarray:
        """The cell's glands that survive thinning against every gland that could contain their centre."""
        def thin():
            others = np.concatenate([self._cell(r, c)[0] for r in range(row - rings, row + rings + 1)
                                     for c in range(col - rings, col + rings + 1)])
            return _thin(self._cell(row, col)[0], others, self.recipe.gland_exclusion)

        return self._cached(self._survivors, (row, col), thin)

    def _cached(self, cache: OrderedDict, key, make):
        value = cache.get(key)
        if value is None:
            value = cache[key] = make()
            while len(cache) > self._capacity:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return value


class _Glands:
    """Glands to draw, with the pixel box each one influences (its bounding box grown by the gap)."""

    def __init__(self, glands: np.ndarray, gap: float):
        self.glands, self.gap = glands, gap
        half_h, half_w = _half_extents(glands)
        # Pixels beyond an outline by up to `gap` still take part, as the neighbour that keeps a gap.
        self.y_first = np.ceil(glands[:, _CY] - half_h - gap).astype(np.int64)
        self.y_end = np.floor(glands[:, _CY] + half_h + gap).astype(np.int64) + 1
        self.x_first = np.ceil(glands[:, _CX] - half_w - gap).astype(np.int64)
        self.x_end = np.floor(glands[:, _CX] + half_w + gap).astype(np.int64) + 1

    def pixels(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        """Where d1 < 0 and d2 - d1 >= gap (see the module docstring). Distances are float32 computed
        from each pixel's absolute coordinates, so a pixel gets the same value in any block."""
        y_first, y_end = np.maximum(self.y_first, top), np.minimum(self.y_end, bottom)
        x_first, x_end = np.maximum(self.x_first, left), np.minimum(self.x_end, right)
        nearest = np.full((bottom - top, right - left), np.inf, np.float32)
        second = np.full_like(nearest, np.inf)
        for i in np.flatnonzero((y_first < y_end) & (x_first < x_end)):
            cy, cx, a, b, cos, sin = self.glands[i, :_PRIORITY]
            dy = (np.arange(y_first[i], y_end[i]) - cy).astype(np.float32)[:, None]
            dx = (np.arange(x_first[i], x_end[i]) - cx).astype(np.float32)[None, :]
            cos, sin = np.float32(cos), np.float32(sin)
            u = dx * cos + dy * sin
            v = dy * cos - dx * sin
            # rho = sqrt((u/a)^2 + (v/b)^2) is 1 on the outline; (rho - 1) / |grad rho| is the exact
            # distance along both axes (and everywhere for a circle), so differences of two glands'
            # distances grow about 2 px per px across their cut, and the gap comes out gland_gap wide.
            gu = u / np.float32(a * a)
            gv = v / np.float32(b * b)
            rho = np.sqrt(u * gu + v * gv)
            gradient = np.sqrt(gu * gu + gv * gv)  # |grad rho| * rho
            distance = np.full_like(rho, -min(a, b))  # at the centre, where the gradient vanishes
            np.divide((rho - np.float32(1)) * rho, gradient, out=distance, where=gradient > 0)
            window = (slice(y_first[i] - top, y_end[i] - top), slice(x_first[i] - left, x_end[i] - left))
            near, sec = nearest[window], second[window]
            np.minimum(sec, np.maximum(near, distance), out=sec)
            np.minimum(near, distance, out=near)
        with np.errstate(invalid="ignore"):  # inf - inf where no gland is near: NaN, not gland
            return (nearest < 0) & (second - nearest >= np.float32(self.gap))


class _Spots:
    """Background spots, drawn as runs: spots are small and many, so instead of testing the pixels of
    each one's box, every row of every spot is solved for the run of columns inside the ellipse, and
    all runs are painted at once through a difference array."""

    def __init__(self, spots: np.ndarray):
        self.spots = spots
        half_h, half_w = _half_extents(spots)
        self.y_first = np.ceil(spots[:, _CY] - half_h).astype(np.int64)
        self.y_end = np.floor(spots[:, _CY] + half_h).astype(np.int64) + 1
        self.x_first = np.ceil(spots[:, _CX] - half_w).astype(np.int64)
        self.x_end = np.floor(spots[:, _CX] + half_w).astype(np.int64) + 1
        # Inside the ellipse, with X = x - cx and Y = y - cy: qa X^2 + qb Y X + qc Y^2 - 1 <= 0.
        a2, b2 = spots[:, _A] ** 2, spots[:, _B] ** 2
        cos, sin = spots[:, _COS], spots[:, _SIN]
        self.qa = cos**2 / a2 + sin**2 / b2
        self.qb = 2 * cos * sin * (1 / a2 - 1 / b2)
        self.qc = sin**2 / a2 + cos**2 / b2

    def pixels(self, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        height, width = bottom - top, right - left
        y_first, y_end = np.maximum(self.y_first, top), np.minimum(self.y_end, bottom)
        near = np.flatnonzero((y_first < y_end) & (self.x_first < right) & (self.x_end > left))
        rows_each = y_end[near] - y_first[near]
        spot = np.repeat(near, rows_each)
        run_starts = np.cumsum(rows_each) - rows_each
        y = y_first[spot] + np.arange(spot.size) - np.repeat(run_starts, rows_each)
        dy = y - self.spots[spot, _CY]
        qa, qb = self.qa[spot], self.qb[spot] * dy
        discriminant = qb * qb - 4 * qa * (self.qc[spot] * dy * dy - 1)
        root = np.sqrt(np.maximum(discriminant, 0))
        cx = self.spots[spot, _CX]
        x_first = np.maximum(np.ceil(cx + (-qb - root) / (2 * qa)), left).astype(np.int64)
        x_end = np.minimum(np.floor(cx + (-qb + root) / (2 * qa)) + 1, right).astype(np.int64)
        keep = (discriminant >= 0) & (x_first < x_end)
        row_offsets = (y[keep] - top) * (width + 1)
        changes = np.bincount(row_offsets + x_first[keep] - left, minlength=height * (width + 1))
        changes -= np.bincount(row_offsets + x_end[keep] - left, minlength=height * (width + 1))
        return np.cumsum(changes.reshape(height, width + 1)[:, :width], axis=1) > 0


def synthesize(height: int, width: int, seed: int = 0, *, recipe: Recipe = GLAS_RECIPE) -> np.ndarray:
    """A synthetic mask as labels uint8 (height, width): 0 background, 1 stroma, 2 gland.

    The same (seed, recipe) always gives the same labels; a smaller mask is the top-left corner of a
    larger one. For masks too large for memory, use `write_mask` or `MaskSynthesizer.read_labels`.
    """
    height, width = _check_size(height, width)
    return MaskSynthesizer(seed, recipe).read_labels(0, 0, height, width)


def _check_size(height, width) -> tuple[int, int]:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise SafronInputError(f"mask {name} must be a positive integer (got {value!r})")
    return int(height), int(width)


def write_mask(
    path: str | os.PathLike,
    height: int,
    width: int,
    seed: int = 0,
    *,
    recipe: Recipe = GLAS_RECIPE,
    colour: bool | None = None,
    tile: int = 256,
    mpp: float | None = None,
    progress: bool = False,
    workers: int | None = None,
) -> Path:
    """Write a synthetic mask to `path` and return it as a Path.

    The format follows the suffix. `.png`: the whole mask at once, at most PNG_MAX_PIXELS. `.tif` or
    `.tiff`: tiled (tile x tile, deflate), generated one band of `tile` rows at a time, so memory holds
    a few such bands across the width, never more whatever the height. `colour` chooses class colours
    (RGB) over labels (0 background, 1 stroma, 2 gland; one byte per pixel, a third of the size, and
    what `safron-render` reads fastest); None means colour for PNG and labels for TIFF. Colour TIFFs are
    pyramidal BigTIFFs that OpenSlide, QuPath and ASAP open. `mpp` (microns per pixel) is recorded in
    the file. The file appears under its name only when complete. `workers`: processes that draw a TIFF
    mask's bands (None: one per CPU core; masks under PARALLEL_MIN_PIXELS are drawn in this process), each
    holding a band or two; the file does not depend on it.
    """
    path = Path(path)
    height, width = _check_size(height, width)
    seed = _check_seed(seed)
    check_output_path(path)
    suffix = path.suffix.lower()
    if suffix != ".png" and suffix not in _TIFF_SUFFIXES:
        raise SafronInputError(
            f"{path}: unsupported mask format {path.suffix or '(no suffix)'!r}; use .png, .tif or .tiff")
    if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise SafronInputError(f"{path}: mpp must be a positive number of microns per pixel (got {mpp!r})")
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 16 or tile % 16:
        raise SafronInputError(f"{path}: tile must be a positive multiple of 16 (got {tile!r})")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1):
        raise SafronInputError(f"{path}: workers must be a positive integer (got {workers!r})")
    synthesizer = MaskSynthesizer(seed, recipe)
    if suffix == ".png":
        if height * width > PNG_MAX_PIXELS:
            raise SafronInputError(
                f"{path}: {width} x {height} px is too large for PNG (at most {PNG_MAX_PIXELS} px); use .tif")
        _write_png(path, synthesizer, height, width, colour is not False, mpp)
    else:
        workers = _worker_count(workers, height, width)
        write = _write_colour_tiff if colour else _write_label_tiff
        write(path, synthesizer, height, width, int(tile), mpp, progress, workers)
    return path


@contextmanager
def _written_atomically(path: Path):
    """Yield a temporary name next to `path` to write to; rename it onto `path` only when the write
    succeeds, and remove it on any failure, so a partial mask never appears under its final name."""
    try:
        with written_atomically(path) as partial:
            try:
                yield partial
            except OSError as error:
                raise SafronInputError(f"{path}: cannot write the mask: {error.strerror or error}") from error
    except OSError as error:  # only the rename's: the write's are SafronInputErrors by now
        raise SafronInputError(f"{path}: cannot move the finished mask into place: {error.strerror}") from error


def _write_png(path, synthesizer, height, width, colour, mpp) -> None:
    from PIL import Image

    labels = synthesizer.read_labels(0, 0, height, width)
    image = Image.fromarray(labels_to_colour(labels) if colour else labels)
    options = {"dpi": (25400 / mpp, 25400 / mpp)} if mpp else {}
    with _written_atomically(path) as partial:
        image.save(partial, format="PNG", **options)


# Below this many pixels (about 11,600 px square) a TIFF mask is generated in the calling process: starting
# worker processes costs about a second. Measured on 2 cores: 8192 px square 3.0 s in-process, 3.9 s with two
# workers; 16384 px square 18.8 s in-process, 10.1 s with two workers.
PARALLEL_MIN_PIXELS = 1 << 27
# One synthesizer per (seed, recipe) in each worker process, so its cell caches serve the bands it is given.
_WORKER_SYNTHESIZERS: dict = {}


def _worker_band(seed: int, recipe: Recipe, top: int, rows: int, width: int) -> np.ndarray:
    synthesizer = _WORKER_SYNTHESIZERS.get((seed, recipe))
    if synthesizer is None:
        _WORKER_SYNTHESIZERS.clear()
        synthesizer = _WORKER_SYNTHESIZERS[seed, recipe] = MaskSynthesizer(seed, recipe)
    return synthesizer.read_labels(top, 0, rows, width)


def _bands(synthesizer, height, width, rows, progress, name, workers=1):
    """(top, labels) of each band of `rows` rows, top to bottom, drawn here or (workers > 1) in worker processes."""
    from tqdm import tqdm

    drawn = _bands_in_processes if workers > 1 else _bands_here
    with tqdm(total=height, unit="row", desc=name, disable=not progress, leave=False) as bar:
        for top, band in drawn(synthesizer, height, width, rows, workers):
            yield top, band
            bar.update(band.shape[0])


def _bands_here(synthesizer, height, width, rows, workers):
    for top in range(0, height, rows):
        yield top, synthesizer.read_labels(top, 0, min(rows, height - top), width)


def _bands_in_processes(synthesizer, height, width, rows, workers):
    """Bands drawn in `workers` processes, a few ahead of the one being written: the drawing is numpy on small
    arrays, held up by the GIL in threads. Labels depend only on the seed, the recipe and each pixel's
    coordinates, so the file is the same as one drawn here."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the caller may have threads (a fork copies their locks in whatever state they are).
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        submitted = ((top, pool.submit(_worker_band, synthesizer.seed, synthesizer.recipe, top,
                                       min(rows, height - top), width)) for top in range(0, height, rows))
        pending = deque(itertools.islice(submitted, workers))
        while pending:
            top, future = pending.popleft()
            pending.extend(itertools.islice(submitted, 1))
            yield top, future.result()


def _worker_count(workers, height: int, width: int) -> int:
    if height * width < PARALLEL_MIN_PIXELS:
        return 1
    return max(1, os.cpu_count() or 1) if workers is None else workers


def _write_colour_tiff(path, synthesizer, height, width, tile, mpp, progress, workers) -> None:
    from .pyramid_tiff import PyramidTiffWriter

    with PyramidTiffWriter(path, height, width, compression="deflate", mpp=mpp, tile=tile) as writer:
        for top, band in _bands(synthesizer, height, width, tile, progress, path.name, workers):
            writer.write_rows(top, labels_to_colour(band))


def _write_label_tiff(path, synthesizer, height, width, tile, mpp, progress, workers) -> None:
    import tifffile

    def tiles():
        for _, band in _bands(synthesizer, height, width, tile, progress, path.name, workers):
            for left in range(0, width, tile):
                block = band[:, left:left + tile]
                if block.shape != (tile, tile):  # edge tiles are padded with background, never read
                    block = np.pad(block, ((0, tile - block.shape[0]), (0, tile - block.shape[1])))
                yield block

    options = {}
    if mpp:
        options = {"resolution": (_CENTIMETRE_IN_MICRONS / mpp,) * 2, "resolutionunit": "CENTIMETER"}
    with _written_atomically(path) as partial, \
            tifffile.TiffWriter(partial, bigtiff=height * width >= _CLASSIC_TIFF_MAX_BYTES) as tiff:
        tiff.write(tiles(), shape=(height, width), dtype=np.uint8, tile=(tile, tile),
                   photometric="minisblack", compression="zlib", metadata=None, software="safron", **options)
