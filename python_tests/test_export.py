"""Checkpoint -> ONNX export (contract, metadata, parity, clean errors) and the PyTorch backend against ONNX Runtime."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="export and the torch backend need torch (pip install torch)")
pytest.importorskip("safetensors", reason="checkpoints need safetensors (pip install safetensors)")
onnx = pytest.importorskip("onnx", reason="export needs onnx (pip install onnx)")
import onnxruntime as ort  # noqa: E402

import safron  # noqa: E402
from safron import engine, export  # noqa: E402
from safron.cli.export import main as export_main  # noqa: E402
from safron.backends import available_backends, create_backend  # noqa: E402
from safron.errors import ModelError, SafronInputError  # noqa: E402
from safron.export import PARITY_TOLERANCE, load_generator, random_masks, save_checkpoint  # noqa: E402
from safron.models import FoldedContext, Generator, fold_one_hot, normalisation_layers  # noqa: E402

# A narrow generator has the full architecture (all eight levels, norms, dropout) and exports in about a second.
NGF = 4


def ort_session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def torch_images(generator, masks: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return generator.eval()(torch.from_numpy(masks)).numpy()


@pytest.fixture(scope="module")
def generator() -> Generator:
    torch.manual_seed(0)
    model = Generator(ngf=NGF)
    # pix2pix's initialisation (std 0.02) gives a nearly flat image; larger weights make every layer matter, so a
    # wrong layer in the export shows up as a large difference.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, generator):
    directory = tmp_path_factory.mktemp("run")
    save_checkpoint(generator, directory / export.RUN_DIR_CHECKPOINT, metadata={"safron.step": "12"})
    return directory


@pytest.fixture(scope="module")
def exported(tmp_path_factory, run_dir):
    out = tmp_path_factory.mktemp("onnx") / "generator.onnx"
    return export.export_onnx(run_dir, out)


def run_cli(capsys, *argv):
    """Exit code and stderr of safron-export; argparse's own usage errors exit through SystemExit."""
    try:
        code = export_main([str(a) for a in argv])
    except SystemExit as usage_exit:
        code = usage_exit.code
    return code, capsys.readouterr().err


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --- the exported model ----------------------------------------------------------------------------------------

def test_export_passes_the_onnx_checker_and_meets_the_model_contract(exported):
    model = onnx.load(str(exported.out_path))
    onnx.checker.check_model(model, full_check=True)
    (mask,), (image,) = model.graph.input, model.graph.output

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert (mask.name, image.name) == ("mask", "image")
    assert mask.type.tensor_type.elem_type == image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert shape(mask)[1:] == [3, 296, 296] and shape(image)[1:] == [3, 256, 256]
    # The batch dimension is symbolic, and the same symbol on both sides.
    assert isinstance(shape(mask)[0], str) and shape(mask)[0] == shape(image)[0]
    assert exported.opset == export.DEFAULT_OPSET
    assert {o.domain: o.version for o in model.opset_import}[""] == export.DEFAULT_OPSET


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_runtime_matches_pytorch_on_fresh_masks_at_any_batch_size(exported, generator, batch):
    masks = random_masks(batch, 296, seed=100 + batch)
    (onnx_images,) = ort_session(exported.out_path).run(["image"], {"mask": masks})
    reference = torch_images(generator, masks)
    assert onnx_images.shape == (batch, 3, 256, 256)
    assert reference.std() > 0.05, "the test generator should produce a varied image"
    assert np.abs(onnx_images - reference).max() <= PARITY_TOLERANCE
    assert exported.max_abs_difference <= PARITY_TOLERANCE


def test_export_runs_the_generator_in_eval_mode(exported):
    ops = {node.op_type for node in onnx.load(str(exported.out_path)).graph.node}
    assert "Dropout" not in ops
    masks = random_masks(2, 296, seed=3)
    session = ort_session(exported.out_path)
    first, second = (session.run(["image"], {"mask": masks})[0] for _ in range(2))
    np.testing.assert_array_equal(first, second)


