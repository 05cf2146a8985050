"""Tests of the streaming pyramidal BigTIFF writer, read back with tifffile and with OpenSlide.

Reduced levels are checked against a 2x2-mean reference written here independently of the writer
(NaN-padded float means rounded half up), not against the writer's own `halve`.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import time
import tracemalloc

import numpy as np
import openslide
import pytest
import tifffile

import safron.pyramid_tiff as pyramid_tiff
import safron.slide_io as slide_io
from safron.errors import SafronInputError
from safron.pyramid_tiff import PyramidTiffWriter, halve

SIZES = [(1, 1), (255, 257), (256, 256), (1000, 700), (1537, 2049)]
LOSSLESS = ["zstd", "deflate", "none"]
TILE = 256
# JPEG q90 (YCbCr 4:2:0) on the smooth test images, measured over every level of every size:
# mean |error| 0.6..2.5, max 5..20, per-channel mean error within +-0.04. The limits leave headroom
# yet catch swapped channels, an unconverted YCbCr image or a misplaced tile (errors of tens).
JPEG_MEAN_ABS_ERROR_LIMIT = 3.0
JPEG_MAX_ABS_ERROR_LIMIT = 32
JPEG_CHANNEL_BIAS_LIMIT = 0.5


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random but smooth RGB image: per channel, waves of 1.5 to 4 periods across the image (at
    least 30 px each), so that every pyramid level is smooth too."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    channels = []
    for _ in range(3):
        fy, fx = 2 * np.pi * rng.uniform(1.5, 4, size=2) / np.maximum((height, width), 120)
        phase = rng.uniform(0, 2 * np.pi)
        channels.append(128 + 100 * np.sin(fy * yy + fx * xx + phase) * np.cos(fx * yy * 0.7 + phase))
    return np.clip(np.stack(channels, axis=-1).round(), 0, 255).astype(np.uint8)


def noise_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def reference_halve(image: np.ndarray) -> np.ndarray:
    """Mean over the existing pixels of each 2x2 block, rounded to nearest with halves up."""
    height, width = image.shape[:2]
    half_h, half_w = math.ceil(height / 2), math.ceil(width / 2)
    padded = np.full((2 * half_h, 2 * half_w, 3), np.nan)
    padded[:height, :width] = image
    means = np.nanmean(padded.reshape(half_h, 2, half_w, 2, 3), axis=(1, 3))
    return np.floor(means + 0.5).astype(np.uint8)


def reference_pyramid(image: np.ndarray) -> list[np.ndarray]:
    levels = [image]
    while levels[-1].shape[0] > TILE or levels[-1].shape[1] > TILE:
        levels.append(reference_halve(levels[-1]))
    return levels


def irregular_stripe_heights(height: int, seed: int) -> list[int]:
    """Stripe heights that straddle tile rows: 1-row stripes, the engine's 236, and larger."""
    rng = np.random.default_rng(seed)
    choices = [1, 2, 17, 236, 236, 255, 257, 300]
    heights = []
    while sum(heights) < height:
        heights.append(min(int(rng.choice(choices)), height - sum(heights)))
    return heights


def write_image(path, image: np.ndarray, seed: int = 0, **options) -> None:
    height, width = image.shape[:2]
    with PyramidTiffWriter(path, height, width, **options) as writer:
        y0 = 0
        for stripe_height in irregular_stripe_heights(height, seed):
            writer.write_rows(y0, image[y0 : y0 + stripe_height])
            y0 += stripe_height


def canvas_path_for(path):
    return path.with_name(path.name + ".canvas")


def new_canvas(path, height: int, width: int):
    """A canvas file of the right size whose rows are not final yet: filled with a constant, so
    rows encoded before they were written show up as a mismatch."""
    canvas = canvas_path_for(path)
    canvas.write_bytes(b"\x5a" * (height * width * 3))
    return canvas


def write_image_via_canvas(path, image: np.ndarray, seed: int = 0, pause_s: float = 0, writer=PyramidTiffWriter,
                           **options):
    """Like write_image, but the rows go into a canvas file as the engine does, announced with
    rows_ready in irregular steps (some of them repeating the previous count), to `writer`
    (PyramidTiffWriter or encoder_process.PyramidTiffProcess)."""
    height, width = image.shape[:2]
    canvas = new_canvas(path, height, width)
    with writer(path, height, width, canvas=canvas, **options) as writer:
        y0 = 0
        for stripe_height in irregular_stripe_heights(height, seed):
            with open(canvas, "r+b") as canvas_file:
                canvas_file.seek(y0 * width * 3)
                canvas_file.write(image[y0 : y0 + stripe_height].tobytes())
            writer.rows_ready(y0 + stripe_height)
            if stripe_height == 17:
                writer.rows_ready(y0 + stripe_height)
            y0 += stripe_height
            time.sleep(pause_s)
    return canvas


