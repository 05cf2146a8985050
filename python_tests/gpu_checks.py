"""Checks shared by the GPU tests of several backends."""

from __future__ import annotations

import numpy as np

from safron import engine


def assert_resident_render_matches_host_path(resident, host, labels: np.ndarray) -> np.ndarray:
    """Render `labels` with two open backends of the same model, one device-resident, one not; they must agree up
    to 1-LSB rounding ties (the same patches summed in the same fp32 order, on the GPU and on the CPU). Closes
    both; returns the resident render."""
    try:
        assert resident.device_resident and not host.device_resident
        on_device = engine.render_array(labels, backend=resident)
        through_host = engine.render_array(labels, backend=host)
    finally:
        resident.close()
        host.close()
    difference = np.abs(on_device.astype(int) - through_host.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, (difference.max(), (difference > 0).mean())
    return on_device