def test_export_stores_version_config_checkpoint_hash_and_metadata(exported, run_dir, generator):
    metadata = {p.key: p.value for p in onnx.load(str(exported.out_path)).metadata_props}
    weights = run_dir / export.RUN_DIR_CHECKPOINT
    assert metadata[export.METADATA_VERSION] == safron.__version__
    assert json.loads(metadata[export.METADATA_GENERATOR_CONFIG]) == generator.config()
    assert metadata[export.METADATA_CHECKPOINT] == weights.name
    assert metadata[export.METADATA_CHECKPOINT_SHA256] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert exported.checkpoint_sha256 == metadata[export.METADATA_CHECKPOINT_SHA256]
    # The checkpoint's own metadata travels along, for the model card.
    assert metadata["safron.step"] == "12"


def test_normalisation_nodes_are_named_after_their_layers(exported, generator):
    """A TensorRT build pins InstanceNorm to fp32 by these names ('encoder.1.norm' ->
    '/encoder.1/norm/InstanceNormalization')."""
    nodes = {n.name for n in onnx.load(str(exported.out_path)).graph.node if n.op_type == "InstanceNormalization"}
    expected = {f"/{name.rpartition('.')[0]}/norm/InstanceNormalization" for name in normalisation_layers(generator)}
    assert len(expected) == 13
    assert nodes == expected


def test_export_honours_the_opset_and_accepts_a_safetensors_file(run_dir, tmp_path):
    out = tmp_path / "opset13.onnx"
    result = export.export_onnx(run_dir / export.RUN_DIR_CHECKPOINT, out, opset=13, check_samples=2)
    assert {o.domain: o.version for o in onnx.load(str(out)).opset_import}[""] == 13
    assert result.check_samples == 2 and result.max_abs_difference <= PARITY_TOLERANCE


# --- the command line ------------------------------------------------------------------------------------------

def test_cli_exports_and_prints_the_difference(run_dir, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    code, err = run_cli(capsys, run_dir, out, "--check-samples", 2)
    assert code == 0 and out.is_file()
    assert "max |difference|" in err and str(out) in err
    assert leftovers(tmp_path) == []

    code, err = run_cli(capsys, run_dir, tmp_path / "quiet.onnx", "--quiet")
    assert code == 0 and err == "" and (tmp_path / "quiet.onnx").is_file()


def test_a_parity_failure_exits_1_in_one_line_and_writes_nothing(run_dir, tmp_path, capsys, monkeypatch):
    """An exporter defect (here: the graph gets a shifted output bias) must be caught before the file appears."""
    real_export = export._torch_export

    def defective_export(generator, example, path, opset):
        broken = copy.deepcopy(generator)
        with torch.no_grad():
            broken.decoder[-1].conv.bias.add_(0.05)
        real_export(broken, example, path, opset)

    monkeypatch.setattr(export, "_torch_export", defective_export)
    out = tmp_path / "model.onnx"
    code, err = run_cli(capsys, run_dir, out)
    assert code == 1
    assert err.count("\n") == 1 and "differs from PyTorch" in err and str(out) in err
    assert not out.exists() and leftovers(tmp_path) == []


def _absent(directory, generator):
    return directory / "absent"


def _empty_run_dir(directory, generator):
    return directory


def _onnx_file(directory, generator):
    path = directory / "model.onnx"
    path.write_bytes(b"not a checkpoint")
    return path


def _junk_safetensors(directory, generator):
    path = directory / "junk.safetensors"
    path.write_bytes(b"\0" * 64)
    return path


def _weights_without_config(directory, generator):
    from safetensors.torch import save_file

    path = directory / "no_config.safetensors"
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(path))
    return path


