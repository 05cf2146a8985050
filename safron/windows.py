"""A render's batches and their mask windows: which patches each batch holds, and the label windows the generator
needs for them. One definition for the engine's reader thread and the reader process (`reader_process`), so that
both hand the generator the same windows in the same batches."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .masks import BACKGROUND


def batch_indices(plan, batch_size: int, first_batch: int, patches_end: int) -> Iterator[np.ndarray]:
    """Raster patch indices of each batch: fixed slices of the patch sequence, from batch `first_batch` to the one
    holding patch patches_end - 1. A band or a resume stops or starts early, but each batch it runs holds the same
    patches as in a whole render."""
    for start in range(first_batch * batch_size, patches_end, batch_size):
        yield np.arange(start, min(start + batch_size, plan.count))


def label_windows(mask, plan, ys: np.ndarray, xs: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The label windows of the patches at origins (ys, xs), raster order, into `out` (uint8, (n >= len(ys), window,
    window)); rows of `out` past the patches (a model with a fixed batch) are background. One region is read per patch
    row: neighbouring windows share most of their pixels."""
    window, margin = plan.window, plan.margin
    out[len(ys):] = BACKGROUND
    for y in np.unique(ys):  # the patches of one patch row share their y, and no other row has it
        sel = np.flatnonzero(ys == y)
        y0, x0 = int(y) - margin, int(xs[sel[0]]) - margin
        region = mask.read_labels(y0, x0, window, int(xs[sel[-1]]) + plan.patch + margin - x0)
        for k in sel:
            left = int(xs[k]) - margin - x0
            out[k] = region[:, left:left + window]
    return out
