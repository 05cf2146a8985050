"""Region readers for masks and slides.

`open_raster(path)` returns a `RasterReader` that reads any rectangle lying inside level 0 of an image
as a uint8 array, without loading the whole image where the format allows it:

* TIFF (stripped or tiled, classic or BigTIFF, pyramidal): tifffile, decoding only the strips/tiles
  that intersect the request, with a bounded cache of decoded tiles.
* Vendor slide formats (Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Philips, Ventana, ...): OpenSlide.
* Anything else Pillow opens (PNG, JPEG, BMP, ...): decoded once and kept in memory, because these
  formats cannot be decoded by region.

Problems with the file itself (missing, empty, truncated, corrupt, unsupported) raise `MaskError`
with one line naming the path, also when they only show up while decoding a region; what tifffile logs about
a file while we read it goes into that line instead of onto stderr (`_TifffileLog`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import stat
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import openslide
import tifffile
from PIL import Image, UnidentifiedImageError

from .errors import MaskError, SafronInputError

__all__ = ["RasterReader", "ArrayRaster", "TiffRaster", "OpenSlideRaster", "open_raster"]

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")

# Resolution tags are trusted only when finer than this: image editors stamp 72, 96, 150 or 300 dpi
# (85 to 353 um/px) into files that never came near a microscope, and no usable tissue mask is this
# coarse (one 256 px patch would span 12.8 mm). Vendor metadata read by OpenSlide is always trusted.
COARSEST_PLAUSIBLE_MPP = 50.0

_MICRONS_PER_RESOLUTION_UNIT = {
    tifffile.RESUNIT.INCH: 25400.0,
    tifffile.RESUNIT.CENTIMETER: 10000.0,
    tifffile.RESUNIT.MILLIMETER: 1000.0,
    tifffile.RESUNIT.MICROMETER: 1.0,
}

_LOSSY_TIFF_COMPRESSIONS = frozenset(
    getattr(tifffile.COMPRESSION, name)
    for name in (
        "OJPEG", "JPEG", "JPEG_99", "ALT_JPEG", "JPEG_LOSSY", "JPEG_2000_LOSSY", "JPEG2000",
        "APERIO_JP2000_YCBC", "APERIO_JP2000_RGB", "JPEGXR", "JPEGXR_NDPI", "WEBP", "JPEGXL", "LERC",
    )
    if hasattr(tifffile.COMPRESSION, name)
)
# Compressions that tifffile decodes through its JPEG path, which converts YCbCr to RGB.
_JPEG_TIFF_COMPRESSIONS = frozenset({6, 7, 33007, 34892})

# The TIFF tile cache keeps decoded tiles covering at least this many full-width image rows (and at
# least _TILE_CACHE_FLOOR_BYTES): the engine reads bands of 296 rows that overlap the previous band,
# window by window across the width, so the tile rows shared by consecutive bands must survive a
# whole pass across the slide. Memory therefore scales with slide width, never with its height.
_TILE_CACHE_ROWS = 512
_TILE_CACHE_FLOOR_BYTES = 8 << 20

# Formats read by Pillow are decoded whole, so refuse beyond this instead of exhausting memory
# (1 Gpx is 3 GiB as RGB); tiled TIFF has no such limit.
PILLOW_MAX_PIXELS = 1 << 30
_pillow_limit_lock = threading.Lock()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class _TifffileLog(logging.Filter):
    """tifffile reports what it finds odd in a file through the `logging` module (logger "tifffile"), which with no
    handler configured prints it to stderr: a malformed mask then printed tifffile's line before ours. A filter on
    that logger takes the records of threads that are inside `capture()` (and passes everyone else's on as before),
    so that what tifffile found can be folded into our one-line message, or dropped when the file reads well."""

    def __init__(self):
        super().__init__()
        self._local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        captured = getattr(self._local, "captured", None)
        if captured is None:
            return True
        # tifffile starts its messages with the repr of the object that logs them: "<tifffile.TiffFile 'x.tif'> ..."
        captured.append(re.sub(r"^<[^>]*>\s*", "", " ".join(record.getMessage().split())))
        return False

    @contextlib.contextmanager
    def capture(self):
        """Collect tifffile's messages of this thread in the list yielded, instead of printing them."""
        outer = getattr(self._local, "captured", None)
        captured = self._local.captured = []
        try:
            yield captured
        finally:
            self._local.captured = outer


_tifffile_log = _TifffileLog()
logging.getLogger("tifffile").addFilter(_tifffile_log)


def _with_tifffile_log(error: MaskError, captured: list[str]) -> MaskError:
    """`error` with what tifffile logged on the way to it, where it logged anything (it often says more)."""
    if not captured:
        return error
    detail = captured[0] if len(captured[0]) <= 200 else captured[0][:197] + "..."
    return MaskError(f"{error}; tifffile: {detail}")


class RasterReader:
    """Level 0 of an image, read by region.

    Attributes: `path` (str), `height`, `width`, `channels` (1 = single channel, 3 = RGB, 4 = RGBA),
    `mpp` (microns per pixel, or None when the file does not record a plausible one), `lossy` (pixels
    went through lossy compression, so colours near edges may be off).
    """

    path: str
    height: int
    width: int
    channels: int
    mpp: float | None
    lossy: bool

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Rows [y0, y0+h) and columns [x0, x0+w), which must lie inside the image, as a new
        uint8 array of shape (h, w) when `channels` is 1, else (h, w, channels)."""
        y0, x0, h, w = (int(v) for v in (y0, x0, h, w))
        if h < 0 or w < 0 or y0 < 0 or x0 < 0 or y0 + h > self.height or x0 + w > self.width:
            raise ValueError(
                f"region y={y0}, x={x0}, h={h}, w={w} is not inside the {self.height} x {self.width} "
                f"image {self.path}"
            )
        if h == 0 or w == 0:
            shape = (h, w) if self.channels == 1 else (h, w, self.channels)
            return np.zeros(shape, np.uint8)
        return self._read_inside(y0, x0, h, w)

    def _read_inside(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file; reading afterwards is an error."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, {self.height}x{self.width}x{self.channels}, "
            f"mpp={self.mpp})"
        )


class ArrayRaster(RasterReader):
    """An image already in memory: uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."""

    def __init__(self, array: np.ndarray, *, path: str = "<array>", mpp: float | None = None,
                 lossy: bool = False):
        self.path = str(path)
        array = np.asarray(array)
        if array.dtype != np.uint8:
            raise MaskError(f"{self.path}: {array.dtype} pixels are not supported (only 8-bit images)")
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            raise MaskError(
                f"{self.path}: image of shape {array.shape} is neither single-channel (H, W) "
                "nor RGB/RGBA (H, W, 3|4)"
            )
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise MaskError(f"{self.path}: image is empty ({array.shape[0]} x {array.shape[1]} pixels)")
        self._array = array
        self.height, self.width = array.shape[:2]
        self.channels = 1 if array.ndim == 2 else array.shape[2]
        self.mpp = mpp
        self.lossy = lossy

    def _read_inside(self, y0, x0, h, w):
        if self._array is None:
            raise ValueError(f"{self.path} is closed")
        return self._array[y0:y0 + h, x0:x0 + w].copy()

    def close(self) -> None:
        self._array = None


class TiffRaster(RasterReader):
    """Level 0 (the first page of the first series) of a TIFF, decoded tile by tile.

    Tiles and strips are decoded with tifffile's own per-segment decoder (`TiffPage.decode`) on bytes
    we read ourselves. tifffile's alternative, a zarr store (`aszarr`), would add zarr and its codec
    stack as dependencies only to do the same segment bookkeeping; decoding segments directly keeps
    one dependency, lets us check every segment against the file size before reading, and turns each
    decoding failure into a MaskError that says where the file is damaged. Uncompressed contiguous
    images are memory-mapped instead, so even a single-strip gigapixel file is never read whole.

    `segments_decoded` counts tile/strip decodes since opening (the cache makes re-reads free).
    """

    def __init__(self, path: str | os.PathLike, *, cache_bytes: int | None = None):
        self.path = os.fspath(path)
        with _tifffile_log.capture() as logged:
            try:
                self._open(cache_bytes)
            except MaskError as exc:
                raise _with_tifffile_log(exc, logged) from exc.__cause__
        self._lock = threading.Lock()
        self.segments_decoded = 0

    def _open(self, cache_bytes: int | None) -> None:
        try:
            self._tif = tifffile.TiffFile(self.path)
        except Exception as exc:  # tifffile raises TiffFileError, ValueError, struct.error, ...
            raise MaskError(f"{self.path}: not a readable TIFF file ({_one_line(exc)})") from exc
        try:
            self._setup(cache_bytes)
        except BaseException:
            self._tif.close()
            raise

    def _setup(self, cache_bytes: int | None) -> None:
        path = self.path
        try:
            page = self._tif.series[0].pages[0]
            if not isinstance(page, tifffile.TiffPage):
                page = page.aspage()
            planes, depth, height, width, contig = page.shaped
            dtype = page.dtype
        except Exception as exc:
            raise MaskError(f"{path}: TIFF has no readable image ({_one_line(exc)})") from exc
        if depth != 1:
            raise MaskError(f"{path}: volumetric TIFF images (depth {depth}) are not supported")
        if height == 0 or width == 0:
            raise MaskError(f"{path}: image is empty ({height} x {width} pixels)")
        if dtype is None or dtype not in (np.uint8, np.bool_):
            described = f"{dtype} samples" if dtype is not None else f"{page.bitspersample}-bit samples"
            raise MaskError(f"{path}: {described} are not supported (only 8-bit images)")
        self._page = page
        self.height, self.width = height, width
        self._planar = planes > 1
        self._samples = planes * contig
        self._bilevel = dtype == np.bool_
        self._palette = None

        photometric = page.photometric
        extra = len(page.extrasamples)
        colour_samples = self._samples - extra
        if photometric in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.MINISWHITE) \
                and colour_samples == 1:
            # Stored values are returned as they are: MinIsWhite only changes how viewers show them.
            # An alpha or other extra sample is ignored.
            self._samples_used, self.channels = 1, 1
        elif photometric == tifffile.PHOTOMETRIC.PALETTE and colour_samples == 1:
            if page.colormap is None:
                raise MaskError(f"{path}: palette TIFF without a ColorMap tag")
            colormap = np.asarray(page.colormap)
            # The TIFF palette is 16-bit per channel, yet some writers store 8-bit values in it.
            colormap = colormap >> 8 if colormap.max() > 255 else colormap
            self._palette = np.ascontiguousarray(colormap.T.astype(np.uint8))
            self._samples_used, self.channels = 1, 3
        elif colour_samples == 3 and (
            photometric == tifffile.PHOTOMETRIC.RGB
            or (photometric == tifffile.PHOTOMETRIC.YCBCR
                and page.compression in _JPEG_TIFF_COMPRESSIONS)
        ):
            self._samples_used = self.channels = 4 if extra else 3
        else:
            raise MaskError(
                f"{path}: TIFF photometric {getattr(photometric, 'name', photometric)} with "
                f"{self._samples} samples per pixel is not supported (greyscale, palette, RGB or RGBA only)"
            )

        self.lossy = page.compression in _LOSSY_TIFF_COMPRESSIONS
        self.mpp = self._mpp_from_tags(page)

        offsets = np.asarray(page.dataoffsets, np.int64)
        counts = np.asarray(page.databytecounts, np.int64)
        file_size = self._tif.filehandle.size
        ends = offsets + counts
        if ends.size and ends.max() > file_size:
            raise MaskError(
                f"{path}: file is truncated (image data runs to byte {int(ends.max())}, "
                f"the file has {file_size} bytes)"
            )
        self._offsets, self._counts = offsets, counts

        self._memmap = None
        if page.is_memmappable and not self._bilevel:
            try:
                self._memmap = np.memmap(
                    self.path, dtype=dtype, mode="r", offset=int(offsets[0]), shape=page.shaped
                )
            except (OSError, ValueError) as exc:
                raise MaskError(f"{path}: cannot map image data ({_one_line(exc)})") from exc
            return

        if page.is_tiled:
            self._segment_h, self._segment_w = page.tilelength, page.tilewidth
        else:
            self._segment_h, self._segment_w = min(page.rowsperstrip, height), width
        self._segments_down = math.ceil(height / self._segment_h)
        self._segments_across = math.ceil(width / self._segment_w)
        if offsets.size != planes * self._segments_down * self._segments_across:
            raise MaskError(
                f"{path}: TIFF lists {offsets.size} tiles/strips, expected "
                f"{planes * self._segments_down * self._segments_across}"
            )
        self._decode = page.decode
        self._jpeg_args = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
        self._segment_kind = "tile" if page.is_tiled else "strip"
        segment_bytes = self._segment_h * self._segment_w * contig * dtype.itemsize
        planes_used = self._samples_used if self._planar else 1
        segment_row_bytes = segment_bytes * self._segments_across * planes_used
        if cache_bytes is None:
            rows_kept = math.ceil(_TILE_CACHE_ROWS / self._segment_h) + 1
            cache_bytes = max(_TILE_CACHE_FLOOR_BYTES, rows_kept * segment_row_bytes)
        self._cache_capacity = cache_bytes
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = 0

    def _mpp_from_tags(self, page: tifffile.TiffPage) -> float | None:
        resolution = page.tags.valueof(282)  # XResolution, a (numerator, denominator) rational
        microns_per_unit = _MICRONS_PER_RESOLUTION_UNIT.get(page.resolutionunit)
        if resolution is None or microns_per_unit is None:
            return None
        numerator, denominator = resolution
        if numerator <= 0 or denominator <= 0:
            return None
        mpp = microns_per_unit * denominator / numerator
        return mpp if mpp < COARSEST_PLAUSIBLE_MPP else None

    def _read_inside(self, y0, x0, h, w):
        with self._lock:
            if self._tif is None:
                raise ValueError(f"{self.path} is closed")
            raw = self._read_raw(y0, x0, h, w) if self._memmap is None else self._read_mapped(y0, x0, h, w)
        return self._to_output(raw)

    def _read_mapped(self, y0, x0, h, w) -> np.ndarray:
        # The map is (planes, depth, height, width, contiguous samples), like TiffPage.shaped.
        used = self._samples_used
        if self._planar:
            return np.moveaxis(self._memmap[:used, 0, y0:y0 + h, x0:x0 + w, 0], 0, -1).copy()
        return np.array(self._memmap[0, 0, y0:y0 + h, x0:x0 + w, :used])

    def _read_raw(self, y0, x0, h, w) -> np.ndarray:
        raw = np.empty((h, w, self._samples_used), self._page.dtype)
        seg_h, seg_w = self._segment_h, self._segment_w
        per_plane = self._segments_down * self._segments_across
        # Separate planes (PlanarConfiguration 2) store one sample per segment, plane after plane.
        planes = range(self._samples_used) if self._planar else range(1)
        for plane in planes:
            into = slice(plane, plane + 1) if self._planar else slice(0, self._samples_used)
            samples = slice(0, 1) if self._planar else into
            for row in range(y0 // seg_h, (y0 + h - 1) // seg_h + 1):
                top = row * seg_h
                ya, yb = max(y0, top), min(y0 + h, top + seg_h)
                for col in range(x0 // seg_w, (x0 + w - 1) // seg_w + 1):
                    left = col * seg_w
                    xa, xb = max(x0, left), min(x0 + w, left + seg_w)
                    segment = self._segment(plane * per_plane + row * self._segments_across + col,
                                            top, left)
                    raw[ya - y0:yb - y0, xa - x0:xb - x0, into] = \
                        segment[ya - top:yb - top, xa - left:xb - left, samples]
        return raw

    def _segment(self, index: int, top: int, left: int) -> np.ndarray:
        """Decoded tile/strip `index` as (rows, columns, samples), at least covering the image."""
        segment = self._cache.get(index)
        if segment is not None:
            self._cache.move_to_end(index)
            return segment
        where = f"the {self._segment_kind} at (y={top}, x={left})"
        count = int(self._counts[index])
        data = None
        if count > 0:
            filehandle = self._tif.filehandle
            filehandle.seek(int(self._offsets[index]))
            data = filehandle.read(count)
            if len(data) != count:
                raise MaskError(f"{self.path}: file is truncated in {where}")
        with _tifffile_log.capture() as logged:
            try:
                decoded, _, shape = self._decode(data, index, **self._jpeg_args)
            except Exception as exc:  # codecs raise their own types (imagecodecs.*Error, ValueError, ...)
                error = MaskError(f"{self.path}: cannot decode {where}: {_one_line(exc)}")
                raise _with_tifffile_log(error, logged) from exc
        self.segments_decoded += 1
        if decoded is None:  # a sparse file leaves never-written tiles out
            decoded = np.full(shape, self._page.nodata, self._page.dtype)
        segment = decoded[0]  # drop depth
        needed_h = min(self._segment_h, self.height - top)
        needed_w = min(self._segment_w, self.width - left)
        if segment.shape[0] < needed_h or segment.shape[1] < needed_w:
            raise MaskError(
                f"{self.path}: {where} decodes to {segment.shape[0]} x {segment.shape[1]} pixels, "
                f"expected {needed_h} x {needed_w}"
            )
        self._cache[index] = segment
        self._cache_size += segment.nbytes
        # Evict least recently used tiles, but always keep the newest one: a single strip larger
        # than the budget (a file written as one compressed strip) must at least not be re-decoded.
        while self._cache_size > self._cache_capacity and len(self._cache) > 1:
            _, evicted = self._cache.popitem(last=False)
            self._cache_size -= evicted.nbytes
        return segment

    def _to_output(self, raw: np.ndarray) -> np.ndarray:
        if self._bilevel:
            # Show 1-bit images as 0/255, as Pillow and viewers do, so that a black/white mask is
            # reported the same way whichever format it was saved in.
            raw = raw.view(np.uint8) * np.uint8(255)
        if self._palette is not None:
            return self._palette[raw[..., 0]]
        if self.channels == 1:
            return np.ascontiguousarray(raw[..., 0])
        return raw

    def close(self) -> None:
        with self._lock:
            if self._tif is not None:
                self._memmap = None
                self._cache = OrderedDict()
                self._tif.close()
                self._tif = None


class OpenSlideRaster(RasterReader):
    """Level 0 of a slide in a vendor format, through OpenSlide (RGB; alpha dropped)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._slide = openslide.OpenSlide(self.path)
            self.width, self.height = self._slide.dimensions
            mpp = self._slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        except Exception as exc:  # OpenSlideError, OpenSlideUnsupportedFormatError, OSError
            raise MaskError(f"{self.path}: OpenSlide cannot open it ({_one_line(exc)})") from exc
        self.channels = 3
        self.lossy = True  # vendor formats store JPEG or JPEG 2000 tiles
        try:
            self.mpp = float(mpp) if mpp is not None else None
        except ValueError:
            self.mpp = None
        if self.mpp is not None and not (math.isfinite(self.mpp) and self.mpp > 0):
            self.mpp = None

    def _read_inside(self, y0, x0, h, w):
        try:
            region = self._slide.read_region((x0, y0), 0, (w, h))
        except openslide.OpenSlideError as exc:
            raise MaskError(
                f"{self.path}: OpenSlide cannot read the region at (y={y0}, x={x0}): {_one_line(exc)}"
            ) from exc
        return np.ascontiguousarray(np.asarray(region)[:, :, :3])

    def close(self) -> None:
        self._slide.close()


def _mpp_from_dpi(dpi) -> float | None:
    try:
        pixels_per_inch = float(dpi[0])
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(pixels_per_inch) and pixels_per_inch > 0):
        return None
    mpp = 25400.0 / pixels_per_inch
    return mpp if mpp < COARSEST_PLAUSIBLE_MPP else None