def _config_of_a_wider_generator(directory, generator):
    from safetensors.torch import save_file

    path = directory / "wider.safetensors"
    wider = dict(generator.config(), ngf=2 * NGF)
    tensors = {k: v.contiguous() for k, v in generator.state_dict().items()}
    save_file(tensors, str(path), metadata={export.CONFIG_METADATA_KEY: json.dumps(wider)})
    return path


@pytest.mark.parametrize(
    "make_input, message",
    [
        (_absent, "checkpoint not found"),
        (_empty_run_dir, "not a run directory"),
        (_onnx_file, "not a checkpoint"),
        (_junk_safetensors, "not a readable safetensors file"),
        (_weights_without_config, "no generator config"),
        (_config_of_a_wider_generator, "has shape"),
    ],
    ids=["missing", "empty-dir", "onnx-file", "junk-safetensors", "no-config", "wrong-shapes"],
)
def test_bad_checkpoints_exit_2_with_one_line_naming_the_file(tmp_path, capsys, generator, make_input, message):
    source_dir = tmp_path / "in"
    source_dir.mkdir()
    source = make_input(source_dir, generator)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = run_cli(capsys, source, out_dir / "model.onnx")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("safron-export: error: ")
    assert message in err and str(source_dir) in err
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--opset", "0"], "expected a positive integer"),
        (["--opset", "3"], "opset must be in"),
        (["--check-samples", "many"], "expected a positive integer"),
        (["--tolerance", "-1"], "expected a positive number"),
        (["--weights", "int8"], "invalid choice"),
    ],
)
def test_bad_options_exit_2_with_one_line(run_dir, tmp_path, capsys, argv_tail, message):
    out = tmp_path / "model.onnx"
    code, err = run_cli(capsys, run_dir, out, *argv_tail)
    assert code == 2
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_output_in_a_missing_directory_exits_2(run_dir, tmp_path, capsys):
    code, err = run_cli(capsys, run_dir, tmp_path / "absent" / "model.onnx")
    assert code == 2 and err.count("\n") == 1 and "output directory does not exist" in err


def test_missing_torch_is_a_clean_usage_error(run_dir, tmp_path, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec_without_torch(name, *args):
        return None if name == "torch" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec_without_torch)
    assert available_backends()["torch"] is False
    with pytest.raises(SafronInputError, match="backend 'torch' needs the Python package 'torch'"):
        create_backend("torch", run_dir)
    code, err = run_cli(capsys, run_dir, tmp_path / "model.onnx")
    assert code == 2 and err.count("\n") == 1 and "'torch'" in err and "pip install torch" in err


# --- checkpoint formats ----------------------------------------------------------------------------------------

def _same_weights(a, b) -> bool:
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_a_config_in_a_json_file_beside_the_weights_is_read(tmp_path, generator):
    from safetensors.torch import save_file

    weights = tmp_path / "step_100.safetensors"
    save_file({k: v.contiguous() for k, v in generator.state_dict().items()}, str(weights))
    (tmp_path / "step_100.json").write_text(json.dumps(generator.config()))
    loaded = load_generator(weights)
    assert not loaded.training and _same_weights(loaded, generator)


def test_a_training_state_with_prefixed_generator_tensors_is_read(tmp_path, generator):
    from safetensors.torch import save_file

    tensors = {f"generator.{k}": v.contiguous() for k, v in generator.state_dict().items()}
    tensors["discriminator.layers.0.conv.weight"] = torch.zeros(4, 6, 4, 4)
    weights = tmp_path / "state.safetensors"
    save_file(tensors, str(weights), metadata={export.CONFIG_METADATA_KEY: json.dumps(generator.config())})
    assert _same_weights(load_generator(weights), generator)


