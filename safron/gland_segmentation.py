"""Gland segmentation of H&E images for the evaluation protocol ("gland fidelity"), with ONNX Runtime only.

The protocol segments real and synthetic images with one network trained on GlaS `train` and reports
Dice(seg(synthetic), the gland mask it was rendered from) beside Dice(seg(real), its mask): the synthetic
figure only means something next to the real one, which says how well the segmenter itself does.

The network is `default_model/gland_segmenter.onnx` (`bench/train_gland_segmenter.py` trains and exports it;
see `GLAND_SEGMENTER_CARD.md`). Its graph takes the image as it is, float32 [N, 3, H, W] RGB in 0..255 at the
full 20x resolution, and does its own preprocessing (downscaling, normalisation) and upsampling back: the
preprocessing lives in the network, so training and inference cannot drift apart. All that is left here is
the geometry: H and W must be multiples of the network's stride, which the file's metadata states
(`STRIDE_METADATA_KEY`), so images are padded by reflection and the mask cropped back.

No PyTorch is needed here; it is for evaluation only, not a diagnostic tool.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import ModelError, SafronInputError, first_line

__all__ = [
    "SEGMENTER_PATH", "INPUT_NAME", "OUTPUT_NAME", "STRIDE_METADATA_KEY", "segment_glands", "dice",
    "open_segmenter", "pad_to_stride",
]

SEGMENTER_PATH = Path(__file__).parent / "default_model" / "gland_segmenter.onnx"
# The segmenter's contract: one input `image` float32 [N, 3, H, W] (RGB, 0..255) -> one output `gland_logit`
# float32 [N, 1, H, W], gland where the logit is > 0; H and W multiples of the integer in the metadata.
INPUT_NAME = "image"
OUTPUT_NAME = "gland_logit"
STRIDE_METADATA_KEY = "safron.segmenter.stride"


def pad_to_stride(image: np.ndarray, stride: int) -> np.ndarray:
    """`image` (H, W, ...) padded at the bottom and right, by reflection about the last row and column, to
    multiples of `stride`. Reflection rather than zeros: a black or white band would be tissue the network
    never saw, and it would change what the network makes of the pixels next to it. Training validates with
    the same padding, so the score it selects on is the one inference gets."""
    height, width = image.shape[:2]
    pads = [(0, -height % stride), (0, -width % stride)] + [(0, 0)] * (image.ndim - 2)
    if not any(after for _, after in pads):
        return image
    # numpy reflects repeatedly when a pad exceeds the image, but a single row or column has nothing to
    # reflect: there the edge value repeats.
    mode = "reflect" if min(height, width) > 1 else "edge"
    return np.pad(image, pads, mode=mode)


def _check_image(image, index: int) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise SafronInputError(
            f"image {index}: expected a uint8 (H, W, 3) RGB array, got {array.dtype} {array.shape}"
        )
    return array


def open_segmenter(model: str | os.PathLike | None = None, threads: int | None = None):
    """(ONNX Runtime session, stride) of the segmenter at `model` (default `SEGMENTER_PATH`), its contract
    checked. `segment_glands` runs through it; training checks its export's logits against PyTorch with it."""
    import onnxruntime as ort

    model = Path(model) if model is not None else SEGMENTER_PATH
    if not model.is_file():
        raise ModelError(f"{model}: gland segmenter not found (bench/train_gland_segmenter.py makes it)")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable/invalid graphs
        raise ModelError(f"{model}: not a loadable ONNX model ({first_line(exc)})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
        found = ", ".join(i.name for i in inputs) + " -> " + ", ".join(o.name for o in outputs)
        raise ModelError(f"{model}: a gland segmenter has input {INPUT_NAME!r} and output {OUTPUT_NAME!r} "
                         f"(found {found})")
    stride = session.get_modelmeta().custom_metadata_map.get(STRIDE_METADATA_KEY, "")
    if not stride.isdigit() or int(stride) < 1:
        raise ModelError(f"{model}: no positive integer {STRIDE_METADATA_KEY!r} in the model's metadata "
                         f"(found {stride!r})")
    return session, int(stride)


def segment_glands(
    images: Iterable[np.ndarray], model: str | os.PathLike | None = None, threads: int | None = None
) -> list[np.ndarray]:
    """Gland masks of RGB H&E images at GlaS's 20x: bool (H, W), True on glands, one per uint8 (H, W, 3) image.

    Images of any size; each is run whole (one at a time, as sizes differ), so memory grows with the image:
    meant for GlaS-sized images (about 775 x 522), not whole slides. `model` is an ONNX gland segmenter
    (default `SEGMENTER_PATH`); `threads` caps ONNX Runtime's intra-op threads (default: its own choice).
    """
    if isinstance(images, np.ndarray) and images.ndim == 3:
        # Iterating would hand out rows, each reported as a bad image: say what went wrong instead.
        raise SafronInputError(f"segment_glands takes a list of images, got one {images.shape} array: "
                               "pass [image]")
    checked = [_check_image(image, index) for index, image in enumerate(images)]
    session, stride = open_segmenter(model, threads)
    masks = []
    for image in checked:
        height, width = image.shape[:2]
        padded = pad_to_stride(image, stride)
        batch = np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32)
        (logit,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        masks.append(logit[0, 0, :height, :width] > 0)
    return masks


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient 2|P & T| / (|P| + |T|) of two boolean masks of one shape.

    Both empty gives 1.0: the segmentation agrees with the mask that there is no gland, and an image without
    glands should not drag a mean over images down (nor be NaN). One empty and the other not gives 0.0.
    Masks must be bool: a 0/255 or probability array would be ambiguous, so threshold it first (mask > 0).
    """
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    for name, mask in (("predicted", predicted), ("truth", truth)):
        if mask.dtype != np.bool_:
            raise SafronInputError(f"dice: {name} must be a bool mask, got {mask.dtype} (threshold it, e.g. mask > 0)")
    if predicted.shape != truth.shape:
        raise SafronInputError(f"dice: masks differ in shape ({predicted.shape} vs {truth.shape})")
    total = int(np.count_nonzero(predicted)) + int(np.count_nonzero(truth))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(predicted & truth)) / total