WRITERS = {"write_rows": write_image, "canvas": write_image_via_canvas}


def region(slide: openslide.OpenSlide, level: int) -> np.ndarray:
    rgba = np.asarray(slide.read_region((0, 0), level, slide.level_dimensions[level]))
    assert (rgba[..., 3] == 255).all()
    return rgba[..., :3]


def check_tiff_structure(path, expected_shapes: list[tuple[int, int]]) -> None:
    with tifffile.TiffFile(path) as tiff:
        assert tiff.is_bigtiff
        assert len(tiff.pages) == len(expected_shapes)  # every level is a top-level IFD
        for level, page in enumerate(tiff.pages):
            assert page.shape == (*expected_shapes[level], 3)
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (TILE, TILE)
            assert page.tags["NewSubfileType"].value == (1 if level else 0)
            assert "SubIFDs" not in page.tags
            assert page.tags["BitsPerSample"].value == (8, 8, 8)


def files_in(directory) -> list[str]:
    return sorted(os.listdir(directory))


# ----------------------------------------------------------------------------- reduction rule


def test_halve_rounds_half_up_and_averages_only_existing_edge_pixels():
    band = np.zeros((3, 3, 3), np.uint8)
    band[..., 0] = [[0, 1, 7], [1, 1, 8], [5, 6, 200]]
    band[..., 1] = [[0, 0, 9], [1, 1, 10], [0, 3, 201]]
    band[..., 2] = 255
    reduced = halve(band)
    # Full block (0,1,1,1)=0.75 -> 1 and (0,0,1,1)=0.5 -> 1 (half up); right column averages two
    # pixels (7,8)=7.5 -> 8, bottom row (5,6)=5.5 -> 6, the corner is the lone pixel itself.
    assert reduced[..., 0].tolist() == [[1, 8], [6, 200]]
    assert reduced[..., 1].tolist() == [[1, 10], [2, 201]]
    assert (reduced[..., 2] == 255).all()


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (5, 4), (255, 257), (256, 8193)])
def test_halve_matches_independent_reference(shape):
    image = noise_image(*shape, seed=shape[0])
    assert np.array_equal(halve(image), reference_halve(image))


# ----------------------------------------------------------------------------- lossless round trip


@pytest.mark.parametrize("mode", WRITERS)
@pytest.mark.parametrize("compression", LOSSLESS)
@pytest.mark.parametrize("make_image", [smooth_image, noise_image], ids=["smooth", "noise"])
@pytest.mark.parametrize("shape", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_lossless_levels_round_trip_through_tifffile_and_openslide(tmp_path, shape, make_image, compression, mode):
    image = make_image(*shape, seed=shape[1])
    path = tmp_path / "slide.tif"
    WRITERS[mode](path, image, seed=shape[0], compression=compression, mpp=0.5)
    expected = reference_pyramid(image)
    if mode == "canvas":  # the caller's canvas is read, never changed or removed
        assert files_in(tmp_path) == ["slide.tif", "slide.tif.canvas"]
        assert canvas_path_for(path).read_bytes() == image.tobytes()
    else:
        assert files_in(tmp_path) == ["slide.tif"]

    check_tiff_structure(path, [level.shape[:2] for level in expected])
    with tifffile.TiffFile(path) as tiff:
        for page, level in zip(tiff.pages, expected):
            assert np.array_equal(page.asarray(), level)

    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == len(expected)
        assert slide.level_dimensions == tuple((lvl.shape[1], lvl.shape[0]) for lvl in expected)
        for level_index, level in enumerate(expected):
            ratios = (image.shape[1] / level.shape[1], image.shape[0] / level.shape[0])
            assert min(ratios) - 1e-9 <= slide.level_downsamples[level_index] <= max(ratios) + 1e-9
            assert np.array_equal(region(slide, level_index), level)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5, rel=1e-6)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5, rel=1e-6)


