"""Training: tiles and their mask context, one training step, checkpoints and resume, the safron-train CLI."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="training needs torch (pip install torch)")
pytest.importorskip("safetensors", reason="training checkpoints need safetensors (pip install safetensors)")

from conftest import SHARED_DATA  # noqa: E402
from safron import masks  # noqa: E402
from safron.data import TRANSFORMS, TileDataset, augment  # noqa: E402
from safron.errors import ModelError, SafronInputError  # noqa: E402
from safron.export import is_checkpoint_path  # noqa: E402
from safron.models import Generator  # noqa: E402
from safron.train import (  # noqa: E402
    LOSS_NAMES, FourierContextConvolution, TrainConfig, Trainer, latest_checkpoint, load_generator,
    portable_checkpoint, train,
)
from safetensors.torch import load_file as safetensors_load  # noqa: E402
from safron.cli.train import main, train_parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Tiny widths and one-patch tiles keep a step near 0.1 s on a CPU; the code path is the one of full-size runs.
TINY = dict(ngf=4, ndf=4)
# The image colour of each class (background, stroma, gland) in the synthetic pairs, so that tests can check that
# an image tile and its mask context stay aligned through every transform.
CLASS_RGB = np.array([[240, 240, 240], [230, 140, 180], [120, 60, 150]], np.uint8)


def blocky_labels(height: int, width: int, seed: int, block: int = 23) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, (height // block + 1, width // block + 1), dtype=np.uint8)
    return np.repeat(np.repeat(coarse, block, axis=0), block, axis=1)[:height, :width]


def write_pair(root: Path, stem: str, labels: np.ndarray, mask_kind: str = "labels") -> None:
    """images/STEM.png painted from `labels`, and masks/STEM.png as labels, colours or a 0/255 gland mask."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    Image.fromarray(CLASS_RGB[labels]).save(root / "images" / f"{stem}.png")
    mask = {
        "labels": labels,
        "colour": masks.labels_to_colour(labels),
        "binary": np.where(labels == masks.GLAND, 255, 0).astype(np.uint8),
    }[mask_kind]
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_pair(root, "a", blocky_labels(300, 330, seed=1))
    write_pair(root, "b", blocky_labels(280, 290, seed=2), "colour")
    return root


@pytest.fixture(scope="module")
def one_tile_dir(tmp_path_factory) -> Path:
    """A single 256 x 256 pair: without augmentation every step sees the same tile."""
    root = tmp_path_factory.mktemp("one_tile")
    write_pair(root, "only", blocky_labels(256, 256, seed=3, block=40))
    return root


def read_losses(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "losses.csv", newline="") as f:
        return list(csv.DictReader(f))


def loss_values(rows: list[dict[str, str]]) -> list[tuple[str, ...]]:
    """The loss columns (not the timings) of CSV rows."""
    return [tuple(row[name] for name in ("step", *LOSS_NAMES)) for row in rows]


def quick_train(run_dir: Path, data: Path, steps: int, **options):
    """train() with tiny models on 256 px tiles, quietly; `config=None` on resume keeps the run's own."""
    config = options.pop("config") if "config" in options else TrainConfig(data=str(data), tile=256, **TINY)
    options = {"save_every": 0, "sample_every": 0, "progress": False, "note": None, **options}
    return train(run_dir, config, steps=steps, **options)


# --- data ----------------------------------------------------------------------------------------------------------

def test_tile_context_is_the_real_surroundings_and_the_mirrored_mask_beyond_the_border(data_dir):
    dataset = TileDataset(data_dir, 256, augment=False)
    labels = blocky_labels(300, 330, seed=1)
    image = CLASS_RGB[labels]
    margin = dataset.margin
    padded = np.pad(labels, margin, mode="symmetric")  # the engine's convention, masks.Mask.read_labels
    for y, x in [(0, 0), (44, 74), (20, 31)]:
        tile = dataset.read_tile(0, y, x)
        np.testing.assert_array_equal(tile.image, image[y:y + 256, x:x + 256])
        np.testing.assert_array_equal(tile.context, padded[y:y + 256 + 2 * margin, x:x + 256 + 2 * margin])


def test_every_transform_keeps_image_and_mask_aligned(data_dir):
    dataset = TileDataset(data_dir, 256)
    margin = dataset.margin
    seen = set()
    for transform in range(TRANSFORMS):
        # The colour mask of pair b: the same alignment must hold for masks read by colour.
        tile = dataset.read_tile(1, 10, 20, transform)
        np.testing.assert_array_equal(CLASS_RGB[tile.context[margin:-margin, margin:-margin]], tile.image)
        seen.add(tile.image.tobytes())
    assert len(seen) == TRANSFORMS
    square = np.arange(9).reshape(3, 3)
    assert augment(square, 1).tolist() == [[2, 5, 8], [1, 4, 7], [0, 3, 6]]  # a quarter turn counter-clockwise
    assert augment(square, 4).tolist() == [[2, 1, 0], [5, 4, 3], [8, 7, 6]]  # a left-right flip


def test_tiles_are_a_function_of_seed_and_step(data_dir):
    first, again = TileDataset(data_dir, 256, seed=5), TileDataset(data_dir, 256, seed=5)
    other = TileDataset(data_dir, 256, seed=6)
    def draws(dataset, steps=6):
        return [(t.source.name, t.y, t.x, t.transform) for t in map(dataset.tile_at, range(steps))]

    assert draws(first) == draws(again)
    assert draws(first) != draws(other)
    assert {source for source, *_ in draws(first, 40)} == {"a.png", "b.png"}


def test_stride_visits_every_grid_position_once_per_epoch(data_dir):
    dataset = TileDataset(data_dir, 256, stride=40, augment=False)
    # Image a (300 x 330): rows 0, 40 and the edge 44; columns 0, 40 and 74. Image b (280 x 290): rows 0 and 24,
    # columns 0 and 34.
    expected = {("a.png", y, x) for y in (0, 40, 44) for x in (0, 40, 74)}
    expected |= {("b.png", y, x) for y in (0, 24) for x in (0, 34)}
    assert dataset.tiles_per_epoch == len(expected)
    for epoch in range(2):
        steps = range(epoch * len(expected), (epoch + 1) * len(expected))
        assert {(t.source.name, t.y, t.x) for t in map(dataset.tile_at, steps)} == expected


def test_binary_gland_masks_get_background_and_stroma_from_the_image(tmp_path):
    labels = blocky_labels(260, 270, seed=4)
    write_pair(tmp_path, "glas_style", labels, "binary")
    tile = TileDataset(tmp_path, 256, augment=False).read_tile(0, 2, 7)
    margin = 20
    image = CLASS_RGB[labels]
    derived = masks.labels_from_gland_mask(image, np.where(labels == masks.GLAND, 255, 0))
    assert set(np.unique(derived)) == {masks.BACKGROUND, masks.STROMA, masks.GLAND}
    np.testing.assert_array_equal(tile.context[margin:-margin, margin:-margin], derived[2:258, 7:263])


def test_default_tile_is_728_or_492_and_small_images_are_mirrored_or_left_out(tmp_path):
    write_pair(tmp_path / "large", "x", blocky_labels(730, 760, seed=1))
    assert TileDataset(tmp_path / "large").tile == 728
    write_pair(tmp_path / "glas", "tall", blocky_labels(522, 775, seed=1))
    write_pair(tmp_path / "glas", "small", blocky_labels(430, 567, seed=2))
    write_pair(tmp_path / "glas", "tiny", blocky_labels(240, 300, seed=3))
    dataset = TileDataset(tmp_path / "glas")
    assert dataset.tile == 492
    assert [p.image.name for p in dataset.pairs] == ["small.png", "tall.png"]
    assert [(p.image.name, p.height, p.width) for p in dataset.skipped] == [("tiny.png", 240, 300)]
    skipping = TileDataset(tmp_path / "glas", small_images="skip")
    assert [p.image.name for p in skipping.pairs] == ["tall.png"]
    assert [p.image.name for p in skipping.skipped] == ["small.png", "tiny.png"]
    with pytest.raises(SafronInputError, match="no image is large enough for a 1600 x 1600 tile"):
        TileDataset(tmp_path / "glas", 1600)
    with pytest.raises(SafronInputError, match="small_images must be one of mirror, skip"):
        TileDataset(tmp_path / "glas", small_images="pad")


