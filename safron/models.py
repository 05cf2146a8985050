"""The SAFRON generator and tile-level discriminator (PyTorch), as in the paper's official code, corrected.

Generator: a learned (window - patch + 1)^2 valid convolution (41x41 for 296 -> 256) that reads the mask context
around the patch, then the pix2pix U-Net with eight stride-2 levels down to a 1x1 bottleneck (fewer optional,
`levels`), skip connections
between mirrored levels and a tanh output. It follows the official TensorFlow graph layer for layer, with the
corrections DESIGN.md lists:

* Normalisation is `InstanceNorm2d(affine=True, track_running_stats=False)`. The official code runs BatchNorm in
  training mode on one patch at a time, which *is* per-patch instance normalisation; making that explicit keeps
  its behaviour while letting patches be batched exactly, in training and in inference alike.
* No normalisation at the 1x1 bottleneck: normalising a 1x1 map subtracts its only value, so every mask gave the
  decoder the same bottleneck (the affine shift) in the official code. (PyTorch's InstanceNorm refuses 1x1
  maps outright.)
* Dropout (0.5, on the three innermost decoder levels) is `nn.Dropout`, active in `train()` only; the official
  code also dropped units at test time.

Noise input (not in the paper; `noise_channels`, default 0): extra input channels of uniform noise in [-1, 1], one
value per pixel, added through a 3x3 convolution to what the context layer reads from the mask. Without it a
generator is a deterministic function of the mask, so inside a region of one class wider than its context (a large
gland, a stretch of stroma) the only thing that varies is the distance to the patch's border: whatever texture it
draws there is a function of the position in the patch, a pattern repeating with the patch grid (the lattices and
blocks the model card describes). Noise gives it something else to draw texture from. The engine draws it as a
function of canvas coordinates (`noise.canvas_noise`), so overlapping patches see the same noise where they overlap
and a render stays seamless and reproducible; training draws fresh noise for each tile.

Discriminator: the PatchGAN of the official code, applied to a whole stitched tile (mask and image concatenated),
giving a map of logits (20x20 for a 728 tile).

Normalisation layers are the modules named `norm` (see `normalisation_layers`), so that an fp16 TensorRT
build can pin them to fp32.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .errors import SafronInputError

# Eight stride-2 levels take the patch down to 1x1 at the default 256: the bottleneck sees the whole patch, so the
# generator can decide something for the patch as a whole (its brightness, a lumen in its middle), which shows as
# a block where the next patch decided otherwise. Fewer levels (`levels`) keep every decision local: at 5 the
# bottleneck is 8 x 8 and its receptive field about a third of the patch.
U_NET_LEVELS = 8
MIN_U_NET_LEVELS = 4
# Widths of the U-Net encoder levels in units of ngf, outermost first (pix2pix's unet_256).
_ENCODER_WIDTHS = (1, 2, 4, 8, 8, 8, 8, 8)
# How decoder levels double their resolution: pix2pix's 4x4 stride-2 transposed convolution, or nearest-neighbour
# resizing followed by a 3x3 convolution (Odena, Dumoulin & Olah 2016, "Deconvolution and Checkerboard
# Artifacts"). A stride-2 transposed convolution with a 4x4 kernel covers output pixels unevenly unless its weights
# learn not to, and the small generators trained here kept regular grids of white dots at the period of its deeper
# levels; resizing cannot make them.
UPSAMPLING = ("transpose", "resize")
# How the generator reads the mask context around its patch: the official code's one dense convolution with a
# (window - patch + 1)^2 kernel (41x41), or a stack of 3x3 convolutions whose dilations add up to the margin, with
# LeakyReLUs between them: the same 41 px reach and the same 296 -> 256 shrink for a sixth of the multiply-adds at
# width 16 (the dense layer is about 90 % of a CPU render and the slowest layer of a CPU training step).
CONTEXTS = ("dense", "dilated")


def context_dilations(margin: int) -> list[int]:
    """Dilations of 3x3 convolutions that together shrink a window by `margin` on each side: powers of two while
    they fit, then the rest (20 -> 1, 2, 4, 8, 5)."""
    dilations, total, step = [], 0, 1
    while total + step <= margin:
        dilations.append(step)
        total, step = total + step, 2 * step
    if total < margin:
        dilations.append(margin - total)
    return dilations


class DilatedContext(nn.Sequential):
    """The cheap context reader (`CONTEXTS`): valid 3x3 convolutions with growing dilation, LeakyReLU between them
    (the generator applies the last one, as after the dense layer)."""

    def __init__(self, in_channels: int, width: int, margin: int):
        layers: list[nn.Module] = []
        for index, dilation in enumerate(context_dilations(margin)):
            if index:
                layers.append(nn.LeakyReLU(_LEAK))
            layers.append(nn.Conv2d(in_channels if index == 0 else width, width, 3, dilation=dilation, bias=index > 0))
        super().__init__(*layers)
# Decoder levels (counted from the bottleneck) that apply dropout in training, as in pix2pix.
_DROPOUT_LEVELS = 3
# Discriminator layers: (width in units of ndf, stride, normalised); a final 1-channel stride-1 conv follows.
_DISCRIMINATOR_LAYERS = ((1, 2, False), (2, 2, True), (4, 2, True), (8, 2, True), (8, 2, True), (8, 1, True))
_LEAK = 0.2
# pix2pix initialisation, which the official code uses for every layer.
_INIT_STD = 0.02

GENERATOR_ARCHITECTURE = "safron.Generator"
DISCRIMINATOR_ARCHITECTURE = "safron.Discriminator"


def _instance_norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)


def _initialise(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(module.weight, 0.0, _INIT_STD)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.InstanceNorm2d) and module.affine:
            nn.init.normal_(module.weight, 1.0, _INIT_STD)
            nn.init.zeros_(module.bias)


def _stage(**layers: nn.Module | None) -> nn.Sequential:
    """A sequential stage whose children keep their names (they become the checkpoint keys), Nones left out."""
    return nn.Sequential(OrderedDict((name, layer) for name, layer in layers.items() if layer is not None))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SafronInputError(message)


def _check_config(config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """The constructor arguments in a stored config, or an error naming what is wrong with it."""
    if not isinstance(config, dict):
        raise SafronInputError(f"{architecture} config must be a JSON object, got {type(config).__name__}")
    arguments = dict(config)
    stored = arguments.pop("architecture", None)
    if stored != architecture:
        raise SafronInputError(f"config describes architecture {stored!r}, expected {architecture!r}")
    return arguments


def _from_config(cls, config: dict[str, Any], architecture: str):
    """`cls` built from the constructor arguments in a stored config, or a one-line error saying what is wrong."""
    arguments = _check_config(config, architecture)
    try:
        return cls(**arguments)
    except TypeError as error:
        raise SafronInputError(f"invalid {architecture} config {arguments}: {error}") from None


class Generator(nn.Module):
    """Mask window [N, in_channels, window, window] in {-1, 1} -> image patch [N, out_channels, patch, patch].

    The input is the ±1 one-hot mask in (stroma, gland, background) order; the output, in [-1, 1], is the image
    at the centre of the window (margin (window - patch) / 2 on each side). Every sample in a batch is computed
    independently of the others, in `train()` and `eval()` mode, so batching patches changes nothing.
    """

    def __init__(
        self,
        ngf: int = 64,
        in_channels: int = 3,
        out_channels: int = 3,
        window: int = 296,
        patch: int = 256,
        dropout: float = 0.5,
        upsample: str = "transpose",
        context: str = "dense",
        levels: int = U_NET_LEVELS,
        noise_channels: int = 0,
    ) -> None:
        super().__init__()
        _require(isinstance(ngf, int) and ngf >= 1, f"generator width ngf must be a positive integer, got {ngf!r}")
        _require(upsample in UPSAMPLING, f"generator upsample must be one of {', '.join(UPSAMPLING)}, got {upsample!r}")
        _require(context in CONTEXTS, f"generator context must be one of {', '.join(CONTEXTS)}, got {context!r}")
        _require(
            isinstance(in_channels, int) and in_channels >= 1 and isinstance(out_channels, int) and out_channels >= 1,
            f"generator channels must be positive integers, got in={in_channels!r} out={out_channels!r}",
        )
        _require(
            isinstance(noise_channels, int) and noise_channels >= 0,
            f"generator noise_channels must be an integer >= 0, got {noise_channels!r}",
        )
        _require(
            isinstance(levels, int) and MIN_U_NET_LEVELS <= levels <= U_NET_LEVELS,
            f"generator levels must be an integer in [{MIN_U_NET_LEVELS}, {U_NET_LEVELS}], got {levels!r}",
        )
        _require(
            isinstance(patch, int) and patch >= 2**levels and patch % 2**levels == 0,
            f"generator patch must be a multiple of {2**levels} ({levels} stride-2 levels), got {patch!r}",
        )
        # An odd difference would centre the patch between two pixels, which no patch grid can express.
        _require(
            isinstance(window, int) and window >= patch and (window - patch) % 2 == 0,
            f"generator window must be the patch plus an even margin on each side, got window={window!r} "
            f"patch={patch!r}",
        )
        _require(
            isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0,
            f"generator dropout must be a number in [0, 1), got {dropout!r}",
        )
        self.ngf, self.in_channels, self.out_channels = ngf, in_channels, out_channels
        self.window, self.patch, self.dropout, self.upsample = window, patch, float(dropout), upsample
        self.context_kind, self.levels, self.noise_channels = context, levels, noise_channels
        self.kernel = window - patch + 1

        # in_channels -> ngf, as the official code's 41x41 filter. No bias: every valid input is a ±1 one-hot
        # whose channels sum to -1 at every pixel, so a constant added to all weights already acts as a bias
        # (and the official code has none).
        if context == "dense":
            self.context = nn.Conv2d(in_channels, ngf, self.kernel, stride=1, padding=0, bias=False)
        else:
            self.context = DilatedContext(in_channels, ngf, (window - patch) // 2)
        # Noise (module docstring) enters beside the context layer's output, through a 3x3 convolution of the
        # patch's noise and a one-pixel ring of the window's (no padding, which would tell it where the patch
        # border is): a fraction of a percent of the dense context layer's work, where reading the noise in that
        # layer would add half of it per channel.
        self.noise = nn.Conv2d(noise_channels, ngf, 3, bias=False) if noise_channels else None

        widths = [ngf * factor for factor in _ENCODER_WIDTHS[:levels]]
        self.encoder = nn.ModuleList()
        for level, width in enumerate(widths):
            outermost, bottleneck = level == 0, level == len(widths) - 1
            previous = ngf if outermost else widths[level - 1]
            # The context convolution's LeakyReLU already precedes the outermost level.
            self.encoder.append(
                _stage(
                    act=None if outermost else nn.LeakyReLU(_LEAK),
                    conv=nn.Conv2d(previous, width, 4, stride=2, padding=1, bias=outermost or bottleneck),
                    norm=None if outermost or bottleneck else _instance_norm(width),
                )
            )

        # decoder[0] mirrors the bottleneck; decoder[i > 0] reads its predecessor's output concatenated with
        # the skip from the mirrored encoder level, hence twice the channels.
        self.decoder = nn.ModuleList()
        for depth in range(levels):
            level = levels - 1 - depth
            outermost = level == 0
            incoming = widths[-1] if depth == 0 else 2 * widths[level]
            outgoing = out_channels if outermost else widths[level - 1]
            if upsample == "transpose":
                resize, conv = None, nn.ConvTranspose2d(incoming, outgoing, 4, stride=2, padding=1, bias=outermost)
            else:
                resize = nn.Upsample(scale_factor=2, mode="nearest")
                conv = nn.Conv2d(incoming, outgoing, 3, stride=1, padding=1, bias=outermost)
            self.decoder.append(
                _stage(
                    act=nn.ReLU(),
                    resize=resize,
                    conv=conv,
                    norm=None if outermost else _instance_norm(outgoing),
                    out=nn.Tanh() if outermost else None,
                    dropout=nn.Dropout(self.dropout) if depth < _DROPOUT_LEVELS else None,
                )
            )
        _initialise(self)

    def forward(self, mask: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        expected = (self.in_channels, self.window, self.window)
        # Skipped under the TorchScript ONNX exporter, where shapes are traced values and the check only warns.
        if not torch.onnx.is_in_onnx_export():
            if mask.dim() != 4 or tuple(mask.shape[1:]) != expected:
                raise ValueError(f"Generator expects masks [N, {', '.join(map(str, expected))}], "
                                 f"got {list(mask.shape)}")
            wanted = (len(mask), self.noise_channels, self.window, self.window)
            if (noise is None) != (self.noise_channels == 0) or (noise is not None and tuple(noise.shape) != wanted):
                got = "none" if noise is None else list(noise.shape)
                expected_noise = list(wanted) if self.noise_channels else "none"
                raise ValueError(f"Generator expects noise {expected_noise}, got {got}")
        features = self.context(mask)
        if self.noise is not None:
            ring = (self.window - self.patch) // 2 - 1
            features = features + self.noise(noise[:, :, ring:self.window - ring, ring:self.window - ring])
        features = nn.functional.leaky_relu(features, _LEAK)
        skips = []
        for level in self.encoder:
            features = level(features)
            skips.append(features)
        # Skips are taken before the next encoder level's LeakyReLU and pass through the decoder's ReLU, as in
        # the official graph.
        image = self.decoder[0](skips[-1])
        for level, skip in zip(self.decoder[1:], reversed(skips[:-1])):
            image = level(torch.cat([image, skip], dim=1))
        return image

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable, tagged with the architecture name."""
        return {
            "architecture": GENERATOR_ARCHITECTURE,
            "ngf": self.ngf,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "window": self.window,
            "patch": self.patch,
            "dropout": self.dropout,
            "upsample": self.upsample,
            "context": self.context_kind,
            "levels": self.levels,
            # Only when used, so that the config (and the metadata of exported files) of a noise-free
            # generator reads as it did before noise existed.
            **({"noise_channels": self.noise_channels} if self.noise_channels else {}),
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Generator:
        """A freshly initialised generator of the architecture `config()` described."""
        return _from_config(cls, config, GENERATOR_ARCHITECTURE)


class Discriminator(nn.Module):
    """Tile-level PatchGAN: (mask, image), each [N, 3, H, W] in [-1, 1] -> logits [N, 1, h, w].

    A 728 tile gives 20x20 logits, a 492 tile 13x13. Losses average the per-logit BCE over the map, as the
    official code does; `score` reduces a logit map to one number per tile for monitoring.

    Normalisation is InstanceNorm (affine): with one tile per step, the official code's training-mode BatchNorm
    computed exactly these per-tile statistics, and unlike BatchNorm it keeps a tile's logits independent of
    whatever else is in the batch and has no running statistics to drift between training and evaluation.
    """

    def __init__(self, ndf: int = 64, in_channels: int = 6) -> None:
        super().__init__()
        _require(isinstance(ndf, int) and ndf >= 1, f"discriminator width ndf must be a positive integer, got {ndf!r}")
        _require(
            isinstance(in_channels, int) and in_channels >= 2,
            f"discriminator in_channels (mask + image) must be an integer >= 2, got {in_channels!r}",
        )
        self.ndf, self.in_channels = ndf, in_channels
        layers: list[nn.Module] = []
        previous = in_channels
        for factor, stride, normalised in _DISCRIMINATOR_LAYERS:
            width = ndf * factor
            # A bias before InstanceNorm would be subtracted away with the mean.
            layers.append(
                _stage(
                    conv=nn.Conv2d(previous, width, 4, stride=stride, padding=1, bias=not normalised),
                    norm=_instance_norm(width) if normalised else None,
                    act=nn.LeakyReLU(_LEAK),
                )
            )
            previous = width
        layers.append(_stage(conv=nn.Conv2d(previous, 1, 4, stride=1, padding=1)))
        self.layers = nn.Sequential(*layers)
        _initialise(self)

    def _checked_pair(self, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """mask and image concatenated along channels, or a ValueError naming the shapes that do not fit."""
        if mask.dim() != 4 or image.dim() != 4 or mask.shape[0] != image.shape[0] or mask.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"Discriminator expects mask and image [N, C, H, W] of one N, H and W, got {list(mask.shape)} "
                f"and {list(image.shape)}"
            )
        pair = torch.cat([mask, image], dim=1)
        if pair.shape[1] != self.in_channels:
            raise ValueError(
                f"Discriminator expects {self.in_channels} channels in all, got {mask.shape[1]} + {image.shape[1]}"
            )
        return pair

    def forward(self, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.layers(self._checked_pair(mask, image))

    def logits_and_features(self, mask: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the logits `forward` gives, the output of every hidden layer), for feature matching
        (`losses.feature_matching_loss`)."""
        hidden, features = self._checked_pair(mask, image), []
        for layer in self.layers[:-1]:
            hidden = layer(hidden)
            features.append(hidden)
        return self.layers[-1](hidden), features

    @staticmethod
    def score(logits: torch.Tensor) -> torch.Tensor:
        """One realism logit per tile: the mean of its logit map, [N, 1, h, w] -> [N]."""
        return logits.mean(dim=(1, 2, 3))

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable, tagged with the architecture name."""
        return {"architecture": DISCRIMINATOR_ARCHITECTURE, "ndf": self.ndf, "in_channels": self.in_channels}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Discriminator:
        """A freshly initialised discriminator of the architecture `config()` described."""
        return _from_config(cls, config, DISCRIMINATOR_ARCHITECTURE)


_NORMALISATION_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm,
)


class FoldedContext(nn.Conv2d):
    """The context convolution with the one-hot input folded in (`fold_one_hot`): it reads the first two channels.

    Every valid input is a ±1 one-hot, so its channels sum to -1 at each pixel and x2 = -1 - x0 - x1. Hence
    conv(x, [W0, W1, W2]) = conv([x0, x1], [W0 - W2, W1 - W2]) - sum(W2): two input channels and a bias. The 41x41
    context convolution is about 90 % of a CPU render's time, and this does a third less of it.
    """

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return super().forward(mask[:, :2])


def fold_one_hot(generator: Generator) -> Generator:
    """`generator` (in place) with its context convolution replaced by the equivalent `FoldedContext`: the same
    output for every one-hot input, up to rounding. For inference only (`export_onnx` applies it by default)."""
    if isinstance(generator.context, FoldedContext) or generator.context_kind != "dense":
        return generator  # folded already, or a dilated context, whose first layer is cheap anyway
    _require(generator.in_channels == 3,
             f"only a 3-class one-hot input folds (this generator reads {generator.in_channels})")
    weight = generator.context.weight.detach().double()
    folded = FoldedContext(2, generator.ngf, generator.kernel, stride=1, padding=0, bias=True)
    folded.to(generator.context.weight.device)
    with torch.no_grad():
        folded.weight.copy_(weight[:, :2] - weight[:, 2:3])
        folded.bias.copy_(-weight[:, 2].sum(dim=(1, 2)))
    folded.requires_grad_(generator.context.weight.requires_grad)
    generator.context = folded
    return generator



def unfold_one_hot(generator: Generator) -> Generator:
    """`generator` (in place) with a folded context convolution (`fold_one_hot`) turned back into the plain
    three-channel one, so that a folded file (the embedded default model) can be trained further.

    The fold forgets one degree of freedom per output channel: only W0 - W2, W1 - W2 and sum(W2) survive. Any W2
    with that sum gives the same function on one-hot inputs; a constant W2 = -bias / kernel^2 is the one that
    spreads it evenly, like the rest of the filter.
    """
    if not isinstance(generator.context, FoldedContext):
        return generator
    folded = generator.context
    weight, bias = folded.weight.detach().double(), folded.bias.detach().double()
    third = (-bias / (generator.kernel * generator.kernel))[:, None, None, None].expand_as(weight[:, :1])
    context = nn.Conv2d(3, generator.ngf, generator.kernel, stride=1, padding=0, bias=False)
    context.to(folded.weight.device)
    with torch.no_grad():
        context.weight.copy_(torch.cat([weight + third, third], dim=1))
    generator.context = context
    return generator

# A nearest-neighbour x2 resize followed by a 3x3 convolution (padding 1) is a 4x4 stride-2 transposed convolution
# (padding 1) whose kernel is constrained: along each axis the transposed kernel's taps k0..k3 are
# (w2, w1 + w2, w0 + w1, w0) for the 3x3 kernel's taps w0..w2 (even outputs read k1 and k3, odd ones k0 and k2;
# resizing makes each pair sum the same input pixels). A kernel in this 3-dimensional subspace (of 4) covers the
# output evenly; what lies outside it is exactly what draws a checkerboard.
_RESIZE_TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)


