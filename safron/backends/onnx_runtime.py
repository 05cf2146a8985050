"""ONNX Runtime backend: the CPU default. Any model that meets the model contract can be rendered."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ModelError, first_line
from .base import Backend, ModelSignature


def _dim(value) -> int | None:
    """An ONNX dimension: an int when static, None when symbolic ('N', 'batch', ...)."""
    return value if isinstance(value, int) and value > 0 else None


def signature_from_session(session, model_path: Path) -> ModelSignature:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    name = model_path.name
    if not 1 <= len(inputs) <= 2 or inputs[0].name != "mask" or (len(inputs) == 2 and inputs[1].name != "noise"):
        found = ", ".join(i.name for i in inputs)
        raise ModelError(f"{name}: the model must have an input named 'mask', and may have a second one named "
                         f"'noise' (found: {found})")
    if len(outputs) != 1 or outputs[0].name != "image":
        found = ", ".join(o.name for o in outputs)
        raise ModelError(f"{name}: the model must have one output named 'image' (found: {found})")
    in_shape, out_shape = inputs[0].shape, outputs[0].shape
    if len(in_shape) != 4 or len(out_shape) != 4:
        raise ModelError(f"{name}: 'mask' and 'image' must be 4-D NCHW (found {in_shape} and {out_shape})")
    window, patch = _dim(in_shape[2]), _dim(out_shape[2])
    if (
        in_shape[1] != 3 or out_shape[1] != 3 or window is None or patch is None
        or in_shape[3] != window or out_shape[3] != patch
    ):
        raise ModelError(
            f"{name}: expected mask [N,3,S,S] -> image [N,3,P,P] with static square S and P "
            f"(found {in_shape} -> {out_shape})"
        )
    if window < patch or (window - patch) % 2:
        raise ModelError(f"{name}: the mask window ({window}) must exceed the patch ({patch}) by an even margin")
    for io in (*inputs, *outputs):
        if io.type != "tensor(float)":
            raise ModelError(f"{name}: '{io.name}' must be float32 (found {io.type})")
    fixed = _dim(in_shape[0])
    noise_channels = 0
    if len(inputs) == 2:
        noise_shape = inputs[1].shape
        noise_channels = _dim(noise_shape[1]) if len(noise_shape) == 4 else None
        if noise_channels is None or list(noise_shape[2:]) != [window, window] or _dim(noise_shape[0]) != fixed:
            raise ModelError(f"{name}: expected noise [N,C,{window},{window}] beside mask {in_shape} "
                             f"(found {noise_shape})")
    return ModelSignature(window=window, patch=patch, fixed_batch=fixed, noise_channels=noise_channels)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    default_batch_size = 8

    def __init__(self, model_path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        self.model_path = Path(model_path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The engine runs reading and accumulation in other threads; ORT's own pool takes the cores it is
        # given, and spinning workers would steal them from those stages between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(self.model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own exception types for unreadable/invalid graphs
            raise ModelError(f"{self.model_path}: not a loadable ONNX model ({first_line(exc)})") from None
        self.signature = signature_from_session(self._session, self.model_path)

    def run(self, masks: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        self._check_noise(masks, noise)
        feeds = {"mask": masks} if noise is None else {"mask": masks, "noise": noise}
        (image,) = self._session.run(["image"], feeds)
        return image

    def close(self) -> None:
        self._session = None
