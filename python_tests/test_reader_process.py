"""The mask reader in a process of its own (`safron.reader_process`): the reader thread's windows, batch for batch;
the reader thread's errors; no hang and no leftovers however it ends."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import tifffile

from safron import child_process, engine, geometry, masks, reader_process, windows
from safron.errors import MaskError
from safron.reader_process import WindowReaderProcess

from test_engine import random_labels

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def windows_in_thread(mask, plan, batch_size, fixed, first_batch, patches_end, outset=0):
    ys, xs = plan.origins()
    for indices in windows.batch_indices(plan, batch_size, first_batch, patches_end):
        rows = batch_size if fixed else len(indices)
        yield windows.label_windows(mask, plan, ys[indices] - outset, xs[indices] - outset,
                                    np.empty((rows, plan.window, plan.window), np.uint8))


@pytest.fixture
def label_tif(tmp_path):
    path = tmp_path / "mask.tif"
    tifffile.imwrite(path, random_labels(1300, 900, seed=3), tile=(256, 256))
    return path


@pytest.mark.parametrize("batch_size,fixed,first_batch,patches_end,outset", [
    (5, False, 0, None, 0),    # a whole render; the last batch is short
    (4, True, 0, None, 0),     # a model with a fixed batch: background past the last patch
    (2, False, 2, 17, 0),      # a resume that starts at batch 2, a band that ends inside a batch
    (5, False, 0, None, 20),   # a grid reaching 20 px beyond the mask (the engine's default outset)
])
def test_the_process_gives_the_threads_windows_batch_for_batch(label_tif, batch_size, fixed, first_batch, patches_end,
                                                               outset):
    with masks.open_mask(label_tif) as mask:
        plan = geometry.plan(mask.height + 2 * outset, mask.width + 2 * outset)
        patches_end = patches_end or plan.count
        expected = list(windows_in_thread(mask, plan, batch_size, fixed, first_batch, patches_end, outset))
    reader = WindowReaderProcess(label_tif, masks.COLOUR_TOLERANCE, plan, outset, batch_size, fixed, first_batch,
                                 patches_end)
    try:
        for want in expected:  # more batches than slots: slots are freed and reused
            got = reader.next_windows()
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    finally:
        reader.close()
    assert len(expected) > reader_process.SLOTS


def test_a_colour_mask_is_snapped_in_the_child_as_here(tmp_path):
    labels = random_labels(700, 600, seed=4)
    colour = masks.labels_to_colour(labels)
    colour[colour == 255] = 250  # off by a little: snapped by the colour tolerance
    path = tmp_path / "mask.tif"
    tifffile.imwrite(path, colour, tile=(128, 128))
    plan = geometry.plan(700, 600)
    reader = WindowReaderProcess(path, masks.COLOUR_TOLERANCE, plan, 0, 6, False, 0, plan.count)
    try:
        with masks.open_mask(path) as mask:
            for want in windows_in_thread(mask, plan, 6, False, 0, plan.count):
                np.testing.assert_array_equal(reader.next_windows(), want)
    finally:
        reader.close()


def test_a_bad_pixel_found_by_the_child_is_the_threads_mask_error(tmp_path):
    colour = masks.labels_to_colour(random_labels(900, 600, seed=5))
    colour[700:720, 300:320] = (128, 128, 128)  # grey: no class, far below the first patch rows
    path = tmp_path / "mask.tif"
    tifffile.imwrite(path, colour, tile=(128, 128))
    plan = geometry.plan(900, 600)
    with masks.open_mask(path) as mask, pytest.raises(MaskError) as in_thread:
        list(windows_in_thread(mask, plan, 2, False, 0, plan.count))
    reader = WindowReaderProcess(path, masks.COLOUR_TOLERANCE, plan, 0, 2, False, 0, plan.count)
    try:
        reader.next_windows()  # the first batches are fine
        with pytest.raises(MaskError) as in_process:
            for _ in range(plan.count):
                reader.next_windows()
    finally:
        reader.close()
    assert str(in_process.value) == str(in_thread.value) and "\n" not in str(in_process.value)


def test_a_mask_the_child_cannot_open_is_reported_at_the_first_batch(tmp_path, label_tif):
    plan = geometry.plan(1300, 900)
    moved = tmp_path / "gone.tif"
    reader = WindowReaderProcess(moved, masks.COLOUR_TOLERANCE, plan, 0, 4, False, 0, plan.count)
    try:
        with pytest.raises(MaskError, match="gone.tif"):
            reader.next_windows()
    finally:
        reader.close()


def test_a_killed_reader_is_an_error_not_a_hang(label_tif):
    plan = geometry.plan(1300, 900)
    reader = WindowReaderProcess(label_tif, masks.COLOUR_TOLERANCE, plan, 0, 4, False, 0, plan.count)
    try:
        reader.next_windows()
        os.kill(reader._child.process.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="mask reader process exited unexpectedly"):
            for _ in range(plan.count):
                reader.next_windows()
    finally:
        reader.close()


def test_stop_frees_a_read_stage_waiting_for_a_stuck_child(label_tif, monkeypatch):
    monkeypatch.setattr(reader_process, "_EXIT_TIMEOUT_S", 0.5)
    plan = geometry.plan(1300, 900)
    reader = WindowReaderProcess(label_tif, masks.COLOUR_TOLERANCE, plan, 0, 4, False, 0, plan.count)
    reader.next_windows()
    os.kill(reader._child.process.pid, signal.SIGSTOP)  # stuck: it will not answer, nor exit when asked
    outcome = []

    def read_all():
        try:
            for _ in range(plan.count):
                reader.next_windows()
        except RuntimeError as exc:
            outcome.append(exc)

    waiting = threading.Thread(target=read_all)
    waiting.start()
    waiting.join(0.5)
    reader.stop()
    waiting.join(10)
    reader.close()
    assert not waiting.is_alive() and outcome
    assert reader._child.process.returncode == -signal.SIGKILL


def test_large_renders_read_their_windows_in_a_process_unless_the_mask_is_in_memory(tmp_path, monkeypatch):
    from onnx_models import centre_crop

    model = centre_crop(tmp_path / "crop.onnx")
    labels = random_labels(600, 500, seed=6)
    tif, png = tmp_path / "mask.tif", tmp_path / "mask.png"
    tifffile.imwrite(tif, labels, tile=(256, 256))
    from PIL import Image

    Image.fromarray(masks.labels_to_colour(labels)).save(png)
    started = []
    real_init = WindowReaderProcess.__init__

    def spy(self, mask_path, *args):
        started.append(os.path.basename(mask_path))
        real_init(self, mask_path, *args)

    monkeypatch.setattr(WindowReaderProcess, "__init__", spy)
    monkeypatch.setattr(engine, "CHILD_PROCESSES_MIN_PIXELS", 0)
    options = dict(model=model, progress=False, compression="zstd", batch_size=3)
    engine.render(tif, tmp_path / "from_tif.tif", **options)
    engine.render(png, tmp_path / "from_png.tif", **options)  # decoded whole: read in a thread, no second copy
    assert started == ["mask.tif"]
    image = masks.labels_to_colour(labels)
    for out in ("from_tif.tif", "from_png.tif"):
        np.testing.assert_array_equal(tifffile.imread(tmp_path / out), image)


def test_a_mask_error_in_a_large_render_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from onnx_models import centre_crop

    model = centre_crop(tmp_path / "crop.onnx")
    colour = masks.labels_to_colour(random_labels(1200, 500, seed=7))
    colour[1000:1010, 100:110] = (128, 128, 128)
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, colour, tile=(128, 128))
    monkeypatch.setattr(engine, "CHILD_PROCESSES_MIN_PIXELS", 0)
    with pytest.raises(MaskError) as raised:
        engine.render(mask, tmp_path / "out.tif", model=model, progress=False, batch_size=2)
    assert "\n" not in str(raised.value) and "mask.tif" in str(raised.value)
    assert sorted(os.listdir(tmp_path)) == ["crop.onnx", "mask.tif"]


def test_a_reader_whose_render_is_killed_exits_quietly(label_tif):
    # The render (here a small script) is killed with SIGKILL while its reader child is still starting: the child
    # finds the pipe closed when it replies, and must end without a traceback on the terminal they share.
    script = textwrap.dedent(f"""
        import os, signal
        from safron import geometry, masks
        from safron.reader_process import WindowReaderProcess
        plan = geometry.plan(1300, 900)
        reader = WindowReaderProcess({str(label_tif)!r}, masks.COLOUR_TOLERANCE, plan, 0, 1, False, 0, plan.count)
        print(reader._child.process.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    # communicate() returns once every holder of the pipes has closed them: the reader child too.
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert proc.stderr == ""
    child = int(proc.stdout.split()[0])  # has closed its end of the pipes; give it a moment to be reaped
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}")


