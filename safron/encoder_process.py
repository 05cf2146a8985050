"""The pyramidal TIFF encoder in a process of its own, fed through the canvas file.

Why a process: every Python thread of a render shares one interpreter lock. tifffile hands each tile to its
compression threads from Python, so the encoder takes and releases the lock several times per tile, and so do the
mask reader, the inference thread and the main loop; each handover can wait up to the interpreter's switch
interval (5 ms) while another thread runs Python. On a lent H200 this contention kept a 32k render at half the
bare generator's speed (bench/RESULTS.md, issue 15), and on a 2-core VM a render slows 3-4x beside one busy Python
thread, most of it in the encoder (`bench/gil_share.py`). The encoder needs nothing from the render but the canvas
file, which the render writes anyway, and the number of rows final in it, so it moves out of the render's
interpreter at the cost of starting one (about 0.2 s; the engine uses it for large images only,
`engine.ENCODER_PROCESS_MIN_PIXELS`).

`PyramidTiffProcess` has the canvas-mode interface of `PyramidTiffWriter` (`rows_ready`, `close`, `abort`,
`busy_seconds`, use as a context manager) and writes the same bytes: the child runs a `PyramidTiffWriter` on the
same canvas. Messages are JSON lines on the child's stdin (rows ready, close, abort) and stdout (ready, closed,
error). The child is a plain `python -c` with the parent's `sys.path`, not a `multiprocessing` spawn, which
would re-import the caller's main module (a user script without a ``__main__`` guard would run again).

Failures: the child's constructor errors are raised by the constructor here, its writer's errors by the next
`rows_ready` or `close`, with the same types (`SafronInputError`, `OutputWriteError` with its errno, `ValueError`)
and messages. A child that dies without a word (killed for memory) is a `RuntimeError`, and its temporary files
are removed from here. The child ignores SIGINT: Ctrl-C reaches the whole process group, and the render decides
whether to finish or abort. It also aborts by itself if the render's process goes away (its stdin closes).
"""

from __future__ import annotations

import json
import operator
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from . import errors
from .pyramid_tiff import PyramidTiffWriter, temporary_paths

__all__ = ["PyramidTiffProcess"]

# How long `abort` waits for the child to clean up before killing it (and cleaning up here).
_ABORT_TIMEOUT_S = 30.0

_CHILD = (
    "import json, sys; sys.path[:] = json.loads(sys.stdin.readline()); "
    "from safron.encoder_process import _serve; _serve()"
)


