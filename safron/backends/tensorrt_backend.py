"""TensorRT backend: the GPU default for ONNX models that meet the model contract.

Build. The ONNX file is parsed with TensorRT's ONNX parser and compiled in fp16 (TensorRT 10's weakly typed
builder: `BuilderFlag.FP16`), except the normalisation layers, which are pinned to fp32 (layer precision, output
types and `OBEY_PRECISION_CONSTRAINTS`): instance statistics over a 256x256 feature map lose accuracy in fp16, the
same reason the PyTorch backend keeps them in fp32 under autocast. A layer counts as normalisation when TensorRT
made it a normalisation layer, when it comes from an `InstanceNormalization` node, or when it lies inside a module
whose name contains "norm" (`/encoder.1/norm/...` in safron-export's naming), which also catches the ReduceMean,
Pow and Sqrt pieces of a normalisation that was exported decomposed. `precision="fp32"` builds in true fp32
(TF32 off), for checking. TensorRT 11 removed the weakly typed builder, so there fp16 is refused with a clear error.

Batch profile. The batch dimension is dynamic from 1 to `max_batch`, and TensorRT tunes its kernels for
`max_batch`, which is also the batch the engine asks for by default. When `max_batch` is not given it is the
largest power of two, at most MAX_BATCH_LIMIT, whose activations fit in ACTIVATION_MEMORY_SHARE of the GPU's free
memory; a patch's activations are estimated as the sum of every layer output of the parsed network, per sample, at
the build precision. TensorRT reuses activation memory, so the true peak is lower: the estimate errs on the side of
leaving room for other processes and for the accumulator. Powers of two keep the choice (and the engine cache key)
stable while free memory fluctuates. Models exported with a static batch get an engine for exactly that batch.

Cache. A build takes from seconds to minutes, so serialised engines are kept in `default_cache_dir()`
($SAFRON_CACHE_DIR/tensorrt, else $XDG_CACHE_HOME/safron/tensorrt, else ~/.cache/safron/tensorrt), named by a
digest of everything that makes an engine invalid elsewhere: the ONNX file's sha256, the TensorRT version, the
GPU's name, the precision, the maximum batch and ENGINE_RECIPE (bumped whenever this module builds differently).
Concurrent renders of a new model build it once: the builder holds an exclusive `fcntl` lock beside the engine
file, the others wait and then read its result, and the engine appears under its name only complete (written to a
temporary file, then `os.replace`).

Inputs. The mask, and for a generator with noise channels (the embedded default) its noise windows, a second
float32 input `noise` with the same dynamic batch (the model contract, `backends.base.ModelSignature`).

Execution, host path. CUDA is driven through cuda-python (`cuda.bindings.runtime`), not PyTorch, so that
TensorRT rendering needs neither torch nor its multi-GB CUDA wheels. The backend owns one CUDA stream, device
buffers for the engine's inputs and output at the maximum batch, and pinned host buffers; `run` copies a batch
(and its noise, drawn on the CPU) in, enqueues the engine and copies the result out on that stream, then waits
for it; the engine accumulates the float patches on the CPU.

Execution, device-resident (the default when PyTorch with CUDA is installed beside TensorRT and safron was built
with its CUDA kernels): the engine's hooks go through `safron.cuda_band`, exactly as the torch backend's do --
uint8 label windows up through pinned memory, one-hot encoding (and the noise: `noise.NoiseBatch.draw_on_device`)
on the GPU, then `execute_async_v3` on a torch stream with its inputs and output bound to stream-ordered torch
allocations, and the float32 patches straight into the CUDA band accumulator on its own stream; only finished uint8
rows come back. Each batch gets fresh buffers from torch's caching allocator, and the accumulator marks the ones it
reads (`record_stream`), so the engine can run batch k+1 while batch k is accumulated without either overwriting
what the other reads: that is the double buffering, with as many buffers in flight as the pipeline holds. PyTorch
serves here as a well-kept stream-ordered allocator; writing one on cuda-python would duplicate it.

TensorRT has not been run on any machine this project is developed on (none has it): the `needs_tensorrt` tests
check both paths against ONNX Runtime wherever it is installed.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ModelError, SafronInputError
from ..files import written_atomically
from ..checkpoints import file_sha256
from .base import Backend, ModelSignature

PRECISIONS = ("fp16", "fp32")
CACHE_DIR_ENV = "SAFRON_CACHE_DIR"
# Part of every cache key: bump it when the build changes (flags, pinning rules, profile), so that engines
# built the old way are not reused.
ENGINE_RECIPE = 1
# Beyond 64 windows of 296 x 296 a batch no longer raises a GPU's throughput, only its latency and memory.
MAX_BATCH_LIMIT = 64
# The share of free GPU memory the activations of one batch may take (see the module docstring).
ACTIVATION_MEMORY_SHARE = 0.5

_BYTES_PER_VALUE = {"fp16": 2, "fp32": 4}
# A module path component naming a normalisation: '/encoder.1/norm/', '/block/InstanceNorm_3/', ...
_NORMALISATION_MODULE = re.compile(r"(^|/)[^/]*norm[^/]*/", re.IGNORECASE)


def default_cache_dir() -> Path:
    """Where engines are cached: $SAFRON_CACHE_DIR/tensorrt, else the user's cache directory."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root).expanduser() / "tensorrt"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "safron" / "tensorrt"


