"""What every command-line tool shares: run_main, the parser, argument types and the exit codes.
Exit codes: 0 success, 1 internal error, 2 bad input or usage, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM,
where a tool handles it)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import traceback
from collections.abc import Callable

from ..errors import SafronInputError, Terminated

# 130 and 143 are what a shell reports for a process killed by SIGINT and SIGTERM (128 + the signal number), so
# scripts that test for them see the same whether we handled the signal or not.
EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM
EXIT_MEANINGS = {
    EXIT_OK: "done",
    EXIT_USAGE: "bad input or usage",
    EXIT_INTERNAL: "internal error",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_TERMINATED: "terminated (SIGTERM)",
}


def exit_status_help(*, sigterm: bool, done: str = EXIT_MEANINGS[EXIT_OK], usage: str = EXIT_MEANINGS[EXIT_USAGE],
                     internal: str = EXIT_MEANINGS[EXIT_INTERNAL]) -> str:
    """The "Exit status: ..." sentence of a tool's --help, made from the codes run_main returns so that the two cannot
    drift; `sigterm` as given to run_main, `done`, `usage` and `internal` the tool's own wording for exits 0, 2, 1."""
    meanings = {**EXIT_MEANINGS, EXIT_OK: done, EXIT_USAGE: usage, EXIT_INTERNAL: internal}
    if not sigterm:
        del meanings[EXIT_TERMINATED]
    return "Exit status: " + "; ".join(f"{code} {meaning}" for code, meaning in meanings.items()) + "."


@contextlib.contextmanager
def _sigterm_raises_terminated():
    """While the block runs, SIGTERM raises `Terminated` in the main thread, as Ctrl-C raises KeyboardInterrupt, so
    that a job scheduler's stop runs the same clean-up. Only the main thread may set handlers; elsewhere (a tool
    called from a thread) SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        # Once only: a scheduler that repeats SIGTERM must not break off the clean-up the first one started (the
        # journal's last record, removing the partial TIFF). SIGKILL still stops a process that hangs in it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run_main(
    prog: str,
    command: Callable[[], None],
    *,
    interrupted: str = "interrupted",
    failures: tuple[type[Exception], ...] = (),
    sigterm: bool = False,
) -> int:
    """Run a command-line tool's work and turn how it ended into the exit status, the same for every tool.

    A `SafronInputError` is the user's mistake: "PROG: error: MESSAGE" as one line, exit 2. Ctrl-C prints
    "PROG: `interrupted`", where each tool says what it left behind and how to go on, exit 130; with `sigterm`,
    SIGTERM does the same and exits 143 (tools that do not ask keep SIGTERM's default: killed at once). `failures`
    are not the user's mistake but their message says all there is (export's parity check): one line too, exit 1.
    Anything else is our bug: the traceback, which a report needs, and exit 1.
    """
    try:
        with _sigterm_raises_terminated() if sigterm else contextlib.nullcontext():
            command()
    except SafronInputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except failures as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except KeyboardInterrupt as exc:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    except Exception:  # our bug, not the user's: show everything needed to report it
        traceback.print_exc()
        print(f"{prog}: internal error (please report it with the traceback above)", file=sys.stderr)
        return EXIT_INTERNAL
    return EXIT_OK


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (plus a pointer to --help), exit 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def argument_type(convert, expected: str, accept):
    """An argparse `type=` that converts the text and checks the value, with one message for both failures."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = argument_type(int, "a positive integer", lambda v: v >= 1)


def threads(text):
    from ..engine import MAX_THREADS_PER_CORE, max_threads

    return argument_type(int, f"1..{max_threads()} (at most {MAX_THREADS_PER_CORE} per CPU core)",
                         lambda v: 1 <= v <= max_threads())(text)


non_negative_int = argument_type(int, "a non-negative integer", lambda v: v >= 0)
positive_float = argument_type(float, "a positive number", lambda v: 0 < v < float("inf"))
colour_tolerance = argument_type(float, "a number >= 0 or inf", lambda v: v >= 0)  # NaN fails v >= 0
quality = argument_type(int, "1..100", lambda v: 1 <= v <= 100)
probability = argument_type(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
tile_side = argument_type(int, "a positive multiple of 16", lambda v: v >= 16 and v % 16 == 0)
non_negative_float = argument_type(float, "a number >= 0", lambda v: 0 <= v < float("inf"))
