"""Noise channels: the canvas noise (safron.noise), generators that read it (models.Generator, with_noise), and
renders of noise-reading models, which must see the noise of their canvas coordinates and nothing else."""

from __future__ import annotations

import numpy as np
import pytest

import onnx_models
from safron import _core, engine, geometry, masks
from safron.noise import NoiseBatch, canvas_noise, noise_windows
from test_engine import random_labels


def _lowbias32(value: int) -> int:
    """Wellons' lowbias32 on one Python int: an implementation independent of the vectorised one."""
    value &= 0xFFFFFFFF
    value ^= value >> 16
    value = (value * 0x7FEB352D) & 0xFFFFFFFF
    value ^= value >> 15
    value = (value * 0x846CA68B) & 0xFFFFFFFF
    return value ^ (value >> 16)


def _reference(y: int, x: int, channel: int, seed: int) -> float:
    """The documented definition: mix(column + mix(row + mix(channel + seed * golden))), top 24 bits, bin centres."""
    key = _lowbias32(channel + seed * 0x9E3779B9)
    hashed = _lowbias32((x & 0xFFFFFFFF) + _lowbias32((y & 0xFFFFFFFF) + key))
    return (hashed >> 8) * 2.0 ** -23 - 1 + 2.0 ** -24


def test_canvas_noise_follows_its_definition_at_any_coordinates():
    got = canvas_noise(-3, 99_998, 4, 5, 2, seed=7)
    for c in range(2):
        for i in range(4):
            for j in range(5):
                assert got[c, i, j] == np.float32(_reference(-3 + i, 99_998 + j, c, 7))


def test_a_region_of_the_canvas_is_the_same_wherever_it_is_read_from():
    whole = canvas_noise(-20, -20, 300, 400, 3)
    np.testing.assert_array_equal(canvas_noise(37, 101, 50, 60, 3), whole[:, 57:107, 121:181])
    np.testing.assert_array_equal(canvas_noise(-20, -20, 300, 400, 3), whole)  # and every time alike


def test_the_noise_is_uniform_in_minus_one_one_and_uncorrelated():
    noise = canvas_noise(1000, 2000, 512, 512, 2)
    assert -1 < noise.min() and noise.max() < 1
    assert abs(noise.mean()) < 0.01 and noise.std() == pytest.approx(1 / np.sqrt(3), abs=0.005)
    pairs = {
        "horizontal neighbours": (noise[0, :, :-1], noise[0, :, 1:]),
        "vertical neighbours": (noise[0, :-1], noise[0, 1:]),
        "diagonal neighbours": (noise[0, :-1, :-1], noise[0, 1:, 1:]),
        "channels": (noise[0], noise[1]),
        "seeds": (noise[0], canvas_noise(1000, 2000, 512, 512, 1, seed=1)[0]),
    }
    for name, (a, b) in pairs.items():
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.01, name


def test_noise_windows_are_the_canvas_around_each_patch_and_padding_rows_are_zero():
    plan = geometry.plan(700, 500)
    ys, xs = plan.origins()
    out = np.full((len(ys) + 2, 2, plan.window, plan.window), 5, np.float32)
    noise_windows(plan, ys, xs, 2, out=out)
    for k, (y, x) in enumerate(zip(ys, xs)):
        np.testing.assert_array_equal(out[k], canvas_noise(int(y) - plan.margin, int(x) - plan.margin, plan.window,
                                                           plan.window, 2))
    assert (out[len(ys):] == 0).all()