class PyramidTiffProcess:
    """`PyramidTiffWriter(out_path, height, width, canvas=canvas, **options)`, run in a child process."""

    def __init__(self, out_path, height: int, width: int, *, canvas, **options) -> None:
        self.out_path, self.height, self.width = Path(out_path), height, width
        self._options = dict(options)
        self._rows_ready = 0
        self._state = "open"
        self._busy_seconds = 0.0
        self._replies: list[dict] = []
        self._replied = threading.Condition()
        self._process = subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
        )
        self._listener = threading.Thread(target=self._listen, name=f"PyramidTiffProcess({self.out_path.name})",
                                          daemon=True)
        self._listener.start()
        arguments = dict(out_path=str(out_path), height=height, width=width, canvas=str(canvas), options=options)
        self._send(sys.path)
        self._send(arguments)
        reply = self._reply()
        if reply.get("reply") != "ready":
            self._state = "failed"
            self._wait_for_exit()
            raise _exception(reply)

    # ------------------------------------------------------------------------------------------------ public API

    def rows_ready(self, y: int) -> None:
        """Rows [0, y) of the canvas are final; returns at once (the child encodes behind)."""
        self._require_open()
        self._raise_if_failed()
        try:
            y = operator.index(y) if not isinstance(y, bool) else None
        except TypeError:
            y = None
        if y is None:
            raise ValueError(f"{self.out_path}: rows_ready takes a row index (an integer)")
        if not self._rows_ready <= y <= self.height:
            # Checked here as well, so that a wrong call fails at the call, not at the next one.
            raise ValueError(
                f"{self.out_path}: rows_ready({y!r}) must lie between the rows already ready ({self._rows_ready}) "
                f"and the image height ({self.height})"
            )
        self._rows_ready = y
        self._send({"rows_ready": y})

    def close(self) -> None:
        """Wait for the child to finish the file and move it onto out_path."""
        if self._state == "closed":
            return
        self._require_open()
        self._raise_if_failed()
        self._send({"close": True})
        reply = self._reply()
        self._wait_for_exit()
        if reply.get("reply") != "closed":
            self._state = "failed"
            raise _exception(reply)
        self._busy_seconds = float(reply["busy_seconds"])
        self._state = "closed"

    def abort(self) -> None:
        """Stop encoding and remove every temporary file; out_path and the canvas are left as they were."""
        if self._state != "open":
            return
        self._state = "aborted"
        try:
            self._send({"abort": True})
            self._process.wait(timeout=_ABORT_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._wait_for_exit()

    @property
    def busy_seconds(self) -> float:
        """The child's `PyramidTiffWriter.busy_seconds`, known once closed."""
        return self._busy_seconds

    def __enter__(self) -> PyramidTiffProcess:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    # ------------------------------------------------------------------------------------------------- internals

    def _require_open(self) -> None:
        if self._state != "open":
            raise ValueError(f"{self.out_path}: the writer is {self._state}")

    def _raise_if_failed(self) -> None:
        with self._replied:
            failure = next((reply for reply in self._replies if reply.get("reply") != "ready"), None)
        if failure is not None:
            self._state = "failed"
            self._wait_for_exit()
            raise _exception(failure)

    def _send(self, message) -> None:
        try:
            self._process.stdin.write(json.dumps(message).encode() + b"\n")
            self._process.stdin.flush()
        except (BrokenPipeError, ValueError):
            # The child is gone; what it said last (or that it said nothing) is raised by the caller's next check.
            pass

    def _listen(self) -> None:
        for line in self._process.stdout:
            with self._replied:
                self._replies.append(json.loads(line))
                self._replied.notify_all()
        with self._replied:
            self._replies.append({"reply": "gone"})
            self._replied.notify_all()

    def _reply(self) -> dict:
        """The child's next reply (\"gone\" once it has exited)."""
        with self._replied:
            self._replied.wait_for(lambda: self._replies)
            return self._replies.pop(0)

    def _wait_for_exit(self) -> None:
        """Reap the child; if it died without cleaning up, remove its temporary files here."""
        try:
            self._process.stdin.close()
        except OSError:
            pass
        if self._process.poll() is None:
            try:
                self._process.wait(timeout=_ABORT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._listener.join()
        if self._state != "closed":
            for path in temporary_paths(self.out_path, self.height, self.width, self._options.get("tile", 256),
                                        with_canvas=True):
                path.unlink(missing_ok=True)


def _exception(reply: dict) -> BaseException:
    """The child's failure as the exception the in-process writer would have raised."""
    if reply.get("reply") == "gone":
        return RuntimeError("the TIFF encoder process exited unexpectedly (killed, or out of memory?)")
    kind, message = reply.get("type"), reply.get("message", "")
    if kind == "OutputWriteError":
        return errors.OutputWriteError(message, errno=reply.get("errno"))
    known = {name: getattr(errors, name) for name in ("SafronInputError", "MaskError", "ModelError")}
    known["ValueError"] = ValueError
    if kind in known:
        return known[kind](message)
    return RuntimeError(f"the TIFF encoder process failed: {kind}: {message}")


def _serve() -> None:
    """The child: one PyramidTiffWriter, driven by the messages on stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Replies go out on a copy of fd 1, and fd 1 itself now goes to stderr, so that nothing else (a print, a C
    # library's message) can write into the reply channel.
    reply_to = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        reply_to.write(json.dumps(message).encode() + b"\n")
        reply_to.flush()

    def failed(exc: BaseException) -> None:
        reply({"reply": "error", "type": type(exc).__name__, "message": str(exc),
               "errno": getattr(exc, "errno", None)})

    arguments = json.loads(sys.stdin.readline())
    try:
        writer = PyramidTiffWriter(arguments["out_path"], arguments["height"], arguments["width"],
                                   canvas=arguments["canvas"], **arguments["options"])
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
        failed(exc)
        return
    reply({"reply": "ready"})
    try:
        for line in sys.stdin:
            message = json.loads(line)
            if "rows_ready" in message:
                writer.rows_ready(message["rows_ready"])
            elif "close" in message:
                writer.close()
                reply({"reply": "closed", "busy_seconds": writer.busy_seconds})
                return
            else:
                break
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
        writer.abort()
        failed(exc)
        return
    # "abort", or the parent is gone (stdin closed): nothing of this file is wanted any more.
    writer.abort()