# Pillow modes we turn into single-channel, RGB or RGBA 8-bit; None keeps the mode.
_PILLOW_CONVERSIONS = {
    "1": "L", "L": None, "LA": "L", "La": "L",
    "P": "RGB", "PA": "RGB",
    "RGB": None, "RGBA": None, "RGBX": "RGB", "RGBa": "RGBA",
    "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB",
}


@contextlib.contextmanager
def _pillow_bomb_check_replaced():
    """Masks are large flat colour fields that compress enormously, exactly what Pillow's
    decompression-bomb guard (about 89 Mpx) refuses. Lift it while Pillow reads the header, then the
    caller applies PILLOW_MAX_PIXELS with a message that says what to do. Pillow only has a global
    switch; the lock serialises our own opens, and the window is a header parse."""
    with _pillow_limit_lock:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _open_with_pillow(path: str) -> ArrayRaster:
    try:
        with _pillow_bomb_check_replaced():
            image = Image.open(path)
    except UnidentifiedImageError as exc:
        raise MaskError(
            f"{path}: unknown file format (not a TIFF, a slide OpenSlide reads, or an image Pillow reads)"
        ) from exc
    except Exception as exc:  # Pillow's plugins raise OSError, SyntaxError, struct.error, ...
        raise MaskError(f"{path}: cannot read image ({_one_line(exc)})") from exc
    with image:
        if image.width * image.height > PILLOW_MAX_PIXELS:
            raise MaskError(
                f"{path}: {image.width} x {image.height} pixels is too large to decode whole "
                f"({image.format} cannot be read by region); save it as a tiled TIFF"
            )
        if image.mode not in _PILLOW_CONVERSIONS:
            bits = ("16-bit integer" if image.mode.startswith("I;16") else
                    {"I": "32-bit integer", "F": "32-bit floating-point"}.get(image.mode, image.mode))
            raise MaskError(f"{path}: {bits} pixels are not supported (only 8-bit images)")
        target_mode = _PILLOW_CONVERSIONS[image.mode]
        try:
            image.load()
            converted = image.convert(target_mode) if target_mode else image
            array = np.asarray(converted)
        except Exception as exc:  # truncated or corrupt data surfaces only when decoding
            raise MaskError(f"{path}: image data is truncated or corrupt ({_one_line(exc)})") from exc
        return ArrayRaster(array, path=path, mpp=_mpp_from_dpi(image.info.get("dpi")),
                           lossy=image.format in ("JPEG", "MPO", "WEBP"))