def test_float16_weights_halve_the_file_and_compute_like_the_rounded_generator(run_dir, exported, generator, tmp_path):
    result = export.export_onnx(run_dir, tmp_path / "half.onnx", weights="float16")
    assert result.weights == "float16"
    assert result.out_path.stat().st_size < 0.6 * exported.out_path.stat().st_size
    model = onnx.load(str(result.out_path))
    assert {entry.key: entry.value for entry in model.metadata_props}[export.METADATA_WEIGHTS] == "float16"
    assert all(init.data_type != onnx.TensorProto.FLOAT for init in model.graph.initializer)
    # ONNX Runtime equals the (folded) generator whose weights were rounded to fp16, not the fp32 one.
    rounded = fold_one_hot(copy.deepcopy(generator))
    with torch.no_grad():
        for tensor in rounded.state_dict().values():
            tensor.copy_(tensor.half().float())
    masks = random_masks(2, 296, seed=11)
    onnx_out = ort_session(result.out_path).run(None, {"mask": masks})[0]
    assert np.abs(onnx_out - torch_images(rounded, masks)).max() <= PARITY_TOLERANCE
    full_difference = np.abs(onnx_out - torch_images(generator, masks)).max()
    assert PARITY_TOLERANCE < full_difference < 0.05 and 0 < result.rounding_difference < 0.05
    # The torch backend reads fp16-stored weights back under their names.
    backend = create_backend("torch", result.out_path)
    try:
        assert np.abs(backend.run(masks) - onnx_out).max() <= PARITY_TOLERANCE
    finally:
        backend.close()


def test_the_folded_context_gives_the_generators_output_for_one_hot_masks_only(generator):
    folded = fold_one_hot(copy.deepcopy(generator))
    assert isinstance(folded.context, FoldedContext) and folded.context.weight.shape[1] == 2
    one_hot = random_masks(3, 296, seed=12)
    assert np.abs(torch_images(folded, one_hot) - torch_images(generator, one_hot)).max() <= PARITY_TOLERANCE
    # The fold assumes the channels sum to -1: any other input (here all -1) tells the two apart.
    other = -np.ones_like(one_hot)
    assert np.abs(torch_images(folded, other) - torch_images(generator, other)).max() > 100 * PARITY_TOLERANCE


def _context_input_channels(path) -> int:
    model = onnx.load(str(path))
    context = next(node for node in model.graph.node if node.op_type == "Conv")
    weight = next(init for init in model.graph.initializer if init.name == context.input[1])
    return weight.dims[1]


def test_export_folds_by_default_and_not_with_no_fold(run_dir, exported, tmp_path, capsys):
    metadata = {entry.key: entry.value for entry in onnx.load(str(exported.out_path)).metadata_props}
    assert exported.folded and metadata[export.METADATA_FOLDED] == "true"
    assert _context_input_channels(exported.out_path) == 2 and 0 < exported.fold_difference <= PARITY_TOLERANCE
    code, err = run_cli(capsys, run_dir, tmp_path / "plain.onnx", "--no-fold")
    assert code == 0 and "folding" not in err
    plain = onnx.load(str(tmp_path / "plain.onnx"))
    assert {entry.key: entry.value for entry in plain.metadata_props}[export.METADATA_FOLDED] == "false"
    assert _context_input_channels(tmp_path / "plain.onnx") == 3
    # Both read the same [N, 3, 296, 296] masks and agree within the parity tolerance.
    masks = random_masks(2, 296, seed=13)
    folded_out = ort_session(exported.out_path).run(None, {"mask": masks})[0]
    plain_out = ort_session(tmp_path / "plain.onnx").run(None, {"mask": masks})[0]
    assert np.abs(folded_out - plain_out).max() <= PARITY_TOLERANCE


def test_cli_says_how_far_float16_weights_moved_the_output(run_dir, tmp_path, capsys):
    code, err = run_cli(capsys, run_dir, tmp_path / "half.onnx", "--weights", "float16")
    assert code == 0 and "float16 weights" in err and "fp16 weights moved the output by at most" in err


# --- the torch backend -----------------------------------------------------------------------------------------

