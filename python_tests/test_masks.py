"""Mask reading (safron.slide_io readers, safron.masks) region by region, in every supported format."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from safron import masks, slide_io
from safron.errors import MaskError

SLIDES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "slides"


def needs_slides(test):
    skip = pytest.mark.skipif(not SLIDES.is_dir(), reason=f"test slides not found at {SLIDES}")
    return pytest.mark.needs_data(skip(test))


# The class colours, written out here rather than taken from the module under test.
BLUE, RED, GREEN = (0, 0, 255), (255, 0, 0), (0, 255, 0)
PALETTE = np.array([BLUE, RED, GREEN], np.uint8)  # indexed by label: 0 background, 1 stroma, 2 gland


def blob_labels(height, width, seed=0):
    """Stroma with elliptical glands and round background spots, like SAFRON's synthetic masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    labels = np.ones((height, width), np.uint8)
    for _ in range(max(4, height * width // 4000)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        a, b = rng.uniform(4, 30, 2)
        t = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        labels[(u / a) ** 2 + (v / b) ** 2 <= 1] = 2
    for _ in range(max(2, height * width // 15000)):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(2, 15)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 0
    return labels


def expected_region(labels, y0, x0, h, w):
    """What read_labels must return: the labels where the region overlaps the image and, beyond its border, the
    image mirrored about it (numpy.pad's "symmetric" mode, which repeats the reflection as far as needed)."""
    pad = max(-y0, -x0, y0 + h - labels.shape[0], x0 + w - labels.shape[1], 0)
    padded = np.pad(labels, pad, mode="symmetric")
    return padded[y0 + pad:y0 + pad + h, x0 + pad:x0 + pad + w]


def test_mirror_index_folds_positions_onto_the_axis():
    # Half-sample symmetric with period 2 * size: ... 1 0 | 0 1 2 3 | 3 2 1 0 | 0 ...
    positions = np.arange(-6, 10)
    assert masks.mirror_index(positions, 4).tolist() == [2, 3, 3, 2, 1, 0, 0, 1, 2, 3, 3, 2, 1, 0, 0, 1]
    assert masks.mirror_index(positions, 1).tolist() == [0] * 16
    wide = np.arange(-1000, 1000)
    assert (masks.mirror_index(wide, 7) == np.pad(np.arange(7), 1000, mode="symmetric")[wide + 1000]).all()


def test_a_region_beyond_the_border_reads_the_mirrored_mask_without_reading_more_than_it_spans():
    labels = blob_labels(40, 60, seed=9)
    reads = []

    class CountingRaster(slide_io.ArrayRaster):
        def read(self, y0, x0, h, w):
            reads.append((h, w))
            return super().read(y0, x0, h, w)

    mask = masks.Mask(CountingRaster(labels, path="counting"))
    np.testing.assert_array_equal(mask.read_labels(-20, -20, 30, 100), expected_region(labels, -20, -20, 30, 100))
    assert reads and all(h <= 30 and w <= 60 for h, w in reads), reads
    # A class edge that touches the border continues across it instead of meeting a background frame.
    edge = np.zeros((10, 10), np.uint8)
    edge[:, 5:] = masks.GLAND
    edge[:, :5] = masks.STROMA
    np.testing.assert_array_equal(masks.from_array(edge).read_labels(-3, 0, 16, 10)[:3], edge[:3][::-1])


def random_regions(height, width, count, seed=1):
    """Regions inside, straddling and wholly outside the image, including 1-pixel and full-size ones."""
    rng = np.random.default_rng(seed)
    regions = [(0, 0, height, width), (-5, -7, height + 12, width + 3), (height, width, 4, 4),
               (-20, -20, 10, 10), (height - 1, width - 1, 1, 1), (0, 0, 1, 1),
               (-2 * height - 3, 5, 3 * height, 7), (4, -3 * width, 9, 5 * width)]  # more than one reflection
    for _ in range(count):
        h, w = rng.integers(1, max(2, height // 2)), rng.integers(1, max(2, width // 2))
        y0 = rng.integers(-h - 3, height + 3)
        x0 = rng.integers(-w - 3, width + 3)
        regions.append((int(y0), int(x0), int(h), int(w)))
    return regions


def assert_mask_error(excinfo, path, *fragments):
    message = str(excinfo.value)
    assert str(path) in message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------------------------------------------------
# TIFF layouts


def write_tiff(path, array, layout, **options):
    if layout == "stripped":
        tifffile.imwrite(path, array, rowsperstrip=7, compression="zlib", **options)
    elif layout == "stripped-uncompressed":
        tifffile.imwrite(path, array, **options)
    elif layout == "tiled":
        tifffile.imwrite(path, array, tile=(32, 48), compression="zlib", **options)
    elif layout == "tiled-bigtiff":
        tifffile.imwrite(path, array, tile=(64, 64), bigtiff=True, compression="zstd", **options)
    elif layout == "tiled-uncompressed":
        tifffile.imwrite(path, array, tile=(32, 32), **options)
    elif layout == "pyramid-ifds":  # reduced levels as top-level IFDs, like our own writer
        with tifffile.TiffWriter(path, bigtiff=True) as tiff:
            tiff.write(array, tile=(32, 32), compression="zlib", **options)
            tiff.write(array[::2, ::2], tile=(32, 32), compression="zlib", subfiletype=1)
            tiff.write(array[::4, ::4], tile=(32, 32), compression="zlib", subfiletype=1)
    elif layout == "pyramid-subifds":
        with tifffile.TiffWriter(path, bigtiff=True) as tiff:
            tiff.write(array, tile=(32, 32), compression="zlib", subifds=1, **options)
            tiff.write(array[::2, ::2], tile=(32, 32), compression="zlib", subfiletype=1)
    elif layout == "planar-separate":
        tifffile.imwrite(path, np.moveaxis(array, -1, 0), planarconfig="separate", photometric="rgb",
                         tile=(32, 32), compression="zlib", **options)
    else:
        raise AssertionError(layout)


TIFF_LAYOUTS = ["stripped", "stripped-uncompressed", "tiled", "tiled-bigtiff", "tiled-uncompressed",
                "pyramid-ifds", "pyramid-subifds"]


LAYOUTS_AND_KINDS = [(layout, kind) for layout in TIFF_LAYOUTS for kind in ("labels", "colour")]


@pytest.mark.parametrize("layout,kind", LAYOUTS_AND_KINDS + [("planar-separate", "colour")])
def test_tiff_region_reads_match_whole_image(tmp_path, layout, kind):
    labels = blob_labels(157, 203, seed=len(layout))
    array = labels if kind == "labels" else PALETTE[labels]
    path = tmp_path / "mask.tif"
    write_tiff(path, array, layout)
    with masks.open_mask(path) as mask:
        assert (mask.height, mask.width, mask.kind) == (157, 203, kind)
        for region in random_regions(157, 203, 60):
            np.testing.assert_array_equal(mask.read_labels(*region), expected_region(labels, *region),
                                          err_msg=str(region))
    with slide_io.open_raster(path) as raster:
        assert isinstance(raster, slide_io.TiffRaster)
        assert raster.channels == (1 if kind == "labels" else 3)
        np.testing.assert_array_equal(raster.read(10, 20, 100, 150), array[10:110, 20:170])


@pytest.mark.parametrize("layout", ["tiled", "stripped"])
def test_tiff_rgba_alpha_is_ignored(tmp_path, layout):
    labels = blob_labels(70, 90, seed=3)
    alpha = np.random.default_rng(0).integers(0, 256, labels.shape, dtype=np.uint8)
    rgba = np.dstack([PALETTE[labels], alpha])
    write_tiff(tmp_path / "rgba.tif", rgba, layout, extrasamples=["unassalpha"])
    with slide_io.open_raster(tmp_path / "rgba.tif") as raster:
        assert raster.channels == 4
        np.testing.assert_array_equal(raster.read(0, 0, 70, 90), rgba)
    with masks.open_mask(tmp_path / "rgba.tif") as mask:
        np.testing.assert_array_equal(mask.read_labels(-3, 5, 80, 80), expected_region(labels, -3, 5, 80, 80))


def test_tiff_greyscale_with_alpha_reads_labels(tmp_path):
    labels = blob_labels(40, 50, seed=4)
    tifffile.imwrite(tmp_path / "la.tif", np.dstack([labels, np.full_like(labels, 255)]),
                     photometric="minisblack", extrasamples=["unassalpha"], tile=(16, 16))
    with masks.open_mask(tmp_path / "la.tif") as mask:
        assert mask.kind == "labels"
        np.testing.assert_array_equal(mask.read_labels(0, 0, 40, 50), labels)


def test_palette_tiff_is_read_as_colour(tmp_path):
    labels = blob_labels(60, 64, seed=5)
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, :3] = PALETTE.T.astype(np.uint16) * 257  # TIFF palettes are 16-bit
    tifffile.imwrite(tmp_path / "palette.tif", labels, photometric="palette", colormap=colormap,
                     tile=(32, 32))
    with masks.open_mask(tmp_path / "palette.tif") as mask:
        assert mask.kind == "colour"
        np.testing.assert_array_equal(mask.read_labels(0, 0, 60, 64), labels)


def test_bilevel_tiff_reads_as_0_and_255(tmp_path):
    bits = np.zeros((20, 30), bool)
    bits[4, 7] = True
    tifffile.imwrite(tmp_path / "bits.tif", bits, tile=(16, 16))
    with slide_io.open_raster(tmp_path / "bits.tif") as raster:
        np.testing.assert_array_equal(raster.read(0, 0, 20, 30), bits.astype(np.uint8) * 255)
    with masks.open_mask(tmp_path / "bits.tif") as mask, pytest.raises(MaskError) as excinfo:
        mask.read_labels(0, 0, 20, 30)
    assert_mask_error(excinfo, tmp_path / "bits.tif", "label value 255 at (y=4, x=7)")


def test_jpeg_compressed_tiff_snaps_to_classes(tmp_path):
    labels = blob_labels(128, 128, seed=6)
    # tifffile stores JPEG tiles as YCbCr; without chroma subsampling, which smears class edges
    # (see test_jpeg_with_chroma_subsampling_fails_on_edges_unless_tolerance_is_lifted).
    tifffile.imwrite(tmp_path / "jpeg.tif", PALETTE[labels], tile=(64, 64), compression="jpeg",
                     compressionargs={"level": 95}, photometric="rgb", subsampling=(1, 1))
    with slide_io.open_raster(tmp_path / "jpeg.tif") as raster:
        assert raster.lossy
    with masks.open_mask(tmp_path / "jpeg.tif") as mask:
        np.testing.assert_array_equal(mask.read_labels(0, 0, 128, 128), labels)


# ---------------------------------------------------------------------------------------------------------
# Decoding only what a region needs


def test_tiled_region_read_decodes_only_intersecting_tiles(tmp_path):
    labels = np.random.default_rng(0).integers(0, 3, (2048, 3072), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "big.tif", labels, tile=(256, 256), compression="zlib")
    with slide_io.open_raster(tmp_path / "big.tif") as raster:  # 8 x 12 = 96 tiles
        np.testing.assert_array_equal(raster.read(300, 600, 10, 10), labels[300:310, 600:610])
        assert raster.segments_decoded == 1
        np.testing.assert_array_equal(raster.read(250, 250, 10, 10), labels[250:260, 250:260])
        assert raster.segments_decoded == 5  # 2 x 2 new tiles
        np.testing.assert_array_equal(raster.read(300, 600, 10, 10), labels[300:310, 600:610])
        assert raster.segments_decoded == 5  # cached

        # The engine's pattern: full-width bands of 296 rows, each starting 236 rows below the last.
        first = raster.read(0, 0, 296, 3072)
        assert raster.segments_decoded == 24  # tile rows 0-1, of which the 5 tiles above were cached
        second = raster.read(236, 0, 296, 3072)
        assert raster.segments_decoded == 24 + 12  # only tile row 2 is new
        np.testing.assert_array_equal(first, labels[:296])
        np.testing.assert_array_equal(second, labels[236:532])


def test_tile_cache_is_bounded(tmp_path):
    labels = np.random.default_rng(1).integers(0, 3, (512, 512), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "tiles.tif", labels, tile=(64, 64), compression="zlib")
    with slide_io.TiffRaster(tmp_path / "tiles.tif", cache_bytes=2 * 64 * 64) as raster:
        for _ in range(2):  # 4 tiles per read, room for 2: every read decodes all 4 again
            np.testing.assert_array_equal(raster.read(32, 32, 64, 64), labels[32:96, 32:96])
        assert raster.segments_decoded == 8
        for _ in range(3):  # 2 tiles per read fit: decoded once
            np.testing.assert_array_equal(raster.read(0, 0, 10, 128), labels[:10, :128])
        assert raster.segments_decoded == 10


def test_stripped_reads_decode_only_needed_strips(tmp_path):
    labels = np.random.default_rng(2).integers(0, 3, (640, 100), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "strips.tif", labels, rowsperstrip=16, compression="zlib")
    with slide_io.open_raster(tmp_path / "strips.tif") as raster:
        np.testing.assert_array_equal(raster.read(100, 5, 40, 50), labels[100:140, 5:55])
        assert raster.segments_decoded == 3  # strips 6, 7, 8 (rows 96-143)


def test_uncompressed_tiff_is_mapped_not_decoded(tmp_path):
    labels = np.random.default_rng(3).integers(0, 3, (300, 400), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "raw.tif", labels)  # one uncompressed strip
    with slide_io.open_raster(tmp_path / "raw.tif") as raster:
        np.testing.assert_array_equal(raster.read(123, 45, 67, 89), labels[123:190, 45:134])
        assert raster.segments_decoded == 0


def test_sparse_tiles_read_as_zero(tmp_path):
    # A tiled TIFF whose tiles were never written (offset and byte count 0) reads as zeros = background.
    with tifffile.TiffWriter(tmp_path / "sparse.tif") as tiff:
        tiff.write(shape=(64, 64), dtype=np.uint8, tile=(32, 32))
    with masks.open_mask(tmp_path / "sparse.tif") as mask:
        np.testing.assert_array_equal(mask.read_labels(0, 0, 64, 64), np.zeros((64, 64), np.uint8))


# ---------------------------------------------------------------------------------------------------------
# Pillow formats


def test_png_colour_and_label_masks(tmp_path):
    labels = blob_labels(91, 133, seed=7)
    Image.fromarray(PALETTE[labels]).save(tmp_path / "colour.png")
    Image.fromarray(labels).save(tmp_path / "labels.png")
    for name, kind in (("colour.png", "colour"), ("labels.png", "labels")):
        with masks.open_mask(tmp_path / name) as mask:
            assert (mask.kind, mask.height, mask.width) == (kind, 91, 133)
            for region in random_regions(91, 133, 40):
                np.testing.assert_array_equal(mask.read_labels(*region), expected_region(labels, *region))


def test_png_palette_and_rgba(tmp_path):
    labels = blob_labels(50, 60, seed=8)
    palette_image = Image.fromarray(labels, mode="L").convert("P")
    palette_image.putpalette(PALETTE.ravel().tolist())
    palette_image.save(tmp_path / "palette.png")
    alpha = np.random.default_rng(0).integers(0, 256, labels.shape, dtype=np.uint8)
    Image.fromarray(np.dstack([PALETTE[labels], alpha])).save(tmp_path / "rgba.png")
    for name in ("palette.png", "rgba.png"):
        with masks.open_mask(tmp_path / name) as mask:
            assert mask.kind == "colour"
            np.testing.assert_array_equal(mask.read_labels(0, 0, 50, 60), labels)


def test_pillow_size_limits(tmp_path, monkeypatch):
    labels = blob_labels(40, 40, seed=9)
    Image.fromarray(labels).save(tmp_path / "labels.png")
    # Pillow's own decompression-bomb limit does not apply to masks...
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with masks.open_mask(tmp_path / "labels.png") as mask:
        np.testing.assert_array_equal(mask.read_labels(0, 0, 40, 40), labels)
    assert Image.MAX_IMAGE_PIXELS == 100  # ... and is restored for everyone else
    # ... ours does, with advice.
    monkeypatch.setattr(slide_io, "PILLOW_MAX_PIXELS", 1000)
    with pytest.raises(MaskError) as excinfo:
        masks.open_mask(tmp_path / "labels.png")
    assert_mask_error(excinfo, tmp_path / "labels.png", "40 x 40 pixels is too large", "tiled TIFF")


def jpeg_bytes(rgb, **options):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def edge_pixels(labels, radius=2):
    """Pixels within `radius` of a pixel of another class."""
    padded = np.pad(labels, radius, mode="edge")
    edge = np.zeros(labels.shape, bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            edge |= padded[dy:dy + labels.shape[0], dx:dx + labels.shape[1]] != labels
    return edge


def test_jpeg_noise_snaps_back_to_drawn_classes(tmp_path):
    labels = blob_labels(256, 384, seed=10)
    path = tmp_path / "mask.jpg"
    path.write_bytes(jpeg_bytes(PALETTE[labels], quality=90, subsampling=0))  # 4:4:4 chroma
    decoded = np.asarray(Image.open(path)).astype(int)
    assert (decoded != PALETTE[labels]).any(), "the test needs real JPEG noise"
    with masks.open_mask(path) as mask:
        snapped = mask.read_labels(0, 0, 256, 384)
    # Measured with libjpeg-turbo: no pixel changes class. Allow a handful on class edges only.
    wrong = snapped != labels
    assert not (wrong & ~edge_pixels(labels)).any()
    assert wrong.sum() <= labels.size // 10000


def test_default_jpeg_with_chroma_subsampling_snaps_its_edge_smear_to_classes(tmp_path):
    # 4:2:0 chroma at quality 75 (Pillow's defaults) smears colours across class edges further from every class
    # colour than mid-grey is; in a JPEG that is accepted as smear, in a lossless file the same pixels are not.
    labels = blob_labels(256, 384, seed=11)
    path = tmp_path / "mask.jpg"
    path.write_bytes(jpeg_bytes(PALETTE[labels]))
    decoded = np.asarray(Image.open(path).convert("RGB"))
    assert (nearest_class_distance(decoded) > masks.COLOUR_TOLERANCE).any(), "the test needs 4:2:0 smear"
    with masks.open_mask(path) as mask:
        assert mask.lossy
        mask.validate()
        snapped = mask.read_labels(0, 0, 256, 384)
    wrong = snapped != labels
    assert not (wrong & ~edge_pixels(labels, radius=1)).any()
    assert wrong.mean() < 0.002  # measured: 0.02 %

    Image.fromarray(decoded).save(tmp_path / "was_a_jpeg.png")
    with masks.open_mask(tmp_path / "was_a_jpeg.png") as mask, pytest.raises(MaskError) as excinfo:
        mask.validate()
    assert_mask_error(excinfo, tmp_path / "was_a_jpeg.png", "is not a class colour", "on a class edge",
                      "raise the colour tolerance")
    with masks.open_mask(tmp_path / "was_a_jpeg.png", colour_tolerance=math.inf) as mask:
        lifted = mask.read_labels(0, 0, 256, 384)
    assert not ((lifted != labels) & ~edge_pixels(labels, radius=1)).any()


def test_lossy_masks_take_off_colours_within_two_pixels_of_a_class_colour_for_smear_whatever_the_region():
    grey = (128, 128, 128)
    rgb = np.zeros((12, 30, 3), np.uint8)
    rgb[:] = RED
    rgb[:, 15:] = GREEN
    rgb[:, 3:7] = grey  # 4 px wide: every pixel within 2 px of red
    rgb[:, 20:25] = grey  # 5 px wide: column 22 is 3 px from the nearest class colour
    lossy = masks.Mask(slide_io.ArrayRaster(rgb, path="lossy", lossy=True))
    # Regions that hold only the 4 px line, or cut it, judge its pixels by the mask around them as a whole read does.
    whole = lossy.read_labels(0, 0, 12, 19)
    for y0, x0, h, w in ((0, 3, 12, 4), (2, 4, 1, 2), (5, 6, 3, 1), (-3, 3, 20, 4)):
        np.testing.assert_array_equal(lossy.read_labels(y0, x0, h, w), expected_region(whole, y0, x0, h, w))
    for y0, x0, h, w in ((0, 0, 12, 30), (4, 22, 1, 1), (0, 21, 12, 3)):
        with pytest.raises(MaskError) as excinfo:
            lossy.read_labels(y0, x0, h, w)
        assert_mask_error(excinfo, "lossy", f"colour {grey} at (y={max(y0, 0)}, x=22)",
                          "more than 2 px from every class colour")
    lossless = masks.Mask(slide_io.ArrayRaster(rgb, path="lossless"))
    with pytest.raises(MaskError, match=r"at \(y=2, x=3\)"):
        lossless.read_labels(2, 0, 1, 15)


def test_lossy_masks_snap_by_brightness_first():
    # A blue pixel of a blue-red edge as Pillow's default JPEG decodes it: 4:2:0 kept its luma (47; blue's is 29, red's
    # 76) and mixed red's chroma into its own, which brought it nearer red in RGB (176 against 186).
    smeared = np.array([[RED, RED, (117, 0, 110), BLUE, BLUE]], np.uint8)
    assert masks.from_array(smeared).read_labels(0, 0, 1, 5).tolist() == [[1, 1, 1, 0, 0]]
    lossy = masks.Mask(slide_io.ArrayRaster(smeared, path="lossy", lossy=True))
    assert lossy.read_labels(0, 0, 1, 5).tolist() == [[1, 1, 0, 0, 0]]


def test_wrong_colours_drawn_into_a_jpeg_are_still_errors(tmp_path):
    labels = blob_labels(200, 300, seed=15)
    rgb = PALETTE[labels]
    yy, xx = np.mgrid[:200, :300]
    rgb[(yy - 120) ** 2 + (xx - 210) ** 2 <= 8 ** 2] = (255, 255, 0)
    path = tmp_path / "mask.jpg"
    path.write_bytes(jpeg_bytes(rgb))
    with masks.open_mask(path) as mask, pytest.raises(MaskError) as excinfo:
        mask.validate()
    assert_mask_error(excinfo, path, "is not a class colour", "more than 2 px from every class colour")
    y, x = (int(v) for v in str(excinfo.value).split("at (y=")[1].split(")")[0].replace("x=", "").split(", "))
    assert (y - 120) ** 2 + (x - 210) ** 2 <= 8 ** 2


@pytest.mark.parametrize("quality", [75, 100])
def test_jpeg_label_masks_are_refused_when_opened_as_they_lost_their_labels(tmp_path, quality):
    labels = blob_labels(200, 300, seed=16)
    Image.fromarray(labels).save(tmp_path / "labels.jpg", quality=quality)
    decoded = np.asarray(Image.open(tmp_path / "labels.jpg"))
    # Where the codec stayed within 0..2 it still changed labels: nothing would have found that.
    assert ((decoded <= masks.GLAND) & (decoded != labels)).any(), "the test needs silently changed labels"
    with pytest.raises(MaskError) as excinfo:
        masks.open_mask(tmp_path / "labels.jpg")
    assert_mask_error(excinfo, tmp_path / "labels.jpg", "lossy compression", "save label masks as PNG or TIFF")


def test_jpeg_compressed_tiff_label_masks_are_refused_too(tmp_path):
    tifffile.imwrite(tmp_path / "labels.tif", blob_labels(256, 256, seed=17), tile=(64, 64), compression="jpeg")
    with pytest.raises(MaskError) as excinfo:
        masks.open_mask(tmp_path / "labels.tif")
    assert_mask_error(excinfo, tmp_path / "labels.tif", "lossy compression")


# ---------------------------------------------------------------------------------------------------------
# Colour tolerance


def nearest_class_distance(rgb):
    rgb = np.asarray(rgb, float)
    return np.sqrt(((rgb[..., None, :] - PALETTE.astype(float)) ** 2).sum(-1)).min(-1)


def test_tolerance_rejects_non_class_colours():
    greys = [(v, v, v) for v in range(256)]
    others = [(255, 255, 255), (0, 0, 0), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    for colour in greys + others:
        mask = masks.from_array(np.array([[colour]], np.uint8), name="probe")
        with pytest.raises(MaskError) as excinfo:
            mask.read_labels(0, 0, 1, 1)
        assert_mask_error(excinfo, "probe", f"colour {colour} at (y=0, x=0) is not a class colour",
                          f"tolerance {masks.COLOUR_TOLERANCE:g}")


def test_tolerance_accepts_blends_of_two_classes_and_noise():
    # Every blend of two class colours (what resampling or antialiasing makes of an edge) snaps to the
    # nearest class colour.
    t = np.linspace(0, 1, 101)[:, None]
    for a, b in ((0, 1), (0, 2), (1, 2)):
        blend = np.round((1 - t) * PALETTE[a] + t * PALETTE[b]).astype(np.uint8)
        snapped = masks.from_array(blend[None]).read_labels(0, 0, 1, 101)[0]
        distances = np.sqrt(((blend[:, None, :].astype(float) - PALETTE) ** 2).sum(-1))
        ordered = np.sort(distances, axis=1)
        clear = ordered[:, 0] < ordered[:, 1]  # leave exact midpoints out
        np.testing.assert_array_equal(snapped[clear], distances.argmin(1)[clear])
        assert set(snapped[~clear]) <= {a, b}
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (64, 64), dtype=np.uint8)
    noisy = np.clip(PALETTE[labels].astype(int) + rng.integers(-60, 61, (64, 64, 3)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(masks.from_array(noisy).read_labels(0, 0, 64, 64), labels)


def test_tolerance_boundary_and_custom_tolerance():
    tolerance = masks.COLOUR_TOLERANCE
    # Colours straight from pure red towards grey at distances just inside and outside the tolerance.
    direction = np.array([-1.0, 1.0, 1.0]) / math.sqrt(3)
    inside = np.round(np.array(RED) + direction * (tolerance - 2)).astype(np.uint8)
    outside = np.round(np.array(RED) + direction * (tolerance + 2)).astype(np.uint8)
    assert nearest_class_distance(inside) <= tolerance < nearest_class_distance(outside)
    assert masks.from_array(inside[None, None]).read_labels(0, 0, 1, 1)[0, 0] == masks.STROMA
    with pytest.raises(MaskError):
        masks.from_array(outside[None, None]).read_labels(0, 0, 1, 1)
    strict = masks.from_array(np.array([[[235, 0, 0]]], np.uint8), colour_tolerance=10)
    with pytest.raises(MaskError) as excinfo:
        strict.read_labels(0, 0, 1, 1)
    assert "tolerance 10" in str(excinfo.value)
    with pytest.raises(ValueError):
        masks.from_array(inside[None, None], colour_tolerance=-1)


# ---------------------------------------------------------------------------------------------------------
# Bad values: reported with the position in the whole mask


def test_bad_label_value_names_value_and_position(tmp_path):
    labels = blob_labels(100, 120, seed=12)
    labels[60, 77] = 7
    tifffile.imwrite(tmp_path / "mask.tif", labels, tile=(32, 32), compression="zlib")
    with masks.open_mask(tmp_path / "mask.tif") as mask:
        mask.read_labels(0, 0, 50, 120)  # the bad pixel is not in this region
        with pytest.raises(MaskError) as excinfo:
            mask.read_labels(55, 70, 20, 200)
    assert str(excinfo.value) == (
        f"{tmp_path / 'mask.tif'}: label value 7 at (y=60, x=77) is not a class "
        "(0 background, 1 stroma, 2 gland)"
    )


def test_bad_colour_names_colour_and_position(tmp_path):
    rgb = PALETTE[blob_labels(30, 40, seed=13)]
    rgb[21, 3] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "mask.png")
    with masks.open_mask(tmp_path / "mask.png") as mask, pytest.raises(MaskError) as excinfo:
        mask.read_labels(-10, -10, 50, 50)
    assert str(excinfo.value) == (
        f"{tmp_path / 'mask.png'}: colour (255, 255, 255) at (y=21, x=3) is not a class colour "
        f"(gland green, stroma red, background blue; tolerance {masks.COLOUR_TOLERANCE:g})"
    )


def test_validate_checks_the_whole_mask_band_by_band(tmp_path, monkeypatch):
    labels = blob_labels(200, 150, seed=14)
    tifffile.imwrite(tmp_path / "good.tif", labels, tile=(64, 64), compression="zlib")
    labels[187, 149] = 3
    tifffile.imwrite(tmp_path / "bad.tif", labels, tile=(64, 64), compression="zlib")
    monkeypatch.setattr(masks.reader, "_VALIDATE_BYTES", 150 * 16)  # 16-row bands
    with masks.open_mask(tmp_path / "good.tif") as mask:
        mask.validate()
    with masks.open_mask(tmp_path / "bad.tif") as mask, pytest.raises(MaskError) as excinfo:
        mask.validate()
    assert_mask_error(excinfo, tmp_path / "bad.tif", "label value 3 at (y=187, x=149)")


# ---------------------------------------------------------------------------------------------------------
# Resolution


@pytest.mark.parametrize("unit,pixels_per_unit,expected", [
    ("CENTIMETER", 1e4 / 0.25, 0.25),
    ("INCH", 25400 / 0.5, 0.5),
    ("CENTIMETER", 1e4 / 16, 16.0),
    ("INCH", 72, None),  # an image editor's default, not a microscope's
    ("INCH", 300, None),
    ("NONE", 1e4 / 0.25, None),
])
def test_mpp_from_tiff_resolution(tmp_path, unit, pixels_per_unit, expected):
    tifffile.imwrite(tmp_path / "mask.tif", np.zeros((8, 8), np.uint8), resolution=(pixels_per_unit,) * 2,
                     resolutionunit=unit)
    with masks.open_mask(tmp_path / "mask.tif") as mask:
        assert mask.mpp == (pytest.approx(expected, rel=1e-6) if expected else None)


def test_mpp_absent_from_tiff_without_resolution(tmp_path):
    tifffile.imwrite(tmp_path / "mask.tif", np.zeros((8, 8), np.uint8))
    with masks.open_mask(tmp_path / "mask.tif") as mask:
        assert mask.mpp is None


@pytest.mark.parametrize("fmt,dpi,expected", [
    ("PNG", 25400 / 0.5, 0.5), ("PNG", 96, None), ("PNG", None, None),
    ("JPEG", 25400 / 2, 2.0), ("JPEG", 72, None),
])
def test_mpp_from_pillow_dpi(tmp_path, fmt, dpi, expected):
    path = tmp_path / f"mask.{fmt.lower()}"
    options = {"dpi": (dpi, dpi)} if dpi else {}
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path, fmt, **options)
    with slide_io.open_raster(path) as raster:
        assert raster.mpp == (pytest.approx(expected, rel=1e-4) if expected else None)


# ---------------------------------------------------------------------------------------------------------
# Real slides


@needs_slides
def test_svs_is_read_by_openslide_by_region():
    path = SLIDES / "CMU-1-Small-Region.svs"
    with slide_io.open_raster(path) as raster:
        assert isinstance(raster, slide_io.OpenSlideRaster)
        assert (raster.height, raster.width, raster.channels) == (2967, 2220, 3)
        assert raster.mpp == pytest.approx(0.499)
        # Independent decoder: tifffile's whole-page read of level 0 (same JPEG tiles).
        whole = tifffile.imread(path, key=0)
        for y0, x0, h, w in random_regions(2967, 2220, 20, seed=5)[6:]:
            y0, x0 = max(y0, 0), max(x0, 0)
            h, w = min(h, 2967 - y0), min(w, 2220 - x0)
            if h <= 0 or w <= 0:
                continue
            np.testing.assert_array_equal(raster.read(y0, x0, h, w), whole[y0:y0 + h, x0:x0 + w])


@needs_slides
def test_he_slide_is_not_a_mask():
    path = SLIDES / "CMU-1-Small-Region.svs"
    with masks.open_mask(path) as mask:
        assert mask.kind == "colour" and mask.mpp == pytest.approx(0.499)
        with pytest.raises(MaskError) as excinfo:
            mask.read_labels(1000, 1000, 64, 64)
    assert_mask_error(excinfo, path, "is not a class colour", "more than 2 px from every class colour")


@needs_slides
def test_generic_tiled_tiff_read_by_tifffile_matches_openslide():
    path = SLIDES / "boxes.tiff"
    with slide_io.open_raster(path) as raster:
        assert isinstance(raster, slide_io.TiffRaster)
        assert (raster.height, raster.width) == (250, 300)
        with openslide.OpenSlide(path) as slide:
            for y0, x0, h, w in [(0, 0, 250, 300), (17, 33, 100, 200), (249, 299, 1, 1)]:
                expected = np.asarray(slide.read_region((x0, y0), 0, (w, h)))[..., :3]
                np.testing.assert_array_equal(raster.read(y0, x0, h, w), expected)


# ---------------------------------------------------------------------------------------------------------
# Files that are not masks


def test_missing_file(tmp_path):
    with pytest.raises(MaskError) as excinfo:
        masks.open_mask(tmp_path / "nope.tif")
    assert_mask_error(excinfo, tmp_path / "nope.tif", "no such file")


def test_directory(tmp_path):
    with pytest.raises(MaskError) as excinfo:
        masks.open_mask(tmp_path)
    assert_mask_error(excinfo, tmp_path, "is a directory")


@pytest.mark.parametrize("name", ["empty.tif", "empty.png"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(MaskError) as excinfo:
        masks.open_mask(tmp_path / name)
    assert_mask_error(excinfo, tmp_path / name, "file is empty")


def test_text_file_renamed_tif(tmp_path):
    (tmp_path / "notes.tif").write_text("gland: green\nstroma: red\n")
    with pytest.raises(MaskError) as excinfo:
        masks.open_mask(tmp_path / "notes.tif")
    assert_mask_error(excinfo, tmp_path / "notes.tif", "unknown file format")


def _png_mask(path):
    Image.fromarray(PALETTE[blob_labels(200, 200, seed=15)]).save(path)


def _tiled_tiff_mask(path):
    labels = np.random.default_rng(4).integers(0, 3, (512, 512), dtype=np.uint8)
    tifffile.imwrite(path, labels, tile=(64, 64), compression="zlib")


@pytest.mark.parametrize("suffix, write, message", [
    (".png", _png_mask, "truncated or corrupt"),
    (".tif", _tiled_tiff_mask, "truncated"),
])
def test_a_mask_cut_in_half_is_a_one_line_error(tmp_path, suffix, write, message):
    write(tmp_path / f"full{suffix}")
    data = (tmp_path / f"full{suffix}").read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[:len(data) // 2])
    with pytest.raises(MaskError) as excinfo:
        masks.open_mask(tmp_path / f"cut{suffix}")
    assert_mask_error(excinfo, tmp_path / f"cut{suffix}", message)


def test_truncated_tiff_header(tmp_path):
    tifffile.imwrite(tmp_path / "full.tif", np.zeros((64, 64), np.uint8))
    (tmp_path / "cut.tif").write_bytes((tmp_path / "full.tif").read_bytes()[:12])
    with pytest.raises(MaskError) as excinfo:
        masks.open_mask(tmp_path / "cut.tif")
    assert_mask_error(excinfo, tmp_path / "cut.tif")


def test_corrupt_tile_fails_when_read(tmp_path):
    labels = np.random.default_rng(5).integers(0, 3, (256, 256), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "mask.tif", labels, tile=(64, 64), compression="zlib")
    with tifffile.TiffFile(tmp_path / "mask.tif") as tif:
        offset, count = tif.pages[0].dataoffsets[5], tif.pages[0].databytecounts[5]  # tile row 1, column 1
    data = bytearray((tmp_path / "mask.tif").read_bytes())
    data[offset:offset + count] = bytes(count)  # zeros are not a zlib stream
    (tmp_path / "mask.tif").write_bytes(bytes(data))
    with masks.open_mask(tmp_path / "mask.tif") as mask:
        np.testing.assert_array_equal(mask.read_labels(0, 0, 64, 256), labels[:64])  # intact tiles
        with pytest.raises(MaskError) as excinfo:
            mask.read_labels(0, 0, 256, 256)
    assert_mask_error(excinfo, tmp_path / "mask.tif", "cannot decode the tile at (y=64, x=64)")


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_non_8bit_tiff(tmp_path, dtype):
    tifffile.imwrite(tmp_path / "mask.tif", np.ones((16, 16), dtype))
    with pytest.raises(MaskError) as excinfo:
        masks.open_mask(tmp_path / "mask.tif")
    assert_mask_error(excinfo, tmp_path / "mask.tif", "not supported (only 8-bit images)")


def test_16bit_png(tmp_path):
    Image.fromarray(np.ones((16, 16), np.uint16)).save(tmp_path / "mask.png")
    with pytest.raises(MaskError) as excinfo:
        masks.open_mask(tmp_path / "mask.png")
    assert_mask_error(excinfo, tmp_path / "mask.png", "16-bit integer pixels are not supported")


def test_reading_outside_is_a_programming_error_for_raw_readers(tmp_path):
    tifffile.imwrite(tmp_path / "mask.tif", np.zeros((10, 10), np.uint8))
    with slide_io.open_raster(tmp_path / "mask.tif") as raster:
        with pytest.raises(ValueError):
            raster.read(5, 5, 6, 1)
    with pytest.raises(ValueError):
        raster.read(0, 0, 1, 1)  # closed


# ---------------------------------------------------------------------------------------------------------
# In-memory masks and encodings


def test_from_array():
    labels = blob_labels(33, 44, seed=16)
    for array in (labels, labels[..., None], PALETTE[labels]):
        mask = masks.from_array(array, mpp=0.5)
        assert (mask.height, mask.width, mask.mpp) == (33, 44, 0.5)
        for region in random_regions(33, 44, 20):
            np.testing.assert_array_equal(mask.read_labels(*region), expected_region(labels, *region))
    with pytest.raises(MaskError):
        masks.from_array(labels.astype(np.uint16))
    with pytest.raises(MaskError):
        masks.from_array(np.zeros((4, 4, 2), np.uint8))


def test_read_labels_does_not_alias_the_source_array():
    labels = np.zeros((4, 4), np.uint8)
    region = masks.from_array(labels).read_labels(0, 0, 4, 4)
    region[0, 0] = 2
    assert labels[0, 0] == 0


def test_labels_to_model_input():
    labels = np.array([[0, 1], [2, 1]], np.uint8)
    expected = np.array([
        [[-1, 1], [-1, 1]],   # stroma
        [[-1, -1], [1, -1]],  # gland
        [[1, -1], [-1, -1]],  # background
    ], np.float32)
    np.testing.assert_array_equal(masks.labels_to_model_input(labels), expected)
    # It is the colour mask scaled to [-1, 1], for a batch too, written into `out` when given.
    batch = np.stack([blob_labels(40, 50, seed=s) for s in range(3)])
    out = np.full((3, 3, 40, 50), 7, np.float32)
    assert masks.labels_to_model_input(batch, out=out) is out
    scaled = PALETTE[batch].astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(out, np.moveaxis(scaled, -1, 1))
    with pytest.raises(ValueError):
        masks.labels_to_model_input(batch, out=np.empty((3, 3, 40, 50), np.float64))
    with pytest.raises(ValueError):
        masks.labels_to_model_input(np.array([[3]], np.uint8))


def test_labels_to_colour():
    labels = np.array([[0, 1, 2]], np.uint8)
    np.testing.assert_array_equal(masks.labels_to_colour(labels), [[BLUE, RED, GREEN]])
    with pytest.raises(ValueError):
        masks.labels_to_colour(np.array([[5]], np.uint8))
