"""Inference backends behind one interface (`Backend`).

ONNX Runtime is the CPU default and the only one in this release; TensorRT (GPU default) and PyTorch join
behind the same interface. `create_backend` is the one place that maps a name to an implementation.
"""

from __future__ import annotations

import importlib.util
import os

from ..errors import SafronInputError
from .base import Backend, ModelSignature

BACKEND_NAMES = ("auto", "onnxruntime")

# name -> Python module that must be importable for the backend to work
_REQUIREMENTS = {"onnxruntime": "onnxruntime"}


def available_backends() -> dict[str, bool]:
    """Which backends can run here (their Python package is importable)."""
    return {name: importlib.util.find_spec(module) is not None for name, module in _REQUIREMENTS.items()}


def create_backend(name: str, model_path: str | os.PathLike, threads: int | None = None) -> Backend:
    if name not in BACKEND_NAMES:
        raise SafronInputError(f"unknown backend {name!r} (choose from {', '.join(BACKEND_NAMES)})")
    if name == "auto":
        name = "onnxruntime"
    if not available_backends()[name]:
        raise SafronInputError(f"backend {name!r} needs the Python package {_REQUIREMENTS[name]!r}, not installed")
    from .onnx_runtime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model_path, threads=threads)


__all__ = ["Backend", "ModelSignature", "BACKEND_NAMES", "available_backends", "create_backend"]
