"""The TIFF encoder in a process of its own (`safron.encoder_process`): the thread writer's bytes, its errors, and
clean-up whichever side stops first."""

from __future__ import annotations

import errno
import os
import resource
import signal
import sys
import time

import numpy as np
import pytest
import tifffile

from safron import engine
from safron.encoder_process import PyramidTiffProcess
from safron.errors import OutputWriteError, SafronInputError
from safron.pyramid_tiff import PyramidTiffWriter, temporary_paths

from test_pyramid_tiff import files_in, new_canvas, noise_image, write_image_via_canvas

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and resource limits")


def canvas_with(path, image):
    canvas = new_canvas(path, *image.shape[:2])
    canvas.write_bytes(image.tobytes())
    return canvas


@pytest.mark.parametrize("options", [dict(compression="jpeg", quality=80, mpp=(0.25, 0.5), description="d"),
                                     dict(compression="zstd", workers=1), dict(compression="none", tile=128)],
                         ids=["jpeg", "zstd", "none"])
def test_the_process_writes_the_thread_writers_bytes(tmp_path, options):
    image = noise_image(1111, 777, seed=3)
    by_thread, by_process = tmp_path / "thread.tif", tmp_path / "process.tif"
    write_image_via_canvas(by_thread, image, seed=4, **options)
    write_image_via_canvas(by_process, image, seed=5, writer=PyramidTiffProcess, **options)
    assert by_process.read_bytes() == by_thread.read_bytes()
    if options["compression"] != "jpeg":
        np.testing.assert_array_equal(tifffile.imread(by_process, level=0), image)
    assert files_in(tmp_path) == ["process.tif", "process.tif.canvas", "thread.tif", "thread.tif.canvas"]


@pytest.mark.parametrize("mistake", ["canvas size", "compression", "quality"])
def test_the_childs_constructor_errors_are_raised_here_with_their_type_and_message(tmp_path, mistake):
    canvas = canvas_with(tmp_path / "slide.tif", noise_image(60, 40, seed=0))
    arguments = {"canvas size": dict(height=61), "compression": dict(compression="webp"),
                 "quality": dict(quality=101)}[mistake]
    options = dict(height=60, width=40, canvas=canvas) | arguments
    height, width = options.pop("height"), options.pop("width")
    with pytest.raises(SafronInputError) as in_thread:
        PyramidTiffWriter(tmp_path / "slide.tif", height, width, **options)
    with pytest.raises(SafronInputError) as in_process:
        PyramidTiffProcess(tmp_path / "slide.tif", height, width, **options)
    assert type(in_process.value) is type(in_thread.value) and str(in_process.value) == str(in_thread.value)
    assert files_in(tmp_path) == ["slide.tif.canvas"]


def test_rows_ready_is_checked_at_the_call(tmp_path):
    image = noise_image(600, 400, seed=1)
    canvas = canvas_with(tmp_path / "slide.tif", image)
    with PyramidTiffProcess(tmp_path / "slide.tif", 600, 400, compression="zstd", canvas=canvas) as writer:
        writer.rows_ready(np.int64(300))
        for bad in (299, 601, 2.5, True, "400"):
            with pytest.raises(ValueError, match="rows_ready"):
                writer.rows_ready(bad)
        writer.rows_ready(600)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "slide.tif", level=0), image)


def test_close_before_the_last_row_is_an_error_and_writes_nothing(tmp_path):
    canvas = canvas_with(tmp_path / "slide.tif", noise_image(600, 400, seed=1))
    writer = PyramidTiffProcess(tmp_path / "slide.tif", 600, 400, canvas=canvas)
    writer.rows_ready(256)
    with pytest.raises(ValueError, match="closed after 256 of 600 rows"):
        writer.close()
    assert files_in(tmp_path) == ["slide.tif.canvas"]


def test_abort_removes_every_temporary_and_keeps_the_canvas_and_an_old_output(tmp_path):
    image = noise_image(1200, 600, seed=2)
    canvas = canvas_with(tmp_path / "slide.tif", image)
    (tmp_path / "slide.tif").write_bytes(b"an older render")
    writer = PyramidTiffProcess(tmp_path / "slide.tif", 1200, 600, compression="zstd", canvas=canvas)
    writer.rows_ready(700)
    writer.abort()
    writer.abort()  # twice is harmless
    assert files_in(tmp_path) == ["slide.tif", "slide.tif.canvas"]
    assert (tmp_path / "slide.tif").read_bytes() == b"an older render" and canvas.read_bytes() == image.tobytes()
    with pytest.raises(ValueError, match="aborted"):
        writer.rows_ready(800)


def test_an_encoder_killed_mid_file_is_an_error_here_and_its_files_are_removed(tmp_path):
    canvas = canvas_with(tmp_path / "slide.tif", noise_image(2000, 600, seed=3))
    writer = PyramidTiffProcess(tmp_path / "slide.tif", 2000, 600, compression="zstd", canvas=canvas)
    writer.rows_ready(1000)
    os.kill(writer._child.process.pid, signal.SIGKILL)
    writer._child.process.wait()
    with pytest.raises(RuntimeError, match="encoder process exited unexpectedly"):
        writer.rows_ready(2000)
        writer.close()
    assert files_in(tmp_path) == ["slide.tif.canvas"]


