"""The canvas and its journal: finished rows are journalled only after the canvas is synced, off the main thread."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from safron.canvas import Journal, JournalThread, open_canvas


def journalled_rows(path) -> list[int]:
    return [json.loads(line)["rows_done"] for line in path.read_text().splitlines()[1:]]


def test_rows_are_journalled_after_a_sync_and_the_last_request_survives_close(tmp_path, monkeypatch):
    canvas = open_canvas(tmp_path / "c", 8, 5, create=True)
    journal = Journal(tmp_path / "j", {"format": 1}, resume=False)
    events = []
    monkeypatch.setattr(canvas, "sync", lambda: events.append("sync"))
    real_record = journal.record
    monkeypatch.setattr(journal, "record", lambda rows: (events.append(rows), real_record(rows)))
    recorder = JournalThread(canvas, journal)
    with canvas.block(0, 4, 0, 5) as rows:
        rows[:] = 7
    for rows_done in (2, 4, 8):
        recorder.submit(rows_done)
    recorder.close()
    # Requests may coalesce, but every record follows a sync, they only grow, and the last one is kept.
    recorded = [event for event in events if event != "sync"]
    assert recorded == sorted(recorded) and recorded[-1] == 8
    assert all(events[events.index(rows) - 1] == "sync" for rows in recorded)
    assert journalled_rows(tmp_path / "j") == recorded
    journal.close()
    canvas.close()
    np.testing.assert_array_equal(np.fromfile(tmp_path / "c", np.uint8).reshape(8, 5, 3)[:4], 7)


def test_a_failed_sync_is_raised_in_the_render_thread_and_nothing_is_journalled(tmp_path, monkeypatch):
    canvas = open_canvas(tmp_path / "c", 4, 4, create=True)
    journal = Journal(tmp_path / "j", {"format": 1}, resume=False)

    def full_disk():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(canvas, "sync", full_disk)
    recorder = JournalThread(canvas, journal)
    recorder.submit(4)
    with pytest.raises(OSError, match="No space left"):
        recorder.close()
    journal.close()
    canvas.close()
    assert journalled_rows(tmp_path / "j") == []


@pytest.mark.parametrize("record_pending", [True, False])
def test_close_records_the_pending_request_only_when_asked(tmp_path, monkeypatch, record_pending):
    canvas = open_canvas(tmp_path / "c", 4, 4, create=True)
    journal = Journal(tmp_path / "j", {"format": 1}, resume=False)
    syncing, release = threading.Event(), threading.Event()

    def slow_sync():
        syncing.set()
        assert release.wait(10)

    monkeypatch.setattr(canvas, "sync", slow_sync)
    recorder = JournalThread(canvas, journal)
    recorder.submit(2)
    assert syncing.wait(10)  # the thread holds request 2, so request 4 stays pending
    recorder.submit(4)

    def release_once_closing():  # let sync 2 finish only after close has decided about request 4
        deadline = time.monotonic() + 10
        while not recorder._closing and time.monotonic() < deadline:
            time.sleep(0.001)
        release.set()

    releaser = threading.Thread(target=release_once_closing)
    releaser.start()
    recorder.close(record_pending=record_pending)
    releaser.join()
    journal.close()
    canvas.close()
    assert journalled_rows(tmp_path / "j") == ([2, 4] if record_pending else [2])


def test_write_block_puts_whole_rows_and_blocks_where_they_belong_and_refuses_what_does_not_fit(tmp_path):
    height, width = 9, 7
    canvas = open_canvas(tmp_path / "c", height, width, create=True)
    rng = np.random.default_rng(4)
    whole_rows = rng.integers(0, 256, (3, width, 3), dtype=np.uint8)
    block = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)
    canvas.write_block(2, 0, whole_rows)
    canvas.write_block(5, 4, block[:, ::-1])  # a strided view is written as its pixels
    for bad_position, bad_pixels in (((7, 0), whole_rows), ((0, 5), block), ((0, 0), block.astype(np.uint16))):
        with pytest.raises(ValueError, match="cannot write"):
            canvas.write_block(*bad_position, bad_pixels)
    canvas.close()
    expected = np.zeros((height, width, 3), np.uint8)
    expected[2:5] = whole_rows
    expected[5:9, 4:7] = block[:, ::-1]
    np.testing.assert_array_equal(np.fromfile(tmp_path / "c", np.uint8).reshape(height, width, 3), expected)


def test_a_canvas_of_the_wrong_size_or_none_is_refused_alike_by_resume_and_the_pyramid_writer(tmp_path):
    from safron.errors import SafronInputError
    from safron.pyramid_tiff import PyramidTiffWriter

    short = tmp_path / "short"
    short.write_bytes(bytes(4 * 5 * 3 - 1))
    cases = ((short, r"canvas .*short holds 59 bytes, not 4 x 5 x 3 = 60"),
             (tmp_path / "gone", r"canvas .*gone is missing"))
    for path, message in cases:
        with pytest.raises(SafronInputError, match=f"^cannot resume: {message}$"):
            open_canvas(path, 4, 5, create=False)
        with pytest.raises(SafronInputError, match=f"^{message}$"):
            PyramidTiffWriter(tmp_path / "out.tif", 4, 5, canvas=path)
    assert not (tmp_path / "out.tif").exists()
    open_canvas(short, 4, 5, create=True).close()  # a new render replaces whatever was there
    assert short.stat().st_size == 60