def engine_cache_key(onnx_sha256: str, tensorrt_version: str, gpu_name: str, precision: str, max_batch: int) -> str:
    """The hex digest an engine is cached under: it changes with each input and with ENGINE_RECIPE."""
    fields = {
        "onnx_sha256": onnx_sha256,
        "tensorrt": tensorrt_version,
        "gpu": gpu_name,
        "precision": precision,
        "max_batch": max_batch,
        "recipe": ENGINE_RECIPE,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def choose_max_batch(free_bytes: int, activation_bytes_per_patch: int, limit: int = MAX_BATCH_LIMIT) -> int:
    """The largest power of two <= `limit` whose activations fit in ACTIVATION_MEMORY_SHARE of `free_bytes`;
    at least 1."""
    fits = int(free_bytes * ACTIVATION_MEMORY_SHARE) // max(activation_bytes_per_patch, 1)
    batch = 1
    while batch * 2 <= min(fits, limit):
        batch *= 2
    return batch


def load_or_build(path: Path, build: Callable[[], bytes]) -> tuple[bytes, bool]:
    """The bytes cached at `path`, building and caching them with `build()` when absent; and whether this call
    built them. Safe across processes: one builds while the others wait on the lock, then read its result."""
    # NotADirectoryError: a file where the cache directory should be, reported below.
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        return path.read_bytes(), False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "ab")  # noqa: SIM115 - held across the build below
    except OSError as exc:
        raise SafronInputError(
            f"{path.parent}: cannot write the TensorRT engine cache ({exc.strerror}); set {CACHE_DIR_ENV} to a "
            f"writable directory"
        ) from None
    # The lock file is never removed: unlinking it while another process waits on it would let a third one
    # lock a new file of the same name and build concurrently. The kernel drops the lock if this process dies.
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):
            return path.read_bytes(), False  # built by another process while this one waited
        data = build()
        with written_atomically(path) as partial, open(partial, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    return data, True


def _tensorrt():
    import tensorrt

    return tensorrt


def _cudart():
    from cuda.bindings import runtime

    return runtime


def _cuda_call(cudart, result, what: str):
    """cuda-python returns (error, *values): raise on an error, else return the value(s)."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA {what} failed: {getattr(error, 'name', error)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _is_normalisation(trt, layer) -> bool:
    return (
        layer.type == trt.LayerType.NORMALIZATION
        or "InstanceNormalization" in layer.name
        or _NORMALISATION_MODULE.search(layer.name) is not None
    )


def pin_normalisation_fp32(network) -> list[str]:
    """Pin the normalisation layers of a TensorRT network to fp32 (precision and output types); return their
    names. Only floating-point layers that compute are pinned: constants and shape arithmetic keep their types,
    and TensorRT honours the pins only with `BuilderFlag.OBEY_PRECISION_CONSTRAINTS`."""
    trt = _tensorrt()
    floating = (trt.float32, trt.float16)
    pinned = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type in (trt.LayerType.CONSTANT, trt.LayerType.SHAPE) or not _is_normalisation(trt, layer):
            continue
        outputs = [layer.get_output(i) for i in range(layer.num_outputs)]
        if any(output.dtype not in floating for output in outputs):
            continue
        layer.precision = trt.float32
        for i in range(layer.num_outputs):
            layer.set_output_type(i, trt.float32)
        pinned.append(layer.name)
    return pinned


def activation_bytes_per_patch(network, bytes_per_value: int) -> int:
    """Sum of every batch-dependent layer output of `network`, per sample, in bytes (an upper bound on what one
    patch needs at once, since TensorRT reuses activation memory)."""
    values = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        for i in range(layer.num_outputs):
            shape = list(layer.get_output(i).shape)
            if len(shape) > 1 and shape[0] == -1 and all(d > 0 for d in shape[1:]):
                values += int(np.prod(shape[1:]))
    return values * bytes_per_value


def _contract_signature(model_path: Path, inputs, outputs, float32) -> ModelSignature:
    """The model contract checked on TensorRT I/O tensors, given as (name, shape, dtype) triples: `mask` (and
    `noise`, for a generator with noise channels) in, `image` out."""
    name = model_path.name
    names = [i[0] for i in inputs]
    if sorted(names) not in (["mask"], ["mask", "noise"]):
        raise ModelError(f"{name}: the model must have an input named 'mask' and at most a second one named 'noise' "
                         f"(found: {', '.join(names)})")
    if len(outputs) != 1 or outputs[0][0] != "image":
        found = ", ".join(o[0] for o in outputs)
        raise ModelError(f"{name}: the model must have one output named 'image' (found: {found})")
    by_name = {i[0]: i for i in inputs}
    (_, in_shape, in_type), (_, out_shape, out_type) = by_name["mask"], outputs[0]
    if (
        len(in_shape) != 4 or len(out_shape) != 4 or in_shape[1] != 3 or out_shape[1] != 3
        or min(in_shape[2:]) < 1 or min(out_shape[2:]) < 1
        or in_shape[2] != in_shape[3] or out_shape[2] != out_shape[3]
    ):
        raise ModelError(
            f"{name}: expected mask [N,3,S,S] -> image [N,3,P,P] with static square S and P "
            f"(found {in_shape} -> {out_shape})"
        )
    window, patch = in_shape[2], out_shape[2]
    if window < patch or (window - patch) % 2:
        raise ModelError(f"{name}: the mask window ({window}) must exceed the patch ({patch}) by an even margin")
    if in_type != float32 or out_type != float32:
        raise ModelError(f"{name}: 'mask' and 'image' must be float32 (found {in_type} and {out_type})")
    noise_channels = 0
    if "noise" in by_name:
        _, noise_shape, noise_type = by_name["noise"]
        if len(noise_shape) != 4 or noise_shape[1] < 1 or tuple(noise_shape[2:]) != (window, window) \
                or noise_shape[0] != in_shape[0]:
            raise ModelError(f"{name}: expected noise [N,C,{window},{window}] beside mask {list(in_shape)} "
                             f"(found {list(noise_shape)})")
        if noise_type != float32:
            raise ModelError(f"{name}: 'noise' must be float32 (found {noise_type})")
        noise_channels = noise_shape[1]
    return ModelSignature(window=window, patch=patch, fixed_batch=in_shape[0] if in_shape[0] > 0 else None,
                          noise_channels=noise_channels)


def _io(tensor) -> tuple[str, tuple[int, ...], object]:
    return tensor.name, tuple(tensor.shape), tensor.dtype


class _ParsedModel:
    """An ONNX model parsed into a TensorRT network. The parser owns the weights the network points to, so it
    lives as long as the network."""

    def __init__(self, trt, logger, model_path: Path):
        self.builder = trt.Builder(logger)
        self.network = self.builder.create_network(0)
        self._parser = trt.OnnxParser(self.network, logger)
        if not self._parser.parse_from_file(str(model_path)):
            reason = self._parser.get_error(0).desc() if self._parser.num_errors else "no reason given"
            raise ModelError(f"{model_path}: TensorRT cannot parse the model ({reason})")
        inputs = [_io(self.network.get_input(i)) for i in range(self.network.num_inputs)]
        outputs = [_io(self.network.get_output(i)) for i in range(self.network.num_outputs)]
        self.signature = _contract_signature(model_path, inputs, outputs, trt.float32)


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        threads: int | None = None,
        precision: str = "fp16",
        max_batch: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        device_resident: bool | None = None,
    ):
        """`threads` is accepted for the common backend interface; inference runs on the GPU. `device_resident`:
        None = when possible (module docstring), True = required, False = the host path."""
        if precision not in PRECISIONS:
            raise SafronInputError(f"TensorRT precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
        if max_batch is not None and (not isinstance(max_batch, int) or max_batch < 1):
            raise SafronInputError(f"TensorRT max_batch must be a positive integer (got {max_batch!r})")
        trt = _tensorrt()
        cudart = self._cudart = _cudart()
        self.model_path = Path(onnx_path)
        if not self.model_path.is_file():
            raise ModelError(f"{self.model_path}: model file not found")
        if precision == "fp16" and not hasattr(trt.BuilderFlag, "FP16"):
            raise SafronInputError(
                f"TensorRT {trt.__version__} builds only strongly typed networks; fp16 with fp32 normalisation needs "
                f"TensorRT 10 (or precision='fp32')"
            )
        error, devices = cudart.cudaGetDeviceCount()
        if error != cudart.cudaError_t.cudaSuccess or devices == 0:
            raise SafronInputError(f"backend 'tensorrt' needs an NVIDIA GPU and CUDA finds none ({error.name})")
        self._device = _cuda_call(cudart, cudart.cudaGetDevice(), "cudaGetDevice")
        properties = _cuda_call(cudart, cudart.cudaGetDeviceProperties(self._device), "cudaGetDeviceProperties")
        raw_name = properties.name
        gpu_name = (raw_name.decode(errors="replace") if isinstance(raw_name, bytes) else str(raw_name)).rstrip("\0")
        free_bytes, _ = _cuda_call(cudart, cudart.cudaMemGetInfo(), "cudaMemGetInfo")

        logger = trt.Logger(trt.Logger.ERROR)
        serialized = self._cached_engine(trt, logger, precision, max_batch, gpu_name, free_bytes, cache_dir)
        self._runtime = trt.Runtime(logger)
        self._engine = self._runtime.deserialize_cuda_engine(serialized)
        if self._engine is None:
            raise ModelError(f"{self.engine_path}: the cached TensorRT engine cannot be loaded; delete it to rebuild")
        engine, inputs, outputs = self._engine, [], []
        for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors)):
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(
                (name, tuple(engine.get_tensor_shape(name)), engine.get_tensor_dtype(name))
            )
        self.signature = _contract_signature(self.model_path, inputs, outputs, trt.float32)
        self._capacity = self.signature.fixed_batch or self.max_batch
        self.default_batch_size = self._capacity

        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise SafronInputError(
                f"{self.model_path}: not enough GPU memory for a TensorRT engine at batch {self._capacity} "
                f"(free {free_bytes / 2**30:.1f} GiB); pass a smaller max_batch"
            )
        self._stream = self._device_out = self._host_out = None
        self._device_in, self._host_in = {}, {}  # per input name
        self._torch_stream = None
        try:
            self._allocate()
            self.device_resident = self._open_device_path(device_resident)
        except BaseException:
            self.close()
            raise

    def _open_device_path(self, wanted: bool | None) -> bool:
        """Whether the engine's hooks stay on the device (module docstring); creates their torch stream."""
        if wanted is False:
            return False
        from .. import _core

        try:
            import torch
        except ImportError:
            torch = None
        missing = (
            "PyTorch" if torch is None
            else "a CUDA build of PyTorch" if not torch.cuda.is_available()
            else "safron built with its CUDA kernels" if not _core.build_info()["cuda"]
            else None
        )
        if missing:
            if wanted:
                raise ModelError(f"device-resident TensorRT rendering needs {missing}")
            return False
        self._torch_stream = torch.cuda.Stream(torch.device("cuda", self._device))
        return True

    def _cached_engine(self, trt, logger, precision, max_batch, gpu_name, free_bytes, cache_dir) -> bytes:
        """The serialised engine, from the cache or built into it; sets `max_batch`, `engine_path` and
        `built_engine`. The parsed network (and its copy of the weights) is freed on return."""
        parsed = None
        if max_batch is None:
            parsed = _ParsedModel(trt, logger, self.model_path)
            max_batch = parsed.signature.fixed_batch or choose_max_batch(
                free_bytes, activation_bytes_per_patch(parsed.network, _BYTES_PER_VALUE[precision])
            )
        self.precision, self.max_batch = precision, max_batch
        key = engine_cache_key(file_sha256(self.model_path), trt.__version__, gpu_name, precision, max_batch)
        self.engine_path = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / f"{key}.engine"

        def build() -> bytes:
            model = parsed or _ParsedModel(trt, logger, self.model_path)
            print(
                f"safron: building a TensorRT {precision} engine for {self.model_path.name} on {gpu_name} "
                f"(once per model, GPU and TensorRT version; cached in {self.engine_path.parent})",
                file=sys.stderr, flush=True,
            )
            return self._build(trt, model, precision, max_batch)

        serialized, self.built_engine = load_or_build(self.engine_path, build)
        return serialized

    def _build(self, trt, model: _ParsedModel, precision: str, max_batch: int) -> bytes:
        config = model.builder.create_builder_config()
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
            pin_normalisation_fp32(model.network)
        else:
            config.clear_flag(trt.BuilderFlag.TF32)
        if model.signature.fixed_batch is None:
            window = model.signature.window
            profile = model.builder.create_optimization_profile()
            for name, channels in self._input_channels(model.signature).items():
                profile.set_shape(name, (1, channels, window, window), (max_batch, channels, window, window),
                                  (max_batch, channels, window, window))
            config.add_optimization_profile(profile)
        serialized = model.builder.build_serialized_network(model.network, config)
        if serialized is None:
            raise ModelError(f"{self.model_path}: TensorRT could not build an engine (see its messages above)")
        return bytes(memoryview(serialized))

    @staticmethod
    def _input_channels(signature: ModelSignature) -> dict[str, int]:
        """The engine's inputs and their channels: the mask, and the noise of a generator with noise channels."""
        return {"mask": 3, **({"noise": signature.noise_channels} if signature.noise_channels else {})}

    def _allocate(self) -> None:
        """Device buffers for every input and the output at the engine's capacity, with pinned host twins (the
        copies then run at full bus speed and truly asynchronously on the stream)."""
        cudart, sig, n = self._cudart, self.signature, self._capacity
        self._in_shapes = {name: (channels, sig.window, sig.window)
                           for name, channels in self._input_channels(sig).items()}
        self._out_shape = (3, sig.patch, sig.patch)
        self._out_bytes = 4 * int(np.prod(self._out_shape))  # per patch, float32
        self._stream = _cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        for name, shape in self._in_shapes.items():
            self._device_in[name] = _cuda_call(cudart, cudart.cudaMalloc(n * 4 * int(np.prod(shape))), "cudaMalloc")
            self._host_in[name] = self._pinned(n, shape)
        self._device_out = _cuda_call(cudart, cudart.cudaMalloc(n * self._out_bytes), "cudaMalloc")
        self._host_out = self._pinned(n, self._out_shape)

    def _pinned(self, count: int, shape: tuple[int, ...]) -> tuple[int, np.ndarray]:
        values = count * int(np.prod(shape))
        pointer = _cuda_call(self._cudart, self._cudart.cudaMallocHost(4 * values), "cudaMallocHost")
        array = np.ctypeslib.as_array((ctypes.c_float * values).from_address(pointer)).reshape(count, *shape)
        return pointer, array

    def run(self, masks: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        self._check_noise(masks, noise)
        if masks.ndim != 4 or masks.shape[1:] != self._in_shapes["mask"]:
            raise ValueError(f"expected masks [N, {', '.join(map(str, self._in_shapes['mask']))}], got "
                             f"{list(masks.shape)}")
        if self.signature.fixed_batch is not None and len(masks) != self.signature.fixed_batch:
            raise ValueError(f"this engine runs batches of exactly {self.signature.fixed_batch}, got {len(masks)}")
        # The engine's thread may not be the one that created the backend, and CUDA's current device is per thread.
        _cuda_call(self._cudart, self._cudart.cudaSetDevice(self._device), "cudaSetDevice")
        images = np.empty((len(masks), *self._out_shape), np.float32)
        for start in range(0, len(masks), self._capacity):
            stop = min(start + self._capacity, len(masks))
            inputs = {"mask": masks[start:stop], **({} if noise is None else {"noise": noise[start:stop]})}
            images[start:stop] = self._run_chunk(inputs)
        return images

    def _enqueue(self, count: int, inputs: dict[str, int], output_pointer: int, stream: int) -> None:
        """Enqueue the engine on `stream` for `count` windows between device buffers (`inputs`: name -> address).
        (TensorRT reads the addresses at enqueue time, so the next call may bind others while this one runs.)"""
        context = self._context
        for name, pointer in (*inputs.items(), ("image", output_pointer)):
            if not context.set_tensor_address(name, pointer):
                raise RuntimeError(f"TensorRT refused the device buffer for {name!r}")
        if self.signature.fixed_batch is None:
            for name in inputs:
                if not context.set_input_shape(name, (count, *self._in_shapes[name])):
                    raise RuntimeError(f"TensorRT refused a batch of {count} (the engine's profile is "
                                       f"1..{self._capacity})")
        if not context.execute_async_v3(stream):
            raise RuntimeError("TensorRT inference failed (see its messages above)")

    def _run_chunk(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        cudart, n = self._cudart, len(inputs["mask"])
        host_out_pointer, host_out = self._host_out
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, values in inputs.items():
            host_pointer, host = self._host_in[name]
            np.copyto(host[:n], values, casting="same_kind")
            _cuda_call(cudart, cudart.cudaMemcpyAsync(self._device_in[name], host_pointer, host[:n].nbytes, to_device,
                                                      self._stream), "cudaMemcpyAsync")
        self._enqueue(n, {name: self._device_in[name] for name in inputs}, self._device_out, int(self._stream))
        _cuda_call(cudart, cudart.cudaMemcpyAsync(host_out_pointer, self._device_out, n * self._out_bytes, to_host,
                                                  self._stream), "cudaMemcpyAsync")
        _cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        # A copy: the pinned buffer is overwritten by the next batch while the engine still holds this one.
        return host_out[:n].copy()

    # -- the engine's device-resident path (module docstring) ---------------------------------------------------
    def prepare(self, labels: np.ndarray, noise=None):
        if not self.device_resident:
            return super().prepare(labels, noise)
        from ..cuda_band import pin_labels

        # The noise stays a request: infer draws it on the GPU.
        return pin_labels(labels) if noise is None else (pin_labels(labels), noise)

    def infer(self, prepared):
        if not self.device_resident:
            return super().infer(prepared)
        import torch

        from ..cuda_band import infer_on_device

        labels, noise = prepared if isinstance(prepared, tuple) else (prepared, None)
        if len(labels) > self._capacity or (self.signature.fixed_batch not in (None, len(labels))):
            raise ValueError(f"a batch of {len(labels)} windows does not fit this engine (batch "
                             f"{self.signature.fixed_batch or f'1..{self._capacity}'})")

        def forward(windows, noise_windows=None):
            # Allocated on the stream the engine runs on: the caching allocator hands it out again only after
            # the accumulator's stream, which records its use, is done with it. The noise windows (float32, drawn
            # on this stream) live until the engine's work on it is queued, which is all TensorRT needs.
            images = torch.empty((len(windows), *self._out_shape), dtype=torch.float32, device=windows.device)
            inputs = {"mask": windows.data_ptr()}
            if noise_windows is not None:
                inputs["noise"] = noise_windows.data_ptr()
            self._enqueue(len(windows), inputs, images.data_ptr(), self._torch_stream.cuda_stream)
            return images

        # The contract's inputs are float32 (the engine casts inside where it runs fp16).
        return infer_on_device(self._torch_stream, labels, forward, torch.float32, noise)

    def band_accumulator(self, plan, blend: str):
        if not self.device_resident:
            return super().band_accumulator(plan, blend)
        from ..cuda_band import CudaBand

        return CudaBand(plan, blend, self._device)

    def close(self) -> None:
        if self._torch_stream is not None:
            self._torch_stream.synchronize()
            self._torch_stream = None
        cudart = self._cudart
        if self._stream is not None:
            cudart.cudaStreamSynchronize(self._stream)
        for pinned in (*self._host_in.values(), self._host_out):
            if pinned is not None:
                cudart.cudaFreeHost(pinned[0])
        for pointer in (*self._device_in.values(), self._device_out):
            if pointer is not None:
                cudart.cudaFree(pointer)
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
        self._stream = self._device_out = self._host_out = None
        self._device_in, self._host_in = {}, {}
        self._context = self._engine = self._runtime = None
