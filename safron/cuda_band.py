"""The engine's device-resident path on the GPU, with PyTorch CUDA tensors: patches never leave the device.

`pin_labels` and `infer_on_device` are the two halves of a GPU backend's `prepare` and `infer` hooks: uint8
label windows in pinned host memory go up (1 byte per mask pixel instead of 12 for the ±1 float input), are
one-hot encoded on the GPU and run through the backend's generator on its stream; a generator with noise channels
gets its noise windows drawn by a kernel on the same stream (`noise.NoiseBatch.draw_on_device`), from the window
origins alone. The torch backend and the TensorRT backend differ only in that generator call.

`CudaBand` gives `_core.CudaBandAccumulator` (raw device pointers and a cudaStream_t) the interface the engine
uses for the CPU `BandAccumulator` (safron.accumulator's, with the staging capability):
`add(patches, ys, xs, image_height)`, `finalise(y0, y1, out, x0, x1)`,
`discard(...)`, `block_cols`. Patches arrive as `DevicePatches`: a CUDA tensor plus the event recorded on the
inference stream after the generator wrote it, so the accumulate kernel waits for exactly that work and no
more, and inference of the next batch runs on its own stream meanwhile.

Finished rows are written by the finalise kernel straight into a pinned host buffer (the accumulator accepts
pinned memory as output), a whole band of rows at a time; the engine's file sink writes them from there to the
canvas file (`finalise_staged`), `finalise` copies them into a caller's array. uint8 pixels are the only thing
that crosses PCIe, 3 bytes per output pixel against the 12 or 6 of the float patches.

PyTorch is imported lazily by the callers' modules; this one needs it at call time only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _core
from .accumulator import StagingBandAccumulator
from .masks.classes import MODEL_INPUT_CLASSES


_CLASSES_ON_DEVICE: dict = {}


def encode_labels(labels, dtype=None):
    """uint8 labels [N, h, w] (a torch tensor) -> the ±1 one-hot model input [N, 3, h, w] of `dtype` (default
    float32), as masks.labels_to_model_input, on the labels' device."""
    import torch

    key = (labels.device, labels.dtype)
    classes = _CLASSES_ON_DEVICE.get(key)
    if classes is None:
        # Made once per device: building it per batch is a blocking host-to-device copy, which synchronised the
        # inference stream every batch and left the GPU idle while the next batch was launched.
        classes = torch.tensor(MODEL_INPUT_CLASSES, dtype=labels.dtype).view(1, -1, 1, 1).to(labels.device)
        _CLASSES_ON_DEVICE[key] = classes
    return (labels.unsqueeze(1) == classes).to(dtype or torch.float32) * 2 - 1


def pin_labels(labels: np.ndarray):
    """uint8 label windows as a tensor in pinned host memory, so that `infer_on_device`'s upload is an
    asynchronous DMA. (Torch's pinned allocator reuses a block only once the copies reading it are done.)"""
    import torch

    return torch.from_numpy(labels).pin_memory()


def infer_on_device(stream, labels, forward, input_dtype, noise=None) -> DevicePatches:
    """On `stream`: upload pinned `labels` to the stream's device, encode them as `input_dtype`, run
    `forward(windows)` -> patches [N, 3, P, P] (float16 or float32), or `forward(windows, noise_windows)` when a
    `noise.NoiseBatch` is given, its windows drawn on the device; return the patches with the event that marks them
    written. The caller's next batch may start at once: the accumulator waits for this event only."""
    import torch

    with torch.inference_mode(), torch.cuda.stream(stream):
        windows = encode_labels(labels.to(stream.device, non_blocking=True), input_dtype)
        if noise is None:
            patches = forward(windows).contiguous()
        else:
            patches = forward(windows, noise.draw_on_device(stream)).contiguous()
        ready = torch.cuda.Event()
        ready.record(stream)
    return DevicePatches(patches, ready)


