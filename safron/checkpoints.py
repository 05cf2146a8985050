"""The generator's on-disk formats, for training, export and inference alike: checkpoints (safetensors weights with
the generator's config, never pickled, so loading one cannot run code) and the metadata and weights of a
safron-exported ONNX model (see safron.export, which writes them).

A checkpoint is a safetensors file of generator weights whose architecture (`Generator.config()`) travels with
it: in the file's own metadata under `CONFIG_METADATA_KEY`, or in a JSON file beside it. PyTorch and safetensors
are imported when a function needs them, so inference without them can still tell a checkpoint path from a model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError, SafronInputError, first_line
from .files import written_atomically

CHECKPOINT_SUFFIX = ".safetensors"
# The generator's config as JSON inside a checkpoint's safetensors metadata.
CONFIG_METADATA_KEY = "safron.generator_config"
# A checkpoint holding more than the generator (a training state) prefixes the generator's tensors so.
GENERATOR_PREFIX = "generator."
# A training run with an exponential moving average of the generator's weights stores it under this prefix too;
# it is the generator the run publishes (what export and the torch backend load).
EMA_PREFIX = "generator_ema."
# The file a run directory keeps its latest generator checkpoint in.
RUN_DIR_CHECKPOINT = "generator.safetensors"

# Keys of the metadata the exported ONNX carries, for model cards and render journals.
METADATA_VERSION = "safron.version"
METADATA_GENERATOR_CONFIG = CONFIG_METADATA_KEY  # the same key as in checkpoints
METADATA_CHECKPOINT = "safron.checkpoint"
METADATA_CHECKPOINT_SHA256 = "safron.checkpoint_sha256"
METADATA_WEIGHTS = "safron.weights"  # "float32" or "float16": how the initializers are stored
METADATA_FOLDED = "safron.context_folded"  # "true": the context convolution reads two channels (models.fold_one_hot)
# "true": trained with a resizing decoder, stored as the transposed convolutions it equals (models.transposed_decoder)
METADATA_DECODER_TRANSPOSED = "safron.decoder_transposed"
# Pretrained networks a training loss read besides the generator and discriminator (the texture loss's), so that
# safron-eval's report can say that its scoring network was not one of them. Absent: none.
METADATA_LOSS_NETWORKS = "safron.loss_networks"
# Suffix of an fp16 initializer whose Cast node restores the fp32 tensor under the original name.
FLOAT16_SUFFIX = "__float16"


def require_module(module: str, package: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SafronInputError(f"{purpose} needs the Python package {package!r}, not installed (pip install {package})")


# --- checkpoints ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Checkpoint:
    """Where a generator's weights are, the architecture they belong to, and the rest of the file's metadata
    (str -> str, e.g. the training step)."""

    weights: Path
    config: dict[str, Any]
    metadata: dict[str, str]


def is_checkpoint_path(path: str | os.PathLike) -> bool:
    """Whether `path` names a checkpoint (a run directory, a .safetensors file, or a training checkpoint's .json
    beside its .safetensors, as safron-train --init takes it) rather than an ONNX model."""
    path = Path(path)
    return path.is_dir() or path.suffix == CHECKPOINT_SUFFIX or _weights_beside(path) is not None


def _weights_beside(path: Path) -> Path | None:
    """The .safetensors file a training checkpoint's .json names by its stem, if `path` is such a .json."""
    weights = path.with_suffix(CHECKPOINT_SUFFIX)
    return weights if path.suffix == ".json" and path.is_file() and weights.is_file() else None


def find_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """The checkpoint at `path`: a .safetensors file (or a training checkpoint's .json beside one), or a run
    directory holding `RUN_DIR_CHECKPOINT`."""
    require_module("safetensors", "safetensors", "reading checkpoints")
    path = Path(path)
    path = _weights_beside(path) or path
    if path.is_dir():
        weights = path / RUN_DIR_CHECKPOINT
        if not weights.is_file():
            raise ModelError(f"{path}: not a run directory (no {RUN_DIR_CHECKPOINT} in it)")
    elif path.is_file():
        if path.suffix != CHECKPOINT_SUFFIX:
            raise ModelError(f"{path}: not a checkpoint (expected a run directory or a {CHECKPOINT_SUFFIX} file)")
        weights = path
    else:
        raise ModelError(f"{path}: checkpoint not found")
    metadata = _read_metadata(weights)
    config = _read_config(weights, metadata.pop(CONFIG_METADATA_KEY, None))
    return Checkpoint(weights=weights, config=config, metadata=metadata)