def test_a_tile_larger_than_its_image_mirrors_image_and_mask_alike(tmp_path):
    labels = blocky_labels(200, 300, seed=5)
    write_pair(tmp_path, "small", labels)
    dataset = TileDataset(tmp_path, 256, augment=False)
    margin = dataset.margin
    image = CLASS_RGB[labels]
    seen_y = set()
    for step in range(40):
        tile = dataset.tile_at(step)
        assert -56 <= tile.y <= 0 and 0 <= tile.x <= 44
        seen_y.add(tile.y)
        # The image is mirrored exactly as the mask is: painting the context's centre gives the image tile.
        np.testing.assert_array_equal(CLASS_RGB[tile.context[margin:-margin, margin:-margin]], tile.image)
        rows = np.arange(tile.y, tile.y + 256)
        inside = (rows >= 0) & (rows < 200)
        np.testing.assert_array_equal(tile.image[inside], image[rows[inside], tile.x:tile.x + 256])
    assert len(seen_y) > 5, "the image lies anywhere inside the tile"
    with pytest.raises(ValueError, match="does not fit"):
        dataset.read_tile(0, -57, 0)


# --- training ------------------------------------------------------------------------------------------------------

def test_fourier_context_convolution_matches_the_direct_one_in_value_and_gradient():
    torch.manual_seed(0)
    direct = Generator(ngf=4).context
    fourier = FourierContextConvolution.replacing(direct)
    assert fourier.weight is direct.weight
    # Any input size works the same way; a small one keeps the direct convolution's weight gradient quick.
    windows = torch.randint(0, 2, (2, 3, 120, 100)).float() * 2 - 1
    upstream = torch.randn(2, 4, 80, 60)
    gradients = []
    for conv in (direct, fourier):
        conv.weight.grad = None
        output = conv(windows)
        (output * upstream).sum().backward()
        gradients.append((output.detach(), conv.weight.grad.clone()))
    (out_direct, grad_direct), (out_fourier, grad_fourier) = gradients
    # Sums of 5043 products of magnitude <= 0.1: fp32 rounding is ~1e-5 absolute; a wrong flip or shift is ~0.1.
    assert (out_fourier - out_direct).abs().max() < 1e-4
    assert ((grad_fourier - grad_direct).abs().max() / grad_direct.abs().max()) < 1e-5


def test_same_seed_gives_the_same_losses_and_another_seed_does_not(tmp_path, data_dir):
    runs = {}
    for name, seed in (("first", 3), ("again", 3), ("other", 4)):
        config = TrainConfig(data=str(data_dir), tile=256, seed=seed, **TINY)
        quick_train(tmp_path / name, data_dir, 2, config=config)
        runs[name] = loss_values(read_losses(tmp_path / name))
    assert len(runs["first"]) == 2
    assert runs["first"] == runs["again"]
    assert runs["first"] != runs["other"]


def test_a_few_steps_lower_the_l1_loss_on_a_fixed_tile(tmp_path, one_tile_dir):
    config = TrainConfig(data=str(one_tile_dir), tile=256, augment=False, lr=1e-3, **TINY)
    quick_train(tmp_path / "run", one_tile_dir, 12, config=config)
    l1 = [float(row["l1"]) for row in read_losses(tmp_path / "run")]
    assert np.mean(l1[-3:]) < 0.7 * np.mean(l1[:3]), l1


def test_fp16_steps_scale_gradients_and_checkpoint_the_scaler(tmp_path, data_dir):
    """The CUDA mixed-precision path (autocast and the gradient scaler), run through the CPU's autocast."""
    config = TrainConfig(data=str(data_dir), tile=256, **TINY)
    dataset = TileDataset(data_dir, 256)
    straight = Trainer(config, dataset, torch.device("cpu"), "fp16")
    losses = [straight.train_step(dataset.tile_at(step)) for step in range(2)]
    assert all(np.isfinite(list(step.values())).all() for step in losses)
    assert straight.scaler.is_enabled()
    first = Trainer(config, dataset, torch.device("cpu"), "fp16")
    first.train_step(dataset.tile_at(0))
    resumed = Trainer(config, dataset, torch.device("cpu"), "fp16")
    resumed.load(first.save(tmp_path).with_suffix(".json"))
    assert resumed.scaler.get_scale() == first.scaler.get_scale()
    assert resumed.train_step(dataset.tile_at(1)) == losses[1]


def test_run_directory_holds_checkpoints_samples_and_logs(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    result = quick_train(run_dir, data_dir, 4, save_every=2, sample_every=2, keep=1)
    assert result.step == 4 and set(result.losses) == set(LOSS_NAMES)
    assert result.checkpoint == run_dir / "checkpoints" / "step-00000004.safetensors"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-00000004.json", "step-00000004.safetensors"
    ]  # keep=1 removed step 2
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "step-00000004.json"
    assert [row["step"] for row in read_losses(run_dir)] == ["1", "2", "3", "4"]
    samples = sorted((run_dir / "samples").iterdir())
    assert [p.name for p in samples] == ["step-00000002.png", "step-00000004.png"]
    # Two rows (preview tile, training tile) of mask | real | generated, 256 px panels with 8 px gaps.
    assert Image.open(samples[-1]).size == (3 * 256 + 16, 2 * 256 + 8)
    events = list(run_dir.glob("tensorboard/events.out.tfevents.*"))
    assert bool(events) == (importlib.util.find_spec("tensorboard") is not None)


