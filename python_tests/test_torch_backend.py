"""The PyTorch backend on safron-exported ONNX models, `auto`'s choice, the engine's backend hooks, and (GPU
machines only) the device-resident render: CUDA accumulator fed with torch tensors."""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import pytest
import tifffile
from PIL import Image

torch = pytest.importorskip("torch", reason="the torch backend needs torch (pip install torch)")

from gpu_checks import assert_resident_render_matches_host_path  # noqa: E402
from onnx_models import centre_crop  # noqa: E402

from safron import backends, engine, geometry, masks  # noqa: E402
from safron.accumulator import BandAccumulator, StagingBandAccumulator  # noqa: E402
from safron.backends.onnx_runtime import OnnxRuntimeBackend  # noqa: E402
from safron.backends.torch_backend import (  # noqa: E402
    TorchBackend,
    load_onnx_generator,
)
from safron.cuda_band import encode_labels  # noqa: E402
from safron.errors import ModelError, SafronInputError  # noqa: E402
from safron.export import CONFIG_METADATA_KEY, PARITY_TOLERANCE, random_masks  # noqa: E402

DEFAULT_MODEL = engine.default_model_path()


def block_labels(height: int, width: int, seed: int, block: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, (height // block + 1, width // block + 1), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, block, axis=0), block, axis=1)[:height, :width]


# --- reading safron-exported ONNX into PyTorch --------------------------------------------------------------------

def test_torch_backend_runs_a_safron_exported_onnx_like_onnx_runtime():
    from safron.noise import canvas_noise

    windows = random_masks(2, 296, seed=3)
    reference, rebuilt = OnnxRuntimeBackend(DEFAULT_MODEL, threads=1), TorchBackend(DEFAULT_MODEL, threads=1)
    try:
        assert rebuilt.signature == reference.signature
        # The default reads noise (since the thirteenth session): both get the same canvas noise.
        channels = rebuilt.signature.noise_channels
        noise = np.stack([canvas_noise(300 * k, 0, 296, 296, channels) for k in range(2)]) if channels else None
        difference = np.abs(rebuilt.run(windows, noise) - reference.run(windows, noise)).max()
    finally:
        reference.close()
        rebuilt.close()
    assert difference <= PARITY_TOLERANCE


def _edited(tmp_path, edit):
    model = onnx.load(str(DEFAULT_MODEL))
    edit(model)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    return path


def _drop_the_config(model):
    kept = [entry for entry in model.metadata_props if entry.key != CONFIG_METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)


def _claim_a_wider_generator(model):
    for entry in model.metadata_props:
        if entry.key == CONFIG_METADATA_KEY:
            entry.value = entry.value.replace('"ngf": 16', '"ngf": 24')


def _junk(path):
    path.write_bytes(b"\x08junk" * 10)
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp_path: centre_crop(tmp_path / "crop.onnx"), "not exported by safron-export"),
        (lambda tmp_path: _edited(tmp_path, _drop_the_config), "not exported by safron-export"),
        (lambda tmp_path: _edited(tmp_path, _claim_a_wider_generator), "has shape .* the config needs"),
        (lambda tmp_path: _junk(tmp_path / "junk.onnx"), "not a readable ONNX model"),
    ],
)
def test_onnx_models_pytorch_cannot_rebuild_are_refused_in_one_line(tmp_path, make, message):
    with pytest.raises(ModelError, match=message) as caught:
        load_onnx_generator(make(tmp_path))
    assert "\n" not in str(caught.value)


def test_missing_onnx_package_is_a_clean_usage_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real_find_spec(name, *a))
    with pytest.raises(SafronInputError, match="Python package 'onnx'"):
        backends.create_backend("torch", DEFAULT_MODEL)


def test_encode_labels_equals_the_numpy_model_input():
    labels = np.random.default_rng(0).integers(0, 3, (3, 40, 50), dtype=np.uint8)
    np.testing.assert_array_equal(encode_labels(torch.from_numpy(labels)).numpy(), masks.labels_to_model_input(labels))
    assert encode_labels(torch.from_numpy(labels), torch.float16).dtype == torch.float16


# --- auto -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gpu", [False, True])
def test_auto_sends_safron_models_to_torch_only_when_a_gpu_is_present(tmp_path, monkeypatch, gpu):
    monkeypatch.setattr(backends, "_cuda_device_present", lambda: gpu)
    monkeypatch.setattr(backends, "_missing_modules", lambda name: ["tensorrt"] if name == "tensorrt" else [])
    foreign = centre_crop(tmp_path / "crop.onnx")
    assert backends._auto_backend(DEFAULT_MODEL) == ("torch" if gpu else "onnxruntime")
    # PyTorch cannot rebuild a model safron did not export: ONNX Runtime runs it whatever the machine.
    assert backends._auto_backend(foreign) == "onnxruntime"