def test_a_noise_batch_draws_alike_on_any_thread_count_and_checks_its_arguments():
    plan = geometry.plan(900, 700)
    ys, xs = plan.origins()
    batch = NoiseBatch.of(plan, ys[:5], xs[:5], 3, seed=2**32 + 9, count=7)  # the seed is taken modulo 2^32
    drawn = batch.draw()
    assert drawn.shape == (7, 3, plan.window, plan.window) and (drawn[5:] == 0).all()
    np.testing.assert_array_equal(batch.draw(threads=3), drawn)
    np.testing.assert_array_equal(drawn[4], canvas_noise(int(ys[4]) - plan.margin, int(xs[4]) - plan.margin,
                                                         plan.window, plan.window, 3, seed=9))
    with pytest.raises(ValueError, match="out must have shape"):
        batch.draw(np.empty((7, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="cannot hold 5 patches"):
        NoiseBatch.of(plan, ys[:5], xs[:5], 3, count=4)


@pytest.mark.parametrize("out", [np.zeros((1, 1, 4, 4)), np.zeros((1, 1, 4, 8), np.float32)[..., ::2],
                                 np.zeros((1, 4, 4), np.float32)], ids=["float64", "strided", "3-D"])
def test_the_core_refuses_noise_buffers_it_cannot_fill(out):
    with pytest.raises(ValueError, match="C-contiguous float32"):
        _core.fill_noise(out, [0], [0], 0)


@pytest.fixture(scope="module")
def noise_model(tmp_path_factory):
    return onnx_models.noise_mix(tmp_path_factory.mktemp("models") / "noise.onnx")


def _expected(labels: np.ndarray) -> np.ndarray:
    """What noise_mix renders where the geometry is right: half the mask's ±1 colour, half the canvas noise."""
    encoded = masks.labels_to_model_input(labels).astype(np.float64)
    value = 0.5 * encoded + 0.5 * canvas_noise(0, 0, *labels.shape, 3).astype(np.float64)
    return np.clip(np.floor((value + 1) * 127.5 + 0.5), 0, 255).astype(np.uint8).transpose(1, 2, 0)


@pytest.mark.parametrize("blend", ["uniform", "cosine"])
@pytest.mark.parametrize("height,width", [(300, 257), (700, 530)])
def test_a_render_reads_the_noise_of_its_canvas_coordinates_seamlessly(noise_model, height, width, blend):
    labels = random_labels(height, width, seed=height + width)
    image = engine.render_array(labels, model=noise_model, blend=blend, batch_size=3)
    expected = _expected(labels)
    difference = np.abs(image.astype(int) - expected)
    # Overlapping patches agree on their noise, so the blend reproduces it; only a weighted mean's float rounding
    # can move a value sitting on a rounding boundary by one level.
    assert difference.max() <= 1 and (difference == 0).mean() > 0.999
    # A different batching reads the same noise: byte for byte the same image.
    np.testing.assert_array_equal(engine.render_array(labels, model=noise_model, blend=blend, batch_size=4), image)


def test_a_fixed_batch_noise_model_renders_alike(tmp_path, noise_model):
    labels = random_labels(500, 520, seed=9)
    fixed = onnx_models.noise_mix(tmp_path / "fixed.onnx", batch=5)
    np.testing.assert_array_equal(engine.render_array(labels, model=fixed),
                                  engine.render_array(labels, model=noise_model))


def test_a_band_of_a_render_reads_the_noise_of_the_whole(tmp_path, noise_model):
    """Rows rendered as a band (as Dask workers do) are the rows of the whole render: the noise is global."""
    from PIL import Image

    labels = random_labels(700, 300, seed=4)
    mask = tmp_path / "mask.png"
    Image.fromarray(masks.labels_to_colour(labels)).save(mask)
    whole = engine.render_array(labels, model=noise_model, threads=1)
    pytest.importorskip("zarr", reason="zarr is not installed (pip install 'safron[distributed]')")
    from safron import zarr_output

    store = tmp_path / "band.zarr"
    zarr_output.create(store, 700, 300, chunk=64, mpp=None, levels=False)
    outcome = engine.render_band(str(mask), str(store), 192, 384, model=str(noise_model), backend="onnxruntime",
                                 batch_size=None, blend="cosine", overlap=20, threads=1, colour_tolerance=195.0)
    assert not isinstance(outcome, Exception), outcome
    band = zarr_output.read_rows(store, 192, 384)
    np.testing.assert_array_equal(band, whole[192:384])


# --- generators that read noise -----------------------------------------------------------------------------------

@pytest.fixture
def torch():
    return pytest.importorskip("torch", reason="the generator tests need torch (pip install torch)")


@pytest.mark.parametrize("context", ["dense", "dilated"])
def test_with_noise_starts_as_the_noise_free_generator_and_folds(torch, context):
    from safron.export import random_masks
    from safron.models import Generator, fold_one_hot, unfold_one_hot, with_noise

    torch.manual_seed(0)
    plain = Generator(ngf=4, context=context).eval()
    windows = torch.from_numpy(random_masks(2, 296))
    noise = torch.rand(2, 2, 296, 296) * 2 - 1
    noisy = with_noise(plain, 2)
    assert noisy.config()["noise_channels"] == 2 and "noise_channels" not in plain.config()
    with torch.no_grad():
        torch.testing.assert_close(noisy(windows, noise), plain(windows), rtol=0, atol=0)
        noisy.noise.weight.normal_(0, 0.05)
        drawn = noisy(windows, noise)
        assert (drawn - plain(windows)).abs().max() > 1e-3  # the noise now shows
        fold_one_hot(noisy)
        torch.testing.assert_close(noisy(windows, noise), drawn, rtol=0, atol=1e-4)
        unfold_one_hot(noisy)
        torch.testing.assert_close(noisy(windows, noise), drawn, rtol=0, atol=1e-4)
        # A third channel starts at zero weight and keeps the first two.
        more = with_noise(noisy, 3)
        torch.testing.assert_close(more(windows, torch.cat([noise, torch.rand(2, 1, 296, 296)], 1)),
                                   noisy(windows, noise), rtol=0, atol=0)
    with pytest.raises(Exception, match="cannot start one that reads 1"):
        with_noise(noisy, 1)


def test_a_generator_reads_its_patchs_noise_and_a_one_pixel_ring_only(torch):
    """Noise beyond the ring would make a patch depend on where the window's border is, as zero padding does."""
    from safron.export import random_masks
    from safron.models import Generator

    torch.manual_seed(1)
    generator = Generator(ngf=4, noise_channels=1).eval()
    with torch.no_grad():
        generator.noise.weight.normal_(0, 0.1)
        windows = torch.from_numpy(random_masks(1, 296))
        noise = torch.rand(1, 1, 296, 296) * 2 - 1
        changed = noise.clone()
        changed[..., :19, :] = 0  # rows outside the ring (the margin is 20)
        changed[..., :, 277:] = 0
        torch.testing.assert_close(generator(windows, changed), generator(windows, noise), rtol=0, atol=0)
        changed[..., 19, 100] = 5.0  # a pixel of the ring
        assert (generator(windows, changed) - generator(windows, noise)).abs().max() > 0


def test_a_generator_refuses_missing_or_misshapen_noise(torch):
    from safron.models import Generator

    windows = torch.zeros(1, 3, 296, 296)
    with pytest.raises(ValueError, match="expects noise"):
        Generator(ngf=4, noise_channels=1)(windows)
    with pytest.raises(ValueError, match="expects noise"):
        Generator(ngf=4, noise_channels=1)(windows, torch.zeros(1, 2, 296, 296))
    with pytest.raises(ValueError, match="expects noise"):
        Generator(ngf=4)(windows, torch.zeros(1, 1, 296, 296))


def test_auto_sends_a_noise_model_past_tensorrt(monkeypatch, noise_model, tmp_path):
    from safron import backends

    monkeypatch.setattr(backends, "_missing_modules", lambda name: [])  # as if TensorRT were installed
    monkeypatch.setattr(backends, "_cuda_device_present", lambda: True)
    assert backends._auto_backend(onnx_models.centre_crop(tmp_path / "crop.onnx")) == "tensorrt"
    assert backends._auto_backend(noise_model) == "onnxruntime"  # not exported by safron: PyTorch cannot rebuild it


# --- the render's noise seed --------------------------------------------------------------------------------------

def test_the_seed_changes_a_noise_models_texture_and_nothing_else(noise_model, tmp_path):
    labels = random_labels(300, 400, seed=2)
    first = engine.render_array(labels, model=noise_model, seed=5)
    np.testing.assert_array_equal(engine.render_array(labels, model=noise_model, seed=5), first)
    other = engine.render_array(labels, model=noise_model, seed=6)
    assert (first != other).mean() > 0.9  # another texture everywhere
    crop = onnx_models.centre_crop(tmp_path / "crop.onnx")  # no noise: the seed changes nothing
    np.testing.assert_array_equal(engine.render_array(labels, model=crop, seed=6), masks.labels_to_colour(labels))


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True])
def test_a_bad_seed_is_one_line(noise_model, seed):
    from safron.errors import SafronInputError

    with pytest.raises(SafronInputError, match="seed must be an integer 0..4294967295"):
        engine.render_array(np.zeros((10, 10), np.uint8), model=noise_model, seed=seed)


