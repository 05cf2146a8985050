"""The noise a generator with noise channels reads (`models.Generator`, `noise_channels`), as a function of canvas
coordinates.

Each pixel of each noise channel is uniform in [-1, 1], independent of every other, and fixed by (seed, channel,
canvas row, canvas column) through an integer hash. So overlapping patches read the same noise where they overlap (a
render stays seamless), a band or a resumed render reads what a whole render reads (byte-exact, like the mask), and
the same mask and seed always give the same image. Rows and columns outside the canvas (the mirrored margin) get
noise of their own, which is as good as any.

The hash is Wellons' `lowbias32` (one of the best-measured 32-bit integer hashes), nested over seed and channel,
then row, then column: h = mix(column + mix(row + mix(channel + seed * golden))). Training draws the same
distribution from torch's generator instead (`uniform_noise`), since what matters there is a fresh draw per tile.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DEFAULT_SEED", "MAX_SEED", "canvas_noise", "noise_windows", "uniform_noise"]

DEFAULT_SEED = 0
MAX_SEED = 2**32 - 1  # the hash takes the seed modulo 2^32: larger ones would repeat smaller ones' noise
_GOLDEN = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive seeds
# 24 random bits per value: every float32 step in [-1, 1) at that resolution is exact, centred in its bin.
_SCALE = np.float32(2.0 ** -23)
_OFFSET = np.float32(-1.0 + 2.0 ** -24)


def _mix(values: np.ndarray) -> np.ndarray:
    """lowbias32 on uint32 arrays (wrapping arithmetic), in place where it can."""
    values = values ^ (values >> np.uint32(16))
    values *= np.uint32(0x7FEB352D)
    values ^= values >> np.uint32(15)
    values *= np.uint32(0x846CA68B)
    values ^= values >> np.uint32(16)
    return values


def _as_uint32(coordinates) -> np.ndarray:
    """Canvas coordinates (negative ones too: the mirrored margin) as uint32, wrapping modulo 2^32."""
    return (np.asarray(coordinates, np.int64) & 0xFFFFFFFF).astype(np.uint32)


def canvas_noise(y0: int, x0: int, height: int, width: int, channels: int, seed: int = DEFAULT_SEED,
                 out: np.ndarray | None = None) -> np.ndarray:
    """float32 [channels, height, width] noise of the canvas region whose top-left pixel is (y0, x0), into `out` if
    given."""
    if channels < 0 or height < 0 or width < 0:
        raise ValueError(f"channels, height and width must be >= 0, got {channels}, {height} and {width}")
    keys = _mix(_as_uint32(np.arange(channels)) + np.uint32((seed * _GOLDEN) & 0xFFFFFFFF))  # [C]
    rows = _mix(_as_uint32(np.arange(y0, y0 + height))[None, :] + keys[:, None])  # [C, H]
    hashed = _mix(_as_uint32(np.arange(x0, x0 + width))[None, None, :] + rows[:, :, None])  # [C, H, W]
    if out is None:
        out = np.empty((channels, height, width), np.float32)
    np.multiply(hashed >> np.uint32(8), _SCALE, out=out, casting="unsafe")
    out += _OFFSET
    return out


def noise_windows(plan, ys: np.ndarray, xs: np.ndarray, channels: int, seed: int = DEFAULT_SEED,
                  out: np.ndarray | None = None) -> np.ndarray:
    """The noise windows [n >= len(ys), channels, window, window] of the patches at origins (ys, xs), as
    `windows.label_windows` gives their masks; rows of `out` past the patches (a fixed batch) are zero."""
    window, margin = plan.window, plan.margin
    if out is None:
        out = np.empty((len(ys), channels, window, window), np.float32)
    out[len(ys):] = 0
    for k, (y, x) in enumerate(zip(ys, xs)):
        canvas_noise(int(y) - margin, int(x) - margin, window, window, channels, seed, out=out[k])
    return out


def uniform_noise(channels: int, height: int, width: int, generator=None):
    """A fresh torch draw [channels, height, width] of the same distribution, on the CPU (so that a run's draws do not
    depend on where it trains), from `generator` or else torch's global one (which a training step seeds, so resumed
    runs stay exact)."""
    import torch

    return torch.rand(channels, height, width, generator=generator) * 2 - 1
