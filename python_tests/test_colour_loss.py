"""The colour loss (safron.losses.colour_loss): per mask class, the sliced Wasserstein distance of RGB colours."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the colour loss needs torch (pip install torch)")

from safron.losses import colour_loss  # noqa: E402

SIZE = 64


def _tissue(seed: int) -> torch.Tensor:
    """[1, 3, SIZE, SIZE] in [-1, 1]: dark nuclei and white vacuoles in pink, one colour per pixel at random."""
    rng = np.random.default_rng(seed)
    palette = np.array([[-0.6, -0.8, -0.1], [0.5, -0.1, 0.5], [0.95, 0.95, 0.95]], np.float32)
    choice = rng.choice(3, size=(SIZE, SIZE), p=[0.2, 0.6, 0.2])
    return torch.from_numpy(palette[choice].transpose(2, 0, 1)[None].copy())


def _halves() -> torch.Tensor:
    """Class 1 on the left half, class 2 on the right: [1, 3, SIZE, SIZE]."""
    classes = torch.zeros(1, 3, SIZE, SIZE)
    classes[:, 1, :, :SIZE // 2] = 1
    classes[:, 2, :, SIZE // 2:] = 1
    return classes


def _loss(fake, real, classes, seed=0):
    torch.manual_seed(seed)  # the random directions: the same for every candidate compared
    return float(colour_loss(fake, real, classes))


def test_the_same_colours_anywhere_score_zero_and_their_average_does_not():
    real, classes = _tissue(0), _halves()
    # Every pixel moved within its class: the same colours, none in the same place.
    left, right = real[..., :SIZE // 2], real[..., SIZE // 2:]
    moved = torch.cat([left.flip(-1).flip(-2), right.roll(7, dims=-1).roll(5, dims=-2)], dim=-1)
    assert not torch.equal(moved, real)
    assert _loss(moved, real, classes) == pytest.approx(0, abs=1e-6)
    # What L1 pulls towards: each class's mean colour, or the mid-tones of a blur. Pixel L1 prefers both to the
    # moved colours; the colour loss ranks them the other way.
    means = torch.cat([left.mean(dim=(2, 3), keepdim=True).expand_as(left),
                       right.mean(dim=(2, 3), keepdim=True).expand_as(right)], dim=-1)
    blurred = torch.nn.functional.avg_pool2d(real, 5, 1, 2, count_include_pad=False)
    for average in (means, blurred):
        assert (average - real).abs().mean() < (moved - real).abs().mean()
        assert _loss(average, real, classes) > 0.1


def test_each_class_is_compared_with_its_own_pixels():
    real, classes = _tissue(1), _halves()
    # Left and right swapped: the same colours in the tile as a whole, but each class gets the other's colours.
    tinted = real.clone()
    tinted[:, :, :, SIZE // 2:] = tinted[:, :, :, SIZE // 2:] * 0.3
    swapped = torch.cat([tinted[..., SIZE // 2:], tinted[..., :SIZE // 2]], dim=-1)
    pooled = torch.ones(1, 1, SIZE, SIZE)  # one class over the whole tile
    assert _loss(swapped, tinted, pooled) == pytest.approx(0, abs=1e-6)
    assert _loss(swapped, tinted, classes) > 0.1


def test_gradients_reach_the_generated_tile_only_and_directions_come_from_the_global_generator():
    real, classes = _tissue(2).requires_grad_(), _halves()
    fake = (_tissue(3) * 0.5).requires_grad_()
    torch.manual_seed(5)
    loss = colour_loss(fake, real, classes)
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0 and real.grad is None
    # Reseeding reproduces the value (what keeps a resumed training step exact); another seed projects elsewhere.
    assert _loss(fake.detach(), real.detach(), classes, seed=5) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert _loss(fake.detach(), real.detach(), classes, seed=6) != pytest.approx(float(loss.detach()), rel=1e-6)