def test_a_resume_under_another_seed_is_refused_both_ways(noise_model, tmp_path, monkeypatch):
    """A journal pins the seed (left out at the default, so that older journals still match): resuming with another
    seed, to or from the default, would mix two textures in one image."""
    import tifffile
    from PIL import Image

    from safron import canvas
    from safron.errors import SafronInputError

    labels = random_labels(900, 300, seed=8)
    mask = tmp_path / "mask.png"
    Image.fromarray(masks.labels_to_colour(labels)).save(mask)
    options = dict(model=noise_model, progress=False, compression="none", batch_size=1, threads=1)
    for first, second in ((0, 3), (3, 0)):
        out = tmp_path / f"out-{first}.tif"
        calls = []

        def stop_after_one_record(self, rows_done, _record=canvas.Journal.record):
            _record(self, rows_done)
            calls.append(rows_done)
            raise KeyboardInterrupt  # an interruption once the first band is in the journal

        monkeypatch.setattr(canvas.Journal, "record", stop_after_one_record)
        with pytest.raises(KeyboardInterrupt):
            engine.render(mask, out, seed=first, **options)
        monkeypatch.undo()
        with pytest.raises(SafronInputError, match="noise_seed differs"):
            engine.render(mask, out, seed=second, resume=True, **options)
        engine.render(mask, out, seed=first, resume=True, **options)
        np.testing.assert_array_equal(tifffile.imread(out), engine.render_array(labels, model=noise_model, seed=first))


