"""The mask reader in a process of its own: label windows handed over through shared memory.

Reading a batch's windows is Python around native decoding (tifffile's tiles, the colour lookup, mirroring at the
border, cutting windows); in a render it shares the interpreter lock with inference and the main loop. Beside one
busy Python thread, reading the windows of an 8k render took 3.2 s busy instead of 0.3 s alone on the dev VM, and
0.4 s with this child (`bench/gil_share.py`); on a lent H200 the reader was the longest stage of a 32k render
(bench/RESULTS.md). A child that opens the same mask file needs nothing from the render but the patch plan and the
batch sequence (`windows`): it writes each batch's uint8 windows into one of a few slots of a shared buffer, and the
render's read stage only copies them out and encodes them for the model.

The slots live in an anonymous file (in /dev/shm where it has room) that both processes map, passed to the child by
file descriptor: nothing to name, nothing left behind however either side ends. The child says when it has opened
the mask (`wait_ready`), then reads ahead into free slots and says which slot holds the next batch; the parent
copies it out and frees it. Where neither /dev/shm nor the temporary folder has room for the slots, or no child
can be started (the constructor raises OSError, `wait_ready` says False), the engine reads in a thread as for small
images. A mask error the child finds (a pixel that is no class, a truncated tile) is raised by `next_windows` as the
same `MaskError` with the same message; a child that dies later without a word is a `RuntimeError`.
`child_process` has the rest.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import tempfile
from collections import deque

import numpy as np

from . import child_process, errors, geometry, masks, raw_image, windows

__all__ = ["WindowReaderProcess"]

SLOTS = 4  # batches the child may read ahead of the render: enough to ride out a slow tile, a few MB each
_EXIT_TIMEOUT_S = 30.0
_WHO = "mask reader"


def _shared_file(size: int):
    """An anonymous file of `size` bytes for the slots: in RAM (/dev/shm) where it has room, else in the temporary
    folder. Its blocks are reserved up front: a memory-mapped file that cannot grow kills the process that writes to
    it (SIGBUS), and a container's /dev/shm is often only 64 MB. OSError if neither place has room."""
    folders = [None]
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        folders.insert(0, "/dev/shm")
    failure = None
    for folder in folders:
        file = tempfile.TemporaryFile(dir=folder)
        try:
            if raw_image.reserve(file.fileno(), size):
                return file
            failure = OSError(errno.EOPNOTSUPP, f"cannot reserve {size} bytes in {folder or tempfile.gettempdir()}")
        except OSError as error:
            failure = error
        file.close()
    raise failure


class WindowReaderProcess:
    """The label windows of a render's batches (`windows.batch_indices(plan, batch_size, first_batch,
    patches_end)`), each as `windows.label_windows` gives them, read by a child process from the mask file at
    `mask_path`. `plan` covers the mask grown by `outset` on every side (the engine's grid coordinates), so a patch
    at grid origin (y, x) reads the window around mask pixel (y - outset, x - outset). With `fixed_batch` (a model
    exported for batches of exactly `batch_size`), every batch has `batch_size` rows, background past its patches."""

    def __init__(self, mask_path, colour_tolerance: float, plan, outset: int, batch_size: int, fixed_batch: bool,
                 first_batch: int, patches_end: int):
        window = plan.window
        self._fixed = fixed_batch
        self._shape = (SLOTS, batch_size, window, window)
        size = int(np.prod(self._shape))
        self._file = _shared_file(size)
        self._map = mmap.mmap(self._file.fileno(), size)
        self._slots = np.frombuffer(self._map, np.uint8).reshape(self._shape)
        self._counts = deque(len(indices) for indices in windows.batch_indices(plan, batch_size, first_batch,
                                                                               patches_end))
        try:
            self._child = self._start_child(mask_path, colour_tolerance, plan, outset, batch_size, fixed_batch,
                                            first_batch, patches_end)
        except BaseException:
            del self._slots
            self._map.close()
            self._file.close()
            raise
        self._closed = self._ready = False

    def _start_child(self, mask_path, colour_tolerance, plan, outset, batch_size, fixed_batch, first_batch,
                     patches_end):
        return child_process.Child(
            __name__, "_serve",
            dict(mask=os.fspath(mask_path), colour_tolerance=colour_tolerance, size=[plan.height, plan.width],
                 geometry=[plan.patch, plan.margin, plan.overlap], outset=outset, batch_size=batch_size,
                 fixed=fixed_batch,
                 first_batch=first_batch, patches_end=patches_end, fd=self._file.fileno(), slots=SLOTS),
            pass_fds=(self._file.fileno(),),
        )

    def wait_ready(self) -> bool:
        """Wait until the child has opened the mask: True; False if it could not start (it died before a word: a
        thread must read instead). A failure it reported (the mask cannot be opened there) is raised."""
        if not self._ready:
            reply = self._child.receive()
            if reply == child_process.GONE:
                return False
            if reply.get("reply") != "ready":
                raise child_process.exception(reply, _WHO)
            self._ready = True
        return True

    def next_windows(self) -> np.ndarray:
        """The next batch's windows: uint8 (batch_size if the batch is fixed, else its patch count, window, window), a
        fresh array."""
        if not self.wait_ready():
            raise child_process.exception(child_process.GONE, _WHO)
        reply = self._child.receive()
        if reply.get("reply") != "windows":
            raise child_process.exception(reply, _WHO)
        slot, count = reply["slot"], self._counts.popleft()
        rows = self._shape[1] if self._fixed else count
        labels = self._slots[slot, :rows].copy()
        self._child.send({"free": slot})
        return labels

    def stop(self) -> None:
        """Stop the child and reap it (a read stage waiting in `next_windows` then gets an error, not a hang). Call
        `close` once no thread uses this any more."""
        if not self._closed:
            self._child.finish(_EXIT_TIMEOUT_S)

    def close(self) -> None:
        if not self._closed:
            self.stop()
            self._closed = True
            self._child.close_channel()
            del self._slots
            self._map.close()
            self._file.close()


def _serve() -> None:
    """The child: open the mask, then read each batch's windows into a free slot and say which."""
    arguments, messages, reply = child_process.serve()
    try:
        mask = masks.open_mask(arguments["mask"], colour_tolerance=arguments["colour_tolerance"])
        patch, margin, overlap = arguments["geometry"]
        outset = arguments["outset"]
        plan = geometry.render_plan(mask.height, mask.width, outset, patch, margin, overlap)
        if [plan.height, plan.width] != arguments["size"]:
            mask.close()
            raise errors.MaskError(f"{arguments['mask']}: the mask changed while it was being rendered")
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        reply(child_process.failure(exc))
        return
    reply({"reply": "ready"})
    window, rows, slots = plan.window, arguments["batch_size"], arguments["slots"]
    size = slots * rows * window * window
    shared = np.frombuffer(mmap.mmap(arguments["fd"], size), np.uint8).reshape(slots, rows, window, window)
    free = deque(range(slots))
    ys, xs = plan.origins()
    with mask:
        for indices in windows.batch_indices(plan, arguments["batch_size"], arguments["first_batch"],
                                             arguments["patches_end"]):
            while not free:
                line = messages.readline()
                if not line:  # the render is gone, or stopped us
                    return
                free.append(json.loads(line)["free"])
            slot = free.popleft()
            target = shared[slot] if arguments["fixed"] else shared[slot, :len(indices)]
            try:
                windows.label_windows(mask, plan, ys[indices] - outset, xs[indices] - outset, target)
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
                reply(child_process.failure(exc))
                return
            reply({"reply": "windows", "slot": slot})