@dataclass(frozen=True)
class DevicePatches:
    """Generator output on the GPU: fp16 or fp32 NCHW contiguous, valid once `ready` has completed."""

    tensor: object  # torch.Tensor [n, 3, patch, patch] on a CUDA device
    ready: object  # torch.cuda.Event recorded after the producing kernels

    def __getitem__(self, index: slice) -> DevicePatches:
        if not isinstance(index, slice):
            raise TypeError("DevicePatches are sliced along the batch axis only (a gather would copy on the GPU)")
        return DevicePatches(self.tensor[index], self.ready)

    def __len__(self) -> int:
        return int(self.tensor.shape[0])


class CudaBand(StagingBandAccumulator):
    """A band accumulator in device memory on `device`, with its own CUDA stream."""

    def __init__(self, plan, blend: str, device):
        import torch

        self._torch = torch
        self.width = plan.width
        with torch.cuda.device(device):
            # Same capacity as the CPU band (geometry.band_accumulator): the engine adds one patch row at a time.
            self._band = _core.CudaBandAccumulator(plan.width, plan.patch, plan.patch, plan.overlap, blend)
            self._stream = torch.cuda.Stream()
        self._pinned = None  # grown on demand, reused across finalise calls

    @property
    def block_cols(self) -> int:
        """Whole rows: the engine then finalises each band of rows once, in one kernel, one copy down and one write
        to the canvas, instead of a block at a time (the band's device memory is full-width anyway). The staging
        buffer grows to one band: 236 rows x width x 3 bytes of pinned memory (71 MB at 100,000 px)."""
        return self.width

    def set_num_threads(self, threads: int) -> None:
        """Host threads do not apply: the kernels run on the GPU."""

    def add(self, patches: DevicePatches, ys, xs, image_height: int) -> None:
        torch = self._torch
        tensor = patches.tensor
        if not (tensor.is_cuda and tensor.is_contiguous()):
            raise ValueError("CudaBand.add takes contiguous CUDA tensors (DevicePatches from a device backend)")
        dtype = {torch.float16: "float16", torch.float32: "float32"}.get(tensor.dtype)
        if dtype is None:
            raise ValueError(f"patches must be float16 or float32, not {tensor.dtype}")
        self._stream.wait_event(patches.ready)
        # The tensor was allocated on the inference stream; without this the caching allocator could hand its
        # memory to the next batch while our kernel still reads it. (Inference mode: it is an inference tensor.)
        with torch.inference_mode():
            tensor.record_stream(self._stream)
        self._band.add(
            tensor.data_ptr(), dtype, len(patches), np.asarray(ys), np.asarray(xs), image_height,
            self._stream.cuda_stream,
        )

    def finalise(self, row_begin: int, row_end: int, out: np.ndarray, col_begin: int = 0, col_end=None) -> int:
        col_end = self.width if col_end is None else col_end
        rows, cols = row_end - row_begin, col_end - col_begin
        if out.shape != (rows, cols, 3) or out.dtype != np.uint8:
            raise ValueError(f"out must be uint8 ({rows}, {cols}, 3), got {out.dtype} {out.shape}")
        pixels, uncovered = self.finalise_staged(row_begin, row_end, col_begin, col_end)
        np.copyto(out, pixels)
        return uncovered

    def finalise_staged(self, row_begin: int, row_end: int, col_begin: int = 0, col_end=None):
        """Finalise into the pinned staging buffer: (a (rows, cols, 3) uint8 view of it, valid until the next call;
        the count of uncovered pixels). For callers that write the pixels somewhere themselves."""
        col_end = self.width if col_end is None else col_end
        rows, cols = row_end - row_begin, col_end - col_begin
        staging = self._staging(rows * cols * 3)
        # finalise synchronises the stream (it returns the uncovered count), so the pinned bytes are complete.
        uncovered = self._band.finalise(
            row_begin, row_end, staging.data_ptr(), col_begin, col_end, cols * 3, self._stream.cuda_stream
        )
        return staging.numpy()[: rows * cols * 3].reshape(rows, cols, 3), uncovered

    def discard(self, row_begin: int, row_end: int, col_begin: int = 0, col_end=None) -> None:
        self._band.discard(row_begin, row_end, col_begin, col_end, self._stream.cuda_stream)

    def _staging(self, size: int):
        if self._pinned is None or self._pinned.numel() < size:
            self._pinned = self._torch.empty(size, dtype=self._torch.uint8, pin_memory=True)
        return self._pinned
