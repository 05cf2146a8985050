"""The pyramidal TIFF encoder in a process of its own, fed through the canvas file.

tifffile hands each tile to its compression threads from Python, so the encoder takes the interpreter lock several
times per tile; beside the render's other Python threads each handover can wait up to the switch interval (5 ms).
On a lent H200 that contention kept a 32k render at half the bare generator's speed (bench/RESULTS.md, issue 15);
on a 2-core VM a render slowed 3x beside one busy Python thread, most of it in the encoder (`bench/gil_share.py`).
The encoder needs nothing from the render but the canvas file, which the render writes anyway, and the number of
rows final in it, so it can leave the render's interpreter, at the cost of starting one (about 0.2 s: the engine
does it for large images only, `engine.CHILD_PROCESSES_MIN_PIXELS`).

`PyramidTiffProcess` has the canvas-mode interface of `PyramidTiffWriter` (`rows_ready`, `close`, `abort`,
`busy_seconds`, a context manager) and writes the same bytes: the child runs a `PyramidTiffWriter` on the same canvas
(`child_process` for how it is started and talked to). The child's constructor errors are raised by the constructor
here, its writer's errors by the next `rows_ready` or `close`, with their types and messages (an `OutputWriteError`
keeps its errno). A child that dies without a word (killed for memory) is a `RuntimeError`, and its temporary files
are removed from here; a child whose render goes away aborts and removes them itself.
"""

from __future__ import annotations

import json
import operator
import threading
from pathlib import Path

from . import child_process
from .pyramid_tiff import ClosedOnExit, PyramidTiffWriter, temporary_paths

__all__ = ["PyramidTiffProcess"]

# How long `abort` and `close` wait for the child to exit before killing it (and cleaning up here).
_EXIT_TIMEOUT_S = 30.0
_WHO = "TIFF encoder"


class PyramidTiffProcess(ClosedOnExit):
    """`PyramidTiffWriter(out_path, height, width, canvas=canvas, **options)`, run in a child process."""

    def __init__(self, out_path, height: int, width: int, *, canvas, **options) -> None:
        self.out_path, self.height, self.width = Path(out_path), height, width
        self._tile = options.get("tile", 256)
        self._rows_ready = 0
        self._state = "open"
        self._busy_seconds = 0.0
        self._replies: list[dict] = []
        self._replied = threading.Condition()
        self._child = child_process.Child(
            __name__, "_serve", dict(out_path=str(out_path), height=height, width=width, canvas=str(canvas),
                                     options=options),
        )
        # Replies are collected as they come, so that rows_ready can tell a failure without waiting for one.
        self._listener = threading.Thread(target=self._listen, name=f"PyramidTiffProcess({self.out_path.name})",
                                          daemon=True)
        self._listener.start()
        reply = self._next_reply()
        if reply.get("reply") != "ready":
            self._end("failed")
            if reply == child_process.GONE:  # died before a word: not this file's fault, a thread will do
                raise child_process.StartError(f"the {_WHO} process exited as it started")
            raise child_process.exception(reply, _WHO)

    def rows_ready(self, y: int) -> None:
        """Rows [0, y) of the canvas are final; returns at once (the child encodes behind)."""
        self._require_open()
        self._raise_if_failed()
        try:
            y = None if isinstance(y, bool) else operator.index(y)
        except TypeError:
            y = None
        if y is None or not self._rows_ready <= y <= self.height:
            # Checked here as well as in the child, so that a wrong call fails at the call, not at the next one.
            raise ValueError(
                f"{self.out_path}: rows_ready({y!r}) must lie between the rows already ready ({self._rows_ready}) "
                f"and the image height ({self.height})"
            )
        self._rows_ready = y
        self._child.send({"rows_ready": y})

    def close(self) -> None:
        """Wait for the child to finish the file and move it onto out_path."""
        if self._state == "closed":
            return
        self._require_open()
        self._raise_if_failed()
        self._child.send({"close": True})
        reply = self._next_reply()
        if reply.get("reply") != "closed":
            self._end("failed")
            raise child_process.exception(reply, _WHO)
        self._busy_seconds = float(reply["busy_seconds"])
        self._end("closed")

    def abort(self) -> None:
        """Stop encoding and remove every temporary file; out_path and the canvas are left as they were."""
        if self._state == "open":
            self._child.send({"abort": True})
            self._end("aborted")

    @property
    def busy_seconds(self) -> float:
        """The child's `PyramidTiffWriter.busy_seconds`, known once closed."""
        return self._busy_seconds

    def _require_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"{self.out_path}: the writer is {self._state}")

    def _raise_if_failed(self) -> None:
        with self._replied:
            failure = self._replies[0] if self._replies else None
        if failure is not None:  # the child replies before "closed" only when something went wrong
            self._end("failed")
            raise child_process.exception(failure, _WHO)

    def _listen(self) -> None:
        while True:
            reply = self._child.receive()
            with self._replied:
                self._replies.append(reply)
                self._replied.notify_all()
            if reply == child_process.GONE:
                return

    def _next_reply(self) -> dict:
        with self._replied:
            self._replied.wait_for(lambda: self._replies)
            return self._replies.pop(0)

    def _end(self, state: str) -> None:
        """Reap the child; unless the file was finished, remove what a child that died uncleanly left."""
        self._state = state
        self._child.finish(_EXIT_TIMEOUT_S)
        self._listener.join()
        self._child.close_channel()
        if state != "closed":
            for path in temporary_paths(self.out_path, self.height, self.width, self._tile, with_canvas=True):
                path.unlink(missing_ok=True)


def _serve() -> None:
    """The child: one PyramidTiffWriter, driven by the messages on stdin."""
    arguments, messages, reply = child_process.serve()
    try:
        writer = PyramidTiffWriter(arguments["out_path"], arguments["height"], arguments["width"],
                                   canvas=arguments["canvas"], **arguments["options"])
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        reply(child_process.failure(exc))
        return
    reply({"reply": "ready"})
    try:
        for line in messages:
            message = json.loads(line)
            if "rows_ready" in message:
                writer.rows_ready(message["rows_ready"])
            elif "close" in message:
                writer.close()
                reply({"reply": "closed", "busy_seconds": writer.busy_seconds})
                return
            else:
                break
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        writer.abort()
        reply(child_process.failure(exc))
        return
    # "abort", or the render is gone (stdin closed): nothing of this file is wanted any more.
    writer.abort()
