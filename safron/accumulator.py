"""The interface of the rolling band accumulator the engine adds patches into and finalises rows from.

Two implementations: the C++ CPU accumulator (`_core.BandAccumulator`, made by `geometry.band_accumulator`, host
float32 patches) and `cuda_band.CudaBand` (device patches, pixels finalised on the GPU). A backend's
`band_accumulator` returns one of them; the engine relies on nothing beyond this interface.

`StagingBandAccumulator` is the capability the engine's file sink asks for by type: such an accumulator finalises
into a host buffer of its own (`finalise_staged`), which the sink writes to the canvas directly instead of having
pixels copied into a memory map (page faults made that most of the main thread's time on the GPU).
"""

from __future__ import annotations

import abc

import numpy as np

from . import _core


class BandAccumulator(abc.ABC):
    """Weighted sums of overlapping patches over a rolling band of rows.

    `block_cols`: the width of the column blocks the engine finalises and discards at once (the whole width for an
    accumulator that prefers whole rows)."""

    block_cols: int

    @abc.abstractmethod
    def set_num_threads(self, threads: int) -> None:
        """Host threads for add and finalise (an accumulator that runs elsewhere ignores it)."""

    @abc.abstractmethod
    def add(self, patches, ys, xs, image_height: int) -> None:
        """Add the patches (what the backend's `infer` returns, one patch row or part of one) at origins ys, xs."""

    @abc.abstractmethod
    def finalise(self, row_begin: int, row_end: int, out: np.ndarray, col_begin: int = 0, col_end=None) -> int:
        """Normalise finished rows into `out`, uint8 (rows, cols, 3); the count of pixels no patch covered."""

    @abc.abstractmethod
    def discard(self, row_begin: int, row_end: int, col_begin: int = 0, col_end=None) -> None:
        """Drop finished rows without finalising them (a resumed render's rows already on the canvas)."""


class StagingBandAccumulator(BandAccumulator):
    """An accumulator whose finished pixels arrive in a host buffer of its own."""

    @abc.abstractmethod
    def finalise_staged(self, row_begin: int, row_end: int, col_begin: int = 0, col_end=None):
        """(a (rows, cols, 3) uint8 view of the accumulator's buffer, valid until the next call; the count of
        uncovered pixels)."""


BandAccumulator.register(_core.BandAccumulator)
