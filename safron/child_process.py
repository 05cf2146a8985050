"""What safron's helper processes share (`encoder_process`, `reader_process`): starting one, its message channel,
and exceptions carried back across it.

Why processes: every Python thread of a render shares one interpreter lock, and the TIFF encoder and the mask
reader take it many times per tile or batch; a stage in a process of its own runs on its own interpreter.

A child is a plain `python -c` of this interpreter with the parent's `sys.path`, not a `multiprocessing` spawn,
which would re-import the caller's main module (a user script without a ``__main__`` guard would run again).
Messages are JSON lines: the parent writes to the child's stdin, the child replies on a copy of its stdout while its
fd 1 goes to stderr, so that nothing else (a print, a C library's message) can write into the reply channel. The
child ignores SIGINT, which Ctrl-C sends to the whole process group: the render decides whether to stop, and tells
it. A child ends when its stdin closes, so it never outlives the render, however the render ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import IO

from . import errors

# A reply the parent makes up when the child's stdout closes: it has exited (or closed it, which it never does).
GONE = {"reply": "gone"}

# The child's first line of input is the parent's sys.path, read from sys.stdin.buffer, the object `serve` reads the
# rest from: the text layer (sys.stdin) would buffer the lines after it where `serve` cannot see them.
_BOOTSTRAP = ("import json, sys; sys.path[:] = json.loads(sys.stdin.buffer.readline()); "
              "from {module} import {function}; {function}()")


class StartError(OSError):
    """No child could be started here (no interpreter to run, or it died before it was ready): the stage that wanted
    one runs in a thread instead."""


class Child:
    """A child process running `module.function()`, which serves the messages sent here (see `serve`). Raises
    OSError (StartError among them) when no process can be started."""

    def __init__(self, module: str, function: str, arguments: dict, pass_fds: tuple[int, ...] = ()):
        if not sys.executable:  # an embedded interpreter: nothing to start
            raise StartError("this Python has no interpreter executable to start a child with")
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP.format(module=module, function=function)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=pass_fds,
        )
        self.send(sys.path)
        self.send(arguments)

    def send(self, message) -> bool:
        """Write one message; False if the child no longer reads (it has exited: `receive` says how)."""
        try:
            self.process.stdin.write(json.dumps(message).encode() + b"\n")
            self.process.stdin.flush()
            return True
        except (BrokenPipeError, ValueError):  # ValueError: stdin already closed here
            return False

    def receive(self) -> dict:
        """The child's next reply; GONE once it has exited."""
        line = self.process.stdout.readline()
        return json.loads(line) if line else dict(GONE)

    def finish(self, timeout: float) -> None:
        """Close the child's stdin (it stops if still serving) and reap it, killing it after `timeout` seconds. A
        thread blocked in `receive` then gets GONE; `close_channel` once none will call it again."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def close_channel(self) -> None:
        self.process.stdout.close()


def serve() -> tuple[dict, IO[bytes], callable]:
    """In the child: set up the channel and return (arguments, the stdin to read messages from, reply(message))."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    replies = os.fdopen(os.dup(1), "wb", buffering=0)  # unbuffered: nothing left to flush (and fail) at exit
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict) -> None:
        try:
            replies.write(json.dumps(message).encode() + b"\n")
        except BrokenPipeError:
            # The render is gone (killed): nobody to tell, nothing to report. SystemExit passes the children's
            # `except Exception` handlers and ends the process without a traceback.
            raise SystemExit(0) from None

    messages = sys.stdin.buffer
    return json.loads(messages.readline()), messages, reply


def failure(exc: BaseException) -> dict:
    """An exception as a reply that `exception` turns back into one of the same kind."""
    return {"reply": "error", "type": type(exc).__name__, "message": str(exc), "errno": getattr(exc, "errno", None)}


def exception(reply: dict, who: str) -> BaseException:
    """The exception a child reported (or the one its unexpected exit amounts to), as the in-process stage would have
    raised it: safron's input errors and ValueError by type and message, anything else as a RuntimeError naming it."""
    if reply.get("reply") == "gone":
        return RuntimeError(f"the {who} process exited unexpectedly (killed, or out of memory?)")
    kind, message = reply.get("type"), reply.get("message", "")
    if kind == "OutputWriteError":
        return errors.OutputWriteError(message, errno=reply.get("errno"))
    known = {name: getattr(errors, name) for name in ("SafronInputError", "MaskError", "ModelError")}
    known["ValueError"] = ValueError
    if kind in known:
        return known[kind](message)
    return RuntimeError(f"the {who} process failed: {kind}: {message}")
