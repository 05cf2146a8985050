"""Error types. A `SafronInputError` is the user's mistake (bad file, bad option): the CLI prints its
message as one line and exits 2. Anything else is our bug and exits 1."""


class SafronInputError(ValueError):
    """Bad input or usage: the message is one line that names the offending file, value or option."""


class MaskError(SafronInputError):
    """A mask that cannot be read or does not follow the colour/label conventions."""


class ModelError(SafronInputError):
    """A model file that is missing, unreadable, or does not meet the model contract."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler or `kill` stopping us), raised in the main thread by the CLI's handler. A
    KeyboardInterrupt, so that every clean-up that Ctrl-C runs runs for it too; the CLI exits 143 rather than 130."""

def first_line(exc: BaseException) -> str:
    """A library exception reduced to what fits in a one-line message: its first line, else its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