# ----------------------------------------------------------------------------- JPEG


@pytest.mark.parametrize("shape", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_jpeg_levels_decode_to_the_right_colours_in_openslide(tmp_path, shape):
    image = smooth_image(*shape, seed=7)
    path = tmp_path / "slide.tif"
    write_image(path, image, seed=3)  # jpeg, quality 90 by default
    expected = reference_pyramid(image)
    check_tiff_structure(path, [level.shape[:2] for level in expected])
    with tifffile.TiffFile(path) as tiff:
        for page in tiff.pages:
            # tifffile converts the RGB input to YCbCr 4:2:0 itself; OpenSlide must undo it.
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.photometric == tifffile.PHOTOMETRIC.YCBCR
            assert page.tags["YCbCrSubSampling"].value == (2, 2)
        tifffile_levels = [page.asarray() for page in tiff.pages]

    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == len(expected)
        assert slide.level_dimensions == tuple((lvl.shape[1], lvl.shape[0]) for lvl in expected)
        for level_index, level in enumerate(expected):
            decoded = region(slide, level_index).astype(np.int16)
            error = decoded - level
            assert np.abs(error).mean() <= JPEG_MEAN_ABS_ERROR_LIMIT, level_index
            assert np.abs(error).max() <= JPEG_MAX_ABS_ERROR_LIMIT, level_index
            if level.size >= 3 * 64 * 64:  # a bias needs enough pixels to be meaningful
                assert np.abs(error.mean(axis=(0, 1))).max() <= JPEG_CHANNEL_BIAS_LIMIT, level_index
            # Two JPEG decoders (libtiff/libjpeg in OpenSlide, imagecodecs) agree to rounding.
            assert np.abs(decoded - tifffile_levels[level_index]).max() <= 2


def test_jpeg_quality_trades_size_for_error(tmp_path):
    image = noise_image(512, 512, seed=1)
    errors, sizes = [], []
    for quality in (30, 95):
        path = tmp_path / f"q{quality}.tif"
        write_image(path, image, quality=quality)
        errors.append(np.abs(tifffile.imread(path).astype(np.int16) - image).mean())
        sizes.append(path.stat().st_size)
    assert errors[1] < errors[0]
    assert sizes[1] > sizes[0]


@pytest.mark.parametrize("quality", [0, 101, 9.5, True])
def test_bad_jpeg_quality_is_an_input_error(tmp_path, quality):
    with pytest.raises(SafronInputError, match="quality"):
        PyramidTiffWriter(tmp_path / "slide.tif", 10, 10, quality=quality)
    assert files_in(tmp_path) == []


# ----------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("mpp", [0.2527, (0.25, 0.2611), 8.0])
def test_resolution_tags_make_openslide_report_the_mpp(tmp_path, mpp):
    mpp_x, mpp_y = (mpp, mpp) if np.isscalar(mpp) else mpp
    path = tmp_path / "slide.tif"
    write_image(path, smooth_image(600, 1100), compression="zstd", mpp=mpp)
    with openslide.OpenSlide(path) as slide:
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp_x, rel=1e-6)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(mpp_y, rel=1e-6)
    with tifffile.TiffFile(path) as tiff:
        for level, page in enumerate(tiff.pages):
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            x_num, x_den = page.tags["XResolution"].value
            y_num, y_den = page.tags["YResolution"].value
            assert x_num / x_den == pytest.approx(1e4 / (mpp_x * 2**level), rel=1e-6)
            assert y_num / y_den == pytest.approx(1e4 / (mpp_y * 2**level), rel=1e-6)


def test_without_mpp_there_is_no_physical_resolution(tmp_path):
    path = tmp_path / "slide.tif"
    write_image(path, smooth_image(300, 300), compression="zstd")
    with openslide.OpenSlide(path) as slide:
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties
        assert openslide.PROPERTY_NAME_MPP_Y not in slide.properties
    with tifffile.TiffFile(path) as tiff:
        assert all(page.tags["ResolutionUnit"].value == tifffile.RESUNIT.NONE for page in tiff.pages)


def test_description_goes_to_level_zero_only(tmp_path):
    path = tmp_path / "slide.tif"
    write_image(path, smooth_image(600, 300), compression="zstd", description="safron render, seed 3")
    with tifffile.TiffFile(path) as tiff:
        assert tiff.pages[0].description == "safron render, seed 3"
        assert all("ImageDescription" not in page.tags for page in tiff.pages[1:])
    with openslide.OpenSlide(path) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_COMMENT] == "safron render, seed 3"