def test_torch_backend_matches_onnx_runtime_on_the_same_generator(run_dir, exported):
    masks = random_masks(4, 296, seed=7)
    reference = create_backend("torch", run_dir)
    onnx_backend = create_backend("onnxruntime", exported.out_path)
    try:
        assert (reference.name, reference.signature) == ("torch", onnx_backend.signature)
        assert reference.signature.fixed_batch is None and reference.signature.margin == 20
        torch_out, onnx_out = reference.run(masks), onnx_backend.run(masks)
    finally:
        reference.close()
        onnx_backend.close()
    assert torch_out.dtype == np.float32 and torch_out.shape == (4, 3, 256, 256)
    assert np.abs(torch_out - onnx_out).max() <= PARITY_TOLERANCE


def test_auto_picks_the_backend_that_reads_the_model(run_dir, exported):
    for model, expected in ((run_dir, "torch"), (run_dir / export.RUN_DIR_CHECKPOINT, "torch"),
                            (exported.out_path, "onnxruntime")):
        backend = create_backend("auto", model)
        backend.close()
        assert backend.name == expected


def test_onnx_runtime_refuses_checkpoints(run_dir):
    with pytest.raises(SafronInputError, match="export it with safron-export"):
        create_backend("onnxruntime", run_dir)
    with pytest.raises(ModelError, match="checkpoint not found"):
        create_backend("torch", run_dir / "absent.safetensors")


def test_torch_backend_restores_the_thread_count_on_close(run_dir):
    before = torch.get_num_threads()
    backend = create_backend("torch", run_dir, threads=1)
    assert torch.get_num_threads() == 1
    backend.close()
    assert torch.get_num_threads() == before


def test_normalisation_stays_fp32_under_autocast():
    """The mechanism the CUDA path uses, exercised with CPU autocast (bfloat16)."""
    from safron.backends.torch_backend import keep_normalisation_fp32

    torch.manual_seed(0)
    # A 3x3 context convolution instead of 41x41: bfloat16 convolutions are slow on CPU, and the U-Net with its
    # normalisation layers is the same.
    generator = Generator(ngf=NGF, window=258).eval()
    wrapped = keep_normalisation_fp32(copy.deepcopy(generator))
    masks = torch.from_numpy(random_masks(1, 258, seed=9))
    seen = []
    for layer in normalisation_layers(wrapped).values():
        layer.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
    with torch.inference_mode():
        np.testing.assert_array_equal(wrapped(masks).numpy(), generator(masks).numpy())
        assert seen == [torch.float32] * 13
        seen.clear()
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            low_precision = wrapped(masks)
    assert seen == [torch.float32] * 13
    assert low_precision.dtype == torch.bfloat16


@pytest.mark.needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="this torch has no CUDA device")
def test_torch_cuda_backend_matches_fp32_cpu_within_fp16_rounding(run_dir):
    masks = random_masks(4, 296, seed=11)
    from safron.backends.torch_backend import CUDA_BATCH_SIZE, TorchBackend

    gpu, cpu = TorchBackend(run_dir), TorchBackend(run_dir, device="cpu")
    try:
        assert gpu.device.type == "cuda" and gpu.default_batch_size == CUDA_BATCH_SIZE
        difference = np.abs(gpu.run(masks) - cpu.run(masks))
    finally:
        gpu.close()
        cpu.close()
    # fp16 keeps 11 significant bits; on a [-1, 1] output a few 1e-3 is one or two 8-bit levels.
    assert difference.max() < 2e-2 and difference.mean() < 2e-3


# --- the engine ------------------------------------------------------------------------------------------------

