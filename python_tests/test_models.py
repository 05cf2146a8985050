"""The generator and discriminator: shapes, parameter counts, per-patch exactness, dropout, bottleneck, configs."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch models need torch (pip install torch)")
from torch import nn  # noqa: E402

from safron.errors import SafronInputError  # noqa: E402
from safron.models import Discriminator, Generator, count_parameters, normalisation_layers  # noqa: E402

# Small widths keep the forward passes cheap; the architecture is the same at every width.
NGF = 8


def random_masks(count: int, size: int = 296, seed: int = 0, blob: int = 23) -> torch.Tensor:
    """±1 one-hot masks [count, 3, size, size] of blocky random classes, so every class and many edges appear."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 3, (count, size // blob + 1, size // blob + 1), generator=generator)
    labels = coarse.repeat_interleave(blob, dim=1).repeat_interleave(blob, dim=2)[:, :size, :size]
    return nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 2 - 1


@pytest.fixture(scope="module")
def masks() -> torch.Tensor:
    return random_masks(2)


def seeded_generator(**options) -> Generator:
    torch.manual_seed(0)
    return Generator(ngf=NGF, **options)


def per_patch(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(batch[i:i + 1]) for i in range(batch.shape[0])])


def with_batch_norm(model: nn.Module) -> nn.Module:
    """The model with every InstanceNorm swapped for a BatchNorm of the same width: the official code's layer."""
    for name, layer in normalisation_layers(model).items():
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, nn.BatchNorm2d(layer.num_features))
    return model


# --- shapes and geometry ---------------------------------------------------------------------------------------

def test_generator_maps_a_296_window_to_a_256_patch_in_tanh_range(masks):
    with torch.no_grad():
        images = seeded_generator().eval()(masks)
    assert images.shape == (2, 3, 256, 256)
    assert torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
    # A degenerate network (e.g. a zeroed path) would give a flat image.
    assert images.std() > 1e-3


def test_context_kernel_is_window_minus_patch_plus_one():
    with torch.device("meta"):
        assert Generator(ngf=NGF).context.kernel_size == (41, 41)
        assert Generator(ngf=NGF, window=300, patch=256).context.kernel_size == (45, 45)
        assert Generator(ngf=NGF, window=256, patch=256).context.kernel_size == (1, 1)


@pytest.mark.parametrize(
    "options",
    [
        {"window": 297},              # odd margin: the patch would sit between two pixels
        {"window": 250},              # window smaller than the patch
        {"patch": 200, "window": 240},  # eight stride-2 levels need a multiple of 256
        {"ngf": 0},
        {"dropout": 1.0},
    ],
)
def test_generator_rejects_impossible_geometry(options):
    with pytest.raises(SafronInputError):
        Generator(**options)


def test_generator_rejects_a_window_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"\[N, 3, 296, 296\].*\[1, 3, 256, 256\]"):
        seeded_generator()(torch.zeros(1, 3, 256, 256))


def logit_map_side(tile: int) -> int:
    """Output side of the discriminator's 4x4 convolutions, each padded by 1: five of stride 2, two of stride 1."""
    side = tile
    for stride in (2, 2, 2, 2, 2, 1, 1):
        side = (side + 2 - 4) // stride + 1
    return side


@pytest.mark.parametrize("tile", [728, 492])
def test_discriminator_logit_map_size(tile):
    assert logit_map_side(728) == 20  # DESIGN.md's figure, checking the helper itself
    torch.manual_seed(0)
    discriminator = Discriminator(ndf=NGF)
    mask, image = random_masks(1, size=tile), torch.rand(1, 3, tile, tile) * 2 - 1
    with torch.no_grad():
        logits = discriminator(mask, image)
    side = logit_map_side(tile)
    assert logits.shape == (1, 1, side, side)
    score = Discriminator.score(logits)
    assert score.shape == (1,)
    assert torch.allclose(score, logits.flatten().mean())


def test_discriminator_rejects_mismatched_mask_and_image():
    with pytest.raises(ValueError, match="one N, H and W"):
        Discriminator(ndf=NGF)(torch.zeros(1, 3, 492, 492), torch.zeros(1, 3, 492, 500))


# --- parameter counts ----------------------------------------------------------------------------------------

def conv_parameters(c_in: int, c_out: int, kernel: int, bias: bool) -> int:
    return c_in * c_out * kernel * kernel + (c_out if bias else 0)


def affine_norm_parameters(channels: int) -> int:
    return 2 * channels


