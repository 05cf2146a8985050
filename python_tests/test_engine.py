"""End-to-end renders with contract-meeting ONNX models built in the tests."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile

import onnx_models
from safron import engine, geometry, masks
from safron.errors import SafronInputError


def random_labels(height, width, seed=0, blob=37):
    """Blocky random labels, so that every class appears and edges fall at many offsets."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, size=(height // blob + 2, width // blob + 2), dtype=np.uint8)
    labels = np.repeat(np.repeat(coarse, blob, axis=0), blob, axis=1)
    shift_y, shift_x = rng.integers(0, blob, size=2)
    return np.ascontiguousarray(labels[shift_y:shift_y + height, shift_x:shift_x + width])


@pytest.fixture(scope="module")
def crop_model(tmp_path_factory):
    return onnx_models.centre_crop(tmp_path_factory.mktemp("models") / "crop.onnx")


@pytest.fixture(scope="module")
def mix_model(tmp_path_factory):
    return onnx_models.context_mix(tmp_path_factory.mktemp("models") / "mix.onnx")


SIZES = [(1, 1), (1, 300), (255, 256), (256, 257), (491, 492), (493, 728), (729, 1000), (260, 2600)]


@pytest.mark.parametrize("outset", [0, engine.DEFAULT_OUTSET, 256])
@pytest.mark.parametrize("blend", ["uniform", "linear", "cosine"])
@pytest.mark.parametrize("height,width", SIZES)
def test_centre_crop_reproduces_mask_exactly(crop_model, height, width, blend, outset):
    labels = random_labels(height, width, seed=height * 7 + width)
    image = engine.render_array(labels, model=crop_model, blend=blend, batch_size=3, outset=outset)
    np.testing.assert_array_equal(image, masks.labels_to_colour(labels))


def test_the_outset_takes_the_image_border_from_inside_patches(tmp_path):
    # A generator that draws its patches' outermost 8 px white: inside the image the cosine blend hides them (their
    # weight is nearly 0 there), but without an outset the image's own border is such edge rows, a white frame.
    model = onnx_models.bright_edges(tmp_path / "edges.onnx", edge=8)
    labels = random_labels(600, 700, seed=5)
    colours = masks.labels_to_colour(labels).astype(int)
    frame = np.ones(labels.shape, bool)
    frame[8:-8, 8:-8] = False

    def frame_error(outset):
        image = engine.render_array(labels, model=model, outset=outset).astype(int)
        return np.abs(image - colours)[frame].mean()

    assert frame_error(0) > 100  # white where the mask's colours should be
    assert frame_error(engine.DEFAULT_OUTSET) < frame_error(0) / 10


@pytest.mark.parametrize("outset,message", [(-1, "outset must be an integer >= 0"), (1.5, "outset must be an integer"),
                                            (257, r"outset must be in \[0, 256\] for this model")])
def test_bad_outsets_are_one_line_errors(crop_model, outset, message):
    with pytest.raises(SafronInputError, match=message):
        engine.render_array(random_labels(64, 64, seed=1), model=crop_model, outset=outset)


def test_colour_mask_and_label_mask_render_alike(crop_model):
    labels = random_labels(300, 520, seed=3)
    from_labels = engine.render_array(labels, model=crop_model)
    from_colour = engine.render_array(masks.labels_to_colour(labels), model=crop_model)
    np.testing.assert_array_equal(from_labels, from_colour)


def test_blend_changes_seams_but_not_interiors(mix_model):
    labels = random_labels(600, 600, seed=5)
    uniform = engine.render_array(labels, model=mix_model, blend="uniform").astype(int)
    linear = engine.render_array(labels, model=mix_model, blend="linear").astype(int)
    # Where the first two patch columns overlap the images differ; where only the first patch reaches, not.
    second = int(geometry.plan(600, 600).xs[1])
    assert np.abs(uniform[:, second:256] - linear[:, second:256]).max() > 0
    np.testing.assert_array_equal(uniform[:second, :second], linear[:second, :second])


def test_batch_size_does_not_change_the_image(mix_model):
    labels = random_labels(700, 500, seed=11)
    one = engine.render_array(labels, model=mix_model, batch_size=1)
    many = engine.render_array(labels, model=mix_model, batch_size=7)
    assert np.abs(one.astype(int) - many.astype(int)).max() <= 1