def test_non_ascii_description_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="ASCII"):
        PyramidTiffWriter(tmp_path / "slide.tif", 10, 10, description="Zürich")
    assert files_in(tmp_path) == []


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("compression", ["jpeg", "zstd"])
def test_identical_rows_give_identical_bytes_whatever_the_stripes_and_workers(tmp_path, compression):
    image = smooth_image(1100, 900, seed=5)
    first, second = tmp_path / "first.tif", tmp_path / "second.tif"
    write_image(first, image, seed=1, compression=compression, mpp=0.5, workers=1)
    write_image(second, image, seed=2, compression=compression, mpp=0.5, workers=2)
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("compression", ["jpeg", "zstd"])
def test_canvas_and_write_rows_give_identical_bytes(tmp_path, compression):
    image = smooth_image(1300, 1500, seed=6)
    from_rows, from_canvas = tmp_path / "rows.tif", tmp_path / "canvas.tif"
    write_image(from_rows, image, seed=1, compression=compression, mpp=0.5, description="d")
    write_image_via_canvas(from_canvas, image, seed=2, compression=compression, mpp=0.5, description="d")
    assert from_rows.read_bytes() == from_canvas.read_bytes()


def test_rows_not_yet_ready_on_the_canvas_are_never_encoded(tmp_path):
    # Rows past rows_ready hold filler until written; the pauses give an encoder that read ahead
    # the time to pick the filler up, which the lossless comparison would show.
    image = noise_image(1100, 1300, seed=4)
    path = tmp_path / "slide.tif"
    write_image_via_canvas(path, image, seed=5, pause_s=0.01, compression="zstd", workers=1)
    with tifffile.TiffFile(path) as tiff:
        for page, level in zip(tiff.pages, reference_pyramid(image)):
            assert np.array_equal(page.asarray(), level)


def test_a_resumed_canvas_may_announce_all_its_rows_at_once(tmp_path):
    image = smooth_image(700, 900, seed=8)
    path = tmp_path / "slide.tif"
    canvas = new_canvas(path, 700, 900)
    canvas.write_bytes(image.tobytes())
    with PyramidTiffWriter(path, 700, 900, compression="zstd", canvas=canvas) as writer:
        writer.rows_ready(700)
    assert np.array_equal(tifffile.imread(path), image)


def test_rows_ready_rejects_going_back_or_past_the_end_and_changes_nothing(tmp_path):
    image = smooth_image(600, 400)
    path = tmp_path / "slide.tif"
    canvas = new_canvas(path, 600, 400)
    canvas.write_bytes(image.tobytes())
    with PyramidTiffWriter(path, 600, 400, compression="zstd", canvas=canvas) as writer:
        writer.rows_ready(300)
        with pytest.raises(ValueError, match="between"):
            writer.rows_ready(299)
        with pytest.raises(ValueError, match="between"):
            writer.rows_ready(601)
        with pytest.raises(ValueError, match="integer"):
            writer.rows_ready(400.0)
        with pytest.raises(ValueError, match="use rows_ready"):
            writer.write_rows(300, image[300:])
        writer.rows_ready(600)
    assert np.array_equal(tifffile.imread(path), image)


def test_rows_ready_without_a_canvas_is_refused(tmp_path):
    with PyramidTiffWriter(tmp_path / "slide.tif", 10, 10, compression="zstd") as writer:
        with pytest.raises(ValueError, match="use write_rows"):
            writer.rows_ready(5)
        writer.write_rows(0, np.zeros((10, 10, 3), np.uint8))


@pytest.mark.parametrize("canvas_bytes", [None, 600 * 400 * 3 - 1, 600 * 400 * 3 + 3])
def test_missing_or_wrongly_sized_canvas_is_an_input_error_naming_it(tmp_path, canvas_bytes):
    canvas = tmp_path / "slide.canvas"
    if canvas_bytes is not None:
        canvas.write_bytes(bytes(canvas_bytes))
    with pytest.raises(SafronInputError) as raised:
        PyramidTiffWriter(tmp_path / "slide.tif", 600, 400, canvas=canvas)
    message = str(raised.value)
    assert "\n" not in message and str(canvas) in message
    assert files_in(tmp_path) == ([] if canvas_bytes is None else ["slide.canvas"])


