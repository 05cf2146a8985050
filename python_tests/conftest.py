"""Shared pytest set-up: markers that skip with their reason where the machine cannot run them, and helpers that
several test files use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def safron_render(*args, timeout=300) -> subprocess.CompletedProcess:
    """`safron-render ARGS` in a fresh interpreter, as a user runs it; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "safron.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def _cuda_skip_reason() -> str | None:
    from safron import _core

    if not _core.build_info()["cuda"]:
        return "safron was built without CUDA kernels (SAFRON_CUDA=OFF or no nvcc)"
    if _core.cuda_device_count() == 0:
        return "no CUDA device on this machine"
    return None


def _tensorrt_skip_reason() -> str | None:
    from safron.backends import available_backends

    if not available_backends()["tensorrt"]:
        return "TensorRT or cuda-python (cuda.bindings) is not installed"
    from cuda.bindings import runtime

    error, count = runtime.cudaGetDeviceCount()
    if error != runtime.cudaError_t.cudaSuccess or count == 0:
        return "no CUDA device on this machine"
    return None


def pytest_collection_modifyitems(config, items):
    cuda_reason = tensorrt_reason = None
    for item in items:
        if "needs_cuda" in item.keywords:
            cuda_reason = cuda_reason or _cuda_skip_reason()
            if cuda_reason:
                item.add_marker(pytest.mark.skip(reason=cuda_reason))
        if "needs_tensorrt" in item.keywords:
            tensorrt_reason = tensorrt_reason or _tensorrt_skip_reason()
            if tensorrt_reason:
                item.add_marker(pytest.mark.skip(reason=tensorrt_reason))
        if "needs_data" in item.keywords and not SHARED_DATA.is_dir():
            item.add_marker(pytest.mark.skip(reason=f"test data not found at {SHARED_DATA}"))
