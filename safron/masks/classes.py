"""The three tissue classes, their colours and the generator's input encoding: a leaf module (NumPy only) that
readers, the synthetic mask generator, the engine and training import alike."""

from __future__ import annotations

import numpy as np

BACKGROUND, STROMA, GLAND = 0, 1, 2
CLASS_NAMES = {BACKGROUND: "background", STROMA: "stroma", GLAND: "gland"}
CLASS_COLOURS = {BACKGROUND: (0, 0, 255), STROMA: (255, 0, 0), GLAND: (0, 255, 0)}
# Channel c of the generator input is +1 where the label is MODEL_INPUT_CLASSES[c], else -1: the
# colour image's (R, G, B) scaled to [-1, 1].
MODEL_INPUT_CLASSES = (STROMA, GLAND, BACKGROUND)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype != np.uint8 or labels.ndim < 2:
        raise ValueError(
            f"labels must be a uint8 array of shape (..., h, w) (got {labels.dtype} {labels.shape})"
        )
    if labels.size and labels.max() > GLAND:
        raise ValueError(f"labels must be 0, 1 or 2 (found {labels.max()})")
    return labels


def labels_to_model_input(labels: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Labels uint8 (..., h, w) -> generator input float32 (..., 3, h, w), ±1 one-hot in channel
    order (stroma, gland, background). `out` may be a preallocated float32 array of that shape."""
    labels = _check_labels(labels)
    shape = labels.shape[:-2] + (3,) + labels.shape[-2:]
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape} (got {out.dtype} {out.shape})")
    # Compare straight into the float output, then map {0, 1} to {-1, 1}: the fastest of the variants
    # measured (2x a per-channel table lookup, 3.5x np.where).
    for channel, label in enumerate(MODEL_INPUT_CLASSES):
        np.equal(labels, label, out=out[..., channel, :, :], casting="unsafe")
    out *= 2
    out -= 1
    return out


_COLOUR_TABLE = np.array([CLASS_COLOURS[label] for label in (BACKGROUND, STROMA, GLAND)], np.uint8)


def labels_to_colour(labels: np.ndarray) -> np.ndarray:
    """Labels uint8 (..., h, w) -> colour mask uint8 (..., h, w, 3) in the class colours."""
    return _COLOUR_TABLE[_check_labels(labels)]