@pytest.mark.parametrize("missing", ["room for the shared buffer", "child processes", "an interpreter",
                                     "a child that starts"])
def test_without_room_or_processes_a_large_render_reads_and_encodes_in_threads(tmp_path, monkeypatch, missing):
    from onnx_models import centre_crop

    model = centre_crop(tmp_path / "crop.onnx")
    labels = random_labels(600, 700, seed=8)
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, labels, tile=(256, 256))
    monkeypatch.setattr(engine, "CHILD_PROCESSES_MIN_PIXELS", 0)

    def refused(*args, **kwargs):
        raise OSError(errno.ENOSPC if missing.startswith("room") else errno.EAGAIN, "refused")

    if missing == "room for the shared buffer":
        monkeypatch.setattr(reader_process, "_shared_file", refused)
    elif missing == "child processes":
        monkeypatch.setattr(subprocess, "Popen", refused)
    elif missing == "an interpreter":  # an embedded Python
        monkeypatch.setattr(sys, "executable", "")
    else:  # a child that dies as it starts (a frozen application, say, whose executable takes no -c)
        monkeypatch.setattr(child_process, "_BOOTSTRAP", "import sys; sys.exit(3)  # {module} {function}")
    result = engine.render(mask, tmp_path / "out.tif", model=model, progress=False, compression="zstd", batch_size=4)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), masks.labels_to_colour(labels))
    assert result.stage_seconds["read"] > 0
    assert sorted(os.listdir(tmp_path)) == ["crop.onnx", "mask.tif", "out.tif"]


def test_the_shared_buffer_goes_where_there_is_room_and_says_when_there_is_none(monkeypatch):
    places = []

    def full_in_ram(fd, offset, length):
        place = os.path.dirname(os.readlink(f"/proc/self/fd/{fd}"))
        places.append(place)
        if place == "/dev/shm" or refuse_all:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full_in_ram)
    refuse_all = False
    with reader_process._shared_file(1 << 20) as file:
        assert not os.readlink(f"/proc/self/fd/{file.fileno()}").startswith("/dev/shm")
    refuse_all = True
    with pytest.raises(OSError):
        reader_process._shared_file(1 << 20)
    if os.path.isdir("/dev/shm"):
        assert places[0] == "/dev/shm"
