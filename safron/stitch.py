"""Differentiable stitching for training: the engine's blend, in PyTorch.

Training must see exactly what inference produces, so `stitch` follows the C++ band accumulator
(csrc/include/safron/accumulate.h) step for step: each patch pixel adds w * value to its output pixel's sum and w
to its weight, with w = r(ty) * r(tx) from the same 1-D ramp (`_core.blend_window`), patches added in the given
order, and the result is sum / weight -- the accumulator's value before it rounds to uint8.

Patches are added one by one into slices of the canvas rather than by `index_add_`/`fold`: it is the same
sequence of fp32 operations as the C++ core (so the two agree to the last bit, not just to rounding), it is
deterministic on CUDA, where `index_add_` uses atomics, and it needs no index tensors. A training tile holds a
handful of patches, so the Python loop costs nothing measurable next to the generator.

`cut_windows` is the other half of the geometry: it cuts the generator's mask windows out of a tile's mask
context at the positions the engine's `PatchPlan` gives.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from . import _core
from .errors import SafronInputError
from .geometry import BLENDS, OVERLAP, PatchPlan

__all__ = ["BLENDS", "stitch", "cut_windows", "context_size"]


def _check_blend(blend: str) -> None:
    if blend not in BLENDS:
        raise SafronInputError(f"unknown blend {blend!r} (choose from {', '.join(BLENDS)})")


def _positions(values, count: int, name: str) -> tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    positions = tuple(int(v) for v in np.asarray(values).reshape(-1))
    if len(positions) != count:
        raise ValueError(f"{name} must hold one position per patch ({count}), got {len(positions)}")
    return positions


def _clipped(start: int, patch: int, size: int) -> tuple[int, int, int]:
    """(first output index, first patch index, length) of the part of [start, start + patch) inside [0, size)."""
    first = max(start, 0)
    end = min(start + patch, size)
    return first, first - start, max(end - first, 0)


def _add_patches(canvas: torch.Tensor, values: torch.Tensor, ys: Sequence[int], xs: Sequence[int]) -> None:
    """canvas[..., y:y+P, x:x+P] += values[k] for each patch k in order, clipped to the canvas."""
    height, width = canvas.shape[-2:]
    patch = values.shape[-1]
    for k, (y, x) in enumerate(zip(ys, xs)):
        oy, py, h = _clipped(y, patch, height)
        ox, px, w = _clipped(x, patch, width)
        if h and w:
            canvas[..., oy:oy + h, ox:ox + w] += values[k, ..., py:py + h, px:px + w]


@functools.lru_cache(maxsize=16)
def _window(blend: str, patch: int, overlap: int) -> torch.Tensor:
    # Built outside inference mode even when first asked for inside it: the cache outlives the caller, and an
    # inference tensor could not be saved for a later backward pass.
    with torch.inference_mode(False):
        # float32 products of float32 ramp values, exactly as the C++ core forms w = ramp[ty] * ramp[tx].
        ramp = torch.from_numpy(_core.blend_window(blend, patch, overlap))
        return ramp[:, None] * ramp[None, :]


@functools.lru_cache(maxsize=16)
def _weights(ys: tuple[int, ...], xs: tuple[int, ...], height: int, width: int, patch: int, blend: str,
             overlap: int) -> torch.Tensor:
    """The accumulator's weight of every output pixel, float32 [height, width]; training reuses one plan."""
    with torch.inference_mode(False):
        weights = torch.zeros(height, width)
        _add_patches(weights, _window(blend, patch, overlap).expand(len(ys), patch, patch), ys, xs)
        return weights


def stitch(
    patches: torch.Tensor,
    ys,
    xs,
    height: int,
    width: int,
    blend: str = "uniform",
    overlap: int = OVERLAP,
) -> torch.Tensor:
    """Blend patches [N, C, P, P] whose top-left output pixels are (ys[k], xs[k]) into an image [C, height, width].

    Differentiable in `patches`. The result is float32 (patches of lower precision, e.g. from autocast, are
    widened first, as the C++ core widens fp16). Parts of patches outside the image are ignored. Every output
    pixel must be covered by some patch (as `PatchPlan` guarantees); an uncovered pixel is an error, since the
    engine would have written it black.
    """
    _check_blend(blend)
    if patches.dim() != 4 or patches.shape[-1] != patches.shape[-2]:
        raise ValueError(f"patches must be [N, C, P, P], got {list(patches.shape)}")
    count, channels, patch = patches.shape[0], patches.shape[1], patches.shape[-1]
    ys, xs = _positions(ys, count, "ys"), _positions(xs, count, "xs")
    height, width = int(height), int(width)
    window = _window(blend, patch, overlap).to(patches.device)
    weights = _weights(ys, xs, height, width, patch, blend, int(overlap)).to(patches.device)
    if not bool((weights > 0).all()):
        raise ValueError(f"the patches do not cover every pixel of the {height} x {width} image")
    sums = torch.zeros(channels, height, width, device=patches.device)
    _add_patches(sums, patches.float() * window, ys, xs)
    return sums / weights


def context_size(plan: PatchPlan) -> tuple[int, int]:
    """(rows, columns) of mask context the windows of `plan` read: the image plus the margin on every side,
    or, when the image is smaller than a patch, the patch plus the margin."""
    return (
        max(plan.height, plan.patch) + 2 * plan.margin,
        max(plan.width, plan.patch) + 2 * plan.margin,
    )


def cut_windows(context: torch.Tensor, plan: PatchPlan) -> torch.Tensor:
    """Generator inputs [N, C, window, window] in the plan's raster order, from mask context [C, h, w] whose pixel
    (0, 0) is image pixel (-margin, -margin) and whose size is `context_size(plan)`.

    The window of the patch at output origin (y, x) spans image rows [y - margin, y - margin + window), i.e.
    context rows [y, y + window): the same windows the engine reads from the mask.
    """
    expected = context_size(plan)
    if context.dim() != 3 or tuple(context.shape[1:]) != expected:
        raise ValueError(
            f"context must be [C, {expected[0]}, {expected[1]}] for a {plan.height} x {plan.width} image "
            f"(margin {plan.margin}), got {list(context.shape)}"
        )
    ys, xs = plan.origins()
    window = plan.window
    return torch.stack([context[:, y:y + window, x:x + window] for y, x in zip(ys.tolist(), xs.tolist())])
