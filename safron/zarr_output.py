"""OME-Zarr output: a multiscale uint8 RGB image (OME-NGFF 0.5 on Zarr v3) that many processes write in place.

Layout:

* Arrays "0", "1", ... (level 0 first), each (3, height_k, width_k) uint8 with dimension names c, y, x. Channel
  before space because NGFF 0.5 orders axes by type (time, channel, space) and ome-zarr-py refuses anything else
  (an interleaved y, x, c array is not valid NGFF). Chunks (3, chunk, chunk): one chunk file holds all three
  channels of a square, as a tile of the TIFF does. Codec: Zarr's default (zstd, lossless).
* Levels halve the previous one (`pyramid_tiff.halve`: the 2x2 mean the TIFF pyramid uses, so both outputs hold the
  same pixels at every level) down to a level that fits in 256 x 256 (`pyramid_tiff.pyramid_shapes`).
* The group's "ome" attributes hold the multiscales: axes c (channel), y and x (space, unit micrometer when the pixel
  size is known) and per level a scale transform [1, mpp * 2**k, mpp * 2**k] (without a pixel size, [1, 2**k, 2**k]
  in pixels), plus "omero" channel colours so that viewers show RGB. A "safron" attribute marks the store as ours
  (an existing OUT without it is never replaced) and records what decided its pixels (mask, model, options).

Complete or absent, like the TIFF: the store is built under `OUT.partial` and renamed onto OUT only once every
level is written (`files.replace_folder`), so a reader that finds OUT finds all of it. Chunk writes are whole
chunks at fixed places (every writer owns whole chunk rows), so writing the same rows again, as a retried band
does, gives the same store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from .errors import SafronInputError
from .pyramid_tiff import halve, pyramid_shapes
from .slide_io import check_output_path

ZARR_SUFFIX = ".zarr"
# 1024 rows of a 100k-wide slide are 300 MB in a band's buffer of unfinished chunk rows (`_ChunkRows` in the
# engine); a smaller chunk means more, smaller files. 1024 is what OME-Zarr writers commonly use for slides.
DEFAULT_CHUNK = 1024
# Columns a pyramid task reduces at once: its memory is 2 * chunk rows of this many columns, whatever the width.
_LEVEL_BLOCK_CHUNKS = 8
_MARKER = "safron"


def is_zarr_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ZARR_SUFFIX


def require_zarr():
    try:
        import zarr
    except ImportError:
        raise SafronInputError("OME-Zarr output and rendering in bands need zarr: pip install 'safron[distributed]'") \
            from None
    return zarr


def check_output(out: Path) -> None:
    """OUT may be missing or a store this package wrote (replaced once the new one is complete); anything else there
    is someone's data and is refused, with one line."""
    if not out.exists():
        check_output_path(out)
        return
    if not is_ours(out):
        raise SafronInputError(f"{out}: exists and is not an OME-Zarr written by safron; remove it or choose another "
                               "name")


def is_ours(store: Path) -> bool:
    try:
        attributes = json.loads((store / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attributes, dict) and _MARKER in attributes


def create(store: Path, height: int, width: int, *, chunk: int, mpp: float | None, levels: bool,
           name: str = "", header: dict | None = None) -> list[tuple[int, int]]:
    """An empty OME-Zarr at `store` (whatever was there is removed): every level of the pyramid, or level 0 only
    (`levels=False`, a scratch store that becomes a TIFF). `header`: what decides its pixels (`render_header`). The
    (height, width) of each level."""
    zarr = require_zarr()
    shutil.rmtree(store, ignore_errors=True)
    shapes = pyramid_shapes(height, width) if levels else [(height, width)]
    group = zarr.open_group(str(store), mode="w", zarr_format=3)
    datasets = []
    for level, (h, w) in enumerate(shapes):
        group.create_array(str(level), shape=(3, h, w), chunks=(3, chunk, chunk), dtype="uint8", fill_value=0,
                           dimension_names=("c", "y", "x"))
        size = (mpp if mpp is not None else 1.0) * 2**level
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale",
                                                                            "scale": [1.0, size, size]}]})
    unit = {"unit": "micrometer"} if mpp is not None else {}
    group.attrs.update({
        "ome": {
            "version": "0.5",
            "multiscales": [{
                "name": name,
                "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", **unit},
                         {"name": "x", "type": "space", **unit}],
                "datasets": datasets,
                "type": "2x2 mean",
            }],
            "omero": {
                "channels": [{"label": label, "color": colour, "active": True,
                              "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                             for label, colour in (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))],
                "rdefs": {"model": "color"},
            },
        },
        _MARKER: {"render": header},
    })
    return shapes


