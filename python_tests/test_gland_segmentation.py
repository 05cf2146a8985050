"""The gland segmenter of the evaluation protocol: Dice, padding to the stride, input checks and the shipped model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from safron.errors import ModelError, SafronInputError
from safron.gland_segmentation import SEGMENTER_PATH, dice, open_segmenter, pad_to_stride, segment_glands

GLAS_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "glas" / "testA"
TEST_IMAGES = ("testA_1", "testA_2", "testA_3", "testA_4", "testA_5")


def _mask(shape, *boxes):
    mask = np.zeros(shape, bool)
    for y0, y1, x0, x1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def test_dice_of_hand_made_masks():
    predicted = _mask((4, 5), (0, 2, 0, 2))  # 4 pixels
    truth = _mask((4, 5), (0, 2, 1, 4))  # 6 pixels, 2 of them shared
    assert dice(predicted, truth) == pytest.approx(2 * 2 / (4 + 6))
    assert dice(truth, predicted) == pytest.approx(0.4)
    assert dice(truth, truth) == 1.0
    assert dice(predicted, ~predicted) == 0.0


def test_dice_of_empty_masks():
    empty, one = np.zeros((3, 3), bool), _mask((3, 3), (1, 2, 1, 2))
    assert dice(empty, empty) == 1.0  # no gland and none found: agreement, by definition
    assert dice(empty, one) == 0.0
    assert dice(one, empty) == 0.0


def test_dice_rejects_masks_that_are_not_bool_or_differ_in_shape():
    with pytest.raises(SafronInputError, match="truth must be a bool mask, got uint8"):
        dice(np.zeros((2, 2), bool), np.full((2, 2), 255, np.uint8))
    with pytest.raises(SafronInputError, match=r"differ in shape \(\(2, 2\) vs \(2, 3\)\)"):
        dice(np.zeros((2, 2), bool), np.zeros((2, 3), bool))


@pytest.mark.parametrize("shape", [(301, 517), (32, 64), (1, 1), (2, 45), (70, 3)])
def test_pad_to_stride_reflects_to_multiples_of_the_stride(shape):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    padded = pad_to_stride(image, 32)
    assert padded.shape[0] % 32 == 0 and padded.shape[1] % 32 == 0 and padded.shape[2] == 3
    assert padded.shape[0] - shape[0] < 32 and padded.shape[1] - shape[1] < 32
    np.testing.assert_array_equal(padded[:shape[0], :shape[1]], image)
    if shape[0] > 1 and padded.shape[0] > shape[0]:
        # Reflection about the last row, which is not repeated (numpy's "reflect").
        np.testing.assert_array_equal(padded[shape[0], :shape[1]], image[shape[0] - 2])


@pytest.mark.parametrize("shape", [(301, 517), (522, 775), (17, 5)])
def test_segment_glands_returns_bool_masks_of_each_input_size(shape):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (*shape, 3), dtype=np.uint8), np.full((40, 33, 3), 230, np.uint8)]
    masks = segment_glands(images, threads=1)
    assert [m.shape for m in masks] == [shape, (40, 33)]
    assert all(m.dtype == np.bool_ for m in masks)


def test_segment_glands_is_the_same_for_one_image_or_many():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (64 + 7 * i, 96, 3), dtype=np.uint8) for i in range(3)]
    together = segment_glands(images, threads=1)
    for image, mask in zip(images, together):
        np.testing.assert_array_equal(segment_glands([image], threads=1)[0], mask)


@pytest.mark.parametrize("image, message", [
    (np.zeros((10, 10, 3), np.float32), r"image 0: expected a uint8 \(H, W, 3\) RGB array, got float32 \(10, 10, 3\)"),
    (np.zeros((10, 10), np.uint8), r"got uint8 \(10, 10\)"),
    (np.zeros((10, 10, 4), np.uint8), r"got uint8 \(10, 10, 4\)"),
    (np.zeros((0, 10, 3), np.uint8), r"got uint8 \(0, 10, 3\)"),
])
def test_segment_glands_rejects_bad_images_in_one_line(image, message):
    good = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(SafronInputError, match=message.replace("image 0", "image 1")) as raised:
        segment_glands([good, image])
    assert "\n" not in str(raised.value)


def test_segment_glands_wants_a_list_not_one_image():
    with pytest.raises(SafronInputError, match=r"takes a list of images, got one \(20, 30, 3\) array: pass \[image\]"):
        segment_glands(np.zeros((20, 30, 3), np.uint8))


def test_a_missing_model_is_a_one_line_error(tmp_path):
    missing = tmp_path / "nowhere.onnx"
    with pytest.raises(ModelError, match="nowhere.onnx: gland segmenter not found") as raised:
        segment_glands([np.zeros((8, 8, 3), np.uint8)], model=missing)
    assert isinstance(raised.value, SafronInputError) and "\n" not in str(raised.value)


def test_a_file_that_is_not_onnx_is_a_one_line_error(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="junk.onnx: not a loadable ONNX model") as raised:
        segment_glands([np.zeros((8, 8, 3), np.uint8)], model=junk)
    assert "\n" not in str(raised.value)


def test_a_model_without_the_stride_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    shape = ["N", 3, "H", "W"]
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], ["gland_logit"], axes=[1], keepdims=1)], "no_stride",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("gland_logit", TensorProto.FLOAT, ["N", 1, "H", "W"])],
    )
    path = tmp_path / "no_stride.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    with pytest.raises(ModelError, match="no positive integer 'safron.segmenter.stride'"):
        segment_glands([np.zeros((8, 8, 3), np.uint8)], model=path)


def test_the_shipped_model_is_small_and_states_its_stride():
    assert SEGMENTER_PATH.stat().st_size <= 8 * 2**20
    _, stride = open_segmenter()
    assert stride in (16, 32, 64)


@pytest.mark.needs_data
@pytest.mark.skipif(not (GLAS_TEST / "masks").is_dir(), reason=f"GlaS testA not found at {GLAS_TEST}")
def test_the_shipped_model_finds_glas_test_glands():
    from PIL import Image

    glas = GLAS_TEST
    images, truths = [], []
    for name in TEST_IMAGES:
        with Image.open(glas / "images" / f"{name}.png") as image, Image.open(glas / "masks" / f"{name}.png") as mask:
            images.append(np.asarray(image.convert("RGB")))
            truths.append(np.asarray(mask) > 127)
    scores = [dice(mask, truth) for mask, truth in zip(segment_glands(images, threads=1), truths)]
    # Measured 0.871 on these five when the model was trained (GLAND_SEGMENTER_CARD.md); testA_1 is the
    # hardest of all 60 (0.680). The bound is three points below: a drift in preprocessing or padding fails it.
    assert np.mean(scores) >= 0.84, scores