def test_checkpoints_load_as_generators_for_export(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    quick_train(run_dir, data_dir, 2)
    config = TrainConfig(data=str(data_dir), tile=256, **TINY)
    trainer = Trainer(config, TileDataset(data_dir, 256), torch.device("cpu"))
    trainer.load(latest_checkpoint(run_dir))
    expected = trainer.generator.state_dict()
    # The run, its weights file, and the step's .json that safron-train --init takes all name the same generator.
    checkpoints = run_dir / "checkpoints"
    for source in (run_dir, checkpoints / "step-00000002.safetensors", checkpoints / "step-00000002.json"):
        assert is_checkpoint_path(source)
        generator = load_generator(source)
        assert not generator.training and generator.ngf == 4
        assert type(generator.context) is torch.nn.Conv2d  # the plain model, as export and inference want it
        for name, tensor in generator.state_dict().items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    # A .json with no .safetensors beside it is not a checkpoint: the ONNX backend reports the file as it is.
    (tmp_path / "stray.json").write_text("{}")
    assert not is_checkpoint_path(tmp_path / "stray.json")


def test_resume_continues_with_the_losses_of_an_uninterrupted_run(tmp_path, data_dir):
    quick_train(tmp_path / "straight", data_dir, 5)
    quick_train(tmp_path / "resumed", data_dir, 2)
    # A row logged after the last checkpoint (a run killed between checkpoints) is replaced on resume.
    with open(tmp_path / "resumed" / "losses.csv", "a") as f:
        f.write("3,9,9,9,9,9,9,1.0\n")
    result = quick_train(tmp_path / "resumed", data_dir, 5, config=None, resume=True)
    assert result.step == 5
    assert loss_values(read_losses(tmp_path / "resumed")) == loss_values(read_losses(tmp_path / "straight"))


def test_resume_refuses_other_settings_and_new_runs_refuse_old_directories(tmp_path, data_dir):
    quick_train(tmp_path / "run", data_dir, 1)
    with pytest.raises(SafronInputError, match="trained with ngf=4, not 8"):
        quick_train(tmp_path / "run", data_dir, 2, resume=True,
                    config=TrainConfig(data=str(data_dir), tile=256, ngf=8, ndf=4))
    with pytest.raises(SafronInputError, match="already holds a run"):
        quick_train(tmp_path / "run", data_dir, 2)
    with pytest.raises(SafronInputError, match="no checkpoint to resume"):
        quick_train(tmp_path / "empty", data_dir, 2, resume=True)
    # The data folder may move between sessions.
    moved = tmp_path / "moved"
    shutil.copytree(data_dir, moved)
    config = TrainConfig(data=str(moved), tile=256, **TINY)
    assert quick_train(tmp_path / "run", moved, 2, config=config, resume=True).step == 2


class _CentreCrop(torch.nn.Module):
    """A stand-in generator: the mask window's centre, times a learnable gain (so that the G step has a graph),
    plus an optional fixed pattern that is the same in every patch -- texture locked to the patch grid."""

    noise_channels = 0  # reads the mask only, as a noise-free models.Generator

    def __init__(self, window: int, patch: int, pattern: torch.Tensor | None = None):
        super().__init__()
        self.window, self.patch, self.margin = window, patch, (window - patch) // 2
        self.gain = torch.nn.Parameter(torch.ones(()))
        self.pattern = pattern

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        m, p = self.margin, self.patch
        out = windows[:, :, m:m + p, m:m + p] * self.gain
        return out if self.pattern is None else out + self.pattern


@pytest.fixture(scope="module")
def big_tile_dir(tmp_path_factory) -> Path:
    """One pair large enough for 492 px tiles (2 x 2 patches), where the extra patch has room to move."""
    root = tmp_path_factory.mktemp("big_tile")
    write_pair(root, "big", blocky_labels(540, 560, seed=4))
    return root


def test_shift_loss_is_zero_for_a_shift_consistent_generator_and_not_for_a_grid_locked_one(big_tile_dir):
    config = TrainConfig(data=str(big_tile_dir), tile=492, lambda_shift=1.0, **TINY)
    assert config.loss_names == (*LOSS_NAMES, "shift")
    dataset = TileDataset(big_tile_dir, 492, seed=0)
    pattern = torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, (3, 256, 256)).astype(np.float32))
    shifts = {}
    for name, locked in (("consistent", None), ("grid-locked", pattern)):
        trainer = Trainer(config, dataset, torch.device("cpu"))
        trainer.generator = _CentreCrop(trainer.plan.window, trainer.plan.patch, locked)
        shifts[name] = [trainer.train_step(dataset.tile_at(step))["shift"] for step in range(3)]
    # The centre crop of every window is the mask itself, wherever the window is: stitched and extra patch agree.
    assert max(shifts["consistent"]) < 1e-6, shifts
    # The same pattern in every patch lands at another phase in the extra patch than in the stitched tile.
    assert min(shifts["grid-locked"]) > 0.05, shifts


def test_block_shift_loss_ignores_grid_locked_texture_finer_than_its_blocks_but_not_coarser(big_tile_dir):
    config = TrainConfig(data=str(big_tile_dir), tile=492, lambda_shift=1.0, shift_scale=16, **TINY)
    dataset = TileDataset(big_tile_dir, 492, seed=0)
    # Zero mean over every aligned 16 x 16 block of the patch vs a pattern with structure larger than the blocks.
    # The extra patch falls at any phase, so a fine pattern need not average out over the loss's blocks there;
    # it is small against the coarse one all the same, and the pixel-wise loss sees both alike.
    rng = np.random.default_rng(0)
    fine = rng.uniform(-0.5, 0.5, (3, 256, 256)).astype(np.float32)
    fine -= fine.reshape(3, 16, 16, 16, 16).mean(axis=(2, 4)).repeat(16, axis=1).repeat(16, axis=2)
    coarse = np.kron(rng.uniform(-0.5, 0.5, (3, 4, 4)), np.ones((1, 64, 64))).astype(np.float32)
    shifts = {}
    for scale in (1, 16):
        for name, pattern in (("fine", fine), ("coarse", coarse)):
            trainer = Trainer(dataclasses.replace(config, shift_scale=scale), dataset, torch.device("cpu"))
            trainer.generator = _CentreCrop(trainer.plan.window, trainer.plan.patch, torch.from_numpy(pattern))
            shifts[scale, name] = np.mean([trainer.train_step(dataset.tile_at(step))["shift"] for step in range(3)])
    assert shifts[1, "fine"] > 0.05 and shifts[1, "coarse"] > 0.05, shifts
    assert shifts[16, "fine"] < shifts[16, "coarse"] / 4, shifts
    assert shifts[16, "coarse"] > 0.05, shifts


def test_shift_loss_is_off_by_default_and_changes_nothing_then(big_tile_dir):
    config = TrainConfig(data=str(big_tile_dir), tile=492, **TINY)
    assert config.lambda_shift == 0 and config.loss_names == LOSS_NAMES
    dataset = TileDataset(big_tile_dir, 492, seed=0)
    losses = {}
    for weight in (0.0, 1.0):
        trainer = Trainer(dataclasses.replace(config, lambda_shift=weight), dataset, torch.device("cpu"))
        losses[weight] = trainer.train_step(dataset.tile_at(0))
    assert set(losses[0.0]) == set(LOSS_NAMES)
    # With the term on, the generator's loss holds it on top of the same kind of L1 and adversarial terms.
    on = losses[1.0]
    assert on["loss_g"] == pytest.approx(config.lambda_l1 * on["l1"] + config.lambda_adv * on["adv"] + on["shift"],
                                         rel=1e-5)


def test_grid_lock_loss_sees_a_pattern_repeated_in_every_patch_and_adds_to_the_generators_loss(big_tile_dir):
    config = TrainConfig(data=str(big_tile_dir), tile=492, lambda_grid=2.0, grid_period=16, **TINY)
    assert config.loss_names == (*LOSS_NAMES, "grid")
    dataset = TileDataset(big_tile_dir, 492, seed=0)
    cell = np.random.default_rng(0).uniform(-0.25, 0.25, (3, 8, 8)).astype(np.float32)
    losses = {}
    for name, pattern in (("plain", None), ("lattice", torch.from_numpy(np.tile(cell, (1, 32, 32))))):
        trainer = Trainer(config, dataset, torch.device("cpu"))
        trainer.generator = _CentreCrop(trainer.plan.window, trainer.plan.patch, pattern)
        losses[name] = [trainer.train_step(dataset.tile_at(step)) for step in range(2)]
    # The lattice adds the mean |deviation| of its cell (period 8 divides 16) to whatever the mask's blocks leave.
    deviation = np.abs(cell - cell.mean(axis=(1, 2), keepdims=True)).mean()
    for plain, lattice in zip(losses["plain"], losses["lattice"]):
        # The mask's blocks leave a floor; by the triangle inequality the lattice's cell shows through it.
        assert plain["grid"] < deviation / 3 and lattice["grid"] >= deviation - plain["grid"]
        assert lattice["loss_g"] == pytest.approx(config.lambda_l1 * lattice["l1"] + config.lambda_adv * lattice["adv"]
                                                  + config.lambda_grid * lattice["grid"], rel=1e-5)



def test_texture_loss_is_logged_and_adds_to_the_generators_loss_with_its_weight(big_tile_dir):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the texture loss needs efficientnet-lite-pytorch")
    config = TrainConfig(data=str(big_tile_dir), tile=492, lambda_texture=3.0, **TINY)
    assert config.loss_names == (*LOSS_NAMES, "texture")
    dataset = TileDataset(big_tile_dir, 492, seed=0)
    trainer = Trainer(config, dataset, torch.device("cpu"))
    # Frozen and outside the optimiser: the checkpoint holds no feature network.
    optimised = {id(p) for group in trainer.optimiser_g.param_groups for p in group["params"]}
    assert not any(id(p) in optimised for p in trainer.texture_features.parameters())
    assert not any(key.startswith("texture") for key in trainer.state()[0])
    losses = trainer.train_step(dataset.tile_at(0))
    assert losses["texture"] > 0
    assert losses["loss_g"] == pytest.approx(config.lambda_l1 * losses["l1"] + config.lambda_adv * losses["adv"]
                                             + config.lambda_texture * losses["texture"], rel=1e-5)
    assert Trainer(dataclasses.replace(config, lambda_texture=0.0), dataset,
                   torch.device("cpu")).texture_features is None


