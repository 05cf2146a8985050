"""The interface every inference backend implements, and the model contract it enforces."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelSignature:
    """What the engine needs to know about a generator: the model contract of DESIGN.md.

    Input `mask` float32 [N, 3, window, window] in {-1, 1}; output `image` float32 [N, 3, patch, patch] in
    [-1, 1], the image at the centre of the mask window. `fixed_batch` is set when the model was exported with
    a static batch dimension, which then dictates the batch size.
    """

    window: int
    patch: int
    fixed_batch: int | None = None

    @property
    def margin(self) -> int:
        return (self.window - self.patch) // 2


class Backend(abc.ABC):
    """Runs the generator on batches of encoded mask windows."""

    name: str
    signature: ModelSignature
    default_batch_size: int

    @abc.abstractmethod
    def run(self, masks: np.ndarray) -> np.ndarray:
        """float32 [N, 3, window, window] -> float32 [N, 3, patch, patch]."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions and device memory."""