def expected_generator_parameters(ngf: int, channels: int = 3, kernel: int = 41) -> int:
    """Counted from the layer list: convolutions followed by an affine norm carry no bias (the norm's shift
    replaces it); the outermost encoder level, the 1x1 bottleneck and the output layer have no norm, so a bias."""
    widths = [ngf, 2 * ngf, 4 * ngf, 8 * ngf, 8 * ngf, 8 * ngf, 8 * ngf, 8 * ngf]
    total = conv_parameters(channels, ngf, kernel, bias=False)  # context convolution
    total += conv_parameters(ngf, widths[0], 4, bias=True)  # outermost encoder level
    for level in range(1, 7):
        total += conv_parameters(widths[level - 1], widths[level], 4, bias=False)
        total += affine_norm_parameters(widths[level])
    total += conv_parameters(widths[6], widths[7], 4, bias=True)  # bottleneck
    total += conv_parameters(widths[7], widths[6], 4, bias=False) + affine_norm_parameters(widths[6])
    for level in range(6, 0, -1):  # skip-concatenated inputs: twice the mirrored width
        total += conv_parameters(2 * widths[level], widths[level - 1], 4, bias=False)
        total += affine_norm_parameters(widths[level - 1])
    total += conv_parameters(2 * widths[0], channels, 4, bias=True)  # output layer, tanh
    return total


def expected_discriminator_parameters(ndf: int, channels: int = 6) -> int:
    widths = [ndf, 2 * ndf, 4 * ndf, 8 * ndf, 8 * ndf, 8 * ndf]
    total = conv_parameters(channels, widths[0], 4, bias=True)
    for previous, width in zip(widths, widths[1:]):
        total += conv_parameters(previous, width, 4, bias=False) + affine_norm_parameters(width)
    return total + conv_parameters(widths[-1], 1, 4, bias=True)


@pytest.mark.parametrize("width", [64, 32, 8])
def test_parameter_counts_follow_the_layer_list(width):
    with torch.device("meta"):  # no memory, no initialisation cost: only shapes are needed
        generator, discriminator = Generator(ngf=width), Discriminator(ndf=width)
    assert count_parameters(generator) == expected_generator_parameters(width)
    assert count_parameters(discriminator) == expected_discriminator_parameters(width)


def test_paper_width_has_about_55_million_generator_parameters():
    with torch.device("meta"):
        assert 54e6 < count_parameters(Generator(ngf=64)) < 56e6


# --- per-patch exactness -------------------------------------------------------------------------------------

def test_batched_generator_equals_per_patch_generator_in_eval(masks):
    generator = seeded_generator().eval()
    with torch.no_grad():
        difference = (generator(masks) - per_patch(generator, masks)).abs().max()
    assert difference < 1e-5


def test_batching_is_exact_in_training_with_instance_norm_but_not_batch_norm(masks):
    """Same weights, dropout off, training mode: only the normalisation layer differs between the two runs."""
    generator = seeded_generator(dropout=0.0).train()
    with torch.no_grad():
        instance_difference = (generator(masks) - per_patch(generator, masks)).abs().max()
        batch_norm = with_batch_norm(generator).train()
        batch_norm_difference = (batch_norm(masks) - per_patch(batch_norm, masks)).abs().max()
    assert instance_difference < 1e-5
    assert batch_norm_difference > 1e-2


# --- dropout and bottleneck ----------------------------------------------------------------------------------

def test_dropout_acts_in_training_only(masks):
    generator = seeded_generator()
    mask = masks[:1]
    with torch.no_grad():
        generator.eval()
        assert torch.equal(generator(mask), generator(mask))
        generator.train()
        assert (generator(mask) - generator(mask)).abs().max() > 1e-3


def test_dropout_sits_on_the_three_innermost_decoder_levels():
    with torch.device("meta"):
        generator = Generator(ngf=NGF)
    dropout_levels = [i for i, level in enumerate(generator.decoder) if any(isinstance(m, nn.Dropout) for m in level)]
    assert dropout_levels == [0, 1, 2]
    assert all(m.p == 0.5 for m in generator.modules() if isinstance(m, nn.Dropout))