def test_colour_loss_is_logged_after_the_texture_loss_and_adds_to_the_generators_loss(big_tile_dir):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the texture loss needs efficientnet-lite-pytorch")
    config = TrainConfig(data=str(big_tile_dir), tile=256, lambda_texture=2.0, lambda_colour=5.0, **TINY)
    assert config.loss_names == (*LOSS_NAMES, "texture", "colour")
    dataset = TileDataset(big_tile_dir, 256, seed=0)
    losses = Trainer(config, dataset, torch.device("cpu")).train_step(dataset.tile_at(0))
    assert losses["colour"] > 0
    assert losses["loss_g"] == pytest.approx(config.lambda_l1 * losses["l1"] + config.lambda_adv * losses["adv"]
                                             + config.lambda_texture * losses["texture"]
                                             + config.lambda_colour * losses["colour"], rel=1e-5)
    # A run without it logs no colour column.
    assert "colour" not in dataclasses.replace(config, lambda_colour=0.0).loss_names


def test_a_texture_trained_generator_says_which_network_its_loss_read_through_to_the_onnx(tmp_path, big_tile_dir):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the texture loss needs efficientnet-lite-pytorch")
    import onnx
    from safetensors import safe_open

    from safron.checkpoints import METADATA_LOSS_NETWORKS, loss_networks
    from safron.export import export_onnx
    from safron.texture_loss import TEXTURE_NETWORK

    for weight in (1.0, 0.0):
        run_dir = tmp_path / f"run-{weight:g}"
        config = TrainConfig(data=str(big_tile_dir), tile=256, lambda_texture=weight, **TINY)
        dataset = TileDataset(big_tile_dir, 256, seed=0)
        trainer = Trainer(config, dataset, torch.device("cpu"))
        trainer.train_step(dataset.tile_at(0))
        weights = trainer.save(run_dir)
        export_onnx(weights.with_suffix(".json"), run_dir / "g.onnx", check_samples=1)
        expected = TEXTURE_NETWORK if weight else None
        for path in (weights, run_dir / "generator.safetensors"):
            with safe_open(str(path), "pt") as stored:
                assert (stored.metadata() or {}).get(METADATA_LOSS_NETWORKS) == expected
        exported = {e.key: e.value for e in onnx.load(str(run_dir / "g.onnx")).metadata_props}
        assert exported.get(METADATA_LOSS_NETWORKS) == expected
        # What safron-eval's report prints, for the exported model and for the checkpoints themselves.
        for model in (run_dir / "g.onnx", weights.with_suffix(".json"), run_dir):
            assert loss_networks(model) == expected
    # A run from before the metadata key: export reads the training settings in the checkpoint's JSON instead.
    state = json.loads(weights.with_suffix(".json").read_text())
    state["training"]["lambda_texture"] = 2.0
    weights.with_suffix(".json").write_text(json.dumps(state))
    export_onnx(weights.with_suffix(".json"), run_dir / "older.onnx", check_samples=1)
    assert {e.key: e.value for e in onnx.load(str(run_dir / "older.onnx")).metadata_props}.get(
        METADATA_LOSS_NETWORKS) == TEXTURE_NETWORK
    assert loss_networks(weights.with_suffix(".json")) == TEXTURE_NETWORK  # and safron-eval's report says the same


class _LatticeInOneClass(_CentreCrop):
    """_CentreCrop with its fixed pattern drawn only where the patch's mask is one class (mask channel `channel`)."""

    def __init__(self, window: int, patch: int, pattern: torch.Tensor, channel: int):
        super().__init__(window, patch)
        self.lattice, self.channel = pattern, channel

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        m, p = self.margin, self.patch
        inside = windows[:, self.channel:self.channel + 1, m:m + p, m:m + p] > 0
        return super().forward(windows) + self.lattice * inside


def test_class_grid_fold_folds_each_class_over_the_patches_own_masks(big_tile_dir):
    from safron.losses import grid_lock_loss
    from safron.masks import MODEL_INPUT_CLASSES
    from safron.stitch import cut_windows

    dataset = TileDataset(big_tile_dir, 492, seed=0)
    cell = np.random.default_rng(1).uniform(-0.25, 0.25, (3, 8, 8)).astype(np.float32)
    pattern = torch.from_numpy(np.tile(cell, (1, 32, 32)))
    logged = {}
    for fold in ("patch", "class"):
        config = TrainConfig(data=str(big_tile_dir), tile=492, lambda_grid=2.0, grid_period=16, grid_fold=fold, **TINY)
        trainer = Trainer(config, dataset, torch.device("cpu"))
        # Stroma (input channel 0) only: a lattice that one class's fold sees whole and the patch fold dilutes.
        generator = _LatticeInOneClass(trainer.plan.window, trainer.plan.patch, pattern, channel=0)
        trainer.generator = generator
        logged[fold] = [trainer.train_step(dataset.tile_at(step)) for step in range(2)]
        for losses in logged[fold]:
            assert losses["loss_g"] == pytest.approx(config.lambda_l1 * losses["l1"] + config.lambda_adv * losses["adv"]
                                                     + config.lambda_grid * losses["grid"], rel=1e-5)
    # The class fold's value is the loss over each patch's own mask, one class per channel, worked out here from
    # the tile's labels rather than from the generator's input.
    plan, margin = trainer.plan, trainer.plan.margin
    for step, losses in enumerate(logged["class"]):
        tile = dataset.tile_at(step)
        with torch.no_grad():
            patches = generator(cut_windows(torch.from_numpy(masks.labels_to_model_input(tile.context)), plan))
        labels = torch.stack([torch.from_numpy(tile.context[y:y + plan.patch, x:x + plan.patch])
                              for y, x in zip(*(o + margin for o in plan.origins()))])
        classes = torch.stack([labels == label for label in MODEL_INPUT_CLASSES], dim=1)
        assert losses["grid"] == pytest.approx(grid_lock_loss(patches, 16, classes).item(), rel=1e-4)
        assert losses["grid"] != pytest.approx(logged["patch"][step]["grid"], rel=0.05)


def test_init_starts_a_new_run_from_another_runs_models_and_optimisers(tmp_path, data_dir):
    quick_train(tmp_path / "base", data_dir, 3)
    base_state = latest_checkpoint(tmp_path / "base")
    config = TrainConfig(data=str(data_dir), tile=256, lr=3e-4, lambda_shift=2.0, **TINY)
    dataset = TileDataset(data_dir, 256, seed=0)
    trainer = Trainer(config, dataset, torch.device("cpu"))
    trainer.load(base_state, restore_step=False)
    assert trainer.step == 0
    expected = load_generator(tmp_path / "base").state_dict()
    for name, tensor in trainer.generator.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    assert trainer.optimiser_g.state, "Adam's moments come along"
    # The new run's learning rate, not the stored one.
    assert {g["lr"] for o in (trainer.optimiser_g, trainer.optimiser_d) for g in o.param_groups} == {3e-4}

    result = quick_train(tmp_path / "tuned", data_dir, 2, config=config, init=tmp_path / "base")
    assert result.step == 2
    stored = json.loads(latest_checkpoint(tmp_path / "tuned").read_text())["training"]
    assert stored["init"] == str(base_state.resolve()) and stored["lambda_shift"] == 2.0
    assert "shift" in read_losses(tmp_path / "tuned")[0]
    with pytest.raises(SafronInputError, match="give one of them"):
        quick_train(tmp_path / "tuned", data_dir, 3, config=None, resume=True, init=tmp_path / "base")
    with pytest.raises(SafronInputError, match="not a run directory or a training checkpoint"):
        quick_train(tmp_path / "other", data_dir, 1, init=tmp_path / "base" / "losses.csv")


