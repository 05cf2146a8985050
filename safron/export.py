"""Checkpoints -> the model contract: load a trained generator, export it to ONNX, check ONNX Runtime against it.

The checkpoint format and the metadata keys of the exported model are safron.checkpoints' (inference reads them
without importing this module); its names stay importable from here.

The export uses the TorchScript exporter (`dynamo=False`): it needs nothing beyond torch and onnx, and it names
nodes after the module paths (e.g. '/encoder.1/norm/InstanceNormalization'), which is how a TensorRT build
finds the normalisation layers to keep in fp32. The file is written under a temporary name, checked (onnx
checker, the engine's contract check, ONNX Runtime against PyTorch on random masks) and only then renamed, so
a failed export never leaves a file that looks usable.

`fold=True` (the default) exports the generator with the one-hot input folded into its context convolution
(`models.fold_one_hot`): a third less work in the layer that takes about 90 % of a CPU render (1.45x faster
inference for the embedded model, bench/RESULTS.md), outputs within ~2e-5 of the unfolded generator's, the same input
contract. The ONNX metadata says so, and the torch backend rebuilds the folded layer from it. The same flag writes a
decoder trained with `upsample="resize"` (nearest x2, then a 3x3 convolution) as the 4x4 stride-2 transposed
convolutions it equals (`models.transposed_decoder`): the same function up to rounding, with 16 instead of 36
multiply-adds per input pixel and channel pair (a width-32 resizing generator renders at 1.28x the embedded model's
CPU time per patch instead of 1.70x, bench/RESULTS.md). The metadata records it, so that `--init` from the file
trains the resizing decoder again (`load_onnx_generator(as_trained=True)`).

`weights="float16"` stores the weights as fp16, each followed by a Cast to fp32 that ONNX Runtime folds when it
loads the model: half the file (a width-32 generator is 53 MB in fp32, over the 40 MB an embedded model may
take) and the same fp32 arithmetic. The check then compares with the generator whose weights were rounded to
fp16 the same way, and the result also reports how far rounding moved the output from the fp32 generator's.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import __version__, masks
from .checkpoints import (  # noqa: F401  the checkpoint names are re-exported: safron.export was their home
    CHECKPOINT_SUFFIX, CONFIG_METADATA_KEY, EMA_PREFIX, FLOAT16_SUFFIX, GENERATOR_PREFIX, METADATA_CHECKPOINT,
    METADATA_CHECKPOINT_SHA256, METADATA_DECODER_TRANSPOSED, METADATA_FOLDED, METADATA_LOSS_NETWORKS,
    METADATA_GENERATOR_CONFIG, METADATA_VERSION, METADATA_WEIGHTS,
    RUN_DIR_CHECKPOINT, Checkpoint, file_sha256, find_checkpoint, is_checkpoint_path, load_generator, load_weights,
    load_checkpoint, loss_networks, onnx_weights, require_module, save_checkpoint, tensors_under,
)
from .errors import ModelError, SafronInputError
from .files import written_atomically
from .noise import canvas_noise
from .slide_io import check_output_path

DEFAULT_OPSET = 17  # read by ONNX Runtime >= 1.13 and TensorRT >= 8.6
# ONNX Runtime only guarantees opsets from 7 on.
MIN_OPSET = 7
DEFAULT_CHECK_SAMPLES = 3
# ONNX Runtime and PyTorch sum convolutions in different orders, so fp32 outputs differ by rounding: measured
# 2e-6 at width 4 and 1.2e-5 at width 64 for random-weight generators. The output in [-1, 1] becomes 8-bit colour with
# one level per 2/255 ~ 7.8e-3, so 1e-4 (1/80 of a level) flips a pixel's colour only at exact rounding ties,
# while any real exporter defect (a wrong layer, active dropout, a missing skip) is orders of magnitude larger.
PARITY_TOLERANCE = 1e-4

WEIGHT_DTYPES = ("float32", "float16")


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
    folded: bool = True  # the one-hot input folded into the context convolution
    fold_difference: float = 0.0  # |rewritten generator - generator| on the check masks (0 without a rewrite)
    decoder_transposed: bool = False  # a resizing decoder written as transposed convolutions


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
        require_module(module, package, "safron-export")
    import onnx
    import torch

    from .backends.onnx_runtime import OnnxRuntimeBackend
    from .models import count_parameters, fold_one_hot, transposed_decoder

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
    generator = load_checkpoint(located)
    if generator.in_channels != 3 or generator.out_channels != 3:
        raise ModelError(
            f"{located.weights}: the model contract needs 3 input and 3 output channels, this generator has "
            f"{generator.in_channels} and {generator.out_channels}"
        )
    checkpoint_sha256 = file_sha256(located.weights)
    networks = loss_networks(checkpoint, located)
    samples = random_masks(check_samples, generator.window)
    # A generator with noise channels gets noise as the engine draws it (canvas coordinates), one window per sample.
    noise = None
    if generator.noise_channels:
        noise = np.stack([canvas_noise(300 * k, 0, generator.window, generator.window, generator.noise_channels)
                          for k in range(check_samples)])

    def images(model) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(samples), None if noise is None else torch.from_numpy(noise)).numpy()

    rounding_difference = fold_difference = 0.0
    # The exact rewrites for inference. A dilated context has no large layer to fold.
    transpose = fold and generator.upsample == "resize"
    fold = fold and generator.context_kind == "dense"
    if fold or transpose:
        original = images(generator)
        if fold:
            fold_one_hot(generator)
        if transpose:
            transposed_decoder(generator)
        fold_difference = float(np.abs(images(generator) - original).max())
    if weights == "float16":
        unrounded = images(generator)
        with torch.inference_mode():
            for tensor in generator.state_dict().values():
                tensor.copy_(tensor.half().float())
        rounding_difference = float(np.abs(images(generator) - unrounded).max())

    with written_atomically(out_path) as temporary:  # renamed only once every check passed
        example = [torch.from_numpy(samples[:1])] + ([] if noise is None else [torch.from_numpy(noise[:1])])
        _torch_export(generator, tuple(example), temporary, opset)
        model = onnx.load(str(temporary))
        noise_input = (f" and noise float32 [N,{generator.noise_channels},{generator.window},{generator.window}] "
                       "in [-1,1] (safron.noise)") if generator.noise_channels else ""
        model.doc_string = (
            f"SAFRON generator: mask float32 [N,3,{generator.window},{generator.window}] in {{-1,1}}{noise_input} -> "
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
            METADATA_DECODER_TRANSPOSED: "true" if transpose else "false",
            **({METADATA_LOSS_NETWORKS: networks} if networks else {}),
        }.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        if weights == "float16":
            store_weights_as_float16(model)
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(temporary))

        backend = OnnxRuntimeBackend(temporary)
        try:
            signature = backend.signature
            expected = (generator.window, generator.patch, None, generator.noise_channels)
            if (signature.window, signature.patch, signature.fixed_batch, signature.noise_channels) != expected:
                raise RuntimeError(f"exported model has signature {signature}, expected the generator's with batch N")
            onnx_images = backend.run(samples, noise)
        finally:
            backend.close()
        torch_images = images(generator)
        difference = float(np.abs(onnx_images - torch_images).max())
        # NaN compares false: a non-finite output fails the check as it should.
        if not difference <= tolerance:
            raise ParityError(
                f"ONNX Runtime differs from PyTorch by {difference:.3g} on {check_samples} random masks "
                f"(tolerance {tolerance:g}); {out_path} not written"
            )
    return ExportResult(
        out_path=out_path, checkpoint=located.weights, checkpoint_sha256=checkpoint_sha256, opset=opset,
        parameters=count_parameters(generator), check_samples=check_samples, max_abs_difference=difference,
        tolerance=tolerance, weights=weights, rounding_difference=rounding_difference, folded=fold,
        fold_difference=fold_difference, decoder_transposed=transpose,
    )


def store_weights_as_float16(model) -> None:
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


def _torch_export(generator, example: tuple, path: Path, opset: int) -> None:
    """`generator` traced on `example` (the mask, and the noise for a generator with noise channels) into `path`."""
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
        names = ["mask", "noise"][:len(example)]
        torch.onnx.export(
            generator, example, str(path), input_names=names, output_names=["image"],
            dynamic_axes={**{name: {0: "N"} for name in names}, "image": {0: "N"}}, opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


if __name__ == "__main__":  # python -m safron.export: the same as safron-export
    from .cli.export import main

    sys.exit(main())