def transposed_kernel(resize_weight: torch.Tensor) -> torch.Tensor:
    """The ConvTranspose2d(4, stride 2, padding 1) weight [in, out, 4, 4] equal to nearest x2 resizing followed by
    a Conv2d(3, padding 1) of weight [out, in, 3, 3]."""
    taps = _RESIZE_TAPS.to(resize_weight.device, torch.float64)
    return torch.einsum("as,oist,bt->ioab", taps, resize_weight.double(), taps).to(resize_weight.dtype)


def resize_kernel(transposed_weight: torch.Tensor) -> torch.Tensor:
    """The Conv2d(3, padding 1) weight [out, in, 3, 3] that, after nearest x2 resizing, comes closest (least
    squares over the kernel taps) to a ConvTranspose2d(4, stride 2, padding 1) of weight [in, out, 4, 4]: the
    transposed kernel with its checkerboard part taken out. Exact inverse of `transposed_kernel`."""
    inverse = torch.linalg.pinv(_RESIZE_TAPS).to(transposed_weight.device)
    return torch.einsum("sa,ioab,tb->oist", inverse, transposed_weight.double(), inverse).to(transposed_weight.dtype)


def resize_decoder(generator: Generator) -> Generator:
    """A new generator with `generator`'s weights whose transposed-convolution decoder levels are replaced by
    nearest-neighbour resizing and a 3x3 convolution, each the `resize_kernel` of the transposed one: the nearest
    checkerboard-free generator, to fine-tune from (a generator that already resizes comes back as it is)."""
    if generator.upsample == "resize":
        return generator
    config = {**generator.config(), "upsample": "resize"}
    converted = Generator.from_config(config).to(next(generator.parameters()).device)
    state = generator.state_dict()
    for index, level in enumerate(generator.decoder):
        key = f"decoder.{index}.conv.weight"
        state[key] = resize_kernel(level.conv.weight.detach())
    if isinstance(generator.context, FoldedContext):
        fold_one_hot(converted)
    converted.load_state_dict(state)
    converted.train(generator.training)
    return converted