def test_rows_are_copied_so_the_caller_may_reuse_its_buffer(tmp_path):
    image = noise_image(700, 300, seed=2)
    path = tmp_path / "slide.tif"
    stripe = np.empty((100, 300, 3), np.uint8)
    with PyramidTiffWriter(path, 700, 300, compression="zstd") as writer:
        for y0 in range(0, 700, 100):
            stripe[:] = image[y0 : y0 + 100]
            writer.write_rows(y0, stripe)
            stripe[:] = 0
    assert np.array_equal(tifffile.imread(path), image)


# ----------------------------------------------------------------------------- failures and cleanup


def test_abort_removes_every_temporary_and_leaves_an_existing_output_alone(tmp_path):
    path = tmp_path / "slide.tif"
    path.write_bytes(b"previous render")
    image = smooth_image(1200, 600)
    writer = PyramidTiffWriter(path, 1200, 600, compression="zstd")
    writer.write_rows(0, image[:700])
    assert {"slide.tif.partial", "slide.tif.level0.raw"} <= set(files_in(tmp_path))
    writer.abort()
    writer.abort()  # idempotent
    assert files_in(tmp_path) == ["slide.tif"]
    assert path.read_bytes() == b"previous render"


def test_abort_in_canvas_mode_keeps_the_canvas(tmp_path):
    path = tmp_path / "slide.tif"
    image = smooth_image(1200, 600)
    canvas = new_canvas(path, 1200, 600)
    canvas.write_bytes(image.tobytes())
    writer = PyramidTiffWriter(path, 1200, 600, compression="zstd", canvas=canvas)
    writer.rows_ready(700)
    writer.abort()
    assert files_in(tmp_path) == ["slide.tif.canvas"]
    assert canvas.read_bytes() == image.tobytes()


def test_exception_in_the_with_block_aborts(tmp_path):
    path = tmp_path / "slide.tif"
    with pytest.raises(KeyError):
        with PyramidTiffWriter(path, 600, 600) as writer:
            writer.write_rows(0, smooth_image(600, 600)[:300])
            raise KeyError("engine failed")
    assert files_in(tmp_path) == []


def test_close_before_the_last_row_is_an_error_and_writes_nothing(tmp_path):
    path = tmp_path / "slide.tif"
    writer = PyramidTiffWriter(path, 600, 600)
    writer.write_rows(0, smooth_image(600, 600)[:599])
    with pytest.raises(ValueError, match="599 of 600"):
        writer.close()
    assert files_in(tmp_path) == []


def test_out_of_order_or_malformed_rows_are_rejected(tmp_path):
    image = smooth_image(600, 400)
    with PyramidTiffWriter(tmp_path / "slide.tif", 600, 400, compression="zstd") as writer:
        writer.write_rows(0, image[:10])
        with pytest.raises(ValueError, match="in order"):
            writer.write_rows(20, image[20:30])
        with pytest.raises(ValueError, match="in order"):
            writer.write_rows(0, image[:10])
        with pytest.raises(ValueError, match="shape"):
            writer.write_rows(10, image[10:20, :399])
        with pytest.raises(ValueError, match="uint8"):
            writer.write_rows(10, image[10:20].astype(np.float32))
        with pytest.raises(ValueError, match="past the image height"):
            writer.write_rows(10, np.zeros((600, 400, 3), np.uint8))
        # The rejected calls changed nothing: the rest still goes in and the file is exact.
        writer.write_rows(10, image[10:])
    assert np.array_equal(tifffile.imread(tmp_path / "slide.tif"), image)


def test_writing_after_close_is_an_error(tmp_path):
    writer = PyramidTiffWriter(tmp_path / "slide.tif", 1, 1)
    writer.write_rows(0, np.zeros((1, 1, 3), np.uint8))
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write_rows(0, np.zeros((1, 1, 3), np.uint8))


def _failing_on_heights(heights):
    """A halve that fails on blocks of the given heights. Only the last tile row of a level is
    shorter than a tile, so a height unique to one level makes it fail in that level."""
    real_halve = pyramid_tiff.halve

    def halve_or_fail(block):
        if block.shape[0] in heights:
            raise RuntimeError("simulated encoder failure")
        return real_halve(block)

    return halve_or_fail