def test_auto_prefers_tensorrt_on_a_gpu_for_models_without_noise(monkeypatch, tmp_path):
    monkeypatch.setattr(backends, "_cuda_device_present", lambda: True)
    monkeypatch.setattr(backends, "_missing_modules", lambda name: [])
    noise_free = centre_crop(tmp_path / "centre_crop.onnx")
    assert backends._auto_backend(noise_free) == "tensorrt"
    # A noise-reading model (the default) goes to PyTorch, whose noise input has run on a GPU; TensorRT's only
    # when asked for.
    assert backends._auto_backend(DEFAULT_MODEL) == "torch"


# --- the engine's backend hooks -----------------------------------------------------------------------------------

class _Patches:
    """Stands for device patches: the engine may only slice them along the batch axis."""

    def __init__(self, array):
        self.array = array

    def __getitem__(self, index):
        assert isinstance(index, slice), f"the engine gathered patches with {index!r}"
        return _Patches(self.array[index])


class _Band(BandAccumulator):
    def __init__(self, inner):
        self.inner, self.added = inner, 0
        self.block_cols = inner.block_cols

    def set_num_threads(self, threads):
        self.inner.set_num_threads(threads)

    def add(self, patches, ys, xs, image_height):
        assert isinstance(patches, _Patches)
        self.added += len(ys)
        self.inner.add(patches.array, ys, xs, image_height)

    def finalise(self, *args):
        return self.inner.finalise(*args)

    def discard(self, *args):
        self.inner.discard(*args)


class _HookedBackend(OnnxRuntimeBackend):
    """Labels in, encoding inside `infer`, opaque patches out, its own accumulator: what a GPU backend does."""

    def prepare(self, labels):
        assert labels.dtype == np.uint8 and labels.shape[1:] == (296, 296)
        return labels.copy()

    def infer(self, labels):
        return _Patches(self.run(masks.labels_to_model_input(labels)))

    def band_accumulator(self, plan, blend):
        self.band = _Band(geometry.band_accumulator(plan, blend))
        return self.band


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_the_engine_goes_through_the_backend_hooks_and_gets_the_same_image(tmp_path, batch_size):
    model = centre_crop(tmp_path / "crop.onnx")
    labels = block_labels(700, 1300, seed=5)
    hooked = _HookedBackend(model, threads=1)
    try:
        image = engine.render_array(labels, backend=hooked, batch_size=batch_size)
        plan = engine.geometry.plan(*(size + 2 * engine.DEFAULT_OUTSET for size in labels.shape))  # the grid
        assert hooked.band.added == plan.count
        # The backend passed in is left open for the next render.
        assert engine.render_array(labels[:300, :300], backend=hooked).shape == (300, 300, 3)
    finally:
        hooked.close()
    np.testing.assert_array_equal(image, masks.labels_to_colour(labels))
    np.testing.assert_array_equal(image, engine.render_array(labels, model=model, batch_size=batch_size))


class _StagedBand(_Band, StagingBandAccumulator):
    """A band with a GPU accumulator's contract (see safron.cuda_band.CudaBand): whole rows per finalise, pixels
    handed back in a buffer of its own, which the file sink writes to the canvas itself."""

    def __init__(self, inner, width):
        super().__init__(inner)
        self.block_cols, self.width, self.staged_calls = width, width, 0

    def finalise_staged(self, y0, y1, x0, x1):
        self.staged_calls += 1
        assert (x0, x1) == (0, self.width), "the engine finalised part of a row despite block_cols == width"
        staging = np.full((y1 - y0, x1 - x0, 3), 17, np.uint8)  # reused memory is never clean
        return staging, self.inner.finalise(y0, y1, staging, x0, x1)


class _StagedBackend(_HookedBackend):
    def band_accumulator(self, plan, blend):
        self.band = _StagedBand(geometry.band_accumulator(plan, blend), plan.width)
        return self.band


def test_a_staged_accumulator_renders_the_same_file(tmp_path, monkeypatch):
    """The file sink's GPU branch (finalise_staged + the canvas's write_block, whole rows), exercised on the CPU."""
    model = centre_crop(tmp_path / "crop.onnx")
    labels = block_labels(700, 1300, seed=9)
    mask_path = tmp_path / "mask.png"
    Image.fromarray(masks.labels_to_colour(labels)).save(mask_path)
    staged = _StagedBackend(model, threads=1)
    monkeypatch.setattr(engine, "create_backend", lambda *args, **kwargs: staged)
    engine.render(mask_path, tmp_path / "staged.tif", model=model, progress=False, compression="none")
    monkeypatch.undo()
    engine.render(mask_path, tmp_path / "plain.tif", model=model, backend="onnxruntime", progress=False,
                  compression="none")
    grown = (size + 2 * engine.DEFAULT_OUTSET for size in labels.shape)  # the render's grid reaches past the image
    assert staged.band.staged_calls == engine.geometry.plan(*grown).rows
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "staged.tif"), tifffile.imread(tmp_path / "plain.tif"))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "staged.tif"), masks.labels_to_colour(labels))


# --- the device-resident path (GPU machines) ---------------------------------------------------------------------

