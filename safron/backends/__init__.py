"""Inference backends behind one interface (`Backend`).

ONNX Runtime runs ONNX models on the CPU; TensorRT runs them on an NVIDIA GPU; PyTorch runs training checkpoints
(run directories and .safetensors files) and safron-exported ONNX models, on a CUDA GPU when there is one, where
the render stays on the device (see torch_backend), and is the reference the exported models are checked
against. `create_backend` is the one place that maps a name to an implementation; each backend's module is
imported only once its packages are known to be installed.

`auto` picks, in order: TensorRT when it is installed and a GPU is present (ONNX models); PyTorch when it is
installed and a GPU is present, or the model is a checkpoint (which only PyTorch reads); else ONNX Runtime.
"""

from __future__ import annotations

import importlib.util
import os

from ..errors import SafronInputError
from ..checkpoints import is_checkpoint_path
from .base import Backend, ModelSignature

BACKEND_NAMES = ("auto", "onnxruntime", "tensorrt", "torch")

# name -> Python modules that must be importable for the backend to work
_REQUIREMENTS = {
    "onnxruntime": ("onnxruntime",),
    "tensorrt": ("tensorrt", "cuda.bindings"),  # cuda.bindings: the cuda-python package
    "torch": ("torch", "safetensors"),
    "onnx": ("onnx",),  # not a backend: what the torch backend needs to read an ONNX model
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
    # safron built without CUDA kernels cannot see devices itself; ask a package that can, if there is one.
    if _importable("cuda.bindings"):
        from cuda.bindings import runtime

        error, count = runtime.cudaGetDeviceCount()
        return error == runtime.cudaError_t.cudaSuccess and count > 0
    if _importable("torch"):
        import torch

        return torch.cuda.is_available()
    return False


def available_backends() -> dict[str, bool]:
    """Which backends can run here (their Python packages are importable)."""
    return {name: not _missing_modules(name) for name in BACKEND_NAMES if name != "auto"}


def _auto_backend(model_path: str | os.PathLike) -> str:
    if is_checkpoint_path(model_path):
        return "torch"  # only PyTorch reads checkpoints; it picks the GPU itself when there is one
    gpu_backends = [name for name in ("tensorrt", "torch") if not _missing_modules(name)]
    if gpu_backends and _cuda_device_present():
        # A model that reads noise (the default) goes to PyTorch (or ONNX Runtime) unless TensorRT is asked for:
        # TensorRT's noise input has not yet run on a machine with TensorRT, PyTorch's has (bench/RESULTS.md).
        if gpu_backends[0] == "tensorrt" and not _onnx_inputs(model_path) - {"mask"}:
            return "tensorrt"
        # PyTorch rebuilds only safron-exported models; any other ONNX model stays with ONNX Runtime.
        if not _missing_modules("onnx") and _exported_by_safron(model_path):
            return "torch"
    return "onnxruntime"


def _onnx_inputs(model_path: str | os.PathLike) -> set[str]:
    """The names of the model's graph inputs (its weights left unread); an empty set when onnx is missing or the
    file is unreadable (the backend that opens it reports that)."""
    if _missing_modules("onnx"):
        return set()
    import onnx

    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - see the docstring
        return set()
    weights = {initializer.name for initializer in graph.initializer}
    return {tensor.name for tensor in graph.input} - weights


def _exported_by_safron(model_path: str | os.PathLike) -> bool:
    import onnx

    from ..checkpoints import CONFIG_METADATA_KEY

    try:
        # The graph's metadata only: the weights (external data, if any) are not needed to decide.
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable model is reported by the backend that opens it
        return False
    return any(entry.key == CONFIG_METADATA_KEY for entry in model.metadata_props)


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
        if not checkpoint and _missing_modules("onnx"):
            raise SafronInputError(
                f"{model_path}: the torch backend reads ONNX models with the Python package 'onnx', not installed "
                f"(pip install onnx), or use --backend onnxruntime"
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


__all__ = ["BACKEND_NAMES", "Backend", "ModelSignature", "available_backends", "create_backend"]
