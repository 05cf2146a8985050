"""Command-line entry points. Exit codes: 0 success, 1 internal error, 2 bad input or usage, 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM, where a tool handles it)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

from .errors import SafronInputError, Terminated

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


def exit_status_help(*, sigterm: bool, usage: str = EXIT_MEANINGS[EXIT_USAGE]) -> str:
    """The "Exit status: ..." sentence of a tool's --help, made from the codes run_main returns so that the two cannot
    drift; `sigterm` as given to run_main, `usage` the tool's own wording for exit 2."""
    meanings = {**EXIT_MEANINGS, EXIT_USAGE: usage}
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


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one line (plus a pointer to --help), exit 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _argument_type(convert, expected: str, accept):
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


_positive_int = _argument_type(int, "a positive integer", lambda v: v >= 1)


def _threads(text):
    from .engine import MAX_THREADS_PER_CORE, max_threads

    return _argument_type(int, f"1..{max_threads()} (at most {MAX_THREADS_PER_CORE} per CPU core)",
                          lambda v: 1 <= v <= max_threads())(text)


_non_negative_int = _argument_type(int, "a non-negative integer", lambda v: v >= 0)
_positive_float = _argument_type(float, "a positive number", lambda v: 0 < v < float("inf"))
_colour_tolerance = _argument_type(float, "a number >= 0 or inf", lambda v: v >= 0)  # NaN fails v >= 0
_quality = _argument_type(int, "1..100", lambda v: 1 <= v <= 100)
_probability = _argument_type(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
_tile_side = _argument_type(int, "a positive multiple of 16", lambda v: v >= 16 and v % 16 == 0)


def render_parser() -> argparse.ArgumentParser:
    from .backends import BACKEND_NAMES
    from .engine import BLENDS, DEFAULT_BLEND
    from .masks import COLOUR_TOLERANCE, SMEAR_RADIUS
    from .pyramid_tiff import COMPRESSIONS

    p = _Parser(
        prog="safron-render",
        description=(
            "Render a tissue component mask (gland green, stroma red, background blue; or labels 0 background, "
            "1 stroma, 2 gland) into a synthetic H&E image, written as a pyramidal tiled BigTIFF that OpenSlide, "
            "QuPath and ASAP open. Masks may be PNG, JPEG, TIFF (tiled or stripped, pyramidal) or any format "
            "OpenSlide reads, of any size."
        ),
        epilog=(
            "An interrupted render (Ctrl-C, SIGTERM, a killed job, a full disk) keeps OUT.safron-canvas and "
            "OUT.safron-journal next to OUT; run the same command with --resume to continue it. One render at a "
            "time may write to OUT (it holds OUT.safron-lock). "
            + exit_status_help(sigterm=True, usage="bad input or usage, or the disk refused the output (full, failing)")
        ),
    )
    p.add_argument("mask", metavar="MASK", help="tissue component mask to render")
    p.add_argument("out", metavar="OUT", help="output pyramidal BigTIFF, named .tif, .tiff, .btf or .tf8 (written under a temporary name, renamed when complete)")
    p.add_argument("--model", metavar="ONNX", help="generator: an ONNX file meeting the model contract, or a training run directory or checkpoint (RUN_DIR/checkpoints/step-N.json or .safetensors) for --backend torch (default: the embedded model)")
    p.add_argument(
        "--backend", choices=BACKEND_NAMES, default="auto",
        help="inference backend (default: %(default)s = tensorrt if installed and a GPU is present; else torch on a "
             "GPU for checkpoints and safron-exported ONNX, rendering on the device; else onnxruntime on the CPU; "
             "torch also runs checkpoints on the CPU)",
    )
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="patches per inference call (default: backend's choice)")
    p.add_argument("--blend", choices=BLENDS, default=DEFAULT_BLEND,
                   help="weights for overlapping patches: uniform = the paper's average; linear/cosine ramp across the overlap, which hides patch seams (default: %(default)s)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="jpeg", help="tile compression (default: %(default)s)")
    p.add_argument("--quality", type=_quality, default=90, metavar="Q", help="JPEG quality 1..100 (default: %(default)s)")
    p.add_argument("--mpp", type=_positive_float, metavar="UM", help="microns per pixel to record (default: taken from the mask)")
    p.add_argument("--colour-tolerance", "--color-tolerance", dest="colour_tolerance", type=_colour_tolerance,
                   default=COLOUR_TOLERANCE, metavar="T",
                   help="RGB distance within which a mask colour snaps to the nearest class colour; other colours "
                        f"are errors, except in lossy (JPEG) masks within {SMEAR_RADIUS} px of a class colour, taken "
                        "for the codec's smear along class edges; inf snaps every colour (default: %(default)g)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted render of OUT")
    p.add_argument("--threads", type=_threads, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--profile", action="store_true",
                   help="print where the time went (read, infer, accumulate, finalise, journal, encode) and MP/s")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def render_main(argv=None) -> int:
    args = render_parser().parse_args(argv)

    def command() -> None:
        from .engine import render

        result = render(
            args.mask, args.out, model=args.model, backend=args.backend, batch_size=args.batch_size,
            blend=args.blend, compression=args.compression, quality=args.quality, mpp=args.mpp,
            resume=args.resume, progress=not args.quiet, threads=args.threads, colour_tolerance=args.colour_tolerance,
        )
        if result.already_complete:
            if not args.quiet:
                print(f"{result.out_path} is already complete (its render was stopped after finishing it); "
                      "nothing to resume", file=sys.stderr)
        elif args.profile:
            print(result.profile(), file=sys.stderr)
        elif not args.quiet:
            print(
                f"wrote {result.out_path} ({result.width} x {result.height} px, {result.patches} patches, "
                f"{result.seconds:.1f} s, {result.megapixels_per_second:.2f} MP/s, backend {result.backend})",
                file=sys.stderr,
            )

    return run_main("safron-render", command, interrupted="interrupted; run the same command with --resume to continue",
                    sigterm=True)


def masks_parser() -> argparse.ArgumentParser:
    from .synthesis import GLAS_RECIPE, PARALLEL_MIN_PIXELS, PNG_MAX_PIXELS

    p = _Parser(
        prog="safron-masks",
        description=(
            "Write a synthetic tissue component mask: elliptical glands in stroma with background spots (the SAFRON "
            "paper's recipe), calibrated so that gland area fraction and gland sizes match the GlaS training masks "
            "(20x, about 0.62 um/px). The same seed always gives the same mask, and a mask is the top-left corner of "
            "any larger one with that seed. Any size: TIFF masks are generated tile row by tile row."
        ),
        epilog=(
            f"OUT's suffix picks the format: .png (at most {PNG_MAX_PIXELS} px, colour unless --labels) or .tif/.tiff "
            "(tiled, deflate; labels unless --colour; colour TIFFs are pyramidal BigTIFFs for viewers). Labels: "
            "0 background, 1 stroma, 2 gland; colours: background blue, stroma red, gland green. "
            + exit_status_help(sigterm=False)
        ),
    )
    p.add_argument("out", metavar="OUT", help="output mask (.png, .tif or .tiff), written under a temporary name and renamed when complete")
    p.add_argument("--size", nargs=2, type=_positive_int, metavar=("W", "H"), required=True, help="width and height in pixels")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: %(default)s)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--colour", "--color", dest="colour", action="store_const", const=True,
                      help="class colours, RGB (default for PNG)")
    kind.add_argument("--labels", dest="colour", action="store_const", const=False,
                      help="class labels, one byte per pixel: a third of the size, what safron-render reads fastest (default for TIFF)")
    p.add_argument("--scale", type=_positive_float, default=1.0, metavar="F",
                   help="gland and spot sizes times F, e.g. 2 for 40x masks (default: %(default)s, GlaS's 20x)")
    p.add_argument("--background", type=_probability, default=GLAS_RECIPE.background_fraction, metavar="P",
                   help="probability that a stroma pixel is background, drawn as spots (default: %(default)s, the paper's)")
    p.add_argument("--tile", type=_tile_side, default=256, metavar="N", help="TIFF tile side, a multiple of 16 (default: %(default)s)")
    p.add_argument("--mpp", type=_positive_float, metavar="UM", help="microns per pixel to record in the file (default: none)")
    p.add_argument("--workers", type=_positive_int, metavar="N",
                   help=f"processes drawing a TIFF mask (default: one per core; masks under {PARALLEL_MIN_PIXELS / 1e6:.0f} "
                        "MP are drawn in this one); the file is the same whatever N")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def masks_main(argv=None) -> int:
    args = masks_parser().parse_args(argv)

    def command() -> None:
        import dataclasses

        from .synthesis import GLAS_RECIPE, write_mask

        recipe = dataclasses.replace(GLAS_RECIPE, background_fraction=args.background).scaled(args.scale)
        width, height = args.size
        start = time.perf_counter()
        path = write_mask(args.out, height, width, args.seed, recipe=recipe, colour=args.colour, tile=args.tile,
                          mpp=args.mpp, progress=not args.quiet, workers=args.workers)
        if not args.quiet:
            kind = "colour" if args.colour or (args.colour is None and path.suffix.lower() == ".png") else "labels"
            print(f"wrote {path} ({width} x {height} px, {kind}, seed {args.seed}, "
                  f"{time.perf_counter() - start:.1f} s)", file=sys.stderr)

    return run_main("safron-masks", command, interrupted="interrupted; no mask was written")


def train_main(argv=None) -> int:
    """safron-train: PyTorch is an optional dependency, so its absence is a one-line usage error."""
    try:
        from .train import main
    except ImportError as exc:
        print(
            f"safron-train: error: training needs PyTorch and safetensors ({exc.name} is not installed): "
            "pip install torch==2.13.0 'safron[train]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return main(argv)


if __name__ == "__main__":
    sys.exit(render_main())
