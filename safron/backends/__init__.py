"""Inference backends behind one interface (`Backend`).

ONNX Runtime runs ONNX models (the CPU default); TensorRT runs them on an NVIDIA GPU (the GPU default for ONNX
models); PyTorch runs training checkpoints (run directories and .safetensors files), on a CUDA GPU when there is
one, and is the reference the exported models are checked against. `create_backend` is the one place that maps a
name to an implementation; each backend's module is imported only once its packages are known to be installed.
"""

from __future__ import annotations

import importlib.util
import os

from ..errors import SafronInputError
from ..export import is_checkpoint_path
from .base import Backend, ModelSignature

BACKEND_NAMES = ("auto", "onnxruntime", "tensorrt", "torch")

# name -> Python modules that must be importable for the backend to work
_REQUIREMENTS = {
    "onnxruntime": ("onnxruntime",),
    "tensorrt": ("tensorrt", "cuda.bindings"),  # cuda.bindings: the cuda-python package
    "torch": ("torch", "safetensors"),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def _missing_modules(name: str) -> list[str]:
    return [module for module in _REQUIREMENTS[name] if not _importable(module)]


def _cuda_device_present() -> bool:
    from .. import _core

    if _core.build_info()["cuda"]:
        return _core.cuda_device_count() > 0
    # safron built without CUDA kernels cannot see devices itself; TensorRT's own CUDA binding can.
    from cuda.bindings import runtime

    error, count = runtime.cudaGetDeviceCount()
    return error == runtime.cudaError_t.cudaSuccess and count > 0


def available_backends() -> dict[str, bool]:
    """Which backends can run here (their Python packages are importable)."""
    return {name: not _missing_modules(name) for name in _REQUIREMENTS}


def _auto_backend(model_path: str | os.PathLike) -> str:
    # The model decides first: only PyTorch reads checkpoints (it picks the GPU itself when there is one). ONNX
    # models go to TensorRT where it is installed and a GPU is present, else to ONNX Runtime on the CPU.
    if is_checkpoint_path(model_path):
        return "torch"
    if not _missing_modules("tensorrt") and _cuda_device_present():
        return "tensorrt"
    return "onnxruntime"


def create_backend(name: str, model_path: str | os.PathLike, threads: int | None = None) -> Backend:
    if name not in BACKEND_NAMES:
        raise SafronInputError(f"unknown backend {name!r} (choose from {', '.join(BACKEND_NAMES)})")
    if name == "auto":
        name = _auto_backend(model_path)
    missing = _missing_modules(name)
    if missing:
        packages = " and ".join(repr(module) for module in missing)
        plural = "s" if len(missing) > 1 else ""
        raise SafronInputError(f"backend {name!r} needs the Python package{plural} {packages}, not installed")
    checkpoint = is_checkpoint_path(model_path)
    if name == "torch":
        if not checkpoint:
            raise SafronInputError(
                f"{model_path}: the torch backend runs checkpoints (a run directory or .safetensors file); "
                f"use --backend onnxruntime for ONNX models"
            )
        from .torch_backend import TorchBackend

        return TorchBackend(model_path, threads=threads)
    if checkpoint:
        raise SafronInputError(
            f"{model_path}: a checkpoint, not an ONNX model: export it with safron-export or render it with "
            f"--backend torch"
        )
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(model_path, threads=threads)
    from .onnx_runtime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model_path, threads=threads)


__all__ = ["Backend", "ModelSignature", "BACKEND_NAMES", "available_backends", "create_backend"]
