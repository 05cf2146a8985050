"""Error types. A `SafronInputError` is the user's mistake (bad file, bad option): the CLI prints its
message as one line and exits 2. Anything else is our bug and exits 1."""

from __future__ import annotations

import errno


class SafronInputError(ValueError):
    """Bad input or usage: the message is one line that names the offending file, value or option."""


class MaskError(SafronInputError):
    """A mask that cannot be read or does not follow the colour/label conventions."""


class ModelError(SafronInputError):
    """A model file that is missing, unreadable, or does not meet the model contract."""


class OutputWriteError(SafronInputError):
    """The disk refused to store the output or its scratch files: full, over quota, over a file size limit, read-only
    or failing. Nothing the user passed is wrong, but it is theirs to fix (free space, another disk), so it is one line
    and exit 2 like an input error, not a traceback to report. Unlike other input errors it does not recur by itself,
    so a render keeps its canvas and journal and `--resume` continues once the disk is fixed. `errno` is the system's
    reason where known."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class WorkerLostError(RuntimeError):
    """A Dask worker died every time it ran one task (more often than the scheduler's allowed-failures): killed for
    memory, say, or its machine lost. Neither the user's input nor our bug, and the message says all there is (the
    rest is in the worker's own log), so the CLI prints one line and exits 1; what was finished is kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler or `kill` stopping us), raised in the main thread by the CLI's handler. A
    KeyboardInterrupt, so that every clean-up that Ctrl-C runs runs for it too; the CLI exits 143 rather than 130."""


# What the disk or the filesystem says when it cannot take a write; any other OSError is not the disk's fault.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS})


def is_storage_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS


def first_line(exc: BaseException) -> str:
    """A library exception reduced to what fits in a one-line message: its first line, else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