def loss_networks(model: str | os.PathLike, located: Checkpoint | None = None) -> str | None:
    """The pretrained networks a generator's training losses read (`METADATA_LOSS_NETWORKS`), or None: from an
    ONNX file's metadata, or a checkpoint's (`located`, if already found, saves reading it again); for a training
    checkpoint's JSON from before the key, from the training settings it stores."""
    if not is_checkpoint_path(model):
        import onnxruntime

        session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        return session.get_modelmeta().custom_metadata_map.get(METADATA_LOSS_NETWORKS)
    located = located or find_checkpoint(model)
    if located.metadata.get(METADATA_LOSS_NETWORKS):
        return located.metadata[METADATA_LOSS_NETWORKS]
    path = Path(model)
    if path.suffix == ".json" and path.is_file():
        try:
            training = json.loads(path.read_text(encoding="utf-8")).get("training") or {}
        except (OSError, ValueError, AttributeError):
            return None
        if training.get("lambda_texture"):
            from .texture_loss import TEXTURE_NETWORK

            return TEXTURE_NETWORK
    return None


def _read_metadata(weights: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        # Metadata needs no framework: numpy keeps this working where torch is missing, to say so cleanly.
        with safe_open(str(weights), framework="numpy") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ModelError(f"{weights}: not a readable safetensors file ({first_line(exc)})") from None


def _read_config(weights: Path, embedded: str | None) -> dict[str, Any]:
    """The generator config embedded in the checkpoint's metadata, else the one in the JSON file beside it."""
    if embedded is not None:
        text, source = embedded, weights
    else:
        source = weights.with_suffix(".json")
        if not source.is_file():
            raise ModelError(
                f"{weights}: no generator config (neither {CONFIG_METADATA_KEY!r} in its metadata nor {source.name} "
                f"beside it)"
            )
        text = source.read_text(encoding="utf-8")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{source}: generator config is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{source}: generator config must be a JSON object")
    return config


def tensors_under(tensors: dict, prefix: str) -> dict:
    """The tensors whose names start with `prefix`, named without it (one model's part of a training state)."""
    return {name[len(prefix):]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}


def published_tensors(tensors: dict) -> dict:
    """The generator a checkpoint publishes: of a training state, its moving average where the run keeps one, else
    its generator, named without the prefix; a generator checkpoint's tensors as they are."""
    for prefix in (EMA_PREFIX, GENERATOR_PREFIX):
        if any(name.startswith(prefix) for name in tensors):
            return tensors_under(tensors, prefix)
    return tensors


def save_checkpoint(generator, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write `generator`'s weights with its config embedded, in the format `load_generator` reads.

    Written to a temporary name and renamed, so an interrupted save never replaces a good checkpoint with a
    truncated one. `metadata` (str -> str) is stored beside the config, e.g. the training step.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != CHECKPOINT_SUFFIX:
        raise SafronInputError(f"{path}: a checkpoint file name must end in {CHECKPOINT_SUFFIX}")
    stored = dict(metadata or {})
    stored[CONFIG_METADATA_KEY] = json.dumps(generator.config(), sort_keys=True)
    # safetensors refuses tensors that share memory or are not contiguous; a state dict can hold either.
    tensors = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in generator.state_dict().items()}
    with written_atomically(path) as temporary:
        save_file(tensors, str(temporary), metadata=stored)
    return path


def load_generator(path: str | os.PathLike):
    """The generator stored at `path` (run directory, .safetensors, or a training checkpoint's .json) on the CPU,
    in eval mode, gradients off."""
    return load_checkpoint(find_checkpoint(path))


def load_checkpoint(checkpoint: Checkpoint):
    require_module("torch", "torch", "loading checkpoints")
    from safetensors.torch import load_file

    from .models import Generator

    generator = Generator.from_config(checkpoint.config)
    try:
        tensors = load_file(str(checkpoint.weights), device="cpu")
    except Exception as exc:
        raise ModelError(f"{checkpoint.weights}: not a readable safetensors file ({first_line(exc)})") from None
    return load_weights(generator, published_tensors(tensors), checkpoint.weights)


def load_weights(generator, tensors: dict, source):
    """`generator` with `tensors` (name -> torch tensor) loaded, in eval mode with gradients off; weights that do
    not fit its config are a ModelError naming `source`."""
    expected = generator.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ModelError(
            f"{source}: weights do not match the generator config ({len(missing)} missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ModelError(
                f"{source}: tensor {name!r} has shape {list(tensor.shape)}, the config needs "
                f"{list(expected[name].shape)}"
            )
    generator.load_state_dict(tensors)
    generator.requires_grad_(False)
    return generator.eval()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- safron-exported ONNX models -------------------------------------------------------------------------------

def onnx_weights(model) -> dict:
    """name -> float32 numpy array of a safron-exported model's weights, fp16-stored ones (see
    `store_weights_as_float16`) under their original names."""
    import onnx
    from onnx import numpy_helper

    weights = {}
    for initializer in model.graph.initializer:
        values = numpy_helper.to_array(initializer)
        name = initializer.name
        if initializer.data_type == onnx.TensorProto.FLOAT16 and name.endswith(FLOAT16_SUFFIX):
            name, values = name[: -len(FLOAT16_SUFFIX)], values.astype(np.float32)
        weights[name] = values
    return weights