def test_bottleneck_carries_the_input_through(masks):
    generator = seeded_generator().eval()
    bottleneck = generator.encoder[-1]
    captured = []
    handle = bottleneck.register_forward_hook(lambda module, inputs, output: captured.append(output))
    with torch.no_grad():
        generator(masks)
    handle.remove()
    (codes,) = captured
    assert codes.shape == (2, 8 * NGF, 1, 1)
    assert normalisation_layers(bottleneck) == {}
    # Normalising a 1x1 map would leave only its shift, the same for every mask (the official code's defect);
    # ours must depend on the mask and be more than the convolution's bias.
    assert (codes[0] - codes[1]).abs().max() > 1e-3
    assert (codes - bottleneck.conv.bias.view(1, -1, 1, 1)).abs().max() > 1e-3


# --- normalisation layers and configs ------------------------------------------------------------------------

def test_normalisation_layers_are_the_instance_norms_named_norm():
    with torch.device("meta"):
        generator, discriminator = Generator(ngf=NGF), Discriminator(ndf=NGF)
    for model, expected_count in ((generator, 6 + 7), (discriminator, 5)):
        layers = normalisation_layers(model)
        instance_norms = [m for m in model.modules() if isinstance(m, nn.InstanceNorm2d)]
        assert len(layers) == len(instance_norms) == expected_count
        assert all(name.endswith(".norm") for name in layers)
        assert all(m.affine and not m.track_running_stats for m in instance_norms)
    assert "encoder.7.norm" not in normalisation_layers(generator)


def test_generator_config_round_trips_through_json():
    original = Generator(ngf=NGF, window=300, patch=256, dropout=0.25).eval()
    config = json.loads(json.dumps(original.config()))
    rebuilt = Generator.from_config(config).eval()
    assert rebuilt.config() == original.config()
    assert rebuilt.context.kernel_size == (45, 45) and rebuilt.dropout == 0.25
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    mask = random_masks(1, size=300)
    with torch.no_grad():
        assert torch.equal(rebuilt(mask), original(mask))


def test_discriminator_config_round_trips_through_json():
    original = Discriminator(ndf=NGF)
    rebuilt = Discriminator.from_config(json.loads(json.dumps(original.config())))
    assert rebuilt.config() == original.config()
    rebuilt.load_state_dict(original.state_dict(), strict=True)


@pytest.mark.parametrize(
    "config",
    [
        {"architecture": "safron.Discriminator", "ndf": 8},
        {"ngf": 8},
        {"architecture": "safron.Generator", "ngf": 8, "depth": 9},
        ["not", "a", "dict"],
    ],
)
def test_generator_from_config_rejects_foreign_configs(config):
    with pytest.raises(SafronInputError):
        Generator.from_config(config)


# --- the resize-convolution decoder --------------------------------------------------------------------------------

def _nyquist_energy(image: torch.Tensor) -> float:
    """Mean |pixel - mean of its 2x2 block's other phase|: what a period-2 checkerboard adds, relative to the
    image's overall variation."""
    centre = image[..., 16:-16, 16:-16]
    even, odd = centre[..., 0::2, 0::2], centre[..., 1::2, 1::2]
    checker = (even - odd).abs().mean()
    return float(checker / (centre - centre.mean()).abs().mean().clamp_min(1e-12))


