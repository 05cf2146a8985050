"""The patch geometry, used alike by training and inference.

The one definition lives in C++ (csrc/include/safron/grid.h); this module only gives it a Python face.
A generator maps a `window` = patch + 2*margin mask window to the `patch` x `patch` image at its centre.
Patches overlap by at least `overlap` pixels (stride = patch - overlap). Their positions are spread evenly
from the first (0) to the last (size - patch), so the border is always covered, output pixel (y, x) always
comes from mask pixel (y, x), and every overlap is within a pixel or two of the nominal one — the same seam
everywhere, and a carried band that stays about `overlap` rows tall (see grid.h). Beyond the mask border
the model sees the background class.
"""

from __future__ import annotations

from ._core import BandAccumulator, PatchPlan, blend_modes

PATCH, MARGIN, OVERLAP = 256, 20, 20
# The weight windows of overlapping patches (csrc/include/safron/blend.h): "uniform", "linear", "cosine".
BLENDS = tuple(blend_modes())


def plan(height: int, width: int, patch: int = PATCH, margin: int = MARGIN, overlap: int = OVERLAP) -> PatchPlan:
    """Patch positions covering a height x width image: `.ys`, `.xs`, `.origins()`, `.final_rows_end(i)`..."""
    return PatchPlan(height, width, patch, margin, overlap)


def band_accumulator(p: PatchPlan, blend: str) -> BandAccumulator:
    """A CPU accumulator whose rolling band holds exactly the rows one patch row can touch.

    The engine adds each patch row separately and finalises it as soon as it is complete, which is what
    lets a band of `patch` rows suffice (see accumulate.h).
    """
    return BandAccumulator(p.width, p.patch, p.patch, p.overlap, blend)