def test_a_portable_checkpoint_carries_the_published_generator_and_the_discriminator_in_fp16(tmp_path, data_dir):
    config = TrainConfig(data=str(data_dir), tile=256, ema_decay=0.5, **TINY)
    quick_train(tmp_path / "base", data_dir, 3, config=config)
    base_state = latest_checkpoint(tmp_path / "base")
    portable = portable_checkpoint(base_state, tmp_path / "travel")
    assert portable.name == base_state.name and portable.with_suffix(".safetensors").is_file()
    tensors = safetensors_load(str(portable.with_suffix(".safetensors")))
    base = safetensors_load(str(base_state.with_suffix(".safetensors")))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert not any(k.startswith(("optimiser.", "generator_ema.")) for k in tensors), "models only"
    # The generator is the run's published one (its average), the discriminator its own; both rounded to fp16.
    for prefix, source in (("generator.", "generator_ema."), ("discriminator.", "discriminator.")):
        names = [k[len(source):] for k in base if k.startswith(source)]
        assert names and sorted(k[len(prefix):] for k in tensors if k.startswith(prefix)) == sorted(names)
        for name in names:
            torch.testing.assert_close(tensors[prefix + name], base[source + name].half(), rtol=0, atol=0)
    assert sum(t.numel() * 2 for t in tensors.values()) < sum(t.numel() * t.element_size() for t in base.values()) / 3

    # A new run starts from it with fresh optimisers and trains on.
    trainer = Trainer(config, TileDataset(data_dir, 256, seed=0), torch.device("cpu"))
    trainer.load(portable, restore_step=False)
    assert not trainer.optimiser_g.state and not trainer.optimiser_d.state, "Adam starts afresh"
    for name, tensor in trainer.discriminator.state_dict().items():
        torch.testing.assert_close(tensor, tensors["discriminator." + name].float(), rtol=0, atol=0)
    notes = []
    result = quick_train(tmp_path / "tuned", data_dir, 2, config=config, init=portable, note=notes.append)
    assert result.step == 2 and any("new optimisers" in n for n in notes)


def test_a_shallower_generator_trains_and_its_depth_is_stored(tmp_path, data_dir):
    config = TrainConfig(data=str(data_dir), tile=256, levels=5, **TINY)
    result = quick_train(tmp_path / "run", data_dir, 2, config=config)
    stored = json.loads(latest_checkpoint(tmp_path / "run").read_text())
    assert result.step == 2 and stored["training"]["levels"] == 5 and stored["generator"]["levels"] == 5
    assert len(load_generator(tmp_path / "run").encoder) == 5


def _parameters(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _without_dropout(trainer: Trainer) -> Trainer:
    for module in trainer.generator.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return trainer


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.needs_cuda)])
def test_a_batch_of_tiles_scores_each_tile_as_alone(data_dir, device):
    """Losses computed before any update (L1 of the stitched tiles, the discriminator's) are the means of what each
    tile scores alone: batching tiles through InstanceNorm models and the stitch mixes nothing between them.
    Dropout is off, as its masks depend on the batch's shape. On CUDA, fp32 with cuDNN's TF32 convolutions, whose
    algorithms may differ with the batch size: a looser tolerance."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("this torch has no CUDA device")
    config = TrainConfig(data=str(data_dir), tile=256, **TINY)
    dataset = TileDataset(data_dir, 256, seed=0)
    tiles = [dataset.tile_at(0), dataset.tile_at(1)]
    alone = [_without_dropout(Trainer(config, dataset, torch.device(device))).train_step(tile) for tile in tiles]
    batched = _without_dropout(Trainer(dataclasses.replace(config, tiles_per_step=2), dataset, torch.device(device)))
    losses = batched.train_step(tiles)
    for name in ("l1", "loss_d", "d_real", "d_fake"):
        expected = (alone[0][name] + alone[1][name]) / 2
        assert losses[name] == pytest.approx(expected, rel=1e-5 if device == "cpu" else 1e-3), name
    assert alone[0]["l1"] != pytest.approx(alone[1]["l1"], rel=1e-3)  # two different tiles, so the mean tells
    assert batched.last_output.shape == (3, 256, 256)


def test_tiles_per_step_trains_on_consecutive_tiles_and_resumes(tmp_path, data_dir, monkeypatch):
    read = []
    tile_at = TileDataset.tile_at
    monkeypatch.setattr(TileDataset, "tile_at", lambda self, step: read.append(step) or tile_at(self, step))
    config = TrainConfig(data=str(data_dir), tile=256, tiles_per_step=3, **TINY)
    quick_train(tmp_path / "straight", data_dir, 2, config=config)
    assert sorted(read) == [0, 1, 2, 3, 4, 5]  # steps 0 and 1 take tiles 0-2 and 3-5
    read.clear()
    quick_train(tmp_path / "resumed", data_dir, 1, config=config)
    result = quick_train(tmp_path / "resumed", data_dir, 2, config=None, resume=True)
    assert sorted(read) == [0, 1, 2, 3, 4, 5] and result.step == 2
    straight, resumed = load_generator(tmp_path / "straight"), load_generator(tmp_path / "resumed")
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0)


def test_ema_moves_towards_the_generator_after_each_step(data_dir):
    config = TrainConfig(data=str(data_dir), tile=256, ema_decay=0.9, **TINY)
    dataset = TileDataset(data_dir, 256, seed=0)
    trainer = Trainer(config, dataset, torch.device("cpu"))
    average = _parameters(trainer.generator)
    for step in range(2):
        trainer.train_step(dataset.tile_at(step))
        average = [0.9 * a + 0.1 * p for a, p in zip(average, _parameters(trainer.generator))]
    for got, expected in zip(trainer.generator_ema.parameters(), average):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert trainer.published_generator is trainer.generator_ema
    assert not any(p.requires_grad for p in trainer.generator_ema.parameters())
    assert Trainer(dataclasses.replace(config, ema_decay=0.0), dataset, torch.device("cpu")).generator_ema is None


def test_ema_is_checkpointed_resumed_exactly_and_published(tmp_path, data_dir):
    config = TrainConfig(data=str(data_dir), tile=256, ema_decay=0.8, **TINY)
    quick_train(tmp_path / "straight", data_dir, 4, config=config)
    quick_train(tmp_path / "resumed", data_dir, 2, config=config)
    quick_train(tmp_path / "resumed", data_dir, 4, config=None, resume=True)
    straight, resumed = load_generator(tmp_path / "straight"), load_generator(tmp_path / "resumed")
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0)
    # The run directory's generator and the training checkpoint's are both the average, not the raw weights.
    checkpoint = latest_checkpoint(tmp_path / "straight").with_suffix(".safetensors")
    from safetensors.torch import load_file

    stored = load_file(str(checkpoint))
    for name, tensor in straight.state_dict().items():
        torch.testing.assert_close(stored["generator_ema." + name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(load_generator(checkpoint).state_dict()[name], tensor, rtol=0, atol=0)
    assert any(not torch.equal(stored["generator." + n], t) for n, t in straight.state_dict().items())


def test_init_starts_the_average_at_the_loaded_generator(tmp_path, data_dir):
    quick_train(tmp_path / "base", data_dir, 2)
    config = TrainConfig(data=str(data_dir), tile=256, ema_decay=0.5, **TINY)
    trainer = Trainer(config, TileDataset(data_dir, 256, seed=0), torch.device("cpu"))
    trainer.load(latest_checkpoint(tmp_path / "base"), restore_step=False)
    for name, tensor in load_generator(tmp_path / "base").state_dict().items():
        torch.testing.assert_close(trainer.generator_ema.state_dict()[name], tensor, rtol=0, atol=0)


# --- command line --------------------------------------------------------------------------------------------------

def run_main(capsys, *args) -> tuple[int, str]:
    """(exit status, stderr) of safron-train; argparse's usage errors exit through SystemExit."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def bad_folder(tmp_path: Path, problem: str) -> tuple[Path, str]:
    """A training folder with one problem, and the text the error must contain."""
    root = tmp_path / problem
    if problem == "missing":
        return root, f"{root}: training data folder not found"
    write_pair(root, "a", blocky_labels(280, 280, seed=1))
    if problem == "no_masks_folder":
        for path in (root / "masks").iterdir():
            path.unlink()
        (root / "masks").rmdir()
        return root, "no masks/ folder"
    if problem == "no_images":
        (root / "images" / "a.png").unlink()
        return root, f"{root / 'images'}: no image files"
    if problem == "missing_mask":
        write_pair(root, "b", blocky_labels(280, 280, seed=2))
        (root / "masks" / "b.png").unlink()
        return root, f"{root / 'images' / 'b.png'}: no mask named b.*"
    if problem == "size_mismatch":
        Image.fromarray(blocky_labels(281, 280, seed=1)).save(root / "masks" / "a.png")
        return root, f"{root / 'masks' / 'a.png'}: mask is 281 x 280 pixels but its image a.png is 280 x 280"
    if problem == "unreadable_image":
        (root / "images" / "a.png").write_text("not an image")
        return root, f"{root / 'images' / 'a.png'}: unknown file format"
    if problem == "truncated_mask":
        path = root / "masks" / "a.png"
        path.write_bytes(path.read_bytes()[:200])
        return root, f"{path}: "
    if problem == "bad_labels":
        labels = blocky_labels(280, 280, seed=1)
        labels[3, 4] = 7
        Image.fromarray(labels).save(root / "masks" / "a.png")
        return root, "label value 7 at (y=3, x=4) is not a class"
    raise AssertionError(problem)


