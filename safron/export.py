"""Checkpoints -> the model contract: load a trained generator, export it to ONNX, check ONNX Runtime against it.

A checkpoint is a safetensors file of generator weights whose architecture (`Generator.config()`) travels with
it: in the file's own metadata under `CONFIG_METADATA_KEY`, or in a JSON file beside it. Weights and config are
never pickled, so loading a checkpoint cannot run code.

The export uses the TorchScript exporter (`dynamo=False`): it needs nothing beyond torch and onnx, and it names
nodes after the module paths (e.g. '/encoder.1/norm/InstanceNormalization'), which is how a TensorRT build
finds the normalisation layers to keep in fp32. The file is written under a temporary name, checked (onnx
checker, the engine's contract check, ONNX Runtime against PyTorch on random masks) and only then renamed, so
a failed export never leaves a file that looks usable.

`fold=True` (the default) exports the generator with the one-hot input folded into its context convolution
(`models.fold_one_hot`): a third less work in the layer that takes about 90 % of a CPU render (1.45x faster
inference for the embedded model, bench/RESULTS.md), outputs within ~2e-5 of the unfolded generator's, the same input
contract. The ONNX metadata says so, and the torch backend rebuilds the folded layer from it.

`weights="float16"` stores the weights as fp16, each followed by a Cast to fp32 that ONNX Runtime folds when it
loads the model: half the file (a width-32 generator is 53 MB in fp32, over the 40 MB an embedded model may
take) and the same fp32 arithmetic. The check then compares with the generator whose weights were rounded to
fp16 the same way, and the result also reports how far rounding moved the output from the fp32 generator's.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import secrets
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import __version__, masks
from .errors import ModelError, SafronInputError, first_line
from .slide_io import check_output_path

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

DEFAULT_OPSET = 17  # read by ONNX Runtime >= 1.13 and TensorRT >= 8.6
# ONNX Runtime only guarantees opsets from 7 on.
MIN_OPSET = 7
DEFAULT_CHECK_SAMPLES = 3
# ONNX Runtime and PyTorch sum convolutions in different orders, so fp32 outputs differ by rounding: measured
# 2e-6 at width 4 and 1.2e-5 at width 64 for random-weight generators. The output in [-1, 1] becomes 8-bit colour with
# one level per 2/255 ~ 7.8e-3, so 1e-4 (1/80 of a level) flips a pixel's colour only at exact rounding ties,
# while any real exporter defect (a wrong layer, active dropout, a missing skip) is orders of magnitude larger.
PARITY_TOLERANCE = 1e-4

# Keys of the metadata the exported ONNX carries, for model cards and render journals.
METADATA_VERSION = "safron.version"
METADATA_GENERATOR_CONFIG = CONFIG_METADATA_KEY  # the same key as in checkpoints
METADATA_CHECKPOINT = "safron.checkpoint"
METADATA_CHECKPOINT_SHA256 = "safron.checkpoint_sha256"
METADATA_WEIGHTS = "safron.weights"  # "float32" or "float16": how the initializers are stored
METADATA_FOLDED = "safron.context_folded"  # "true": the context convolution reads two channels (models.fold_one_hot)
WEIGHT_DTYPES = ("float32", "float16")


def _require_module(module: str, package: str, purpose: str) -> None:
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
    _require_module("safetensors", "safetensors", "reading checkpoints")
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
    with _temporary_beside(path) as temporary:
        save_file(tensors, str(temporary), metadata=stored)
        os.replace(temporary, path)
    return path


def load_generator(path: str | os.PathLike):
    """The generator stored at `path` (run directory, .safetensors, or a training checkpoint's .json) on the CPU,
    in eval mode, gradients off."""
    return _load(find_checkpoint(path))


def _load(checkpoint: Checkpoint):
    _require_module("torch", "torch", "loading checkpoints")
    from safetensors.torch import load_file

    from .models import Generator

    generator = Generator.from_config(checkpoint.config)
    try:
        tensors = load_file(str(checkpoint.weights), device="cpu")
    except Exception as exc:
        raise ModelError(f"{checkpoint.weights}: not a readable safetensors file ({first_line(exc)})") from None
    for prefix in (EMA_PREFIX, GENERATOR_PREFIX):  # a training checkpoint: its published generator
        if any(name.startswith(prefix) for name in tensors):
            tensors = tensors_under(tensors, prefix)
            break
    return load_weights(generator, tensors, checkpoint.weights)


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


# --- export ----------------------------------------------------------------------------------------------------

def random_masks(count: int, window: int, seed: int = 0) -> np.ndarray:
    """Encoded masks float32 [count, 3, window, window]: blocky random classes, like real masks piecewise
    constant with every class and many edges, at a different block size per mask."""
    rng = np.random.default_rng(seed)
    labels = np.empty((count, window, window), np.uint8)
    for i in range(count):
        block = int(rng.integers(8, 64))
        cells = -(-window // block)
        coarse = rng.integers(0, 3, (cells, cells), dtype=np.uint8)
        labels[i] = np.repeat(np.repeat(coarse, block, axis=0), block, axis=1)[:window, :window]
    return masks.labels_to_model_input(labels)


@dataclass(frozen=True)
class ExportResult:
    out_path: Path
    checkpoint: Path
    checkpoint_sha256: str
    opset: int
    parameters: int
    check_samples: int
    max_abs_difference: float
    tolerance: float
    weights: str = "float32"
    rounding_difference: float = 0.0  # |fp16-weight generator - fp32 generator| on the check masks (0 for float32)
    folded: bool = True
    fold_difference: float = 0.0  # |folded generator - generator| on the check masks (0 without the fold)


class ParityError(RuntimeError):
    """ONNX Runtime disagrees with PyTorch beyond the tolerance: an exporter or runtime defect, not the user's."""


def export_onnx(
    checkpoint: str | os.PathLike,
    out_path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    check_samples: int = DEFAULT_CHECK_SAMPLES,
    tolerance: float = PARITY_TOLERANCE,
    weights: str = "float32",
    fold: bool = True,
) -> ExportResult:
    """Export the generator at `checkpoint` to `out_path` as a model-contract ONNX and check it.

    Raises `SafronInputError` for a bad checkpoint, path or option, and `ParityError` when ONNX Runtime's output on
    `check_samples` random masks (one batch, so the dynamic batch dimension is exercised too) differs from
    PyTorch's by more than `tolerance`. Nothing is left at `out_path` unless every check passed.
    """
    for module, package in (("torch", "torch"), ("onnx", "onnx"), ("onnxruntime", "onnxruntime")):
        _require_module(module, package, "safron-export")
    import onnx
    import torch

    from .backends.onnx_runtime import OnnxRuntimeBackend
    from .models import count_parameters, fold_one_hot

    out_path = Path(out_path)
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise SafronInputError(f"opset must be in {MIN_OPSET}..{max_opset} (the installed onnx's newest), got {opset}")
    if check_samples < 1:
        raise SafronInputError(f"check samples must be at least 1, got {check_samples}")
    if not tolerance > 0:
        raise SafronInputError(f"tolerance must be positive, got {tolerance}")
    if weights not in WEIGHT_DTYPES:
        raise SafronInputError(f"weights must be one of {', '.join(WEIGHT_DTYPES)}, got {weights!r}")
    check_output_path(out_path)
    located = find_checkpoint(checkpoint)
    if out_path.exists() and out_path.resolve() == located.weights.resolve():
        raise SafronInputError(f"{out_path}: output would overwrite the checkpoint")
    generator = _load(located)
    if generator.in_channels != 3 or generator.out_channels != 3:
        raise ModelError(
            f"{located.weights}: the model contract needs 3 input and 3 output channels, this generator has "
            f"{generator.in_channels} and {generator.out_channels}"
        )
    checkpoint_sha256 = file_sha256(located.weights)
    samples = random_masks(check_samples, generator.window)
    rounding_difference = fold_difference = 0.0
    fold = fold and generator.context_kind == "dense"  # a dilated context has no large layer to fold
    if fold:
        with torch.inference_mode():
            original = generator(torch.from_numpy(samples)).numpy()
        fold_one_hot(generator)
        with torch.inference_mode():
            fold_difference = float(np.abs(generator(torch.from_numpy(samples)).numpy() - original).max())
    if weights == "float16":
        with torch.inference_mode():
            unrounded = generator(torch.from_numpy(samples)).numpy()
            for tensor in generator.state_dict().values():
                tensor.copy_(tensor.half().float())
            rounding_difference = float(np.abs(generator(torch.from_numpy(samples)).numpy() - unrounded).max())

    with _temporary_beside(out_path) as temporary:
        _torch_export(generator, torch.from_numpy(samples[:1]), temporary, opset)
        model = onnx.load(str(temporary))
        model.doc_string = (
            f"SAFRON generator: mask float32 [N,3,{generator.window},{generator.window}] in {{-1,1}} -> "
            f"image float32 [N,3,{generator.patch},{generator.patch}] in [-1,1]"
        )
        # The checkpoint's own metadata (e.g. the training step) first, so that ours wins on a clash.
        for key, value in {
            **located.metadata,
            METADATA_VERSION: __version__,
            METADATA_GENERATOR_CONFIG: json.dumps(generator.config(), sort_keys=True),
            METADATA_CHECKPOINT: located.weights.name,
            METADATA_CHECKPOINT_SHA256: checkpoint_sha256,
            METADATA_WEIGHTS: weights,
            METADATA_FOLDED: "true" if fold else "false",
        }.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        if weights == "float16":
            _store_weights_as_float16(model)
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(temporary))

        backend = OnnxRuntimeBackend(temporary)
        try:
            signature = backend.signature
            if (signature.window, signature.patch, signature.fixed_batch) != (generator.window, generator.patch, None):
                raise RuntimeError(f"exported model has signature {signature}, expected the generator's with batch N")
            onnx_images = backend.run(samples)
        finally:
            backend.close()
        with torch.inference_mode():
            torch_images = generator(torch.from_numpy(samples)).numpy()
        difference = float(np.abs(onnx_images - torch_images).max())
        # NaN compares false: a non-finite output fails the check as it should.
        if not difference <= tolerance:
            raise ParityError(
                f"ONNX Runtime differs from PyTorch by {difference:.3g} on {check_samples} random masks "
                f"(tolerance {tolerance:g}); {out_path} not written"
            )
        os.replace(temporary, out_path)
    return ExportResult(
        out_path=out_path, checkpoint=located.weights, checkpoint_sha256=checkpoint_sha256, opset=opset,
        parameters=count_parameters(generator), check_samples=check_samples, max_abs_difference=difference,
        tolerance=tolerance, weights=weights, rounding_difference=rounding_difference, folded=fold,
        fold_difference=fold_difference,
    )