@pytest.mark.parametrize("phase", ["level 0", "reduced levels"])
def test_writer_thread_failure_surfaces_and_cleans_up(tmp_path, monkeypatch, phase):
    height, width = 2000, 1100
    # Last tile rows: 208 rows at level 0, 232 at level 1 (1000 rows).
    failing_height = height % TILE if phase == "level 0" else math.ceil(height / 2) % TILE
    monkeypatch.setattr(pyramid_tiff, "halve", _failing_on_heights({failing_height}))
    path = tmp_path / "slide.tif"
    path.write_bytes(b"previous render")
    image = smooth_image(height, width)
    writer = PyramidTiffWriter(path, height, width)
    with pytest.raises(RuntimeError, match="simulated encoder failure"):
        for y0 in range(0, height, 236):
            writer.write_rows(y0, image[y0 : y0 + 236])
        writer.close()
    assert files_in(tmp_path) == ["slide.tif"]
    assert path.read_bytes() == b"previous render"
    with pytest.raises(ValueError, match="failed"):
        writer.close()


def test_failure_while_rows_arrive_surfaces_at_the_next_rows_ready(tmp_path, monkeypatch):
    monkeypatch.setattr(pyramid_tiff, "halve", _failing_on_heights({TILE}))
    path = tmp_path / "slide.tif"
    canvas = new_canvas(path, 2000, 600)
    writer = PyramidTiffWriter(path, 2000, 600, compression="zstd", canvas=canvas)
    writer.rows_ready(TILE)
    deadline = time.monotonic() + 30
    with pytest.raises(RuntimeError, match="simulated encoder failure"):
        while time.monotonic() < deadline:  # the encoder fails on its own time
            writer.rows_ready(TILE)
            time.sleep(0.01)
    assert files_in(tmp_path) == ["slide.tif.canvas"]


def test_disk_filling_up_while_writing_is_a_one_line_input_error(tmp_path):
    # RLIMIT_FSIZE makes any write past the limit fail with EFBIG, like a full disk; SIGXFSZ
    # (which would kill the process) is ignored meanwhile.
    image = noise_image(1000, 700)
    path = tmp_path / "slide.tif"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
    try:
        with pytest.raises(SafronInputError) as raised:
            write_image(path, image, compression="none")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("compression", ["webp", "lzw", "JPEG"])
def test_unsupported_compression_is_an_input_error_naming_the_valid_ones(tmp_path, compression):
    with pytest.raises(SafronInputError) as raised:
        PyramidTiffWriter(tmp_path / "slide.tif", 10, 10, compression=compression)
    message = str(raised.value)
    assert "\n" not in message
    assert all(name in message for name in ("jpeg", "zstd", "deflate", "none"))
    if compression == "webp":
        assert "OpenSlide" in message
    assert files_in(tmp_path) == []


def test_output_path_that_is_a_directory_is_an_input_error(tmp_path):
    (tmp_path / "out.tif").mkdir()
    with pytest.raises(SafronInputError, match="is a directory"):
        PyramidTiffWriter(tmp_path / "out.tif", 10, 10)
    assert files_in(tmp_path) == ["out.tif"]


def test_output_path_taken_by_a_directory_meanwhile_fails_cleanly_at_close(tmp_path):
    writer = PyramidTiffWriter(tmp_path / "out.tif", 300, 300, compression="zstd")
    writer.write_rows(0, smooth_image(300, 300))
    (tmp_path / "out.tif").mkdir()
    with pytest.raises(SafronInputError, match="cannot move the finished TIFF into place"):
        writer.close()
    assert files_in(tmp_path) == ["out.tif"]
    assert (tmp_path / "out.tif").is_dir()


def test_missing_output_directory_is_an_input_error(tmp_path):
    with pytest.raises(SafronInputError, match="does not exist"):
        PyramidTiffWriter(tmp_path / "no" / "out.tif", 10, 10)


