"""Training losses and DiffAugment (safron.losses), the discriminator's hidden features, and unfolding a folded
context convolution so that an exported generator trains again."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the training losses need torch (pip install torch)")

from safron.losses import (  # noqa: E402
    AugmentParams, augment_pair, check_policy, discriminator_loss, feature_matching_loss, generator_adversarial_loss,
    grid_lock_loss, parse_policy, sample_augmentation,
)
from safron.models import Discriminator, FoldedContext, Generator, fold_one_hot, unfold_one_hot  # noqa: E402


def one_hot(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels.long(), 3).permute(0, 3, 1, 2).float() * 2 - 1


def pair(count: int = 3, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mask = one_hot(torch.randint(0, 3, (count, size, size), generator=generator))
    image = torch.rand(count, 3, size, size, generator=generator) * 2 - 1
    return mask, image


# --- policies ------------------------------------------------------------------------------------------------------

def test_policies_parse_in_any_order_to_one_canonical_form():
    assert parse_policy("") == () and parse_policy(" , ") == ()
    assert parse_policy("cutout, color") == ("cutout", "color")
    assert check_policy("cutout,translation,color") == check_policy("color,translation,cutout") == \
        "color,translation,cutout"
    with pytest.raises(ValueError, match="unknown augmentation 'flip'"):
        parse_policy("color,flip")
    with pytest.raises(ValueError, match="twice"):
        parse_policy("color,color")


def test_an_empty_policy_draws_nothing_and_changes_nothing():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    params = sample_augmentation((), 2, 32, 32)
    assert torch.equal(torch.get_rng_state(), state), "no random numbers drawn"
    mask, image = pair(2)
    out_mask, out_image = augment_pair(mask, image, params)
    assert torch.equal(out_mask, mask) and torch.equal(out_image, image)


# --- the transforms ------------------------------------------------------------------------------------------------

def test_translation_moves_mask_and_image_together_by_the_drawn_shift_with_zeros_coming_in():
    mask, _ = pair(4, 40)
    torch.manual_seed(5)
    params = sample_augmentation(("translation",), 4, 40, 40)
    assert any(shift != (0, 0) for shift in params.shift)
    # An image equal to the mask must come out equal to the mask: the same shift for both.
    out_mask, out_image = augment_pair(mask, mask.clone(), params)
    assert torch.equal(out_mask, out_image)
    for k, (dy, dx) in enumerate(params.shift):
        assert max(abs(dy), abs(dx)) <= 5  # 1/8 of 40
        expected = torch.zeros_like(mask[k])
        src = mask[k][:, max(-dy, 0):40 - max(dy, 0), max(-dx, 0):40 - max(dx, 0)]
        expected[:, max(dy, 0):max(dy, 0) + src.shape[1], max(dx, 0):max(dx, 0) + src.shape[2]] = src
        assert torch.equal(out_mask[k], expected), (k, dy, dx)


def test_cutout_zeroes_one_square_of_half_the_side_in_mask_and_image_alike():
    mask, image = pair(6, 32)
    ones = torch.ones_like(image)
    torch.manual_seed(2)
    params = sample_augmentation(("cutout",), 6, 32, 32)
    assert params.hole_size == (16, 16)
    out_mask, out_image = augment_pair(torch.ones_like(mask), ones, params)
    assert torch.equal(out_mask, out_image)
    for k, (y, x) in enumerate(params.hole):
        expected = torch.ones(32, 32)
        expected[max(y, 0):max(y + 16, 0), max(x, 0):max(x + 16, 0)] = 0
        assert torch.equal(out_image[k, 0], expected)
        assert 0 < (expected == 0).sum() <= 256


def test_colour_jitter_touches_the_image_only_and_is_the_identity_at_neutral_parameters():
    mask, image = pair(2)
    torch.manual_seed(3)
    params = sample_augmentation(("color",), 2, 32, 32)
    out_mask, out_image = augment_pair(mask, image, params)
    assert torch.equal(out_mask, mask)
    assert not torch.allclose(out_image, image)
    neutral = AugmentParams(brightness=torch.zeros(2, 1, 1, 1), saturation=torch.ones(2, 1, 1, 1),
                            contrast=torch.ones(2, 1, 1, 1))
    torch.testing.assert_close(augment_pair(mask, image, neutral)[1], image, rtol=0, atol=1e-6)


def test_repeated_parameters_treat_real_and_fake_copies_of_a_tile_alike():
    mask, image = pair(2, 32)
    torch.manual_seed(4)
    params = sample_augmentation(("color", "translation", "cutout"), 2, 32, 32)
    both_mask, both_image = augment_pair(mask.repeat(2, 1, 1, 1), torch.cat([image, image]), params.repeat(2))
    torch.testing.assert_close(both_image[:2], both_image[2:], rtol=0, atol=0)
    alone_mask, alone_image = augment_pair(mask, image, params)
    torch.testing.assert_close(both_image[:2], alone_image, rtol=0, atol=0)
    torch.testing.assert_close(both_mask[2:], alone_mask, rtol=0, atol=0)


def test_augmentation_passes_gradients_to_the_image():
    mask, image = pair(2)
    image.requires_grad_(True)
    torch.manual_seed(6)
    params = sample_augmentation(("color", "translation", "cutout"), 2, 32, 32)
    augment_pair(mask, image, params)[1].sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


# --- losses --------------------------------------------------------------------------------------------------------

def test_bce_and_hinge_losses_take_their_textbook_values():
    real, fake = torch.tensor([[2.0, -0.5]]), torch.tensor([[0.5, -3.0]])
    d_real, d_fake = discriminator_loss("bce", real, fake)
    softplus = torch.nn.functional.softplus
    torch.testing.assert_close(d_real, softplus(-real).mean())
    torch.testing.assert_close(d_fake, softplus(fake).mean())
    torch.testing.assert_close(generator_adversarial_loss("bce", fake), softplus(-fake).mean())
    d_real, d_fake = discriminator_loss("hinge", real, fake)
    assert d_real.item() == pytest.approx((0 + 1.5) / 2) and d_fake.item() == pytest.approx((1.5 + 0) / 2)
    assert generator_adversarial_loss("hinge", fake).item() == pytest.approx(1.25)


def test_feature_matching_is_zero_for_equal_features_and_the_mean_l1_over_layers_otherwise():
    real = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 2, 2)]
    assert feature_matching_loss([r.clone() for r in real], real).item() == 0
    fake = [torch.full((1, 2, 4, 4), 0.5, requires_grad=True), torch.full((1, 3, 2, 2), -2.0, requires_grad=True)]
    real_grad = [r.clone().requires_grad_(True) for r in real]
    loss = feature_matching_loss(fake, real_grad)
    assert loss.item() == pytest.approx((0.5 + 2.0) / 2)
    loss.backward()
    assert all(f.grad is not None for f in fake)
    assert all(r.grad is None for r in real_grad), "the real side is a target, not trained through"
    with pytest.raises(ValueError, match="same, non-zero number of layers"):
        feature_matching_loss(fake[:1], real)


def lattice(period: int, size: int = 256, seed: int = 0) -> torch.Tensor:
    """[1, 3, size, size]: one random period x period cell repeated over the patch."""
    cell = torch.rand(1, 3, period, period, generator=torch.Generator().manual_seed(seed)) - 0.5
    return cell.repeat(1, 1, size // period, size // period)


def test_grid_lock_loss_sees_a_patch_locked_lattice_whole_at_every_period_dividing_its_own():
    for period in (4, 8, 32):
        pattern = lattice(period)
        # The mean absolute deviation of the cell from its mean, for a lattice of this period or one dividing it.
        expected = (pattern - pattern.mean(dim=(2, 3), keepdim=True)).abs().mean().item()
        # Nearly: within P / 2 of the border the local mean sees the point-reflected continuation, not the lattice.
        assert grid_lock_loss(pattern, 32).item() == pytest.approx(expected, rel=0.15)
    assert grid_lock_loss(torch.full((2, 3, 256, 256), 0.7), 32).item() == pytest.approx(0, abs=1e-6)


def test_grid_lock_loss_sees_a_lattice_along_the_patch_border_about_as_well_as_inside():
    pattern = lattice(8)
    band, inside = torch.zeros_like(pattern), torch.zeros_like(pattern)
    band[..., :32, :] = pattern[..., :32, :]  # where a render shows the patch's own pixels beside the overlap
    inside[..., 96:128, :] = pattern[..., 96:128, :]
    assert grid_lock_loss(band, 32).item() > 0.6 * grid_lock_loss(inside, 32).item() > 0


def test_grid_lock_loss_leaves_texture_and_structure_that_do_not_repeat_with_the_patch_grid_nearly_alone():
    generator = torch.Generator().manual_seed(1)
    noise = (torch.rand(4, 3, 256, 256, generator=generator) - 0.5)  # texture at the pixel scale, mean |dev| 0.25
    blob = torch.zeros(1, 3, 256, 256)
    blob[..., 70:170, 40:190] = 1.0  # a gland-sized region, at no particular phase
    locked = grid_lock_loss(lattice(16, seed=2) * 0.5, 32).item()
    # Each cell is a mean over 64 pixels spread over the patch: noise shrinks about 8-fold. A sharp region's edges
    # leave a floor (they differ from their local mean, at a phase that depends on where the region lies).
    assert grid_lock_loss(noise, 32).item() < 0.25 / 4 < locked
    assert grid_lock_loss(blob, 32).item() < locked / 2


def test_grid_lock_loss_does_not_see_colour_or_smooth_gradients():
    image = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(3)) - 0.5 + lattice(8) * 0.3
    ramp = torch.linspace(-1, 1, 256)[None, None, :, None] * torch.tensor([0.5, -1.0, 0.2])[None, :, None, None]
    plane = ramp + ramp.transpose(2, 3) + 0.4  # a colour and a gradient across the patch in both directions
    assert grid_lock_loss(plane.expand(1, 3, 256, 256), 32).item() == pytest.approx(0, abs=1e-6)
    assert grid_lock_loss(image + plane, 32).item() == pytest.approx(grid_lock_loss(image, 32).item(), rel=1e-4)
    image.requires_grad_()
    grid_lock_loss(image, 32).backward()
    push, total = image.grad.sum(dim=(2, 3)).abs(), image.grad.abs().sum(dim=(2, 3))
    assert (push < 1e-5 * total).all(), "no push on a patch's mean colour"
    assert (total > 0).all()
    with pytest.raises(ValueError, match="divide"):
        grid_lock_loss(image, 24)
    with pytest.raises(ValueError, match="three times"):
        grid_lock_loss(image, 128)



def deviation(pattern: torch.Tensor) -> float:
    """A lattice's mean absolute deviation from its mean: what either fold sees of it whole."""
    return (pattern - pattern.mean(dim=(2, 3), keepdim=True)).abs().mean().item()


