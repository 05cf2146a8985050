"""The CUDA band accumulator against the CPU reference, through the Python bindings (GPU machines only)."""

from __future__ import annotations

import numpy as np
import pytest

from safron import _core, geometry

pytestmark = pytest.mark.needs_cuda


@pytest.mark.parametrize("blend", ["uniform", "linear", "cosine"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cuda_finalise_matches_cpu(blend, dtype):
    cupy = pytest.importorskip("cupy", reason="CuPy provides the device buffers for this test")
    plan = geometry.plan(700, 900)
    ys, xs = plan.origins()
    rng = np.random.default_rng(1)
    patches = rng.uniform(-1, 1, size=(plan.count, 3, plan.patch, plan.patch)).astype(dtype)
    cpu = geometry.band_accumulator(plan, blend)
    gpu = _core.CudaBandAccumulator(plan.width, plan.patch, plan.patch, plan.overlap, blend)
    expected = np.zeros((plan.height, plan.width, 3), np.uint8)
    actual = cupy.zeros((plan.height, plan.width, 3), cupy.uint8)
    done = 0
    for row in range(plan.rows):
        sel = slice(row * plan.cols, (row + 1) * plan.cols)
        cpu.add(np.ascontiguousarray(patches[sel]), ys[sel], xs[sel], plan.height)
        device_patches = cupy.asarray(patches[sel])
        gpu.add(device_patches.data.ptr, np.dtype(dtype).name, plan.cols, ys[sel], xs[sel], plan.height)
        end = plan.final_rows_end(row)
        assert cpu.finalise(done, end, expected[done:end]) == 0
        assert gpu.finalise(done, end, actual[done:end].data.ptr) == 0
        done = end
    difference = np.abs(cupy.asnumpy(actual).astype(int) - expected.astype(int))
    assert difference.max() <= 1  # the contract allows 1 LSB; identical fp32 order makes it 0 in practice