@pytest.mark.parametrize("compression", ["none", "zstd", "deflate"])
def test_render_file_equals_render_array(tmp_path, mix_model, compression):
    labels = random_labels(777, 1030, seed=2)
    mask_path = tmp_path / "mask.tif"
    tifffile.imwrite(mask_path, labels, tile=(128, 128))
    out = tmp_path / "out.tif"
    result = engine.render(mask_path, out, model=mix_model, compression=compression, progress=False, batch_size=5)
    assert (result.height, result.width) == labels.shape
    expected = engine.render_array(labels, model=mix_model, batch_size=5)
    np.testing.assert_array_equal(tifffile.imread(out, level=0), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tif", "out.tif"]  # no canvas/journal left


def test_output_opens_in_openslide_with_pyramid_and_mpp(tmp_path, crop_model):
    labels = random_labels(1100, 1500, seed=9)
    mask_path = tmp_path / "mask.tif"
    # 0.5 um/px as the mask's own resolution (pixels per centimetre)
    tifffile.imwrite(mask_path, labels, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    out = tmp_path / "out.tif"
    engine.render(mask_path, out, model=crop_model, compression="deflate", progress=False)
    with openslide.OpenSlide(out) as slide:
        assert slide.dimensions == (1500, 1100)
        assert slide.level_count == 4  # 1500x1100 -> 750x550 -> 375x275 -> 188x138, the first to fit one tile
        assert slide.level_dimensions[1] == (750, 550)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5, rel=1e-6)
        region = np.asarray(slide.read_region((0, 0), 0, (1500, 1100)).convert("RGB"))
        level2 = np.asarray(slide.read_region((0, 0), 2, slide.level_dimensions[2]).convert("RGB"))
    np.testing.assert_array_equal(region, masks.labels_to_colour(labels))
    assert level2.shape == (275, 375, 3)


def test_default_jpeg_output_is_close_to_lossless(tmp_path, mix_model):
    labels = random_labels(600, 900, seed=12, blob=90)
    mask_path = tmp_path / "mask.tif"
    tifffile.imwrite(mask_path, labels)
    engine.render(mask_path, tmp_path / "out.tif", model=mix_model, progress=False)
    error = np.abs(tifffile.imread(tmp_path / "out.tif", level=0).astype(int)
                   - engine.render_array(labels, model=mix_model).astype(int))
    # JPEG q90 with 4:2:0 chroma: small errors, the largest at class edges.
    assert np.median(error) <= 2 and error.mean() < 4


def test_mpp_option_overrides_the_mask(tmp_path, crop_model):
    mask_path = tmp_path / "mask.png"
    from PIL import Image

    Image.fromarray(masks.labels_to_colour(random_labels(300, 300))).save(mask_path)
    out = tmp_path / "out.tif"
    result = engine.render(mask_path, out, model=crop_model, mpp=0.25, progress=False)
    assert result.mpp == 0.25
    with openslide.OpenSlide(out) as slide:
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25, rel=1e-6)


def test_failed_render_leaves_existing_output_untouched(tmp_path, crop_model):
    colour = masks.labels_to_colour(random_labels(900, 400))
    colour[850, 123] = (255, 255, 0)  # yellow, far below the first band: found mid-render
    mask_path = tmp_path / "mask.tif"
    tifffile.imwrite(mask_path, colour, photometric="rgb")
    out = tmp_path / "out.tif"
    out.write_bytes(b"previous result")
    with pytest.raises(masks.MaskError, match=r"\(255, 255, 0\)"):
        engine.render(mask_path, out, model=crop_model, progress=False)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tif", "out.tif"]


def test_stage_times_are_measured(tmp_path, crop_model):
    mask_path = tmp_path / "mask.tif"
    tifffile.imwrite(mask_path, random_labels(700, 900))
    result = engine.render(mask_path, tmp_path / "out.tif", model=crop_model, progress=False)
    assert set(result.stage_seconds) == set(engine.STAGES)
    for stage in ("read", "prepare", "infer", "accumulate", "finalise", "encode"):
        assert 0 < result.stage_seconds[stage] <= result.seconds, stage
    assert result.megapixels_per_second == pytest.approx(700 * 900 / 1e6 / result.seconds)


def test_a_resume_under_another_outset_is_refused(tmp_path, mix_model, monkeypatch):
    # The journal pins the outset: the border rows of the two grids differ, and a journal from before the outset
    # existed (no entry) must not be continued by a render that has one.
    from safron import canvas

    labels = random_labels(900, 300, seed=8)
    mask, out = tmp_path / "mask.tif", tmp_path / "out.tif"
    tifffile.imwrite(mask, masks.labels_to_colour(labels))
    options = dict(model=mix_model, progress=False, compression="none", batch_size=1, threads=1)

    def stop_after_one_record(self, rows_done, _record=canvas.Journal.record):
        _record(self, rows_done)
        raise KeyboardInterrupt

    monkeypatch.setattr(canvas.Journal, "record", stop_after_one_record)
    with pytest.raises(KeyboardInterrupt):
        engine.render(mask, out, outset=0, **options)
    monkeypatch.undo()
    with pytest.raises(SafronInputError, match="cannot resume: outset differs"):
        engine.render(mask, out, resume=True, **options)
    engine.render(mask, out, outset=0, resume=True, **options)
    np.testing.assert_array_equal(tifffile.imread(out), engine.render_array(labels, model=mix_model, outset=0))
    assert not np.array_equal(tifffile.imread(out), engine.render_array(labels, model=mix_model))


def test_cli_outset_reaches_the_render_and_a_bad_one_is_a_usage_error(tmp_path, capsys):
    from safron.cli.render import main

    model = onnx_models.bright_edges(tmp_path / "edges.onnx")
    labels = random_labels(300, 400, seed=2)
    mask, out = tmp_path / "mask.tif", tmp_path / "out.tif"
    tifffile.imwrite(mask, masks.labels_to_colour(labels))
    common = [str(mask), str(out), "--model", str(model), "--quiet", "--compression", "none"]
    assert main(common + ["--outset", "0"]) == 0
    np.testing.assert_array_equal(tifffile.imread(out), engine.render_array(labels, model=model, outset=0))
    assert main(common) == 0  # the default outset
    np.testing.assert_array_equal(tifffile.imread(out), engine.render_array(labels, model=model))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(common + ["--outset", "-3"])
    assert exit_info.value.code == 2 and "--outset" in capsys.readouterr().err