def transposed_decoder(generator: Generator) -> Generator:
    """`generator` (in place) with each resizing decoder level (nearest x2, then a 3x3 convolution) replaced by the
    4x4 stride-2 transposed convolution it equals (`transposed_kernel`): the same function up to rounding, at 16
    multiply-adds per input pixel and channel pair instead of 36 (4 resized pixels x 9 taps). For inference only
    (`export_onnx` applies it by default); a generator that already transposes comes back as it is."""
    if generator.upsample != "resize":
        return generator
    for level in generator.decoder:
        conv = level.conv
        transposed = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, 4, stride=2, padding=1,
                                        bias=conv.bias is not None)
        transposed.to(device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            transposed.weight.copy_(transposed_kernel(conv.weight.detach()))
            if conv.bias is not None:
                transposed.bias.copy_(conv.bias)
        transposed.requires_grad_(conv.weight.requires_grad)
        # The stage keeps its child names (the checkpoint keys): drop the resize, swap the convolution in place.
        del level.resize
        level.conv = transposed
    generator.upsample = "transpose"
    return generator


def with_noise(generator: Generator, channels: int) -> Generator:
    """A new generator with `generator`'s weights that reads `channels` noise channels (`Generator` docstring),
    with zero weights on the new ones: it draws exactly what `generator` draws, whatever the noise, until training
    teaches it to use the noise. Channels it already reads keep their weights; `channels` below what it reads is
    refused (that would drop learnt weights)."""
    _require(channels >= generator.noise_channels,
             f"the generator reads {generator.noise_channels} noise channels; it cannot start one that reads "
             f"{channels}")
    if channels == generator.noise_channels:
        return generator
    folded = isinstance(generator.context, FoldedContext)
    converted = Generator.from_config({**generator.config(), "noise_channels": channels})
    converted.to(next(generator.parameters()).device)
    if folded:
        fold_one_hot(converted)
    state = generator.state_dict()
    weight = converted.noise.weight.detach().clone().zero_()
    if generator.noise is not None:
        weight[:, :generator.noise_channels] = state["noise.weight"]
    state["noise.weight"] = weight
    converted.load_state_dict(state)
    converted.train(generator.training)
    return converted


def normalisation_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every normalisation module of `model` by qualified name (e.g. 'encoder.1.norm'), in definition order.

    In this module's models they are exactly the modules named `norm`; torch.onnx names their nodes after
    these paths (e.g. '/encoder.1/norm/InstanceNormalization'), which is how a TensorRT build finds the
    layers to keep in fp32.
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, _NORMALISATION_TYPES)}


def count_parameters(model: nn.Module) -> int:
    """The number of scalar parameters (weights, biases and norm affines) in `model`."""
    return sum(parameter.numel() for parameter in model.parameters())