def test_cli_seed_reaches_the_render(noise_model, tmp_path):
    import tifffile
    from PIL import Image

    from safron.cli.render import main

    labels = random_labels(300, 300, seed=1)
    mask = tmp_path / "mask.png"
    Image.fromarray(masks.labels_to_colour(labels)).save(mask)
    out = tmp_path / "out.tif"
    assert main([str(mask), str(out), "--model", str(noise_model), "--seed", "7", "--quiet",
                 "--compression", "none"]) == 0
    np.testing.assert_array_equal(tifffile.imread(out), engine.render_array(labels, model=noise_model, seed=7))


def test_a_band_store_under_another_seed_is_not_resumed_both_ways(tmp_path):
    pytest.importorskip("zarr", reason="zarr is not installed (pip install 'safron[distributed]')")
    from safron import bands, zarr_output
    from safron.errors import SafronInputError

    plain = {"format": 1, "blend": "cosine"}
    seeded = dict(plain, noise_seed=3)
    for saved, asked in ((plain, seeded), (seeded, plain)):
        store = tmp_path / "store.zarr"
        zarr_output.create(store, 64, 64, chunk=64, mpp=None, levels=False, header=saved)
        with pytest.raises(SafronInputError, match="noise_seed differs"):
            bands._check_resumable(store, tmp_path / "out.zarr", asked)
        bands._check_resumable(store, tmp_path / "out.zarr", saved)  # the same header resumes


# -- the device-resident render (GPU machines only) ---------------------------------------------------------------


def _cuda_torch():
    torch = pytest.importorskip("torch", reason="the device-resident render needs torch")
    if not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA device")
    return torch


@pytest.fixture
def noise_checkpoint(tmp_path):
    """A small generator with 2 noise channels whose noise weights are large enough to show."""
    torch = pytest.importorskip("torch", reason="the generator tests need torch (pip install torch)")
    from safron.checkpoints import save_checkpoint
    from safron.models import Generator

    torch.manual_seed(4)
    generator = Generator(ngf=8, noise_channels=2)
    with torch.no_grad():
        generator.noise.weight.normal_(0, 0.5)
    return save_checkpoint(generator, tmp_path / "noise.safetensors")


@pytest.mark.needs_cuda
def test_noise_drawn_on_the_gpu_equals_the_host_draw_to_the_bit():
    torch = _cuda_torch()
    plan = geometry.plan(1300, 900)
    ys, xs = plan.origins()
    batch = NoiseBatch.of(plan, ys[3:9], xs[3:9], 2, seed=77, count=8)
    stream = torch.cuda.Stream()
    on_device = batch.draw_on_device(stream)
    stream.synchronize()
    np.testing.assert_array_equal(on_device.cpu().numpy(), batch.draw())


@pytest.mark.needs_cuda
def test_a_noise_model_renders_device_resident_as_through_the_host(noise_checkpoint):
    _cuda_torch()
    from gpu_checks import assert_resident_render_matches_host_path
    from safron.backends.torch_backend import TorchBackend

    labels = random_labels(900, 1300, seed=12)
    resident = TorchBackend(noise_checkpoint, device="cuda")
    host = TorchBackend(noise_checkpoint, device="cuda", device_resident=False)
    assert assert_resident_render_matches_host_path(resident, host, labels).std() > 5


@pytest.mark.needs_cuda
def test_cuda_graphs_replay_a_noise_model_like_eager_launches(noise_checkpoint):
    _cuda_torch()
    from safron.backends.torch_backend import TorchBackend

    labels = random_labels(700, 1300, seed=13)
    graphed = TorchBackend(noise_checkpoint, device="cuda", cuda_graphs=True)
    eager = TorchBackend(noise_checkpoint, device="cuda", cuda_graphs=False)
    try:
        with_graphs = engine.render_array(labels, backend=graphed, batch_size=4, seed=5)
        without = engine.render_array(labels, backend=eager, batch_size=4, seed=5)
        other_seed = engine.render_array(labels, backend=eager, batch_size=4, seed=6)
        replays = graphed.graph_replays
    finally:
        graphed.close()
        eager.close()
    assert replays >= 2
    difference = np.abs(with_graphs.astype(int) - without.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3, (difference.max(), (difference > 0).mean())
    # The noise shows, so the equality above means that each replay read its own batch's noise.
    assert np.abs(other_seed.astype(int) - without.astype(int)).mean() > 0.5
