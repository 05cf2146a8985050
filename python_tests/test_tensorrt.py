"""TensorRT backend: registration, clean failure without TensorRT, the engine cache's key and its cross-process
build lock (all on CPU), and, where TensorRT and a GPU exist, engine build, cache hits and parity with ONNX Runtime.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_models
import pytest
from gpu_checks import assert_resident_render_matches_host_path
from onnx import TensorProto, helper, numpy_helper

from safron import backends
from safron.backends import create_backend
from safron.backends import tensorrt_backend as trt_backend
from safron.errors import ModelError, SafronInputError
from safron.export import random_masks
from safron.synthesis import write_mask

# fp16 parity, in 8-bit colour levels (an output step of 2/255): fp16 keeps 11 significant bits, a relative
# rounding of 2^-11 ~ 5e-4 per operation, so a few-layer network drifts by a few 1e-3 (well under one level)
# on average while single pixels near rounding ties may move a few levels.
FP16_MEAN_LEVELS = 0.5
FP16_MAX_LEVELS = 4
# fp32 (TF32 off): TensorRT and ONNX Runtime pick different convolution algorithms (implicit GEMM, Winograd,
# FFT) and sum in different orders; 1e-3 is an eighth of a colour level.
FP32_TOLERANCE = 1e-3


def _levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64)) * 255 / 2


# --- CPU: registration and clean failures -------------------------------------------------------------------

@pytest.mark.skipif(backends.available_backends()["tensorrt"], reason="TensorRT is installed here")
def test_cli_backend_tensorrt_without_tensorrt_exits_2_and_writes_nothing(tmp_path):
    model = onnx_models.centre_crop(tmp_path / "crop.onnx")
    mask = write_mask(tmp_path / "mask.png", 300, 300, seed=1)
    out = tmp_path / "out.tif"
    result = subprocess.run(
        [sys.executable, "-m", "safron.cli", str(mask), str(out), "--model", str(model), "--backend", "tensorrt",
         "--quiet"],
        check=False, capture_output=True, text=True, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "tensorrt" in lines[0] and "not installed" in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop.onnx", "mask.png"]


def test_tensorrt_is_a_backend_name_and_checkpoints_are_refused(tmp_path):
    assert "tensorrt" in backends.BACKEND_NAMES
    checkpoint = tmp_path / "generator.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(SafronInputError, match="checkpoint|tensorrt"):
        create_backend("tensorrt", checkpoint)


def test_auto_picks_tensorrt_only_with_tensorrt_and_a_gpu(monkeypatch, tmp_path):
    model = str(tmp_path / "model.onnx")
    monkeypatch.setattr(backends, "_missing_modules", lambda name: [])
    monkeypatch.setattr(backends, "_cuda_device_present", lambda: True)
    assert backends._auto_backend(model) == "tensorrt"
    assert backends._auto_backend(str(tmp_path / "run" / "generator.safetensors")) == "torch"
    monkeypatch.setattr(backends, "_cuda_device_present", lambda: False)
    assert backends._auto_backend(model) == "onnxruntime"
    monkeypatch.setattr(backends, "_missing_modules", lambda name: ["tensorrt"] if name == "tensorrt" else [])
    monkeypatch.setattr(backends, "_cuda_device_present", lambda: True)
    assert backends._auto_backend(model) == "onnxruntime"


@pytest.mark.skipif(backends.available_backends()["tensorrt"], reason="TensorRT is installed here")
def test_auto_runs_onnx_models_on_onnxruntime_without_tensorrt(tmp_path):
    backend = create_backend("auto", onnx_models.centre_crop(tmp_path / "crop.onnx"))
    try:
        assert backend.name == "onnxruntime"
    finally:
        backend.close()


# --- CPU: the model contract on TensorRT's I/O tensors ------------------------------------------------------

_F32, _F16 = "float32", "float16"  # stand for TensorRT's dtypes: the contract only compares them
_IMAGE = [("image", (-1, 3, 256, 256), _F32)]


def _signature(inputs, outputs=_IMAGE):
    return trt_backend._contract_signature(Path("model.onnx"), inputs, outputs, _F32)


@pytest.mark.parametrize("order", ["mask_first", "noise_first"])
def test_a_model_with_noise_channels_meets_the_contract_in_either_input_order(order):
    inputs = [("mask", (-1, 3, 296, 296), _F32), ("noise", (-1, 2, 296, 296), _F32)]
    signature = _signature(inputs if order == "mask_first" else inputs[::-1])
    assert (signature.window, signature.patch, signature.noise_channels, signature.fixed_batch) == (296, 256, 2, None)
    plain = _signature(inputs[:1])
    assert plain.noise_channels == 0 and plain.margin == 20
    assert _signature([("mask", (4, 3, 296, 296), _F32), ("noise", (4, 1, 296, 296), _F32)]).fixed_batch == 4


@pytest.mark.parametrize("inputs, message", [
    ([("mask", (-1, 3, 296, 296), _F32), ("noise", (-1, 2, 280, 280), _F32)], "expected noise"),
    ([("mask", (4, 3, 296, 296), _F32), ("noise", (-1, 2, 296, 296), _F32)], "expected noise"),
    ([("mask", (-1, 3, 296, 296), _F32), ("noise", (-1, 0, 296, 296), _F32)], "expected noise"),
    ([("mask", (-1, 3, 296, 296), _F32), ("noise", (-1, 2, 296, 296), _F16)], "'noise' must be float32"),
    ([("mask", (-1, 3, 296, 296), _F32), ("seed", (-1, 2, 296, 296), _F32)], "named 'noise'"),
    ([("noise", (-1, 2, 296, 296), _F32)], "named 'mask'"),
    ([("mask", (-1, 3, 296, 296), _F32)] * 2, "named 'mask'"),
])
def test_inputs_outside_the_contract_are_refused_by_name(inputs, message):
    with pytest.raises(ModelError, match=message):
        _signature(inputs)


# --- CPU: cache key, cache directory, batch rule, build lock -----------------------------------------------

def test_cache_key_changes_with_each_input():
    base = {"onnx_sha256": "ab" * 32, "tensorrt_version": "10.8.0", "gpu_name": "NVIDIA H100 80GB HBM3",
            "precision": "fp16", "max_batch": 64}
    variants = {"onnx_sha256": "cd" * 32, "tensorrt_version": "10.9.0", "gpu_name": "NVIDIA H200",
                "precision": "fp32", "max_batch": 32}
    keys = {trt_backend.engine_cache_key(**base)}
    for field, value in variants.items():
        keys.add(trt_backend.engine_cache_key(**{**base, field: value}))
    assert len(keys) == 1 + len(variants)
    assert trt_backend.engine_cache_key(**base) == trt_backend.engine_cache_key(**base)


def test_cache_dir_follows_safron_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SAFRON_CACHE_DIR", str(tmp_path / "cache"))
    assert trt_backend.default_cache_dir() == tmp_path / "cache" / "tensorrt"
    monkeypatch.delenv("SAFRON_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert trt_backend.default_cache_dir() == tmp_path / "xdg" / "safron" / "tensorrt"


def test_max_batch_is_the_largest_fitting_power_of_two():
    mib, gib = 2**20, 2**30
    # Half of 1 GiB holds 5 patches of 100 MiB: the largest power of two is 4.
    assert trt_backend.choose_max_batch(1 * gib, 100 * mib) == 4
    # Half of 80 GiB holds hundreds of 60 MiB patches: capped at the limit.
    assert trt_backend.choose_max_batch(80 * gib, 60 * mib) == trt_backend.MAX_BATCH_LIMIT
    # Not even one patch fits: still 1, and TensorRT reports the shortage when it allocates.
    assert trt_backend.choose_max_batch(100 * mib, 300 * mib) == 1


def _build_in_process(path, counter, start, results):
    def slow_build():
        with open(counter, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough that the other process arrives while this one builds
        return b"engine built by %d" % os.getpid()

    start.wait()
    data, built = trt_backend.load_or_build(Path(path), slow_build)
    results.put((data, built))


def test_two_processes_build_once_and_read_the_same_engine(tmp_path):
    context = multiprocessing.get_context("fork")
    path, counter = tmp_path / "cache" / "key.engine", tmp_path / "builds.log"
    start, results = context.Barrier(2), context.Queue()
    workers = [context.Process(target=_build_in_process, args=(path, counter, start, results)) for _ in range(2)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert len(counter.read_text().splitlines()) == 1
    assert sorted(built for _, built in outcomes) == [False, True]
    assert outcomes[0][0] == outcomes[1][0] == path.read_bytes()
    assert not list(path.parent.glob("*.partial"))


def test_a_failed_build_leaves_no_engine_and_the_next_call_builds(tmp_path):
    path = tmp_path / "key.engine"

    def failing_build():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        trt_backend.load_or_build(path, failing_build)
    assert not path.exists() and not list(tmp_path.glob("*.partial"))
    assert trt_backend.load_or_build(path, lambda: b"engine") == (b"engine", True)
    assert trt_backend.load_or_build(path, failing_build) == (b"engine", False)


def test_an_unwritable_cache_dir_is_a_clean_error(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    with pytest.raises(SafronInputError, match="SAFRON_CACHE_DIR"):
        trt_backend.load_or_build(blocker / "key.engine", lambda: b"engine")


# --- GPU with TensorRT ----------------------------------------------------------------------------------------

def _instance_norm_model(path: Path, width: int = 8, seed: int = 0) -> Path:
    """The generator's normalised block in miniature: the 41x41 front convolution, an InstanceNormalization
    named as safron-export names it, LeakyReLU, a 1x1 convolution and tanh."""
    rng = np.random.default_rng(seed)
    consts = [
        numpy_helper.from_array((rng.standard_normal((width, 3, 41, 41)) * 0.03).astype(np.float32), "w_front"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(width)).astype(np.float32), "gamma"),
        numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np.float32), "beta"),
        numpy_helper.from_array((rng.standard_normal((3, width, 1, 1)) * 0.3).astype(np.float32), "w_out"),
    ]
    nodes = [
        helper.make_node("Conv", ["mask", "w_front"], ["h"], name="/front/conv/Conv"),
        helper.make_node("InstanceNormalization", ["h", "gamma", "beta"], ["n"], epsilon=1e-5,
                         name="/encoder.1/norm/InstanceNormalization"),
        helper.make_node("LeakyRelu", ["n"], ["a"], alpha=0.2, name="/encoder.1/act/LeakyRelu"),
        helper.make_node("Conv", ["a", "w_out"], ["logits"], name="/out/conv/Conv"),
        helper.make_node("Tanh", ["logits"], ["image"], name="/out/Tanh"),
    ]
    graph = helper.make_graph(
        nodes, "instance_norm", [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 3, 296, 296])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 256, 256])], initializer=consts,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _reference(model: Path, masks: np.ndarray) -> np.ndarray:
    backend = create_backend("onnxruntime", model)
    try:
        return backend.run(masks)
    finally:
        backend.close()


def _tensorrt(model: Path, cache: Path, **options):
    return trt_backend.TensorRTBackend(model, cache_dir=cache, **options)


@pytest.mark.needs_tensorrt
def test_engine_is_built_once_then_read_from_the_cache(tmp_path):
    model = onnx_models.centre_crop(tmp_path / "crop.onnx")
    first = _tensorrt(model, tmp_path / "cache", max_batch=4)
    try:
        assert first.built_engine and first.engine_path.is_file()
        assert first.engine_path.parent == tmp_path / "cache"
        assert first.signature.window == 296 and first.signature.patch == 256 and first.default_batch_size == 4
        built_at = first.engine_path.stat().st_mtime_ns
    finally:
        first.close()
    second = _tensorrt(model, tmp_path / "cache", max_batch=4)
    try:
        assert not second.built_engine
        assert second.engine_path == first.engine_path and second.engine_path.stat().st_mtime_ns == built_at
    finally:
        second.close()


@pytest.mark.needs_tensorrt
def test_centre_crop_matches_onnxruntime_exactly_across_chunks(tmp_path):
    model = onnx_models.centre_crop(tmp_path / "crop.onnx")
    masks = random_masks(6, 296, seed=3)  # more than max_batch: run() splits the batch
    backend = _tensorrt(model, tmp_path / "cache", max_batch=4)
    try:
        images = backend.run(masks)
    finally:
        backend.close()
    # ±1 is exact in fp16, and a crop only moves values.
    np.testing.assert_array_equal(images, _reference(model, masks))


@pytest.mark.needs_tensorrt
@pytest.mark.parametrize("make_model", [onnx_models.conv_generator, _instance_norm_model],
                         ids=["conv", "instance_norm"])
def test_fp16_engine_matches_onnxruntime_within_colour_levels(tmp_path, make_model):
    model = make_model(tmp_path / "model.onnx")
    masks = random_masks(3, 296, seed=5)
    backend = _tensorrt(model, tmp_path / "cache", max_batch=4)
    try:
        images = backend.run(masks)
    finally:
        backend.close()
    levels = _levels(images, _reference(model, masks))
    assert levels.mean() < FP16_MEAN_LEVELS and levels.max() <= FP16_MAX_LEVELS, (levels.mean(), levels.max())


@pytest.mark.needs_tensorrt
def test_fp32_engine_matches_onnxruntime(tmp_path):
    model = onnx_models.conv_generator(tmp_path / "model.onnx")
    masks = random_masks(2, 296, seed=7)
    backend = _tensorrt(model, tmp_path / "cache", precision="fp32", max_batch=2)
    try:
        images = backend.run(masks)
    finally:
        backend.close()
    np.testing.assert_allclose(images, _reference(model, masks), rtol=0, atol=FP32_TOLERANCE)


@pytest.mark.needs_tensorrt
def test_a_model_with_noise_channels_matches_onnxruntime_across_chunks(tmp_path):
    model = onnx_models.noise_mix(tmp_path / "noise.onnx")
    masks = random_masks(6, 296, seed=11)  # more than max_batch: run() splits masks and noise alike
    noise = np.random.default_rng(12).uniform(-1, 1, (6, 3, 296, 296)).astype(np.float32)
    backend = _tensorrt(model, tmp_path / "cache", precision="fp32", max_batch=4)
    try:
        assert backend.signature.noise_channels == 3
        images = backend.run(masks, noise)
        with pytest.raises(ValueError, match="reads noise"):
            backend.run(masks)
    finally:
        backend.close()
    reference = create_backend("onnxruntime", model)
    try:
        expected = reference.run(masks, noise)
    finally:
        reference.close()
    np.testing.assert_allclose(images, expected, rtol=0, atol=FP32_TOLERANCE)


@pytest.mark.needs_tensorrt
def test_normalisation_layers_and_only_those_are_pinned_to_fp32(tmp_path):
    import tensorrt as trt

    model = _instance_norm_model(tmp_path / "model.onnx")
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(model))
    pinned = trt_backend.pin_normalisation_fp32(network)
    assert any("/encoder.1/norm/" in name for name in pinned), pinned
    assert not any(part in name for name in pinned for part in ("/front/", "/out/", "/act/")), pinned


@pytest.mark.needs_tensorrt
def test_default_max_batch_comes_from_gpu_memory(tmp_path):
    backend = _tensorrt(onnx_models.centre_crop(tmp_path / "crop.onnx"), tmp_path / "cache")
    try:
        assert 1 <= backend.max_batch <= trt_backend.MAX_BATCH_LIMIT
        assert backend.max_batch & (backend.max_batch - 1) == 0  # a power of two
        assert backend.default_batch_size == backend.max_batch
    finally:
        backend.close()


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _device_resident(test):
    """Marks a test of the device-resident TensorRT path: TensorRT, a CUDA device, and a CUDA build of PyTorch."""
    marks = (pytest.mark.needs_tensorrt, pytest.mark.needs_cuda,
             pytest.mark.skipif(not _torch_cuda(),
                                reason="the device-resident TensorRT path needs a CUDA build of PyTorch"))
    for mark in marks:
        test = mark(test)
    return test


@_device_resident
def test_device_resident_render_reproduces_the_mask_with_a_centre_crop_model(tmp_path):
    from safron import engine, masks

    model = onnx_models.centre_crop(tmp_path / "crop.onnx")
    labels = np.random.default_rng(8).integers(0, 3, (700, 900), dtype=np.uint8)
    backend = _tensorrt(model, tmp_path / "cache", max_batch=4)
    try:
        assert backend.device_resident
        image = engine.render_array(labels, backend=backend, blend="cosine")
    finally:
        backend.close()
    # Patches carry the mask's ±1 colours exactly (exact in fp16 too), so any blend of them is the mask again.
    np.testing.assert_array_equal(image, masks.labels_to_colour(labels))


@_device_resident
def test_device_resident_render_matches_the_host_path_of_the_same_engine(tmp_path):
    model = _instance_norm_model(tmp_path / "model.onnx")
    labels = np.random.default_rng(9).integers(0, 3, (600, 1000), dtype=np.uint8)
    resident = _tensorrt(model, tmp_path / "cache", max_batch=8)
    host = _tensorrt(model, tmp_path / "cache", max_batch=8, device_resident=False)
    assert assert_resident_render_matches_host_path(resident, host, labels).std() > 5


@_device_resident
def test_device_resident_noise_render_matches_the_host_path_and_onnxruntime(tmp_path):
    from safron import engine

    model = onnx_models.noise_mix(tmp_path / "noise.onnx")
    labels = np.random.default_rng(13).integers(0, 3, (600, 1000), dtype=np.uint8)
    resident = _tensorrt(model, tmp_path / "cache", precision="fp32", max_batch=8)
    host = _tensorrt(model, tmp_path / "cache", precision="fp32", max_batch=8, device_resident=False)
    # The noise is drawn on the GPU on one path and on the CPU on the other, from the same canvas coordinates.
    on_device = assert_resident_render_matches_host_path(resident, host, labels)
    on_cpu = engine.render_array(labels, model=model, backend="onnxruntime")
    assert np.abs(on_device.astype(int) - on_cpu.astype(int)).max() <= 1