needs_torch_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="this torch has no CUDA device")


@pytest.mark.needs_cuda
@needs_torch_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cuda_band_fed_with_torch_tensors_matches_the_cpu_accumulator(dtype):
    from safron.cuda_band import CudaBand, DevicePatches

    plan = geometry.plan(700, 2300)  # three column blocks, so block-wise finalising is exercised
    ys, xs = plan.origins()
    patches = np.random.default_rng(2).uniform(-1, 1, (plan.count, 3, plan.patch, plan.patch)).astype(np.float32)
    patches = torch.from_numpy(patches).to(dtype).float().numpy()  # values both sides can hold exactly
    cpu, gpu = geometry.band_accumulator(plan, "cosine"), CudaBand(plan, "cosine", torch.device("cuda"))
    expected = np.zeros((plan.height, plan.width, 3), np.uint8)
    actual = np.zeros_like(expected)
    done = 0
    for row in range(plan.rows):
        sel = slice(row * plan.cols, (row + 1) * plan.cols)
        cpu.add(np.ascontiguousarray(patches[sel]), ys[sel], xs[sel], plan.height)
        tensor = torch.from_numpy(patches[sel]).to("cuda", dtype)
        ready = torch.cuda.Event()
        ready.record()
        gpu.add(DevicePatches(tensor, ready)[0:plan.cols], ys[sel], xs[sel], plan.height)
        del tensor  # the band must keep the memory alive until its kernel ran (record_stream)
        end = plan.final_rows_end(row)
        for x0, x1 in ((0, 1024), (1024, plan.width)):
            assert cpu.finalise(done, end, expected[done:end, x0:x1], x0, x1) == 0
            assert gpu.finalise(done, end, actual[done:end, x0:x1], x0, x1) == 0
        done = end
    assert done == plan.height
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.needs_cuda
@needs_torch_cuda
def test_device_resident_render_matches_the_host_path_on_the_same_gpu():
    labels = block_labels(900, 1400, seed=6)
    resident = TorchBackend(DEFAULT_MODEL, device="cuda")
    host = TorchBackend(DEFAULT_MODEL, device="cuda", device_resident=False)
    assert assert_resident_render_matches_host_path(resident, host, labels).std() > 5


def test_cuda_graphs_apply_only_to_the_device_resident_path():
    cpu = TorchBackend(DEFAULT_MODEL, device="cpu", cuda_graphs=True)
    try:
        assert not cpu.cuda_graphs
        engine.render_array(block_labels(300, 300, seed=1), backend=cpu, batch_size=1)
        assert cpu.graph_replays == 0
    finally:
        cpu.close()


@pytest.mark.needs_cuda
@needs_torch_cuda
def test_cuda_graph_replays_render_like_eager_launches():
    labels = block_labels(700, 1300, seed=8)
    graphed = TorchBackend(DEFAULT_MODEL, device="cuda", cuda_graphs=True)
    eager = TorchBackend(DEFAULT_MODEL, device="cuda", cuda_graphs=False)
    try:
        # Batches of 4: the first is eager, the second is captured, the rest are replays; the last is partial.
        with_graphs = engine.render_array(labels, backend=graphed, batch_size=4)
        without = engine.render_array(labels, backend=eager, batch_size=4)
        replays = graphed.graph_replays
    finally:
        graphed.close()
        eager.close()
    assert replays >= 2 and eager.graph_replays == 0
    assert with_graphs.std() > 5
    difference = np.abs(with_graphs.astype(int) - without.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, (difference.max(), (difference > 0).mean())


@pytest.mark.needs_cuda
@needs_torch_cuda
def test_device_resident_render_to_a_file_matches_the_in_memory_render(tmp_path):
    """The file sink's staged branch with the real CudaBand: whole-row finalises written from pinned memory."""
    labels = block_labels(900, 1400, seed=10)
    mask_path, out_path = tmp_path / "mask.png", tmp_path / "out.tif"
    Image.fromarray(masks.labels_to_colour(labels)).save(mask_path)
    engine.render(mask_path, out_path, model=DEFAULT_MODEL, backend="torch", compression="none", progress=False)
    resident = TorchBackend(DEFAULT_MODEL, device="cuda")
    try:
        assert resident.device_resident
        in_memory = engine.render_array(labels, backend=resident)
    finally:
        resident.close()
    assert in_memory.std() > 5
    np.testing.assert_array_equal(tifffile.imread(out_path), in_memory)


@pytest.mark.needs_cuda
@needs_torch_cuda
def test_device_resident_render_matches_onnx_runtime_within_fp16_rounding():
    labels = block_labels(600, 800, seed=7)
    resident = TorchBackend(DEFAULT_MODEL, device="cuda")
    try:
        on_gpu = engine.render_array(labels, backend=resident)
    finally:
        resident.close()
    on_cpu = engine.render_array(labels, backend="onnxruntime")
    difference = np.abs(on_gpu.astype(int) - on_cpu.astype(int))
    assert difference.max() <= 8 and difference.mean() < 0.5