def test_the_encoder_aborts_and_cleans_up_when_the_render_goes_away(tmp_path):
    # What a render killed with SIGKILL leaves the child: its stdin closes.
    canvas = canvas_with(tmp_path / "slide.tif", noise_image(2000, 600, seed=4))
    writer = PyramidTiffProcess(tmp_path / "slide.tif", 2000, 600, compression="zstd", canvas=canvas)
    writer.rows_ready(1000)
    assert (tmp_path / "slide.tif.partial").exists()
    writer._child.process.stdin.close()
    assert writer._child.process.wait(timeout=60) == 0
    assert files_in(tmp_path) == ["slide.tif.canvas"]


def test_the_encoder_ignores_ctrl_c_which_is_the_renders_to_handle(tmp_path):
    image = noise_image(900, 500, seed=5)
    canvas = canvas_with(tmp_path / "slide.tif", image)
    with PyramidTiffProcess(tmp_path / "slide.tif", 900, 500, compression="zstd", canvas=canvas) as writer:
        writer.rows_ready(300)
        os.kill(writer._child.process.pid, signal.SIGINT)  # what Ctrl-C sends to the whole process group
        time.sleep(0.2)
        writer.rows_ready(900)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "slide.tif", level=0), image)


def test_a_write_the_disk_refuses_comes_back_as_an_output_write_error_with_its_errno(tmp_path):
    canvas = canvas_with(tmp_path / "slide.tif", noise_image(1500, 1500, seed=6))
    # A file size limit for the child only (inherited at its start): its TIFF outgrows it, and the write fails with
    # EFBIG as on a full disk (Python ignores SIGXFSZ, so the write returns the error instead of killing it).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        writer = PyramidTiffProcess(tmp_path / "slide.tif", 1500, 1500, compression="none", canvas=canvas)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with pytest.raises(OutputWriteError) as raised:
        writer.rows_ready(1500)
        writer.close()
    assert raised.value.errno == errno.EFBIG and "\n" not in str(raised.value)
    assert str(raised.value).startswith(f"{tmp_path / 'slide.tif'}: cannot write the TIFF or its temporary files")
    assert files_in(tmp_path) == ["slide.tif.canvas"]


def test_temporary_paths_name_every_file_a_writer_leaves_while_it_works(tmp_path):
    canvas = canvas_with(tmp_path / "slide.tif", noise_image(1100, 600, seed=7))
    writer = PyramidTiffWriter(tmp_path / "slide.tif", 1100, 600, compression="zstd", canvas=canvas)
    writer.rows_ready(512)
    time.sleep(0.5)
    working = set(files_in(tmp_path)) - {"slide.tif.canvas"}
    writer.abort()
    expected = {p.name for p in temporary_paths(tmp_path / "slide.tif", 1100, 600, with_canvas=True)}
    assert working and working <= expected and "slide.tif.partial" in expected


def test_large_renders_encode_in_a_process_with_the_same_bytes(tmp_path, monkeypatch):
    from onnx_models import context_mix

    model = context_mix(tmp_path / "mix.onnx")
    rng = np.random.default_rng(8)
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, rng.integers(0, 3, (700, 900), dtype=np.uint8), tile=(256, 256))
    used = []
    real_init = PyramidTiffProcess.__init__

    def spy(self, *args, **kwargs):
        used.append(True)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(PyramidTiffProcess, "__init__", spy)
    engine.render(mask, tmp_path / "thread.tif", model=model, progress=False)
    assert not used  # 700 x 900 is below the threshold
    monkeypatch.setattr(engine, "CHILD_PROCESSES_MIN_PIXELS", 700 * 900)
    result = engine.render(mask, tmp_path / "process.tif", model=model, progress=False)
    assert used and result.stage_seconds["encode"] > 0
    assert (tmp_path / "process.tif").read_bytes() == (tmp_path / "thread.tif").read_bytes()
    assert files_in(tmp_path) == ["mask.tif", "mix.onnx", "process.tif", "thread.tif"]


def test_an_interrupted_render_with_the_encoder_process_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    from onnx_models import centre_crop

    model = centre_crop(tmp_path / "crop.onnx")
    rng = np.random.default_rng(9)
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, rng.integers(0, 3, (1300, 500), dtype=np.uint8), tile=(256, 256))
    options = dict(model=model, progress=False, compression="zstd", batch_size=2)
    engine.render(mask, tmp_path / "reference.tif", **options)
    monkeypatch.setattr(engine, "CHILD_PROCESSES_MIN_PIXELS", 0)
    real_rows_final, calls = engine._FileSink.rows_final, []

    def interrupted(self, y1):
        calls.append(y1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C, after the encoder has been given rows
        real_rows_final(self, y1)

    monkeypatch.setattr(engine._FileSink, "rows_final", interrupted)
    out = tmp_path / "out.tif"
    with pytest.raises(KeyboardInterrupt):
        engine.render(mask, out, **options)
    assert files_in(tmp_path) == ["crop.onnx", "mask.tif", "out.tif.safron-canvas", "out.tif.safron-journal",
                                  "reference.tif"]
    monkeypatch.setattr(engine._FileSink, "rows_final", real_rows_final)
    engine.render(mask, out, resume=True, **options)
    assert out.read_bytes() == (tmp_path / "reference.tif").read_bytes()
    assert files_in(tmp_path) == ["crop.onnx", "mask.tif", "out.tif", "reference.tif"]
