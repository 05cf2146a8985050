"""The patch geometry, used alike by training and inference.

The one definition lives in C++ (csrc/include/safron/grid.h); this module only gives it a Python face.
A generator maps a `window` = patch + 2*margin mask window to the `patch` x `patch` image at its centre.
Patches overlap by at least `overlap` pixels (stride = patch - overlap). Their positions are spread evenly
from the first (0) to the last (size - patch), so the border is always covered, output pixel (y, x) always
comes from mask pixel (y, x), and every overlap is within a pixel or two of the nominal one — the same seam
everywhere, and a carried band that stays about `overlap` rows tall (see grid.h). Beyond the mask border
the model sees the mask mirrored about it (`safron.masks.mirror_index`), in training and inference alike.
"""

from __future__ import annotations

from ._core import BandAccumulator, PatchPlan, blend_modes

PATCH, MARGIN, OVERLAP = 256, 20, 20
# How far a render's patch grid reaches beyond each border of the image (the mask mirrored there), the part beyond
# being cropped: the image's border pixels then come from inside patches and are blended like any seam, instead of
# being a patch's outermost rows, which a generator draws worst (trained only on whole stitched tiles, its patch
# edges are hidden by the blend everywhere but at the border). On GlaS testA with the default generator of
# 2026-12: border profile std 2.16 -> 1.93 and rim excess +7.4 -> +3.1 grey levels, FID / KID on whole images
# unchanged, on crops better (MODEL_CARD.md, "The border frame"). It costs patches only where the grown side needs
# one more per axis: none at 512, 775, 1024, 2048 or 4096 px, 4 x 4 instead of 3 x 3 at 728, 2 x 2 instead of 1
# at 256; `outset=0` renders as before.
OUTSET = 20
# The weight windows of overlapping patches (csrc/include/safron/blend.h): "uniform", "linear", "cosine".
BLENDS = tuple(blend_modes())


def plan(height: int, width: int, patch: int = PATCH, margin: int = MARGIN, overlap: int = OVERLAP) -> PatchPlan:
    """Patch positions covering a height x width image: `.ys`, `.xs`, `.origins()`, `.final_rows_end(i)`..."""
    return PatchPlan(height, width, patch, margin, overlap)


def render_plan(height: int, width: int, outset: int = OUTSET, patch: int = PATCH, margin: int = MARGIN,
                overlap: int = OVERLAP) -> PatchPlan:
    """The grid a render lays over a height x width image: `plan` of the image grown by `outset` on every side, so
    its row y is image row y - outset (`OUTSET`)."""
    return plan(height + 2 * outset, width + 2 * outset, patch, margin, overlap)


def band_accumulator(p: PatchPlan, blend: str) -> BandAccumulator:
    """A CPU accumulator whose rolling band holds exactly the rows one patch row can touch.

    The engine adds each patch row separately and finalises it as soon as it is complete, which is what
    lets a band of `patch` rows suffice (see accumulate.h).
    """
    return BandAccumulator(p.width, p.patch, p.patch, p.overlap, blend)
