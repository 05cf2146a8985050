"""PyTorch backend: runs a training checkpoint or a safron-exported ONNX model with PyTorch.

It is the reference that exported models are checked against, and the GPU path on machines without TensorRT.
An ONNX file written by safron-export carries the generator's config in its metadata and its weights as
initializers named after the PyTorch parameters, so the same network is rebuilt from it exactly; the embedded
default model therefore runs here too.

On CPU it computes in fp32, as the export check does. On a CUDA GPU it runs in fp16 autocast with channels-last
tensors (the layout tensor cores want), except the normalisation layers, which stay in fp32: instance
statistics over a 256x256 map lose accuracy in fp16, the same reason the TensorRT build pins them. When safron
was built with its CUDA kernels the render is device-resident: uint8 label windows go up (1 byte per mask pixel
instead of 12 for the ±1 float input), are one-hot encoded on the GPU (a generator with noise channels gets its
noise drawn there too, from the window origins), and the fp16 patches go straight into the CUDA band accumulator
(`safron.cuda_band`); only finished uint8 pixels come back.

On that path the generator's forward is captured as a CUDA graph per batch size (once a size has been seen
twice; a render's last, partial batch stays eager) and replayed: one launch per batch instead of one Python
dispatch per layer. A render runs its reader, encoder and accumulator in Python threads too, and under that GIL
contention the eager launches, not the GPU, set the pace. `cuda_graphs=False` or SAFRON_CUDA_GRAPHS=0 turns it off.

This module imports torch at import time; `create_backend` imports it only once torch is known to be installed.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch
from torch import nn

from .. import _core
from ..cuda_band import infer_on_device, pin_labels
from ..errors import ModelError, first_line
from ..checkpoints import (
    CONFIG_METADATA_KEY,
    METADATA_DECODER_TRANSPOSED,
    METADATA_FOLDED,
    is_checkpoint_path,
    load_generator,
    load_weights,
    onnx_weights,
)
from ..models import Generator, fold_one_hot, normalisation_layers, resize_decoder, unfold_one_hot
from ..noise import NoiseBatch
from .base import Backend, ModelSignature

# Patches per call. On CPU, as ONNX Runtime: larger batches only add latency. On a GPU, enough windows to fill
# the device (a 296 window of a width-64 generator needs well under 100 MB of fp16 activations).
CPU_BATCH_SIZE = 8
CUDA_BATCH_SIZE = 32
CUDA_GRAPHS_ENV = "SAFRON_CUDA_GRAPHS"


class _GraphedForward:
    """`forward` on fixed input shapes (the windows, and the noise of a generator with noise channels), captured
    once as a CUDA graph and replayed on the current stream."""

    def __init__(self, forward, *examples: torch.Tensor):
        self._inputs = [torch.empty_like(example) for example in examples]
        for buffer, example in zip(self._inputs, examples):
            buffer.copy_(example)
        device = examples[0].device
        # Warm-up on a side stream, as capture requires: kernel selection and allocations happen before it.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                forward(*self._inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        # thread_local: the render's other threads keep synchronising and allocating (finalise, pinned uploads)
        # while this one captures; only this thread's own calls must stay capture-safe.
        with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
            self._output = forward(*self._inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buffer, value in zip(self._inputs, inputs, strict=True):
            buffer.copy_(value)
        self._graph.replay()
        # The next replay overwrites the graph's output buffer while the accumulator may still be reading this
        # batch: hand out a copy (a device-to-device copy of one batch, microseconds).
        return self._output.clone()


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


def load_onnx_generator(path: str | os.PathLike, as_trained: bool = False) -> Generator:
    """The generator a safron-exported ONNX file holds, rebuilt in PyTorch (CPU, eval mode, no gradients).
    `as_trained`: with the export's inference rewrites undone (an unfolded context, and the resizing decoder a model
    was trained with), the form that training continues from."""
    try:
        import onnx
    except ImportError:
        raise ModelError(f"{path}: reading an ONNX model into PyTorch needs the 'onnx' package "
                         "(pip install onnx)") from None
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError, OSError, ... for unreadable files
        raise ModelError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    metadata = {entry.key: entry.value for entry in model.metadata_props}
    if CONFIG_METADATA_KEY not in metadata:
        raise ModelError(
            f"{path}: not exported by safron-export (no {CONFIG_METADATA_KEY!r} metadata), so PyTorch cannot "
            f"rebuild it; use --backend onnxruntime"
        )
    generator = Generator.from_config(json.loads(metadata[CONFIG_METADATA_KEY]))
    if metadata.get(METADATA_FOLDED) == "true":
        fold_one_hot(generator)  # the layer's shape; its weights are loaded below
    weights = {name: torch.from_numpy(values.copy()) for name, values in onnx_weights(model).items()}
    generator = load_weights(generator, weights, path)
    if as_trained:
        unfold_one_hot(generator)
        if metadata.get(METADATA_DECODER_TRANSPOSED) == "true":
            generator = resize_decoder(generator)  # exact: the kernels lie in the resize subspace
    return generator


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self, model_path: str | os.PathLike, threads: int | None = None, device: str | None = None,
        device_resident: bool | None = None, cuda_graphs: bool | None = None,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        generator = load_generator(model_path) if is_checkpoint_path(model_path) else load_onnx_generator(model_path)
        if generator.in_channels != 3 or generator.out_channels != 3:
            raise ModelError(
                f"{model_path}: the engine feeds 3 mask channels and reads 3 image channels, this generator has "
                f"{generator.in_channels} and {generator.out_channels}"
            )
        self.signature = ModelSignature(window=generator.window, patch=generator.patch,
                                        noise_channels=generator.noise_channels)
        on_gpu = self.device.type == "cuda"
        if on_gpu:
            generator = keep_normalisation_fp32(generator).to(self.device, memory_format=torch.channels_last)
            self.default_batch_size = CUDA_BATCH_SIZE
        else:
            generator = generator.to(self.device)
            self.default_batch_size = CPU_BATCH_SIZE
        # Device-resident rendering needs safron's own CUDA kernels (the accumulator, and the noise of a generator
        # with noise channels); without them a GPU still runs the generator and the patches take the host path.
        can_stay = on_gpu and bool(_core.build_info()["cuda"])
        if device_resident and not can_stay:
            raise ModelError("device-resident rendering needs a CUDA device and safron built with its CUDA kernels")
        self.device_resident = can_stay if device_resident is None else device_resident
        self._stream = torch.cuda.Stream(self.device) if on_gpu else None
        self._generator = generator
        if cuda_graphs is None:
            cuda_graphs = os.environ.get(CUDA_GRAPHS_ENV, "1") != "0"
        self.cuda_graphs = bool(cuda_graphs) and self.device_resident
        self._graphs: dict[tuple, _GraphedForward] = {}
        self._shapes_seen: set[tuple] = set()
        self.graph_replays = 0
        # torch's CPU thread count is per process: set it for this backend's lifetime and restore it on close.
        self._threads_before = None
        if threads and self.device.type == "cpu":
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)

    def _forward(self, batch: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if self.device.type != "cuda":  # CPU: fp32, as the export check
            return self._generator(batch, noise)
        batch = batch.contiguous(memory_format=torch.channels_last)
        # No autocast weight cache: it would hold casts made during a graph capture.
        with torch.autocast(device_type="cuda", dtype=torch.float16, cache_enabled=False):
            return self._generator(batch, noise)

    def run(self, masks: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        self._check_noise(masks, noise)
        with torch.inference_mode():
            noise = None if noise is None else torch.from_numpy(noise).to(self.device)
            images = self._forward(torch.from_numpy(masks).to(self.device), noise)
            return images.float().contiguous().cpu().numpy()

    # -- the engine's device-resident path (see the module docstring) -------------------------------------------
    def prepare(self, labels: np.ndarray, noise: NoiseBatch | None = None):
        if not self.device_resident:
            return super().prepare(labels, noise)
        # The noise stays a request: infer draws it on the GPU.
        return pin_labels(labels) if noise is None else (pin_labels(labels), noise)

    def infer(self, prepared):
        if not self.device_resident:
            return super().infer(prepared)
        labels, noise = prepared if isinstance(prepared, tuple) else (prepared, None)
        # The accumulator reads NCHW; fp16 halves what it reads and is what autocast produced anyway.
        return infer_on_device(self._stream, labels, self._device_forward, torch.float16, noise)

    def _forward_fp16(self, windows: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return self._forward(windows, noise).to(torch.float16)

    def _device_forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """fp16 patches of the windows (and their noise) on the inference stream: a graph replay for batch shapes
        seen before."""
        eager = self._forward_fp16
        if not self.cuda_graphs:
            return eager(*inputs)
        key = tuple(tuple(value.shape) for value in inputs)
        graphed = self._graphs.get(key)
        if graphed is None:
            if key not in self._shapes_seen:  # a shape seen once (a render's last batch) is not worth a capture
                self._shapes_seen.add(key)
                return eager(*inputs)
            try:
                graphed = self._graphs[key] = _GraphedForward(eager, *inputs)
            except RuntimeError as exc:  # a PyTorch or driver that cannot capture this model: stay eager
                warnings.warn(f"CUDA graph capture failed, running eagerly: {first_line(exc)}", stacklevel=2)
                self.cuda_graphs = False
                return eager(*inputs)
        self.graph_replays += 1
        return graphed(*inputs)

    def band_accumulator(self, plan, blend: str):
        if not self.device_resident:
            return super().band_accumulator(plan, blend)
        from ..cuda_band import CudaBand

        return CudaBand(plan, blend, self.device)

    def close(self) -> None:
        self._generator = None
        self._graphs.clear()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        if self._stream is not None:
            self._stream.synchronize()
            torch.cuda.empty_cache()
