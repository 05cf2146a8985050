"""PyTorch backend: runs a training checkpoint directly, the reference that exported models are checked against.

On CPU it computes in fp32, as the export check does. On a CUDA GPU it runs in fp16 autocast with channels-last
tensors (the layout tensor cores want), except the normalisation layers, which stay in fp32: instance
statistics over a 256x256 map lose accuracy in fp16, the same reason the TensorRT build pins them.

This module imports torch at import time; `create_backend` imports it only once torch is known to be installed.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..export import load_generator
from ..models import normalisation_layers
from .base import Backend, ModelSignature

# Patches per call. On CPU, as ONNX Runtime: larger batches only add latency. On a GPU, enough windows to fill
# the device (a 296 window of a width-64 generator needs well under 100 MB of fp16 activations).
CPU_BATCH_SIZE = 8
CUDA_BATCH_SIZE = 32


class _Float32Normalisation(nn.Module):
    """A normalisation layer that computes in fp32 whatever autocast does around it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.layer(features.float()).to(features.dtype)


def keep_normalisation_fp32(model: nn.Module) -> nn.Module:
    """`model` with each normalisation layer wrapped to compute in fp32 under autocast (in place)."""
    for name, layer in normalisation_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _Float32Normalisation(layer))
    return model


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, checkpoint: str | os.PathLike, threads: int | None = None, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        generator = load_generator(checkpoint)
        if generator.in_channels != 3 or generator.out_channels != 3:
            raise ModelError(
                f"{checkpoint}: the engine feeds 3 mask channels and reads 3 image channels, this generator has "
                f"{generator.in_channels} and {generator.out_channels}"
            )
        self.signature = ModelSignature(window=generator.window, patch=generator.patch)
        self._mixed_precision = self.device.type == "cuda"
        if self._mixed_precision:
            generator = keep_normalisation_fp32(generator).to(self.device, memory_format=torch.channels_last)
            self.default_batch_size = CUDA_BATCH_SIZE
        else:
            generator = generator.to(self.device)
            self.default_batch_size = CPU_BATCH_SIZE
        self._generator = generator
        # torch's CPU thread count is per process: set it for this backend's lifetime and restore it on close.
        self._threads_before = None
        if threads and self.device.type == "cpu":
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)

    def run(self, masks: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.from_numpy(masks).to(self.device)
            if self._mixed_precision:
                batch = batch.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type="cuda", dtype=torch.float16):
                    images = self._generator(batch)
            else:
                images = self._generator(batch)
            return images.float().contiguous().cpu().numpy()

    def close(self) -> None:
        self._generator = None
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