# Suffix of an fp16 initializer whose Cast node restores the fp32 tensor under the original name.
FLOAT16_SUFFIX = "__float16"


def _store_weights_as_float16(model) -> None:
    """Replace each fp32 initializer X by an fp16 initializer X__float16 and a node Cast(X__float16) -> X placed
    first in the graph, so that every consumer still reads X in fp32."""
    import onnx
    from onnx import helper, numpy_helper

    kept, casts = [], []
    for initializer in model.graph.initializer:
        if initializer.data_type != onnx.TensorProto.FLOAT:
            kept.append(initializer)
            continue
        values = numpy_helper.to_array(initializer).astype(np.float16)
        kept.append(numpy_helper.from_array(values, initializer.name + FLOAT16_SUFFIX))
        casts.append(helper.make_node("Cast", [initializer.name + FLOAT16_SUFFIX], [initializer.name],
                                      to=onnx.TensorProto.FLOAT, name=f"/weights/{initializer.name}/Cast"))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def onnx_weights(model) -> dict:
    """name -> float32 numpy array of a safron-exported model's weights, fp16-stored ones (see
    `_store_weights_as_float16`) under their original names."""
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


def _torch_export(generator, example, path: Path, opset: int) -> None:
    import torch

    with warnings.catch_warnings():
        # Chosen on purpose (see the module docstring); the newer exporter needs onnxscript.
        warnings.filterwarnings("ignore", r".*legacy TorchScript-based ONNX export", DeprecationWarning)
        # InstanceNorm without running statistics always uses the input's own statistics, in eval mode too:
        # exporting it "with train=True" is exactly right.
        warnings.filterwarnings("ignore", r".*operator 'instance_norm' is set to train=True")
        warnings.filterwarnings("ignore", r"The feature will be removed", DeprecationWarning)
        # The tracer warns about shape checks (InstanceNorm's channel count, a map's size) turned into constants;
        # the channels and the window are fixed by the contract, only the batch varies, and it is dynamic.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            generator, (example,), str(path), input_names=["mask"], output_names=["image"],
            dynamic_axes={"mask": {0: "N"}, "image": {0: "N"}}, opset_version=opset, do_constant_folding=True,
            dynamo=False,
        )


@contextlib.contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary name in `path`'s directory, so that renaming it to `path` is atomic; whatever is there is
    removed on exit unless it was renamed away. The file is left to its writer to create, so that it gets the
    permissions the user's umask gives (mkstemp's would be private)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)


if __name__ == "__main__":  # python -m safron.export: the same as safron-export
    from .cli.export import main

    sys.exit(main())
