"""Training tiles: (H&E image tile, mask labels with context) from a folder of image/mask pairs.

A training folder holds `images/` and `masks/` with one mask per image under the same file name stem
(`images/a.png` pairs with `masks/a.png`, `masks/a.tif`, ...). A mask may be
* a colour mask (gland green, stroma red, background blue), or a label mask (0 background, 1 stroma, 2 gland),
  read with the same rules as the engine's masks (`safron.masks`);
* a binary gland mask (GlaS style): single-channel with values 0 and 255 only (255 = gland). Its three classes
  come from `masks.labels_from_gland_mask`, the one rule for deriving background and stroma from the image. A
  single-channel mask of zeros only is read as such a mask with no gland: as a label mask it would say the
  whole image is unstained glass, which an H&E image under it contradicts.
  Binary masks stored as 0/1 cannot be told from label masks and are read as labels: save them as 0/255.

Every pair is read once when the dataset opens, so that a missing, unreadable or mismatched file stops training
before it starts, with one line naming the file. Decoded pairs stay in a cache of bounded size.

Tile `step` is a pure function of (seed, step): resuming a run replays exactly the tiles it would have seen.
Tiles are square; the mask context around a tile is read with `Mask.read_labels`, so it is the real mask where
the image continues and the mask mirrored about the image border beyond it -- the convention the engine renders
with.

Images smaller than the tile (6 of GlaS's 85 against its 492 px tile) are, by default (`small_images="mirror"`),
used with the tile reaching past their border, where image and mask are both mirrored about it: the same
convention the mask context already follows, so image and mask stay consistent, and the generator sees nothing
at training time that a render would not show it. Images under half the tile are still left out (mostly
mirror then). `small_images="skip"` leaves out every image smaller than the tile, as runs before it did.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import masks
from .errors import SafronInputError
from .geometry import MARGIN
from .slide_io import open_raster

__all__ = [
    "IMAGES_FOLDER", "MASKS_FOLDER", "DEFAULT_TILE", "SMALL_TILE", "TRANSFORMS", "SMALL_IMAGES", "TrainingPair",
    "TrainingTile", "TileDataset", "augment", "read_pair",
]

IMAGES_FOLDER, MASKS_FOLDER = "images", "masks"
# The paper's 3x3-patch tile, and the 2x2-patch tile for images shorter than that (GlaS is 522 px high).
DEFAULT_TILE, SMALL_TILE = 728, 492
# What to do with images smaller than the tile (module docstring).
SMALL_IMAGES = ("mirror", "skip")
# The eight symmetries of the square: k quarter turns, then a left-right flip for k >= 4.
TRANSFORMS = 8
DEFAULT_CACHE_BYTES = 2 << 30
# Pairs are decoded whole; beyond this an image is a slide, not a training image.
MAX_PAIR_PIXELS = 1 << 28
# SeedSequence stream tags, so that the draws for one step never coincide with an epoch's shuffle.
_TILE_STREAM, _SHUFFLE_STREAM = 0, 1


@dataclass(frozen=True)
class TrainingPair:
    image: Path
    mask: Path
    height: int
    width: int


@dataclass(frozen=True)
class TrainingTile:
    """One training example. `image` uint8 (tile, tile, 3); `context` uint8 labels (tile + 2 margin) square, of
    which `context[margin:-margin, margin:-margin]` lies under the image tile. `y`, `x`: the tile's origin in
    `source` before `transform` (0..7, see `augment`) was applied to both arrays."""

    image: np.ndarray
    context: np.ndarray
    source: Path
    y: int
    x: int
    transform: int


class _CachedPair(NamedTuple):
    image: np.ndarray
    mask: masks.Mask
    nbytes: int


def augment(array: np.ndarray, transform: int) -> np.ndarray:
    """`array` (rows, columns, ...) under symmetry `transform` of the square: `transform % 4` quarter turns
    counter-clockwise, then a left-right flip when `transform >= 4`."""
    turned = np.rot90(array, transform % 4)
    return np.ascontiguousarray(turned[:, ::-1] if transform >= 4 else turned)


def _files(folder: Path) -> dict[str, Path]:
    """Files of `folder` by stem (hidden files skipped); two files of one stem are an error."""
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.stem in by_stem:
            raise SafronInputError(f"{folder}: two files named {path.stem!r} ({by_stem[path.stem].name}, {path.name})")
        by_stem[path.stem] = path
    return by_stem


def _open(path: Path, what: str):
    try:
        return open_raster(path)
    except SafronInputError as exc:
        raise SafronInputError(f"{exc} ({what})") from None


def read_pair(image_path: Path, mask_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), labels uint8 (H, W)) of one pair, or a one-line error naming the bad file."""
    with _open(image_path, "training image") as image_raster, _open(mask_path, "training mask") as mask_raster:
        if image_raster.channels not in (3, 4):
            raise SafronInputError(f"{image_path}: training images must be RGB, this one is single-channel")
        size = (image_raster.height, image_raster.width)
        if (mask_raster.height, mask_raster.width) != size:
            raise SafronInputError(
                f"{mask_path}: mask is {mask_raster.height} x {mask_raster.width} pixels but its image "
                f"{image_path.name} is {size[0]} x {size[1]}"
            )
        if size[0] * size[1] > MAX_PAIR_PIXELS:
            raise SafronInputError(
                f"{image_path}: {size[0]} x {size[1]} pixels is too large to train on whole; cut it into tiles"
            )
        image = image_raster.read(0, 0, *size)[..., :3]
        if mask_raster.channels == 1:
            raw = mask_raster.read(0, 0, *size)
            if not np.isin(raw, (0, 255)).all():
                return image, masks.from_array(raw, name=str(mask_path)).read_labels(0, 0, *size)
            return image, masks.labels_from_gland_mask(image, raw)
        return image, masks.Mask(mask_raster).read_labels(0, 0, *size)