@pytest.mark.parametrize("problem", [
    "missing", "no_masks_folder", "no_images", "missing_mask", "size_mismatch", "unreadable_image",
    "truncated_mask", "bad_labels",
])
def test_bad_data_folders_exit_2_with_one_line_naming_the_problem(tmp_path, capsys, problem):
    root, needle = bad_folder(tmp_path, problem)
    code, err = run_main(capsys, "--data", root, "--out", tmp_path / "run", "--steps", 1, "--tile", 256)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("safron-train: error: "), err
    assert needle in err
    assert not (tmp_path / "run" / "checkpoints").exists()


BAD_OPTIONS = [
    (["--steps", "0"], "--steps: expected a positive integer"),
    (["--blend", "gaussian"], "--blend: invalid choice"),
    (["--tile", "128"], "tile 128 is smaller than the generator's 256 px patch"),
    (["--beta1", "1"], "beta1 must be in [0, 1)"),
    (["--precision", "fp16", "--device", "cpu"], "precision fp16 needs a CUDA device"),
    (["--seed", "-1"], "--seed: expected a non-negative integer"),
    (["--ema-decay", "1"], "ema_decay must be in [0, 1)"),
    (["--lambda-shift", "-2"], "--lambda-shift: expected a number >= 0"),
    (["--shift-scale", "300"], "shift_scale must be an integer in [1, 256]"),
    (["--levels", "3"], "levels must be an integer in [4, 8]"),
    (["--lambda-grid", "-1"], "--lambda-grid: expected a number >= 0"),
    (["--grid-period", "128"], "grid_period must be one of 2, 4, 8, 16, 32, 64"),
    (["--grid-period", "24"], "grid_period must be one of 2, 4, 8, 16, 32, 64"),
    (["--grid-fold", "tile"], "--grid-fold: invalid choice"),
    (["--lambda-texture", "-1"], "--lambda-texture: expected a number >= 0"),
    (["--lambda-colour", "-0.5"], "--lambda-colour/--lambda-color: expected a number >= 0"),
    (["--tiles-per-step", "0"], "--tiles-per-step: expected a positive integer"),
    (["--init", "nowhere"], "nowhere: not a run directory or a training checkpoint"),
    (["--diffaugment", "color,flip"], "--diffaugment: unknown augmentation 'flip'"),
    (["--gan-loss", "wasserstein"], "--gan-loss: invalid choice"),
    (["--lr-d", "0"], "--lr-d: expected a positive number"),
    (["--lambda-l1", "0", "--lambda-adv", "0"], "must be >= 0 and not all 0"),
]
if not torch.cuda.is_available():
    BAD_OPTIONS.append((["--device", "cuda"], "device cuda: no CUDA GPU is usable"))


@pytest.mark.parametrize("args,needle", BAD_OPTIONS)
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, data_dir, args, needle):
    code, err = run_main(capsys, "--data", data_dir, "--out", tmp_path / "run", "--tile", 256, "--quiet", *args)
    assert code == 2
    assert err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


def test_cli_trains_resumes_and_refuses_changed_settings(tmp_path, capsys, data_dir):
    run_dir = tmp_path / "run"
    common = ["--tile", 256, "--ngf", 4, "--ndf", 4, "--sample-every", 1, "--quiet"]
    assert run_main(capsys, "--data", data_dir, "--out", run_dir, "--steps", 1, *common) == (0, "")
    assert run_main(capsys, "--out", run_dir, "--steps", 2, "--resume", "--quiet") == (0, "")
    assert latest_checkpoint(run_dir).name == "step-00000002.json"
    code, err = run_main(capsys, "--out", run_dir, "--steps", 3, "--resume", "--ngf", 8, "--quiet")
    assert code == 2 and "trained with ngf=4, not 8" in err and err.count("\n") == 1
    code, err = run_main(capsys, "--data", data_dir, "--out", run_dir, "--steps", 3, *common)
    assert code == 2 and "already holds a run" in err
    code, err = run_main(capsys, "--out", tmp_path / "new")
    assert code == 2 and "--data DIR is required" in err


def test_cli_init_takes_the_runs_settings_unless_given_and_refuses_other_widths(tmp_path, capsys, data_dir):
    base = tmp_path / "base"
    assert run_main(capsys, "--data", data_dir, "--out", base, "--steps", 1, "--tile", 256, "--ngf", 4, "--ndf", 4,
                    "--lr", 2e-4, "--quiet") == (0, "")
    tuned = tmp_path / "tuned"
    assert run_main(capsys, "--init", base, "--out", tuned, "--steps", 1, "--lambda-shift", 5, "--quiet") == (0, "")
    stored = json.loads(latest_checkpoint(tuned).read_text())["training"]
    assert (stored["ngf"], stored["lr"], stored["lambda_shift"], stored["tile"]) == (4, 2e-4, 5.0, 256)
    assert stored["data"] == str(data_dir.resolve()) and stored["init"] == str(latest_checkpoint(base).resolve())
    code, err = run_main(capsys, "--init", base, "--out", tmp_path / "wider", "--steps", 1, "--ngf", 8, "--quiet")
    assert code == 2 and err.count("\n") == 1 and (
        "does not fit the models of this run (generator ngf 4 there, 8 here)" in err), err
    code, err = run_main(capsys, "--init", tmp_path / "nowhere", "--out", tmp_path / "x", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "not a run directory or a training checkpoint" in err, err
    code, err = run_main(capsys, "--init", base, "--out", tuned, "--resume", "--steps", 2, "--quiet")
    assert code == 2 and "give one of them" in err, err


def test_ctrl_c_finishes_the_step_saves_and_exits_130(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "safron.train", "--data", str(data_dir), "--out", str(run_dir),
               "--steps", "100000", "--tile", "256", "--ngf", "4", "--ndf", "4", "--save-every", "0",
               "--sample-every", "0", "--quiet"]
    proc = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "losses.csv").exists() or len(read_losses(run_dir)) < 2:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    steps = len(read_losses(run_dir))
    assert latest_checkpoint(run_dir).name == f"step-{steps:08d}.json"
    assert quick_train(run_dir, data_dir, steps + 1, config=None, resume=True).step == steps + 1


@pytest.mark.needs_data
def test_two_steps_on_glas(tmp_path):
    glas = SHARED_DATA / "glas" / "train"
    if not glas.is_dir():
        pytest.skip(f"GlaS training data not found at {glas}")
    result = train(tmp_path / "run", TrainConfig(data=str(glas), **TINY), steps=2, save_every=0, sample_every=2,
                   progress=False, note=None)
    assert result.step == 2
    assert all(np.isfinite(value) for value in result.losses.values())
    assert Image.open(tmp_path / "run" / "samples" / "step-00000002.png").size == (3 * 492 + 16, 2 * 492 + 8)
    assert load_generator(tmp_path / "run").ngf == 4


def test_help_lists_the_options():
    text = train_parser().format_help()
    for option in ("--data", "--out", "--steps", "--tile", "--stride", "--ngf", "--ndf", "--lr", "--lambda-l1",
                   "--lambda-fm", "--gan-loss", "--diffaugment", "--lr-d",
                   "--lambda-adv", "--blend", "--tiles-per-step", "--seed", "--save-every", "--sample-every",
                   "--resume", "--device", "--precision", "--threads", "--quiet"):
        assert option in text