def test_class_fold_sees_a_lattice_drawn_inside_one_class_whole_where_the_patch_fold_sees_a_fraction():
    pattern = lattice(16, seed=4)
    noise = (torch.rand(8, 3, 256, 256, generator=torch.Generator().manual_seed(5)) - 0.5) * 0.2
    inside = torch.zeros(8, 1, 256, 256)
    inside[..., 64:192, 64:192] = 1  # a large gland in every patch: a quarter of each
    patches = noise + pattern * inside
    others = 1 - inside
    both = torch.cat([inside, others], dim=1)
    # The gland class alone: its fold holds the lattice whole (its local mean is taken over the whole patch, so the
    # gland's edge blurs it within P / 2 of the edge: most of it survives, not all).
    assert grid_lock_loss(patches, 32, inside).item() > 0.7 * deviation(pattern)
    # The patch fold dilutes it by the gland's share of the patch.
    assert grid_lock_loss(patches, 32).item() < 0.5 * deviation(pattern)
    # Over both classes: the mean of the gland's term and the other class's, which sees the edge and noise only.
    assert grid_lock_loss(patches, 32, both).item() > 0.4 * deviation(pattern) > grid_lock_loss(patches, 32, others)


def test_class_fold_keeps_lattices_of_opposite_sign_in_two_classes_from_cancelling():
    pattern = lattice(8, seed=6)
    left = torch.zeros(4, 1, 256, 256)
    left[..., :128] = 1
    patches = pattern * left - pattern * (1 - left)
    classes = torch.cat([left, 1 - left], dim=1)
    assert grid_lock_loss(patches, 32, classes).item() > 0.8 * deviation(pattern)
    assert grid_lock_loss(patches, 32).item() < 0.3 * deviation(pattern)