def _discover(root: Path) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a training folder, sorted by name; a one-line error for a bad folder layout."""
    if not root.is_dir():
        raise SafronInputError(f"{root}: training data folder not found")
    folders = {}
    for name in (IMAGES_FOLDER, MASKS_FOLDER):
        folders[name] = root / name
        if not folders[name].is_dir():
            raise SafronInputError(
                f"{root}: no {name}/ folder (a training folder holds images/ and masks/ with matching file names)"
            )
    images, mask_files = _files(folders[IMAGES_FOLDER]), _files(folders[MASKS_FOLDER])
    if not images:
        raise SafronInputError(f"{folders[IMAGES_FOLDER]}: no image files")
    pairs = []
    for stem, image_path in images.items():
        mask_path = mask_files.get(stem)
        if mask_path is None:
            raise SafronInputError(f"{image_path}: no mask named {stem}.* in {folders[MASKS_FOLDER]}")
        pairs.append((image_path, mask_path))
    return pairs


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis, every `stride` pixels, plus one flush with the far edge."""
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


class TileDataset:
    """Square training tiles from a folder of image/mask pairs (see the module docstring).

    `tile`: tile side; None picks DEFAULT_TILE when every image has room for it, else SMALL_TILE. Images
    smaller than the tile are mirrored beyond their border (`small_images="mirror"`, down to half the tile) or
    left out (`"skip"`); the ones left out are listed in `skipped`; none left is an error. `stride`: None samples tile
    positions at random, uniformly over the pixels of all images; an integer visits a grid of positions with that
    step (plus the far edges), in a fresh random order each epoch. `augment`: apply a random one of the eight
    symmetries of the square to each tile. `margin`: mask context on each side (the generator's margin).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        tile: int | None = None,
        *,
        margin: int = MARGIN,
        stride: int | None = None,
        seed: int = 0,
        augment: bool = True,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        small_images: str = "mirror",
    ) -> None:
        if tile is not None and tile < 1:
            raise SafronInputError(f"tile size must be a positive number of pixels, got {tile}")
        if stride is not None and stride < 1:
            raise SafronInputError(f"tile stride must be a positive number of pixels, got {stride}")
        if margin < 0:
            raise SafronInputError(f"mask margin must be >= 0, got {margin}")
        if seed < 0:
            raise SafronInputError(f"seed must be >= 0, got {seed}")
        if small_images not in SMALL_IMAGES:
            raise SafronInputError(f"small_images must be one of {', '.join(SMALL_IMAGES)}, got {small_images!r}")
        self.small_images = small_images
        self.root = Path(root)
        self.margin, self.stride, self.seed, self.augment = margin, stride, seed, augment
        self._cache: OrderedDict[Path, _CachedPair] = OrderedDict()
        self._cache_bytes, self._cache_capacity = 0, cache_bytes
        # Training reads tiles in a prefetch thread while the main thread may read the preview tile.
        self._cache_lock = threading.Lock()
        # Every pair is read now, to check it, and kept while the cache has room.
        self.all_pairs = []
        for image_path, mask_path in _discover(self.root):
            image, _ = self._pixels(image_path, mask_path)
            self.all_pairs.append(TrainingPair(image_path, mask_path, image.shape[0], image.shape[1]))
        if tile is None:
            fits = all(min(p.height, p.width) >= DEFAULT_TILE for p in self.all_pairs)
            tile = DEFAULT_TILE if fits else SMALL_TILE
        self.tile = tile
        least = tile if small_images == "skip" else (tile + 1) // 2
        self.pairs = [p for p in self.all_pairs if min(p.height, p.width) >= least]
        self.skipped = [p for p in self.all_pairs if min(p.height, p.width) < least]
        if not self.pairs:
            largest = max(self.all_pairs, key=lambda p: min(p.height, p.width))
            raise SafronInputError(
                f"{self.root / IMAGES_FOLDER}: no image is large enough for a {tile} x {tile} tile (the largest, "
                f"{largest.image.name}, is {largest.height} x {largest.width}; at least {least} px a side is needed); "
                f"choose a smaller tile"
            )
        areas = np.array([p.height * p.width for p in self.pairs], np.float64)
        self._pair_odds = areas / areas.sum()
        self._grid = None
        if stride is not None:
            self._grid = [
                (index, y, x)
                for index, p in enumerate(self.pairs)
                for y in _starts(p.height, tile, stride)
                for x in _starts(p.width, tile, stride)
            ]

    def __repr__(self) -> str:
        return (
            f"TileDataset({str(self.root)!r}, tile={self.tile}, {len(self.pairs)} pairs"
            f"{f', {len(self.skipped)} too small' if self.skipped else ''}, "
            f"{'random positions' if self.stride is None else f'stride {self.stride}'})"
        )

    @property
    def tiles_per_epoch(self) -> int | None:
        """Grid positions visited per epoch with a stride; None when positions are random."""
        return None if self._grid is None else len(self._grid)

    def _pixels(self, image_path: Path, mask_path: Path) -> tuple[np.ndarray, masks.Mask]:
        with self._cache_lock:
            entry = self._cache.get(image_path)
            if entry is not None:
                self._cache.move_to_end(image_path)
                return entry.image, entry.mask
            image, labels = read_pair(image_path, mask_path)
            entry = _CachedPair(image, masks.from_array(labels, name=str(mask_path)), image.nbytes + labels.nbytes)
            self._cache[image_path] = entry
            self._cache_bytes += entry.nbytes
            # The newest pair always stays: it is about to be used.
            while self._cache_bytes > self._cache_capacity and len(self._cache) > 1:
                _, evicted = self._cache.popitem(last=False)
                self._cache_bytes -= evicted.nbytes
            return entry.image, entry.mask

    def tile_at(self, step: int) -> TrainingTile:
        """The tile of training step `step` (>= 0), the same for every call with the same seed and folder."""
        rng = np.random.default_rng((self.seed, _TILE_STREAM, step))
        if self._grid is None:
            index = int(rng.choice(len(self.pairs), p=self._pair_odds))
            pair = self.pairs[index]
            # An image smaller than the tile lies anywhere inside it (the rest mirrored): origins from size - tile to 0.
            y = int(rng.integers(min(0, pair.height - self.tile), max(0, pair.height - self.tile) + 1))
            x = int(rng.integers(min(0, pair.width - self.tile), max(0, pair.width - self.tile) + 1))
        else:
            epoch, position = divmod(step, len(self._grid))
            order = np.random.default_rng((self.seed, _SHUFFLE_STREAM, epoch)).permutation(len(self._grid))
            index, y, x = self._grid[order[position]]
        transform = int(rng.integers(0, TRANSFORMS)) if self.augment else 0
        return self.read_tile(index, y, x, transform)

    def preview(self) -> TrainingTile:
        """A fixed tile to watch training on: the centre of the first image, untransformed."""
        pair = self.pairs[0]
        return self.read_tile(0, (pair.height - self.tile) // 2, (pair.width - self.tile) // 2, 0)

    def read_tile(self, index: int, y: int, x: int, transform: int = 0) -> TrainingTile:
        """The tile of `self.pairs[index]` whose top-left pixel is (y, x), under symmetry `transform`. The tile
        lies inside the image, or, along a side where the image is smaller than the tile, covers it whole (the
        rest mirrored, module docstring)."""
        pair = self.pairs[index]
        image, mask = self._pixels(pair.image, pair.mask)
        tile, margin = self.tile, self.margin
        height, width = image.shape[:2]
        if not (min(0, height - tile) <= y <= max(0, height - tile)
                and min(0, width - tile) <= x <= max(0, width - tile)):
            raise ValueError(f"a {tile} px tile at (y={y}, x={x}) does not fit in {pair.image}")
        if y >= 0 and x >= 0 and y + tile <= height and x + tile <= width:
            pixels = image[y:y + tile, x:x + tile]
        else:
            rows = masks.mirror_index(np.arange(y, y + tile), height)
            cols = masks.mirror_index(np.arange(x, x + tile), width)
            pixels = image[np.ix_(rows, cols)]
        context = mask.read_labels(y - margin, x - margin, tile + 2 * margin, tile + 2 * margin)
        return TrainingTile(
            image=augment(pixels, transform),
            context=augment(context, transform),
            source=pair.image,
            y=y,
            x=x,
            transform=transform,
        )