# --- losses beyond the paper's, DiffAugment, bf16 on the CPU, starting from an exported generator -------------------

RICH = dict(lambda_fm=10.0, gan_loss="hinge", diffaugment="color,translation,cutout", lr_d=4e-4, lambda_l1=5.0)


def test_feature_matching_joins_the_generators_loss_and_is_logged(data_dir):
    config = TrainConfig(data=str(data_dir), tile=256, **RICH, **TINY)
    assert config.loss_names == (*LOSS_NAMES, "fm")
    dataset = TileDataset(data_dir, 256, seed=0)
    trainer = Trainer(config, dataset, torch.device("cpu"))
    assert [g["lr"] for g in trainer.optimiser_d.param_groups] == [4e-4]
    assert [g["lr"] for g in trainer.optimiser_g.param_groups] == [config.lr]
    for step in range(2):
        losses = trainer.train_step(dataset.tile_at(step))
        assert losses["fm"] > 0
        assert losses["loss_g"] == pytest.approx(
            config.lambda_l1 * losses["l1"] + config.lambda_adv * losses["adv"] + config.lambda_fm * losses["fm"],
            rel=1e-5)
        # Hinge: the discriminator's terms are means of relu(1 -+ logit), each >= 0, near 1 for a young network.
        assert 0 <= losses["d_real"] < 3 and 0 <= losses["d_fake"] < 3


def test_feature_matching_is_zero_when_the_generator_reproduces_the_real_tile(big_tile_dir):
    """A generator that returns the real image gives identical features on both sides, whatever the augmentation."""
    config = TrainConfig(data=str(big_tile_dir), tile=492, lambda_fm=1.0, diffaugment="color,translation,cutout",
                         **TINY)
    dataset = TileDataset(big_tile_dir, 492, seed=0)
    trainer = Trainer(config, dataset, torch.device("cpu"))
    tile = dataset.tile_at(0)
    # The synthetic images are a fixed colour per class, so painting the mask's centre reproduces the real tile.
    colours = torch.from_numpy(CLASS_RGB.astype(np.float32) / 127.5 - 1)
    trainer.generator = _Painter(trainer.plan.window, trainer.plan.patch, colours)
    losses = trainer.train_step(tile)
    assert losses["l1"] < 1e-6 and losses["fm"] < 1e-6, losses
    # With another colour for one class, the features differ.
    trainer.generator = _Painter(trainer.plan.window, trainer.plan.patch, colours.flip(0))
    assert trainer.train_step(dataset.tile_at(1))["fm"] > 1e-3


class _Painter(torch.nn.Module):
    """Paints each pixel of the window's centre with its class's colour; one dummy parameter for the optimiser."""

    noise_channels = 0  # reads the mask only, as a noise-free models.Generator

    def __init__(self, window: int, patch: int, colours: torch.Tensor):
        super().__init__()
        self.margin, self.patch, self.colours = (window - patch) // 2, patch, colours
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, windows):
        centre = windows[:, :, self.margin:self.margin + self.patch, self.margin:self.margin + self.patch]
        # Model input channels are (stroma, gland, background) = labels (1, 2, 0).
        labels = torch.stack([centre[:, 2], centre[:, 0], centre[:, 1]], dim=1).argmax(dim=1)
        return self.colours[labels].permute(0, 3, 1, 2) + 0 * self.dummy


def test_new_losses_and_diffaugment_resume_with_the_losses_of_an_uninterrupted_run(tmp_path, data_dir):
    config = TrainConfig(data=str(data_dir), tile=256, **RICH, **TINY)
    quick_train(tmp_path / "straight", data_dir, 4, config=config)
    quick_train(tmp_path / "resumed", data_dir, 2, config=config)
    quick_train(tmp_path / "resumed", data_dir, 4, config=None, resume=True)
    rows = [read_losses(tmp_path / name) for name in ("straight", "resumed")]
    assert [[row[k] for k in ("step", *config.loss_names)] for row in rows[0]] == \
        [[row[k] for k in ("step", *config.loss_names)] for row in rows[1]]
    stored = json.loads(latest_checkpoint(tmp_path / "resumed").read_text())["training"]
    assert {k: stored[k] for k in RICH} == RICH
    with pytest.raises(SafronInputError, match="trained with diffaugment"):
        quick_train(tmp_path / "resumed", data_dir, 5, resume=True,
                    config=dataclasses.replace(config, diffaugment="cutout"))


def test_bf16_trains_on_the_cpu(data_dir):
    config = TrainConfig(data=str(data_dir), tile=256, **TINY)
    dataset = TileDataset(data_dir, 256, seed=0)
    fp32 = Trainer(config, dataset, torch.device("cpu"), "fp32").train_step(dataset.tile_at(0))
    bf16 = Trainer(config, dataset, torch.device("cpu"), "bf16").train_step(dataset.tile_at(0))
    assert all(np.isfinite(list(bf16.values())))
    # Same initialisation and tile: the same losses up to bf16's three significant digits.
    assert bf16["l1"] == pytest.approx(fp32["l1"], rel=2e-2) and bf16 != fp32


@pytest.fixture(scope="module")
def exported_generator(tmp_path_factory, data_dir) -> Path:
    """A tiny run's generator exported as safron-export does by default (context convolution folded)."""
    from safron.export import export_onnx

    root = tmp_path_factory.mktemp("exported")
    quick_train(root / "run", data_dir, 2)
    export_onnx(root / "run", root / "generator.onnx", check_samples=1)
    return root / "generator.onnx"


def test_init_from_an_exported_onnx_starts_from_its_generator_with_a_fresh_discriminator(tmp_path, data_dir,
                                                                                        exported_generator):
    from safron.backends import create_backend
    from safron.stitch import cut_windows

    result = quick_train(tmp_path / "tuned", data_dir, 1, init=exported_generator, save_every=1,
                         config=TrainConfig(data=str(data_dir), tile=256, **TINY))
    assert result.step == 1
    stored = json.loads(latest_checkpoint(tmp_path / "tuned").read_text())["training"]
    assert stored["init"] == str(exported_generator.resolve())

    # Before any step, the trainer's generator computes what the ONNX file computes.
    config = TrainConfig(data=str(data_dir), tile=256, **TINY)
    dataset = TileDataset(data_dir, 256, seed=0)
    trainer = Trainer(config, dataset, torch.device("cpu"))
    from safron.train import generator_from_onnx

    trainer.start_from(generator_from_onnx(exported_generator))
    windows = cut_windows(trainer._tensors(dataset.tile_at(0))[0], trainer.plan)
    trainer.generator.eval()
    with torch.no_grad():
        ours = trainer.generator(windows).numpy()
    backend = create_backend("onnxruntime", exported_generator)
    try:
        theirs = backend.run(windows.numpy())
    finally:
        backend.close()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)
    assert not trainer.optimiser_d.state, "the discriminator's optimiser starts fresh"

    wider = Trainer(dataclasses.replace(config, ngf=8), dataset, torch.device("cpu"))
    with pytest.raises(SafronInputError, match="ngf 4 there, 8 here"):
        wider.start_from(generator_from_onnx(exported_generator))


def test_cli_init_from_onnx_takes_the_width_from_the_file(tmp_path, capsys, data_dir, exported_generator):
    run_dir = tmp_path / "tuned"
    assert run_main(capsys, "--data", data_dir, "--init", exported_generator, "--out", run_dir, "--steps", 1,
                    "--tile", 256, "--ndf", 4, "--lambda-fm", 10, "--diffaugment", "cutout,translation",
                    "--quiet") == (0, "")
    stored = json.loads(latest_checkpoint(run_dir).read_text())["training"]
    assert (stored["ngf"], stored["ndf"], stored["lambda_fm"], stored["diffaugment"]) == (4, 4, 10.0,
                                                                                          "translation,cutout")
    code, err = run_main(capsys, "--data", data_dir, "--init", tmp_path / "missing.onnx", "--out", tmp_path / "x",
                         "--quiet")
    assert code == 2 and err.count("\n") == 1 and "missing.onnx" in err, err