def render_header(store: Path) -> dict | None:
    """The header `create` recorded (None without a store of ours there)."""
    if not is_ours(store):
        return None
    return json.loads((store / "zarr.json").read_text())["attributes"][_MARKER].get("render")


def level_shapes(store: Path) -> list[tuple[int, int]]:
    # Level by level rather than by listing the group, which would warn about the band marks beside the levels.
    shapes, level = [], 0
    while (store / str(level) / "zarr.json").is_file():
        shapes.append(tuple(_array(store, level, "r").shape[1:]))
        level += 1
    return shapes


# A band's rows are all in the store once its task has reported back: the render marks it done with an empty file
# here (in the store, so that it goes with it; removed before an OME-Zarr is published), and a resume skips it.
_BANDS_DONE = "safron-bands-done"


def mark_band_done(store: Path, y0: int, y1: int) -> None:
    folder = store / _BANDS_DONE
    folder.mkdir(exist_ok=True)
    (folder / f"{y0}-{y1}").touch()


def bands_done(store: Path) -> set[tuple[int, int]]:
    folder = store / _BANDS_DONE
    if not folder.is_dir():
        return set()
    return {tuple(int(v) for v in path.name.split("-")) for path in folder.iterdir()}


def unmark_bands(store: Path) -> None:
    shutil.rmtree(store / _BANDS_DONE, ignore_errors=True)


def _array(store: Path, level: int, mode: str):
    return require_zarr().open_array(str(store / str(level)), mode=mode)


def write_rows(store: Path, y0: int, rows: np.ndarray, level: int = 0) -> None:
    """Rows y0 .. y0 + h - 1 of a level, uint8 (h, width, 3); y0 on a chunk boundary, h a whole number of chunks
    unless the rows end the level, so that every chunk is written whole and by one writer."""
    array = _array(store, level, "r+")
    array[:, y0:y0 + len(rows), :] = np.moveaxis(rows, 2, 0)


def read_rows(store: Path, y0: int, y1: int, level: int = 0, x0: int = 0, x1: int | None = None) -> np.ndarray:
    """Rows [y0, y1) (columns [x0, x1)) of a level as uint8 (h, w, 3)."""
    array = _array(store, level, "r")
    return np.ascontiguousarray(np.moveaxis(array[:, y0:y1, x0:x1], 0, 2))


def chunk_rows(store: Path, level: int = 0) -> int:
    return _array(store, level, "r").chunks[1]


def build_level_rows(store: Path, level: int, y0: int, y1: int) -> None:
    """Rows [y0, y1) of `level` >= 1, reduced from rows [2 y0, 2 y1) of the level above, in column blocks. y0 is a
    chunk boundary, so the rows read start on an even row, as `halve` needs to reduce a block to its exact part of
    the level (and an odd last row of the level above is averaged as the TIFF pyramid averages it)."""
    above = _array(store, level - 1, "r")
    below = _array(store, level, "r+")
    chunk = below.chunks[2]
    block = chunk * _LEVEL_BLOCK_CHUNKS
    for x0 in range(0, below.shape[2], block):
        x1 = min(x0 + block, below.shape[2])
        source = above[:, 2 * y0:min(2 * y1, above.shape[1]), 2 * x0:min(2 * x1, above.shape[2])]
        below[:, y0:y1, x0:x1] = np.moveaxis(halve(np.ascontiguousarray(np.moveaxis(source, 0, 2))), 2, 0)


def remove(store: Path) -> None:
    shutil.rmtree(store, ignore_errors=True)