def test_class_fold_pools_the_steps_patches_so_texture_leaves_less_in_it():
    noise = torch.rand(10, 3, 256, 256, generator=torch.Generator().manual_seed(7)) - 0.5
    ones = torch.ones(10, 1, 256, 256)
    patch_fold, class_fold = grid_lock_loss(noise, 64).item(), grid_lock_loss(noise, 64, ones).item()
    # 16 positions per phase and patch, against 160 pooled: about sqrt(10) less.
    assert class_fold < patch_fold / 2.5
    # A lattice shared by every patch is seen as whole by both.
    locked = noise * 0.1 + lattice(64, seed=8)
    assert grid_lock_loss(locked, 64, ones).item() == pytest.approx(deviation(lattice(64, seed=8)), rel=0.15)


def test_class_fold_leaves_out_classes_too_small_to_average_texture():
    image = (torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(9)) - 0.5 + lattice(8)).requires_grad_()
    speck = torch.zeros(2, 1, 256, 256)
    speck[..., :10, :10] = 1  # 200 pixels: under 16 per phase of a 32 x 32 cell
    assert grid_lock_loss(image, 32, speck).item() == 0
    grid_lock_loss(image, 32, speck).backward()  # a step where no class is kept still backpropagates
    assert image.grad is not None and float(image.grad.abs().sum()) == 0
    kept = grid_lock_loss(image, 32, torch.cat([speck, 1 - speck], dim=1)).item()
    assert kept == pytest.approx(grid_lock_loss(image, 32, 1 - speck).item())


