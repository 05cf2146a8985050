"""The interface every inference backend implements, and the model contract it enforces."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from .. import geometry, masks
from ..noise import NoiseBatch


@dataclass(frozen=True)
class ModelSignature:
    """What the engine needs to know about a generator: the model contract of DESIGN.md.

    Input `mask` float32 [N, 3, window, window] in {-1, 1}; output `image` float32 [N, 3, patch, patch] in
    [-1, 1], the image at the centre of the mask window. `fixed_batch` is set when the model was exported with
    a static batch dimension, which then dictates the batch size. A generator with noise channels (models.Generator)
    has a second input `noise` float32 [N, noise_channels, window, window] in [-1, 1], which the engine fills
    from canvas coordinates (`noise.NoiseBatch`).
    """

    window: int
    patch: int
    fixed_batch: int | None = None
    noise_channels: int = 0

    @property
    def margin(self) -> int:
        return (self.window - self.patch) // 2


class Backend(abc.ABC):
    """Runs the generator on batches of encoded mask windows.

    `run` is the model contract (NumPy in, NumPy out), what export checks and tests compare. The engine goes
    through three hooks instead, so that a GPU backend can keep everything between the mask labels and the
    finished uint8 pixels on the device: `prepare` (read thread) turns label windows into the backend's input,
    `infer` (inference thread) produces patches in whatever form the backend's `band_accumulator` takes. The
    defaults are the host path: ±1 float32 input, float32 NumPy patches, the CPU accumulator.
    """

    name: str
    signature: ModelSignature
    default_batch_size: int

    @abc.abstractmethod
    def run(self, masks: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """float32 [N, 3, window, window] (and the noise windows [N, noise_channels, window, window] of a model with
        noise channels, None otherwise) -> float32 [N, 3, patch, patch]."""

    def prepare(self, labels: np.ndarray, noise: NoiseBatch | None = None):
        """uint8 label windows [N, window, window] (and, for a model with noise channels, their noise windows, not
        yet drawn) -> the input `infer` takes. The host path draws the noise here."""
        encoded = masks.labels_to_model_input(labels)
        return encoded if noise is None else (encoded, noise.draw())

    def infer(self, prepared):
        """A prepared batch -> patches the accumulator adds, sliceable along the batch axis."""
        return self.run(*prepared) if isinstance(prepared, tuple) else self.run(prepared)

    def _check_noise(self, masks: np.ndarray, noise: np.ndarray | None) -> None:
        """A ValueError unless `noise` is what this model reads beside `masks` (None for a model without noise)."""
        channels, window = self.signature.noise_channels, self.signature.window
        wanted = (len(masks), channels, window, window)
        if (noise is None) != (channels == 0) or (noise is not None and tuple(noise.shape) != wanted):
            got = "none" if noise is None else list(noise.shape)
            raise ValueError(f"this model reads noise {list(wanted) if channels else 'none'}, got {got}")

    def band_accumulator(self, plan, blend: str):
        """The accumulator that `infer`'s patches are added into (see geometry.band_accumulator)."""
        return geometry.band_accumulator(plan, blend)

    def close(self) -> None:
        """Release sessions and device memory."""