def test_resize_decoder_keeps_the_contract_and_round_trips_its_config(masks):
    generator = seeded_generator(upsample="resize").eval()
    with torch.no_grad():
        out = generator(masks)
    assert out.shape == (2, 3, 256, 256) and out.abs().max() <= 1
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in generator.modules())
    config = json.loads(json.dumps(generator.config()))
    assert config["upsample"] == "resize"
    rebuilt = Generator.from_config(config).eval()
    rebuilt.load_state_dict(generator.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(rebuilt(masks), out)
    # Configs written before the option existed describe the transposed decoder.
    legacy = {k: v for k, v in seeded_generator().config().items() if k != "upsample"}
    assert Generator.from_config(legacy).upsample == "transpose"
    with pytest.raises(SafronInputError, match="upsample must be one of transpose, resize"):
        Generator(ngf=NGF, upsample="bilinear")


def test_only_the_transposed_decoder_draws_a_checkerboard_at_initialisation():
    """Odena et al.'s observation, on this U-Net: with random weights, a uniform mask gives the transposed decoder
    a period-2 pattern that the resize decoder does not have."""
    uniform = -torch.ones(1, 3, 296, 296)
    uniform[:, 0] = 1  # all stroma
    energies = {}
    for upsample in ("transpose", "resize"):
        generator = seeded_generator(upsample=upsample).eval()
        with torch.no_grad():
            for parameter in generator.parameters():  # weights large enough for every layer to matter
                parameter.add_(torch.randn_like(parameter) * 0.05)
            energies[upsample] = _nyquist_energy(generator(uniform))
    assert energies["transpose"] > 3 * energies["resize"], energies


def test_resizing_then_3x3_is_the_transposed_convolution_of_its_transposed_kernel():
    """The identity `resize_decoder` rests on, borders included, in float64 so that only rounding separates them."""
    from safron.models import resize_kernel, transposed_kernel

    torch.manual_seed(0)
    weight = torch.randn(5, 7, 3, 3, dtype=torch.float64)  # [out, in, 3, 3]
    features = torch.randn(2, 7, 9, 11, dtype=torch.float64)
    resized = nn.functional.conv2d(nn.functional.interpolate(features, scale_factor=2, mode="nearest"), weight,
                                   padding=1)
    transposed = nn.functional.conv_transpose2d(features, transposed_kernel(weight), stride=2, padding=1)
    assert transposed.shape == resized.shape == (2, 5, 18, 22)
    torch.testing.assert_close(transposed, resized, rtol=0, atol=1e-12)
    torch.testing.assert_close(resize_kernel(transposed_kernel(weight)), weight, rtol=0, atol=1e-12)


def test_resize_kernel_takes_out_exactly_the_checkerboard_part():
    """A transposed kernel = its resize part + a rest orthogonal to every resize kernel, and the rest alone draws
    a constant input as a pure period-2 pattern (zero mean over each 2 x 2 cell, away from the border)."""
    from safron.models import resize_kernel, transposed_kernel

    torch.manual_seed(1)
    kernel = torch.randn(4, 3, 4, 4, dtype=torch.float64)  # [in, out, 4, 4]
    rest = kernel - transposed_kernel(resize_kernel(kernel))
    assert rest.abs().max() > 0.1  # a random kernel is not checkerboard-free
    other = transposed_kernel(torch.randn(3, 4, 3, 3, dtype=torch.float64))
    assert abs(float((rest * other).sum())) < 1e-10
    flat = nn.functional.conv_transpose2d(torch.ones(1, 4, 6, 6, dtype=torch.float64), rest, stride=2, padding=1)
    inner = flat[:, :, 2:-2, 2:-2]
    cells = inner.reshape(1, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    assert inner.abs().max() > 0.1 and cells.abs().max() < 1e-12


@pytest.mark.parametrize("folded", [False, True])
def test_resize_decoder_keeps_a_checkerboard_free_generator_and_everything_but_the_decoder(masks, folded):
    from safron.models import fold_one_hot, resize_decoder, transposed_kernel

    source = seeded_generator(upsample="resize").eval()
    twin = seeded_generator(upsample="transpose").eval()
    state = source.state_dict()
    for index in range(len(twin.decoder)):
        state[f"decoder.{index}.conv.weight"] = transposed_kernel(state[f"decoder.{index}.conv.weight"])
    twin.load_state_dict(state)  # a transposed decoder whose kernels lie in the resize subspace
    if folded:
        fold_one_hot(twin)
    converted = resize_decoder(twin)
    assert converted.upsample == "resize" and twin.upsample == "transpose" and not converted.training
    assert isinstance(converted.context, type(twin.context))
    with torch.no_grad():
        torch.testing.assert_close(converted(masks), twin(masks), rtol=0, atol=2e-5)
        torch.testing.assert_close(converted(masks), source(masks), rtol=0, atol=2e-5)
    assert resize_decoder(converted) is converted


def test_resize_decoder_removes_the_transposed_decoders_checkerboard():
    from safron.models import resize_decoder

    uniform = -torch.ones(1, 3, 296, 296)
    uniform[:, 0] = 1
    generator = seeded_generator(upsample="transpose").eval()
    with torch.no_grad():
        for parameter in generator.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
        before, after = (_nyquist_energy(model(uniform)) for model in (generator, resize_decoder(generator)))
    assert after * 3 < before, (before, after)


@pytest.mark.parametrize("options", [{}, {"context": "dilated"}, {"noise_channels": 2}, {"fold": True}],
                         ids=["dense", "dilated", "noise", "folded"])
def test_transposed_decoder_draws_what_the_resizing_decoder_draws(masks, options):
    """The export's rewrite: the same function up to rounding, a transposed generator's layout (config and keys), and
    `resize_decoder` takes it back to the very weights it came from."""
    from safron.models import fold_one_hot, resize_decoder, transposed_decoder

    options = dict(options)
    fold = options.pop("fold", False)
    resizing = seeded_generator(upsample="resize", **options).eval()
    with torch.no_grad():
        for parameter in resizing.parameters():  # weights large enough for every layer to matter
            parameter.add_(torch.randn_like(parameter) * 0.05)
    if fold:
        fold_one_hot(resizing)
    original = {key: value.clone() for key, value in resizing.state_dict().items()}
    noise = torch.rand(len(masks), 2, 296, 296) * 2 - 1 if resizing.noise_channels else None
    with torch.no_grad():
        expected = resizing(masks, noise)
        transposed = transposed_decoder(resizing)
        assert transposed is resizing and transposed.upsample == "transpose"
        assert all(isinstance(level.conv, nn.ConvTranspose2d) and not hasattr(level, "resize")
                   for level in transposed.decoder)
        torch.testing.assert_close(transposed(masks, noise), expected, rtol=0, atol=2e-5)
        assert expected.std() > 0.05  # not a flat image: every layer shows
        # A generator built from the rewritten config takes the rewritten weights as they are.
        rebuilt = Generator.from_config(transposed.config()).eval()
        if fold:
            fold_one_hot(rebuilt)
        rebuilt.load_state_dict(transposed.state_dict())
        torch.testing.assert_close(rebuilt(masks, noise), expected, rtol=0, atol=2e-5)
        back = resize_decoder(transposed)
    assert back.upsample == "resize" and back.state_dict().keys() == original.keys()
    for key, value in back.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=1e-6)
    assert transposed_decoder(seeded_generator()).upsample == "transpose"  # nothing to rewrite


# --- the dilated context reader ------------------------------------------------------------------------------------

@pytest.mark.parametrize("margin,dilations", [(20, [1, 2, 4, 8, 5]), (22, [1, 2, 4, 8, 7]), (15, [1, 2, 4, 8]),
                                              (1, [1])])
def test_context_dilations_add_up_to_the_margin(margin, dilations):
    from safron.models import context_dilations

    assert context_dilations(margin) == dilations and sum(dilations) == margin


def test_dilated_context_keeps_the_contract_and_reaches_as_far_as_the_dense_one():
    generator = seeded_generator(context="dilated").eval()
    masks = random_masks(2)
    with torch.no_grad():
        out = generator(masks)
    assert out.shape == (2, 3, 256, 256)
    assert generator.config()["context"] == "dilated"
    dense_parameters = count_parameters(seeded_generator().context)
    assert count_parameters(generator.context) < dense_parameters / 4
    # Reach: an output pixel changes when the mask changes 20 px away (the margin), and not 21 px away.
    probe = torch.zeros_like(masks[:1], requires_grad=True)
    generator.context(probe)[0, :, 0, 0].sum().backward()
    reached = probe.grad[0].abs().sum(dim=0) > 0
    assert reached[:41, :41].all() and not reached[41:].any() and not reached[:, 41:].any()
    legacy = {k: v for k, v in seeded_generator().config().items() if k != "context"}
    assert Generator.from_config(legacy).context_kind == "dense"
    with pytest.raises(SafronInputError, match="context must be one of dense, dilated"):
        Generator(ngf=NGF, context="sparse")


def test_fewer_levels_keep_the_contract_with_a_bottleneck_that_sees_part_of_the_patch():
    generator = seeded_generator(levels=5).eval()
    masks = random_masks(2)
    with torch.no_grad():
        assert generator(masks).shape == (2, 3, 256, 256)
        features = nn.functional.leaky_relu(generator.context(masks), 0.2)
        for level in generator.encoder:
            features = level(features)
    assert len(generator.encoder) == len(generator.decoder) == 5
    assert features.shape[-2:] == (8, 8), "256 / 2**5: the bottleneck no longer sees the patch as a whole"
    # The innermost 8 ngf-wide levels go, so most of the U-Net's parameters (here, at width 8: 0.89 M -> 0.30 M).
    assert count_parameters(generator) < count_parameters(seeded_generator()) / 2
    assert generator.config()["levels"] == 5 and Generator.from_config(generator.config()).levels == 5
    legacy = {k: v for k, v in seeded_generator().config().items() if k != "levels"}
    assert Generator.from_config(legacy).levels == 8, "configs stored before the option build the paper's depth"
    for bad in (3, 9, 5.0):
        with pytest.raises(SafronInputError, match="levels must be an integer in"):
            Generator(ngf=NGF, levels=bad)
