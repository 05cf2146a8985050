"""The noise a generator with noise channels reads (`models.Generator`, `noise_channels`), as a function of canvas
coordinates.

Each pixel of each noise channel is uniform in [-1, 1], independent of every other, and fixed by (seed, channel,
canvas row, canvas column) through an integer hash. So overlapping patches read the same noise where they overlap (a
render stays seamless), a band or a resumed render reads what a whole render reads (byte-exact, like the mask), and
the same mask and seed always give the same image. Rows and columns outside the canvas (the mirrored margin) get
noise of their own, which is as good as any.

The hash is Wellons' `lowbias32` (one of the best-measured 32-bit integer hashes), nested over seed and channel,
then row, then column: h = mix(column + mix(row + mix(channel + seed * golden))). It is computed by the C++ core
(`csrc/include/safron/noise.h`), whose CPU body fills host windows without the GIL and whose CUDA body fills them in
device memory, so a GPU render never moves noise over the bus. Training draws the same distribution from torch's
generator instead (`uniform_noise`), since what matters there is a fresh draw per tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _core

__all__ = ["DEFAULT_SEED", "MAX_SEED", "NoiseBatch", "canvas_noise", "noise_windows", "uniform_noise"]

DEFAULT_SEED = 0
MAX_SEED = 2**32 - 1  # the hash takes the seed modulo 2^32: larger ones would repeat smaller ones' noise


def canvas_noise(y0: int, x0: int, height: int, width: int, channels: int, seed: int = DEFAULT_SEED,
                 out: np.ndarray | None = None) -> np.ndarray:
    """float32 [channels, height, width] noise of the canvas region whose top-left pixel is (y0, x0), into `out` if
    given."""
    if channels < 0 or height < 0 or width < 0:
        raise ValueError(f"channels, height and width must be >= 0, got {channels}, {height} and {width}")
    if out is None:
        out = np.empty((channels, height, width), np.float32)
    _core.fill_noise(out[None], [y0], [x0], int(seed) % 2**32)
    return out


def noise_windows(plan, ys: np.ndarray, xs: np.ndarray, channels: int, seed: int = DEFAULT_SEED,
                  out: np.ndarray | None = None) -> np.ndarray:
    """The noise windows [n >= len(ys), channels, window, window] of the patches at origins (ys, xs), as
    `windows.label_windows` gives their masks; rows of `out` past the patches (a fixed batch) are zero."""
    count = len(ys) if out is None else len(out)
    return NoiseBatch.of(plan, ys, xs, channels, seed, count).draw(out)


@dataclass(frozen=True)
class NoiseBatch:
    """The noise windows of one batch, not yet drawn: what the engine hands a backend's `prepare` beside the label
    windows. A host backend draws them with `draw`, a device-resident one in GPU memory with `draw_on_device`, so
    only these few numbers cross the bus. Windows past the patches (a fixed batch's padding) are zero."""

    y0s: np.ndarray  # int64 [patches]: each window's top-left canvas row
    x0s: np.ndarray  # and column
    count: int  # windows in the batch, >= patches
    channels: int
    window: int
    seed: int

    @classmethod
    def of(cls, plan, ys, xs, channels: int, seed: int = DEFAULT_SEED, count: int | None = None) -> NoiseBatch:
        """The windows around the patches at origins (ys, xs) of `plan`."""
        y0s = np.asarray(ys, np.int64) - plan.margin
        x0s = np.asarray(xs, np.int64) - plan.margin
        count = len(y0s) if count is None else int(count)
        if count < len(y0s):
            raise ValueError(f"a batch of {count} windows cannot hold {len(y0s)} patches")
        return cls(y0s, x0s, count, int(channels), plan.window, int(seed) % 2**32)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.count, self.channels, self.window, self.window)

    def draw(self, out: np.ndarray | None = None, threads: int = 1) -> np.ndarray:
        """float32 [count, channels, window, window] in host memory (into `out` if given), on `threads` threads (the
        default 1: the engine draws beside inference, which has the cores)."""
        if out is None:
            out = np.empty(self.shape, np.float32)
        elif out.shape != self.shape:
            raise ValueError(f"out must have shape {self.shape}, got {out.shape}")
        patches = len(self.y0s)
        out[patches:] = 0
        _core.fill_noise(out[:patches], self.y0s, self.x0s, self.seed, threads)
        return out

    def draw_on_device(self, stream):
        """A float32 CUDA tensor [count, channels, window, window] on `stream`'s device, filled by kernels queued on
        `stream` (a torch.cuda.Stream): valid for the work queued after them there."""
        import torch

        with torch.cuda.stream(stream):
            out = torch.empty(self.shape, dtype=torch.float32, device=stream.device)
            patches = len(self.y0s)
            out[patches:].zero_()
            _core.fill_noise_cuda(out.data_ptr(), patches, self.channels, self.window, self.window, self.y0s,
                                  self.x0s, self.seed, stream.cuda_stream)
        return out


def uniform_noise(channels: int, height: int, width: int, generator=None):
    """A fresh torch draw [channels, height, width] of the same distribution, on the CPU (so that a run's draws do not
    depend on where it trains), from `generator` or else torch's global one (which a training step seeds, so resumed
    runs stay exact)."""
    import torch

    return torch.rand(channels, height, width, generator=generator) * 2 - 1