def _openslide_vendor(path: str) -> str | None:
    """OpenSlide's name for the format when it is a vendor slide format, else None.
    OpenSlide's 'generic-tiff' is left to tifffile, which also reads stripped and single-channel
    TIFFs and does not force RGBA."""
    try:
        vendor = openslide.OpenSlide.detect_format(path)
    except openslide.OpenSlideError:
        return None
    return None if vendor in (None, "generic-tiff") else vendor


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early, with one line, where an output file cannot be created at `path`."""
    path = Path(path)
    if path.is_dir():
        raise SafronInputError(f"{path}: is a directory, not an output file path")
    if not path.parent.is_dir():
        # "Does not exist" would send the user looking for a missing folder where a file stands in the way.
        blocking = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise SafronInputError(f"{path}: {blocking} is a file, not a directory")
        raise SafronInputError(f"{path}: output directory does not exist ({path.parent})")
    if not os.access(path.parent, os.W_OK):
        raise SafronInputError(f"{path}: output directory is not writable ({path.parent})")
    return path


def check_free_space(out_path: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse, with one line, when the filesystem of `out_path` has fewer than `needed` bytes free for `what`."""
    directory = Path(out_path).parent
    usage = shutil.disk_usage(directory)
    # A filesystem that reports no size at all (/proc, some FUSE mounts) cannot be judged here; creating the
    # files says what is wrong with it, where "not enough free space" would mislead.
    if usage.total == 0 or needed <= usage.free:
        return
    raise SafronInputError(
        f"{out_path}: not enough free disk space in {directory} for {what}: need about {_bytes(needed)}, "
        f"{_bytes(usage.free)} free"
    )


def _bytes(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.1f} MB"


_NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_raster(path: str | os.PathLike) -> RasterReader:
    """Open an image for reading by region, choosing the reader by content, not by extension."""
    path = os.fspath(path)
    file = Path(path)
    if file.is_dir():
        raise MaskError(f"{path}: is a directory, not an image file")
    with contextlib.suppress(OSError):  # a missing or unreadable file is reported by the open below
        mode = os.stat(path).st_mode
        # Regions are read at offsets, and opening a named pipe waits for a writer that may never come.
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), None)
        if kind is not None:
            raise MaskError(f"{path}: is {kind}, not an image file")
    try:
        with open(file, "rb") as stream:
            head = stream.read(16)
    except FileNotFoundError:
        raise MaskError(f"{path}: no such file") from None
    except OSError as exc:
        raise MaskError(f"{path}: cannot read file ({exc.strerror or _one_line(exc)})") from exc
    if not head:
        raise MaskError(f"{path}: file is empty")
    if _openslide_vendor(path) is not None:
        return OpenSlideRaster(path)
    if head[:4] in _TIFF_MAGICS:
        return TiffRaster(path)
    return _open_with_pillow(path)
