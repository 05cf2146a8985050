"""Tissue component masks: reading them region by region as class labels, and encoding labels for the model.

Three classes. Single-channel masks store the labels themselves: BACKGROUND 0, STROMA 1, GLAND 2.
Colour masks use gland green (0, 255, 0), stroma red (255, 0, 0), background blue (0, 0, 255); each
pixel snaps to the nearest class colour within COLOUR_TOLERANCE, anything else is an error, except in
masks stored with lossy compression (JPEG), where off colours within SMEAR_RADIUS of a class colour are
taken for the codec's smear along class edges (see COLOUR_TOLERANCE). The generator's input is the colour
image scaled to [-1, 1]: a ±1 one-hot in channel order (stroma, gland, background).

Masks are validated as they are read, so a render that reads every pixel validates every pixel
without a separate pass; `Mask.validate()` does the whole mask upfront for callers that want it.
"""

from __future__ import annotations

import numpy as np

from ..errors import MaskError  # noqa: F401  (safron.masks.MaskError, as before the split)
from .classes import (
    BACKGROUND, CLASS_COLOURS, CLASS_NAMES, GLAND, MODEL_INPUT_CLASSES, STROMA, labels_to_colour, labels_to_model_input,
)
from .gland_labels import BACKGROUND_MIN_CHANNEL, BACKGROUND_SMOOTHING_RADIUS, labels_from_gland_mask
from .reader import COLOUR_TOLERANCE, LOSSY_LUMA_WEIGHT, SMEAR_RADIUS, Mask, from_array, mirror_index, open_mask

__all__ = [
    "BACKGROUND", "STROMA", "GLAND", "CLASS_NAMES", "CLASS_COLOURS", "COLOUR_TOLERANCE", "SMEAR_RADIUS",
    "MODEL_INPUT_CLASSES", "Mask", "mirror_index", "open_mask", "from_array", "labels_to_model_input",
    "labels_to_colour",
]
__all__ += [
    "BACKGROUND_MIN_CHANNEL", "BACKGROUND_SMOOTHING_RADIUS", "LOSSY_LUMA_WEIGHT", "labels_from_gland_mask",
    "synthesize",
]


def synthesize(height: int, width: int, seed: int = 0, **options) -> np.ndarray:
    """A synthetic mask as labels (height, width); see `safron.synthesis.synthesize`."""
    from ..synthesis import synthesize as _synthesize

    return _synthesize(height, width, seed, **options)