def test_output_that_cannot_be_created_is_an_input_error(tmp_path):
    (tmp_path / "out.tif.partial").mkdir()  # works for root too, unlike directory permissions
    with pytest.raises(SafronInputError, match="cannot create out.tif.partial"):
        PyramidTiffWriter(tmp_path / "out.tif", 10, 10)
    assert files_in(tmp_path) == ["out.tif.partial"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_directory_is_an_input_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(SafronInputError, match="cannot create"):
            PyramidTiffWriter(locked / "out.tif", 10, 10)
    finally:
        locked.chmod(0o700)


def test_too_little_free_space_for_the_temporaries_is_refused_up_front(tmp_path, monkeypatch):
    real_disk_usage = slide_io.shutil.disk_usage

    def nearly_full(path):
        return real_disk_usage(path)._replace(free=1_000_000)

    monkeypatch.setattr(slide_io.shutil, "disk_usage", nearly_full)
    # Level 1 of 2000 x 2000 is 3 MB of raw temporary data: more than the 1 MB "free".
    with pytest.raises(SafronInputError, match="not enough free disk space"):
        PyramidTiffWriter(tmp_path / "out.tif", 2000, 2000)
    assert files_in(tmp_path) == []
    # 1000 x 1000: the copy of level 0 (3 MB) does not fit, but levels 1 and 2 (0.94 MB) do,
    # so with a canvas, which exists already, the same render is accepted.
    with pytest.raises(SafronInputError, match="not enough free disk space"):
        PyramidTiffWriter(tmp_path / "out.tif", 1000, 1000)
    canvas = new_canvas(tmp_path / "out.tif", 1000, 1000)
    PyramidTiffWriter(tmp_path / "out.tif", 1000, 1000, canvas=canvas).abort()
    assert files_in(tmp_path) == ["out.tif.canvas"]


# ----------------------------------------------------------------------------- memory


def _peak_traced_bytes_while_writing(path, height: int, width: int, workers: int, mode: str) -> int:
    """Peak Python/numpy heap while streaming a height x width image, either with write_rows or
    from a canvas written beforehand (the canvas's own memory is the caller's, not traced)."""
    stripe = smooth_image(236, width)
    canvas = None
    if mode == "canvas":
        canvas = new_canvas(path, height, width)
        with open(canvas, "r+b") as canvas_file:
            for y0 in range(0, height, 236):
                canvas_file.write(stripe[: min(236, height - y0)].tobytes())
    tracemalloc.start()
    try:
        with PyramidTiffWriter(path, height, width, compression="zstd", workers=workers, canvas=canvas) as writer:
            for y0 in range(0, height, 236):
                y1 = min(y0 + 236, height)
                if canvas is None:
                    writer.write_rows(y0, stripe[: y1 - y0])
                else:
                    writer.rows_ready(y1)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _tiff_batch_bytes(workers: int) -> int:
    """Raw tiles tifffile gathers before compressing them: 16 per worker."""
    return 16 * workers * TILE * TILE * 3


@pytest.mark.parametrize("mode", WRITERS)
def test_peak_memory_does_not_grow_with_image_height(tmp_path, mode):
    width, workers = 1024, 2
    # Below 4096 rows the whole level is less than one tifffile batch (32 tiles here) and the peak
    # is not yet at its steady state.
    short = _peak_traced_bytes_while_writing(tmp_path / "short.tif", 4096, width, workers, mode)
    tall = _peak_traced_bytes_while_writing(tmp_path / "tall.tif", 16384, width, workers, mode)
    # 4x the rows; the margin is for thread timing, which decides how many blocks are in flight at the peak.
    assert tall < 1.5 * short
    # Measured 9-10 MB: a tifffile batch of raw tiles and their encodings, a few blocks (4 tiles wide here) and
    # their reductions. The tall image itself is 48 MB.
    assert tall < 2 * _tiff_batch_bytes(workers)


@pytest.mark.parametrize("mode", WRITERS)
def test_peak_memory_does_not_grow_with_image_width(tmp_path, mode):
    height, workers = 1280, 2
    # Two blocks of tiles wide, five tile rows, 160 tiles (five tifffile batches): the narrow image already
    # reaches the steady state, in which blocks, not rows, are held.
    narrow_width = 2 * pyramid_tiff._BLOCK_TILES * TILE
    narrow = _peak_traced_bytes_while_writing(tmp_path / "narrow.tif", height, narrow_width, workers, mode)
    wide = _peak_traced_bytes_while_writing(tmp_path / "wide.tif", height, 4 * narrow_width, workers, mode)
    # 4x the columns; the margin is for thread timing, which decides how many blocks are in flight at the peak.
    assert wide < 1.5 * narrow
    # Measured 16-18 MB, less than a single full-width band of tile rows of the wide image (25 MB).
    assert wide < TILE * 4 * narrow_width * 3