def test_engine_renders_the_exported_model_like_the_checkpoint(run_dir, exported):
    rng = np.random.default_rng(4)
    labels = np.repeat(np.repeat(rng.integers(0, 3, (10, 13), dtype=np.uint8), 30, axis=0), 30, axis=1)
    from_onnx = engine.render_array(labels, model=exported.out_path)
    from_checkpoint = engine.render_array(labels, model=run_dir / export.RUN_DIR_CHECKPOINT, backend="torch")
    assert from_onnx.shape == (300, 390, 3) and from_onnx.dtype == np.uint8
    assert from_onnx.std() > 5
    # Both round the same float image to 8 bits: at most one level apart, at rare rounding ties.
    difference = np.abs(from_onnx.astype(int) - from_checkpoint.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


@pytest.mark.parametrize("options,folded", [({"upsample": "resize"}, True),
                                            ({"upsample": "resize", "context": "dilated"}, False),
                                            ({"upsample": "resize", "context": "dilated", "levels": 5}, False)])
def test_other_decoders_and_contexts_export_and_read_back_into_pytorch(tmp_path, options, folded):
    """The resize decoder, the dilated context and a shallower U-Net meet the contract through ONNX Runtime and the
    torch backend; a dilated context has no large layer to fold and is exported as it is."""
    torch.manual_seed(1)
    model = Generator(ngf=NGF, **options)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(model.eval(), run / export.RUN_DIR_CHECKPOINT)
    result = export.export_onnx(run, tmp_path / "variant.onnx")
    assert result.folded == folded and _context_input_channels(result.out_path) == (2 if folded else 3)
    masks = random_masks(2, 296, seed=3)
    expected = torch_images(model, masks)
    np.testing.assert_allclose(ort_session(result.out_path).run(None, {"mask": masks})[0], expected, rtol=0,
                               atol=PARITY_TOLERANCE)
    reference = create_backend("torch", result.out_path)
    try:
        assert np.abs(reference.run(masks) - expected).max() <= PARITY_TOLERANCE
    finally:
        reference.close()


def _op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_a_resizing_decoder_is_exported_as_the_transposed_convolutions_it_equals(tmp_path, capsys):
    """Cheaper inference (`models.transposed_decoder`), the same images, and `--init` from the file trains the
    resizing decoder again with the weights it was exported from."""
    from safron.train import generator_from_onnx

    torch.manual_seed(2)
    resizing = Generator(ngf=NGF, upsample="resize", context="dilated")
    with torch.no_grad():
        for parameter in resizing.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    resizing.eval()
    save_checkpoint(resizing, tmp_path / "resize.safetensors")
    code, err = run_cli(capsys, tmp_path / "resize.safetensors", tmp_path / "fast.onnx")
    assert code == 0 and "transposing the resizing decoder moved the output by at most" in err
    assert "ConvTranspose" in _op_types(tmp_path / "fast.onnx") and "Resize" not in _op_types(tmp_path / "fast.onnx")
    metadata = {entry.key: entry.value for entry in onnx.load(str(tmp_path / "fast.onnx")).metadata_props}
    assert metadata[export.METADATA_DECODER_TRANSPOSED] == "true"
    assert json.loads(metadata[export.CONFIG_METADATA_KEY])["upsample"] == "transpose"
    masks = random_masks(3, 296, seed=21)
    expected = torch_images(resizing, masks)
    fast = ort_session(tmp_path / "fast.onnx").run(None, {"mask": masks})[0]
    assert np.abs(fast - expected).max() <= PARITY_TOLERANCE and expected.std() > 0.05
    # --no-fold keeps the layers as trained.
    code, err = run_cli(capsys, tmp_path / "resize.safetensors", tmp_path / "plain.onnx", "--no-fold")
    assert code == 0 and "transposing" not in err
    assert "Resize" in _op_types(tmp_path / "plain.onnx") and "ConvTranspose" not in _op_types(tmp_path / "plain.onnx")
    plain_metadata = {entry.key: entry.value for entry in onnx.load(str(tmp_path / "plain.onnx")).metadata_props}
    assert plain_metadata[export.METADATA_DECODER_TRANSPOSED] == "false"
    # Training continues from the resizing decoder, within rounding of the exported weights.
    trained = generator_from_onnx(tmp_path / "fast.onnx")
    assert trained.upsample == "resize" and trained.training
    for key, value in resizing.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[key], value, rtol=0, atol=1e-6)