def test_class_fold_does_not_see_colour_or_smooth_gradients_and_checks_its_mask():
    ramp = torch.linspace(-1, 1, 256)[None, None, :, None] * torch.tensor([0.5, -1.0, 0.2])[None, :, None, None]
    plane = (ramp + ramp.transpose(2, 3) + 0.4).expand(3, 3, 256, 256)
    halves = torch.zeros(3, 2, 256, 256)
    halves[:, 0, :100] = 1
    halves[:, 1, 100:] = 1
    assert grid_lock_loss(plane, 64, halves).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match=r"classes must be \[3, K, 256, 256\]"):
        grid_lock_loss(plane, 64, halves[:2])
    with pytest.raises(ValueError, match="classes must be"):
        grid_lock_loss(plane, 64, halves[:, :, :128])

def test_the_discriminators_features_lead_to_its_logits():
    discriminator = Discriminator(ndf=4).eval()
    mask, image = pair(2, 128)
    logits, features = discriminator.logits_and_features(mask, image)
    torch.testing.assert_close(logits, discriminator(mask, image), rtol=0, atol=0)
    assert len(features) == len(discriminator.layers) - 1
    assert [f.shape[1] for f in features] == [4, 8, 16, 32, 32, 32]
    with pytest.raises(ValueError, match="one N, H and W"):
        discriminator.logits_and_features(mask, image[:, :, :64])


# --- unfolding -----------------------------------------------------------------------------------------------------

def test_unfolding_a_folded_generator_gives_the_same_images_from_a_plain_context_convolution():
    generator = Generator(ngf=4).eval()
    with torch.no_grad():  # weights unlike the near-zero initialisation, so that the fold's rounding would show
        generator.context.weight.normal_(0, 0.05)
    folded = fold_one_hot(copy.deepcopy(generator))
    unfolded = unfold_one_hot(copy.deepcopy(folded))
    assert isinstance(folded.context, FoldedContext) and not isinstance(unfolded.context, FoldedContext)
    assert unfolded.context.weight.shape == generator.context.weight.shape and unfolded.context.bias is None
    masks = one_hot(torch.from_numpy(np.random.default_rng(0).integers(0, 3, (2, 296, 296))))
    with torch.no_grad():
        expected = generator(masks)
        torch.testing.assert_close(unfolded(masks), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(fold_one_hot(copy.deepcopy(unfolded))(masks), expected, rtol=0, atol=1e-4)
    assert unfold_one_hot(generator) is generator, "a plain generator is left as it is"
    assert set(unfolded.state_dict()) == set(generator.state_dict())