def test_init_with_the_resize_decoder_refits_a_transposed_one(tmp_path, data_dir, exported_generator):
    """--upsample resize on --init of a transposed-decoder run or file: both generators (trained and averaged) start
    as models.resize_decoder of the stored ones, the discriminator and its Adam state come along, the generator's
    Adam starts afresh (its moments belong to other kernels); a resumed run never changes its decoder."""
    from safron.models import resize_decoder
    from safron.train import generator_from_onnx

    quick_train(tmp_path / "base", data_dir, 2, config=TrainConfig(data=str(data_dir), tile=256, ema_decay=0.5, **TINY))
    base = latest_checkpoint(tmp_path / "base")
    config = TrainConfig(data=str(data_dir), tile=256, ema_decay=0.5, upsample="resize", **TINY)
    dataset = TileDataset(data_dir, 256, seed=0)
    trainer = Trainer(config, dataset, torch.device("cpu"))
    trainer.load(base, restore_step=False)
    expected = resize_decoder(load_generator(base)).state_dict()  # the published (averaged) generator
    for name, tensor in trainer.generator_ema.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    assert trainer.generator.upsample == "resize" and trainer.refits("transpose") and not trainer.refits("resize")
    assert trainer.optimiser_d.state and not trainer.optimiser_g.state
    with pytest.raises(ModelError, match="upsample 'transpose' there, 'resize' here"):
        Trainer(config, dataset, torch.device("cpu")).load(base)  # resuming is not refitting

    onnx_trainer = Trainer(config, dataset, torch.device("cpu"))
    onnx_trainer.start_from(generator_from_onnx(exported_generator))
    refitted = resize_decoder(generator_from_onnx(exported_generator)).state_dict()
    for name, tensor in onnx_trainer.generator.state_dict().items():
        torch.testing.assert_close(tensor, refitted[name], rtol=0, atol=0)

    notes = []
    result = quick_train(tmp_path / "tuned", data_dir, 1, config=config, init=tmp_path / "base", note=notes.append)
    assert result.step == 1 and any("refitted" in text for text in notes), notes
    assert json.loads(latest_checkpoint(tmp_path / "tuned").read_text())["generator"]["upsample"] == "resize"


def test_checkpoints_from_before_the_small_images_setting_resume_skipping_them(tmp_path, data_dir):
    quick_train(tmp_path / "run", data_dir, 1, save_every=1)
    state_path = latest_checkpoint(tmp_path / "run")
    state = json.loads(state_path.read_text())
    assert state["training"]["small_images"] == "mirror"
    del state["training"]["small_images"]  # as written before the setting existed
    state_path.write_text(json.dumps(state))
    result = quick_train(tmp_path / "run", data_dir, 2, config=None, resume=True)
    assert result.step == 2
    assert json.loads(latest_checkpoint(tmp_path / "run").read_text())["training"]["small_images"] == "skip"


def test_the_cheaper_context_and_the_resize_decoder_train_and_resume_exactly(tmp_path, data_dir):
    config = TrainConfig(data=str(data_dir), tile=256, context="dilated", upsample="resize", lambda_fm=1.0, **TINY)
    quick_train(tmp_path / "straight", data_dir, 3, config=config)
    quick_train(tmp_path / "resumed", data_dir, 1, config=config)
    quick_train(tmp_path / "resumed", data_dir, 3, config=None, resume=True)
    assert loss_values(read_losses(tmp_path / "straight")) == loss_values(read_losses(tmp_path / "resumed"))
    generator = load_generator(tmp_path / "resumed")
    assert (generator.context_kind, generator.upsample) == ("dilated", "resize")


def test_noise_channels_train_resume_exactly_and_reach_the_export(tmp_path, data_dir):
    """A generator reading noise: each tile's noise is one draw from the step's seed (a resumed run has the same
    losses), the setting is stored, and the exported file has the noise input the engine fills."""
    from safron.backends.onnx_runtime import OnnxRuntimeBackend
    from safron.export import export_onnx

    config = TrainConfig(data=str(data_dir), tile=256, noise_channels=2, lambda_grid=1.0, grid_fold="class",
                         lambda_shift=1.0, **TINY)
    quick_train(tmp_path / "straight", data_dir, 3, config=config)
    quick_train(tmp_path / "resumed", data_dir, 1, config=config)
    quick_train(tmp_path / "resumed", data_dir, 3, config=None, resume=True)
    assert loss_values(read_losses(tmp_path / "straight")) == loss_values(read_losses(tmp_path / "resumed"))
    state = json.loads(latest_checkpoint(tmp_path / "resumed").read_text())
    assert state["training"]["noise_channels"] == 2 and state["generator"]["noise_channels"] == 2
    generator = load_generator(tmp_path / "resumed")
    assert generator.noise_channels == 2 and generator.noise.weight.abs().sum() > 0  # trained, not left at zero

    export_onnx(tmp_path / "resumed", tmp_path / "noisy.onnx", check_samples=2)
    backend = OnnxRuntimeBackend(tmp_path / "noisy.onnx")
    try:
        assert backend.signature.noise_channels == 2
        with pytest.raises(ValueError, match="reads noise"):
            backend.run(np.ones((1, 3, 296, 296), np.float32))
    finally:
        backend.close()


def test_the_noise_a_tile_gets_is_fresh_per_step_and_shared_by_its_overlapping_windows(data_dir):
    config = TrainConfig(data=str(data_dir), tile=256, noise_channels=1, **TINY)
    trainer = Trainer(config, TileDataset(data_dir, 256, seed=0), torch.device("cpu"))
    tile = trainer.dataset.tile_at(0)
    torch.manual_seed(1)
    first = trainer._tensors(tile)[0]
    second = trainer._tensors(tile)[0]
    assert first.shape[0] == 4
    torch.testing.assert_close(first[:3], second[:3], rtol=0, atol=0)  # the mask
    assert (first[3] != second[3]).float().mean() > 0.99  # the noise: a new draw
    assert -1 <= float(first[3].min()) and float(first[3].max()) <= 1 and abs(float(first[3].mean())) < 0.02
    # The samples' noise is fixed, so successive samples differ by the generator only.
    fixed = torch.Generator().manual_seed(0)
    again = torch.Generator().manual_seed(0)
    torch.testing.assert_close(trainer._tensors(tile, fixed)[0], trainer._tensors(tile, again)[0], rtol=0, atol=0)


def test_init_with_noise_channels_adds_zero_weights_and_a_fresh_generator_optimiser(tmp_path, data_dir,
                                                                                    exported_generator):
    from safron.models import with_noise
    from safron.train import generator_from_onnx

    quick_train(tmp_path / "base", data_dir, 2, config=TrainConfig(data=str(data_dir), tile=256, **TINY))
    base = latest_checkpoint(tmp_path / "base")
    config = TrainConfig(data=str(data_dir), tile=256, noise_channels=1, **TINY)
    dataset = TileDataset(data_dir, 256, seed=0)
    trainer = Trainer(config, dataset, torch.device("cpu"))
    trainer.load(base, restore_step=False)
    expected = with_noise(load_generator(base), 1).state_dict()
    for name, tensor in trainer.generator.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)
    assert float(trainer.generator.noise.weight.detach().abs().sum()) == 0
    assert trainer.optimiser_d.state and not trainer.optimiser_g.state
    with pytest.raises(ModelError, match="noise_channels"):
        Trainer(config, dataset, torch.device("cpu")).load(base)  # resuming never adds noise

    onnx_trainer = Trainer(config, dataset, torch.device("cpu"))
    onnx_trainer.start_from(generator_from_onnx(exported_generator))
    assert float(onnx_trainer.generator.noise.weight.detach().abs().sum()) == 0

    notes = []
    result = quick_train(tmp_path / "tuned", data_dir, 1, config=config, init=tmp_path / "base", note=notes.append)
    assert result.step == 1 and any("zero weights on the noise" in text for text in notes), notes
