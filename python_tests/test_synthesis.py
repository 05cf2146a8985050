"""Synthetic masks (safron.synthesis, safron-masks) and three classes from binary gland masks."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from safron import masks, synthesis
from safron.cli import masks_main
from safron.errors import SafronInputError

ROOT = Path(__file__).resolve().parents[1]
GLAS_TRAIN = ROOT.parent / "shared" / "data" / "glas" / "train"
GLAS_SHAPE = (522, 775)

# GlaS train as measured by bench/mask_statistics.py (85 images; README table). Tolerances below are
# loose enough for 12 synthetic masks' sampling noise and tight enough to catch a miscalibration.
GLAS_GLAND_FRACTION = 0.501
GLAS_GLANDS_PER_100X100 = 0.231
GLAS_WHOLE_GLAND_AREA_P50 = 11_824
GLAS_HALF_GLAND_AREA_ABOVE = 42_475
GLAS_MAJOR_AXIS_P50 = 152
GLAS_BACKGROUND_OF_NON_GLAND = 0.119


def needs_glas(test):
    skip = pytest.mark.skipif(not (GLAS_TRAIN / "masks").is_dir(), reason=f"GlaS data not found at {GLAS_TRAIN}")
    return pytest.mark.needs_data(skip(test))


def _statistics_module():
    pytest.importorskip("scipy", reason="the mask statistics need scipy (connected components)")
    spec = importlib.util.spec_from_file_location("mask_statistics", ROOT / "bench" / "mask_statistics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ determinism, locality


def test_same_seed_same_bytes_across_processes():
    labels = synthesis.synthesize(300, 450, seed=11)
    np.testing.assert_array_equal(labels, synthesis.synthesize(300, 450, seed=11))
    code = ("import hashlib; from safron import synthesis; "
            "print(hashlib.sha256(synthesis.synthesize(300, 450, seed=11).tobytes()).hexdigest())")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == hashlib.sha256(labels.tobytes()).hexdigest()


def test_different_seeds_differ():
    first, second = synthesis.synthesize(400, 400, seed=0), synthesis.synthesize(400, 400, seed=1)
    assert (first != second).mean() > 0.2


def test_regions_equal_the_same_region_of_the_whole():
    whole = synthesis.synthesize(1100, 2300, seed=5)  # crosses read_labels' 512 x 2048 blocks
    synthesizer = synthesis.MaskSynthesizer(5)
    # Every pixel read again through a small tile, the most sensitive test of the cells within reach.
    reassembled = np.empty_like(whole)
    for y0 in range(0, 1100, 97):
        for x0 in range(0, 2300, 131):
            h, w = min(97, 1100 - y0), min(131, 2300 - x0)
            reassembled[y0:y0 + h, x0:x0 + w] = synthesizer.read_labels(y0, x0, h, w)
    np.testing.assert_array_equal(reassembled, whole)
    rng = np.random.default_rng(0)
    for _ in range(12):
        h, w = rng.integers(1, 600, size=2)
        y0, x0 = rng.integers(0, 1100 - h), rng.integers(0, 2300 - w)
        fresh = synthesis.MaskSynthesizer(5)  # nothing cached from neighbouring reads
        np.testing.assert_array_equal(fresh.read_labels(y0, x0, h, w), whole[y0:y0 + h, x0:x0 + w])


def test_smaller_mask_is_the_corner_of_a_larger_one():
    larger = synthesis.synthesize(800, 900, seed=2)
    np.testing.assert_array_equal(synthesis.synthesize(257, 333, seed=2), larger[:257, :333])


def test_far_regions_of_a_gigapixel_mask_are_consistent():
    # Around (y, x) = (70 000, 95 000) of a 100k x 100k mask: a tile read alone equals the same pixels
    # read as part of a larger neighbourhood, and of a band that starts at column 0's cell neighbours.
    synthesizer = synthesis.MaskSynthesizer(9)
    y, x = 70_001, 95_003
    tile = synthesizer.read_labels(y, x, 256, 256)
    np.testing.assert_array_equal(synthesizer.read_labels(y - 300, x - 700, 900, 1300)[300:556, 700:956], tile)
    assert len(np.unique(tile)) >= 2


def test_all_classes_present_in_plausible_shares():
    # One GlaS-sized window can be mostly gland (so can GlaS images); pooled, the shares are GlaS-like.
    windows = [synthesis.synthesize(*GLAS_SHAPE, seed) for seed in range(6)]
    for labels in windows:
        assert set(np.unique(labels)) == {masks.BACKGROUND, masks.STROMA, masks.GLAND}
    shares = np.bincount(np.concatenate([w.ravel() for w in windows]), minlength=3) / sum(w.size for w in windows)
    assert 0.02 < shares[masks.BACKGROUND] < 0.1
    assert 0.3 < shares[masks.STROMA] < 0.6
    assert 0.35 < shares[masks.GLAND] < 0.65


def test_overlapping_glands_are_cut_apart_by_the_gap():
    # Two circles of radius 50 centred at x = -40 and x = +40 on row 0 overlap by 20 px. Each pixel goes
    # to the circle it lies deeper in, and pixels whose two depths differ by less than the gap (6) stay
    # stroma: on row 0 that is |x| <= 2 (depths -7 and -13 at x = 3 differ by exactly 6). Without the
    # gap rule the overlap would be one gland.
    cy, cx, a, b, cos, sin, priority = 0.0, 40.0, 50.0, 50.0, 1.0, 0.0, 0.5
    glands = np.array([[cy, -cx, a, b, cos, sin, priority], [cy, cx, a, b, cos, sin, priority]])
    pixels = synthesis._Glands(glands, gap=6.0).pixels(-60, -100, 1, 100)  # rows -60..0, columns -100..99
    xs = np.arange(-100, 100)
    # Depth 0 on the outlines (x = -90 and 90) is not inside.
    np.testing.assert_array_equal(xs[pixels[60]], np.r_[-89:-2, 3:90])
    # Off the axis the two depths differ more slowly across the bisector x = 0: the gap only widens.
    assert not pixels[:, (xs >= -2) & (xs <= 2)].any()


def test_background_fraction_follows_the_recipe():
    for fraction in (0.0, 0.3):
        recipe = dataclasses.replace(synthesis.GLAS_RECIPE, background_fraction=fraction)
        labels = synthesis.synthesize(1500, 1500, seed=4, recipe=recipe)
        non_gland = labels != masks.GLAND
        share = (labels == masks.BACKGROUND).sum() / non_gland.sum()
        assert share == pytest.approx(fraction, abs=0.03)


def test_scaled_recipe_scales_gland_sizes():
    ndimage = pytest.importorskip("scipy.ndimage")

    def median_area(labels):
        components, count = ndimage.label(labels == masks.GLAND)
        return np.median(np.bincount(components.ravel())[1:])

    base = median_area(synthesis.synthesize(1500, 1500, seed=1))
    doubled = median_area(synthesis.synthesize(3000, 3000, seed=1, recipe=synthesis.GLAS_RECIPE.scaled(2)))
    assert 3 < doubled / base < 5.5


def test_statistics_match_glas_within_tolerance():
    stats = _statistics_module().statistics(synthesis.synthesize(*GLAS_SHAPE, seed) for seed in range(100, 112))
    assert stats["gland fraction"] == pytest.approx(GLAS_GLAND_FRACTION, abs=0.07)
    assert stats["glands per 100x100 px"] == pytest.approx(GLAS_GLANDS_PER_100X100, rel=0.3)
    assert stats["whole gland area p50 (px)"] == pytest.approx(GLAS_WHOLE_GLAND_AREA_P50, rel=0.35)
    assert stats["half the gland area in components above (px)"] == pytest.approx(GLAS_HALF_GLAND_AREA_ABOVE, rel=0.35)
    assert stats["whole gland major axis p50 (px)"] == pytest.approx(GLAS_MAJOR_AXIS_P50, rel=0.2)
    assert stats["background / non-gland"] == pytest.approx(0.1, abs=0.03)


@pytest.fixture(scope="module")
def glas_pairs():
    """(name, image, gland mask) of every GlaS training pair, read once for the tests that use them."""
    pairs = []
    for image_path in sorted((GLAS_TRAIN / "images").glob("*.png")):
        image = np.asarray(Image.open(image_path).convert("RGB"))
        pairs.append((image_path.name, image, np.asarray(Image.open(GLAS_TRAIN / "masks" / image_path.name))))
    return pairs


@needs_glas
def test_recorded_glas_figures_are_current(glas_pairs):
    labels = [masks.labels_from_gland_mask(image, gland) for _, image, gland in glas_pairs]
    stats = _statistics_module().statistics(labels)
    assert stats["gland fraction"] == pytest.approx(GLAS_GLAND_FRACTION, abs=0.001)
    assert stats["glands per 100x100 px"] == pytest.approx(GLAS_GLANDS_PER_100X100, abs=0.001)
    assert stats["whole gland area p50 (px)"] == pytest.approx(GLAS_WHOLE_GLAND_AREA_P50, rel=0.001)
    assert stats["half the gland area in components above (px)"] == pytest.approx(GLAS_HALF_GLAND_AREA_ABOVE, rel=0.001)
    assert stats["whole gland major axis p50 (px)"] == pytest.approx(GLAS_MAJOR_AXIS_P50, abs=1)
    assert stats["background / non-gland"] == pytest.approx(GLAS_BACKGROUND_OF_NON_GLAND, abs=0.001)


@pytest.mark.parametrize("bad", [
    dict(cell_size=0), dict(glands_per_cell=(7, 3)), dict(gland_ratio=(0.5, 1.5)), dict(gland_exclusion=0.5),
    dict(background_fraction=1.0), dict(spot_area=(30.0, 10.0)), dict(gland_length=float("nan")),
])
def test_bad_recipes_are_refused(bad):
    with pytest.raises(SafronInputError, match=next(iter(bad))):
        dataclasses.replace(synthesis.GLAS_RECIPE, **bad)


@pytest.mark.parametrize("height,width,seed", [(0, 10, 0), (10, -1, 0), (10, 10, -1), (10.5, 10, 0), (10, 10, 1.5)])
def test_bad_sizes_and_seeds_are_refused(height, width, seed):
    with pytest.raises(SafronInputError):
        synthesis.synthesize(height, width, seed)


# ------------------------------------------------------------------------------------ written files


@pytest.mark.parametrize("name,colour,channels", [
    ("m.png", None, 3), ("m.png", False, 1), ("m.tif", None, 1), ("m.tiff", True, 3),
])
def test_written_masks_read_back_with_the_same_labels(tmp_path, name, colour, channels):
    height, width = 300, 520  # not multiples of the tile: edge tiles are partial
    path = synthesis.write_mask(tmp_path / name, height, width, seed=8, colour=colour, tile=128, mpp=0.62)
    with masks.open_mask(path) as mask:
        assert (mask.height, mask.width) == (height, width)
        assert mask.kind == ("labels" if channels == 1 else "colour")
        assert mask.mpp == pytest.approx(0.62, rel=1e-3)
        np.testing.assert_array_equal(mask.read_labels(0, 0, height, width), synthesis.synthesize(height, width, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_label_tiff_is_tiled_and_colour_tiff_pyramidal(tmp_path):
    labels_path = synthesis.write_mask(tmp_path / "labels.tif", 700, 900, tile=256)
    colour_path = synthesis.write_mask(tmp_path / "colour.tif", 700, 900, colour=True, tile=256)
    with tifffile.TiffFile(labels_path) as tif:
        assert tif.pages[0].is_tiled and tif.pages[0].tilewidth == 256 and len(tif.pages) == 1
    with tifffile.TiffFile(colour_path) as tif:
        assert tif.pages[0].is_tiled and [page.shape[:2] for page in tif.pages] == [(700, 900), (350, 450), (175, 225)]
    png = np.asarray(Image.open(synthesis.write_mask(tmp_path / "colour.png", 700, 900)))
    np.testing.assert_array_equal(tifffile.imread(colour_path), png)


def test_tiff_writing_memory_does_not_grow_with_height(tmp_path):
    def peak(height):
        tracemalloc.start()
        synthesis.write_mask(tmp_path / f"m{height}.tif", height, 500, seed=1)
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return peak_bytes

    peak(256)  # imports and codec set-up outside the measurement
    # Eight times the height: a writer that kept rows would need eight times the memory. The peak
    # varies a little with the glands of the busiest band.
    short, tall = peak(1500), peak(12000)
    assert tall < 1.5 * short, (short, tall)


@pytest.mark.parametrize("colour", [False, True])
def test_bands_drawn_in_worker_processes_give_the_same_file(tmp_path, monkeypatch, colour):
    monkeypatch.setattr(synthesis, "PARALLEL_MIN_PIXELS", 0)  # parallel at a test's size
    drawn_here = []
    real_read_labels = synthesis.MaskSynthesizer.read_labels
    monkeypatch.setattr(synthesis.MaskSynthesizer, "read_labels",
                        lambda self, *region: drawn_here.append(region) or real_read_labels(self, *region))
    one = synthesis.write_mask(tmp_path / "one.tif", 700, 900, seed=3, colour=colour, tile=128, workers=1)
    assert len(drawn_here) == 6  # 700 rows in bands of 128
    drawn_here.clear()
    three = synthesis.write_mask(tmp_path / "three.tif", 700, 900, seed=3, colour=colour, tile=128, workers=3)
    assert drawn_here == []  # every band came from a worker (spawned: the patch above is not in them)
    assert one.read_bytes() == three.read_bytes()


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_bad_worker_counts_are_refused(tmp_path, workers):
    with pytest.raises(SafronInputError, match="workers must be a positive integer"):
        synthesis.write_mask(tmp_path / "m.tif", 10, 10, workers=workers)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthesis.MaskSynthesizer, "read_labels", fail)
    for name in ("m.png", "m.tif", "c.tif"):
        with pytest.raises(KeyboardInterrupt):
            synthesis.write_mask(tmp_path / name, 600, 600, colour=name.startswith("c"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,needle", [
    ("mask.jpg", "unsupported mask format"), ("missing/mask.tif", "does not exist"), ("", "directory"),
])
def test_bad_paths_are_refused(tmp_path, name, needle):
    with pytest.raises(SafronInputError, match=needle):
        synthesis.write_mask(tmp_path / name, 10, 10)


def test_png_size_limit(tmp_path):
    side = int(synthesis.PNG_MAX_PIXELS**0.5) + 1
    with pytest.raises(SafronInputError, match="too large for PNG"):
        synthesis.write_mask(tmp_path / "big.png", side, side)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_writes_the_mask_and_a_summary(tmp_path, capsys):
    out = tmp_path / "mask.tif"
    assert masks_main([str(out), "--size", "640", "480", "--seed", "3", "--colour", "--tile", "128"]) == 0
    assert f"wrote {out} (640 x 480 px, colour, seed 3" in capsys.readouterr().err
    with masks.open_mask(out) as mask:
        assert (mask.width, mask.height, mask.kind) == (640, 480, "colour")
        np.testing.assert_array_equal(mask.read_labels(0, 0, 480, 640), synthesis.synthesize(480, 640, 3))


def test_cli_options_reach_the_recipe(tmp_path):
    plain, scaled = tmp_path / "plain.png", tmp_path / "scaled.png"
    assert masks_main([str(plain), "--size", "300", "200", "--labels", "--quiet"]) == 0
    options = ["--labels", "--scale", "2", "--background", "0", "--quiet"]
    assert masks_main([str(scaled), "--size", "300", "200", *options]) == 0
    recipe = dataclasses.replace(synthesis.GLAS_RECIPE, background_fraction=0.0).scaled(2)
    np.testing.assert_array_equal(np.asarray(Image.open(scaled)), synthesis.synthesize(200, 300, recipe=recipe))
    np.testing.assert_array_equal(np.asarray(Image.open(plain)), synthesis.synthesize(200, 300))


@pytest.mark.parametrize("args,needle", [
    (["--size", "0", "10"], "--size"),
    (["--size", "10"], "--size"),
    (["--size", "ten", "10"], "--size"),
    (["--size", "10", "10", "--seed", "-1"], "--seed"),
    (["--size", "10", "10", "--tile", "100"], "--tile"),
    (["--size", "10", "10", "--background", "1"], "--background"),
    (["--size", "10", "10", "--scale", "0"], "--scale"),
    (["--size", "10", "10", "--colour", "--labels"], "--labels"),
    ([], "--size"),
])
def test_cli_usage_errors_exit_2_with_one_line(tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as exit_info:
        masks_main([str(tmp_path / "m.png"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,size,needle", [
    ("m.bmp", ["10", "10"], "unsupported mask format"),
    ("no/m.tif", ["10", "10"], "does not exist"),
    (".", ["10", "10"], "directory"),
    ("big.png", ["9000", "9000"], "too large for PNG"),
])
def test_cli_bad_outputs_exit_2_with_one_line(tmp_path, capsys, name, size, needle):
    assert masks_main([str(tmp_path / name), "--size", *size]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("safron-masks: error:") and needle in err
    assert list(tmp_path.iterdir()) == []


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        masks_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--size", "--seed", "--colour", "--labels", "--scale", "--background", "--tile", "--mpp", "--quiet"):
        assert option in out


# --------------------------------------------------------------- three classes from a binary gland mask

WHITE, PINK, PURPLE = (245, 243, 246), (230, 150, 200), (120, 60, 150)


def test_gland_mask_to_labels_on_constructed_image():
    image = np.empty((40, 60, 3), np.uint8)
    image[:, :30] = WHITE
    image[:, 30:] = PINK
    image[5, 40] = WHITE  # a lone bright pixel in stroma stays stroma (5x5 mean)
    image[20, 10] = PURPLE  # a lone dark pixel in white space stays background
    gland = np.zeros((40, 60), np.uint8)
    gland[30:, :] = 255
    labels = masks.labels_from_gland_mask(image, gland)
    assert (labels[30:] == masks.GLAND).all()
    assert (labels[:30, :27] == masks.BACKGROUND).all()
    assert (labels[:30, 33:] == masks.STROMA).all()
    assert labels[5, 40] == masks.STROMA and labels[20, 10] == masks.BACKGROUND


def test_gland_mask_threshold_is_on_the_darkest_channel():
    gland = np.zeros((8, 8), bool)
    for value, expected in ((masks.BACKGROUND_MIN_CHANNEL, masks.BACKGROUND),
                            (masks.BACKGROUND_MIN_CHANNEL - 1, masks.STROMA)):
        image = np.full((8, 8, 3), 255, np.uint8)
        image[..., 1] = value  # bright in red and blue: only green decides
        assert (masks.labels_from_gland_mask(image, gland) == expected).all()
    rgba = np.full((8, 8, 4), 250, np.uint8)
    rgba[..., 3] = 0
    assert (masks.labels_from_gland_mask(rgba, gland) == masks.BACKGROUND).all()


def test_gland_mask_errors():
    with pytest.raises(ValueError, match="image_rgb"):
        masks.labels_from_gland_mask(np.zeros((8, 8), np.uint8), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="gland_mask"):
        masks.labels_from_gland_mask(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 9)))


@needs_glas
def test_gland_mask_to_labels_on_glas(glas_pairs):
    non_gland = background = 0
    for name, image, gland in glas_pairs:
        labels = masks.labels_from_gland_mask(image, gland)
        np.testing.assert_array_equal(labels == masks.GLAND, gland > 0)
        darkest = np.minimum(np.minimum(image[..., 0], image[..., 1]), image[..., 2])
        is_background, is_stroma = labels == masks.BACKGROUND, labels == masks.STROMA
        non_gland += int((gland == 0).sum())
        background += int(is_background.sum())
        if is_background.sum() > 1000 and is_stroma.sum() > 1000:
            # Background is unstained, bright in every channel, and far brighter than the stroma.
            assert np.median(darkest[is_background]) >= 220, name
            assert np.median(darkest[is_background]) - np.median(darkest[is_stroma]) > 40, name
    # About the paper's 0.1 of the non-gland area; the empty glass beside the tissue in a few images
    # adds the rest.
    assert background / non_gland == pytest.approx(GLAS_BACKGROUND_OF_NON_GLAND, abs=0.001)
    by_name = {name: (image, gland) for name, image, gland in glas_pairs}
    # train_67 is mostly empty glass, train_22 densely packed crypts with hardly any white space.
    for name, low, high in (("train_67.png", 0.5, 1.0), ("train_22.png", 0.0, 0.03)):
        image, gland = by_name[name]
        labels = masks.labels_from_gland_mask(image, gland)
        assert low <= (labels == masks.BACKGROUND).sum() / (gland == 0).sum() <= high, name
