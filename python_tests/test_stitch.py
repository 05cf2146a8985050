"""The differentiable PyTorch stitch against the engine's C++ accumulator, and the training windows against the
engine's mask windows: training must see exactly what a render produces."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the training stitch needs torch (pip install torch)")

from safron import _core, geometry, masks  # noqa: E402
from safron.errors import SafronInputError  # noqa: E402
from safron.stitch import BLENDS, context_size, cut_windows, stitch  # noqa: E402
from safron.train import to_uint8  # noqa: E402

SIZES = [(492, 492), (728, 728), (500, 613), (100, 300), (1, 1)]


def accumulate(patches: np.ndarray, height: int, width: int, blend: str):
    """(sums [H, W, 3], weights [H, W], uint8 image [H, W, 3]) from the C++ accumulator fed as the engine feeds it."""
    plan = geometry.plan(height, width)
    ys, xs = plan.origins()
    accumulator = _core.BandAccumulator(width, plan.ys[-1] + plan.patch, plan.patch, plan.overlap, blend)
    accumulator.add(patches, ys, xs, height)
    sums, weights = accumulator.read_rows(0, height)
    image = np.empty((height, width, 3), np.uint8)
    assert accumulator.finalise(0, height, image) == 0
    return sums, weights, image


def random_patches(count: int, seed: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (count, 3, 256, 256)).astype(dtype)


@pytest.mark.parametrize("blend", BLENDS)
@pytest.mark.parametrize("height,width", SIZES)
def test_stitch_equals_the_accumulator_before_rounding(height, width, blend):
    plan = geometry.plan(height, width)
    patches = random_patches(plan.count, seed=height * 7 + width)
    sums, weights, image = accumulate(patches, height, width, blend)
    stitched = stitch(torch.from_numpy(patches), *plan.origins(), height, width, blend=blend, overlap=plan.overlap)
    assert stitched.shape == (3, height, width) and stitched.dtype == torch.float32
    np.testing.assert_allclose(stitched.permute(1, 2, 0).numpy(), sums / weights[..., None], rtol=0, atol=1e-6)
    # ... and rounds to the engine's pixels.
    np.testing.assert_array_equal(to_uint8(stitched), image)


def test_half_precision_patches_are_widened_as_the_accumulator_widens_them():
    plan = geometry.plan(500, 613)
    patches = random_patches(plan.count, seed=3, dtype=np.float16)
    sums, weights, _ = accumulate(patches, 500, 613, "cosine")
    stitched = stitch(torch.from_numpy(patches), *plan.origins(), 500, 613, blend="cosine")
    np.testing.assert_allclose(stitched.permute(1, 2, 0).numpy(), sums / weights[..., None], rtol=0, atol=1e-6)


@pytest.mark.parametrize("blend", BLENDS)
def test_patches_cut_from_one_image_stitch_back_to_it(blend):
    height, width = 530, 777
    image = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (3, height, width)).astype(np.float32))
    plan = geometry.plan(height, width)
    ys, xs = plan.origins()
    patches = torch.stack([image[:, y:y + 256, x:x + 256] for y, x in zip(ys, xs)])
    stitched = stitch(patches, ys, xs, height, width, blend=blend)
    np.testing.assert_allclose(stitched.numpy(), image.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("blend", BLENDS)
def test_gradient_reaches_each_patch_pixel_with_its_share_of_the_blend(blend):
    height, width = 500, 613
    plan = geometry.plan(height, width)
    ys, xs = plan.origins()
    patches = torch.from_numpy(random_patches(plan.count, seed=5)).requires_grad_()
    upstream = torch.from_numpy(np.random.default_rng(6).normal(size=(3, height, width)).astype(np.float32))
    (stitch(patches, ys, xs, height, width, blend=blend) * upstream).sum().backward()
    # d out(y, x) / d patch_k(ty, tx) = w(ty, tx) / W(y, x), with W the accumulator's summed weight.
    _, weights, _ = accumulate(np.zeros((plan.count, 3, 256, 256), np.float32), height, width, blend)
    ramp = _core.blend_window(blend, 256, plan.overlap)
    window = np.outer(ramp, ramp)
    for k, (y, x) in enumerate(zip(ys, xs)):
        share = upstream.numpy()[:, y:y + 256, x:x + 256] * (window / weights[y:y + 256, x:x + 256])
        np.testing.assert_allclose(patches.grad[k].numpy(), share, rtol=1e-5, atol=1e-7)


def test_stitch_rejects_uncovered_pixels_and_unknown_blends():
    patches = torch.zeros(1, 3, 256, 256)
    with pytest.raises(ValueError, match="do not cover"):
        stitch(patches, [0], [0], 300, 256)
    with pytest.raises(SafronInputError, match="unknown blend 'gaussian'"):
        stitch(patches, [0], [0], 256, 256, blend="gaussian")
    with pytest.raises(ValueError, match="one position per patch"):
        stitch(patches, [0, 1], [0], 256, 256)


@pytest.mark.parametrize("height,width", [(492, 492), (500, 613), (100, 300)])
def test_cut_windows_are_the_windows_the_engine_reads(height, width):
    rng = np.random.default_rng(height + width)
    labels = np.repeat(np.repeat(rng.integers(0, 3, (height // 7 + 1, width // 7 + 1), dtype=np.uint8), 7, 0), 7, 1)
    mask = masks.from_array(labels[:height, :width])
    plan = geometry.plan(height, width)
    margin, window = plan.margin, plan.window
    rows, columns = context_size(plan)
    context = torch.from_numpy(masks.labels_to_model_input(mask.read_labels(-margin, -margin, rows, columns)))
    windows = cut_windows(context, plan)
    assert windows.shape == (plan.count, 3, window, window)
    # The engine reads the window of the patch at (y, x) as mask rows [y - margin, y - margin + window).
    for k, (y, x) in enumerate(zip(*plan.origins())):
        expected = masks.labels_to_model_input(mask.read_labels(y - margin, x - margin, window, window))
        np.testing.assert_array_equal(windows[k].numpy(), expected)


def test_cut_windows_rejects_context_of_the_wrong_size():
    plan = geometry.plan(492, 492)
    with pytest.raises(ValueError, match=r"context must be \[C, 532, 532\]"):
        cut_windows(torch.zeros(3, 492, 492), plan)
