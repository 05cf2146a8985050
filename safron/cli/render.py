"""safron-render: a tissue mask in, a pyramidal BigTIFF of synthetic H&E out."""

from __future__ import annotations

import argparse
import sys

from ..errors import SafronInputError, first_line
from .common import (
    EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, Parser, colour_tolerance, exit_status_help, positive_float, positive_int,
    quality, run_main, threads,
)


def render_parser() -> argparse.ArgumentParser:
    from ..backends import BACKEND_NAMES
    from ..engine import BLENDS, DEFAULT_BLEND
    from ..masks import COLOUR_TOLERANCE, SMEAR_RADIUS
    from ..pyramid_tiff import COMPRESSIONS

    p = Parser(
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
    p.usage = "%(prog)s MASK OUT [options]\n       %(prog)s MASK [MASK ...] --out-dir DIR [--scheduler ADDRESS] [options]"
    p.add_argument("paths", metavar="MASK OUT | MASK...", nargs="+",
                   help="a tissue component mask and its output pyramidal BigTIFF, named .tif, .tiff, .btf or .tf8 "
                        "(written under a temporary name, renamed when complete); or, with --out-dir, many masks")
    p.add_argument("--out-dir", metavar="DIR",
                   help="render every MASK given to DIR/<mask name>.tif as jobs on Dask workers: a local cluster "
                        "(one worker process per core) unless --scheduler is given. Complete outputs are skipped and "
                        "interrupted ones resumed, so rerunning the command finishes the set; a mask that fails is "
                        "reported and the others go on")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="with --out-dir: a Dask scheduler (e.g. tcp://host:8786) whose workers render; they need "
                        "safron and the same paths to masks and DIR")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="with --out-dir and no --scheduler: local worker processes (default: one per core)")
    p.add_argument("--model", metavar="ONNX", help="generator: an ONNX file meeting the model contract, or a training run directory or checkpoint (RUN_DIR/checkpoints/step-N.json or .safetensors) for --backend torch (default: the embedded model)")
    p.add_argument(
        "--backend", choices=BACKEND_NAMES, default="auto",
        help="inference backend (default: %(default)s = tensorrt if installed and a GPU is present; else torch on a "
             "GPU for checkpoints and safron-exported ONNX, rendering on the device; else onnxruntime on the CPU; "
             "torch also runs checkpoints on the CPU)",
    )
    p.add_argument("--batch-size", type=positive_int, metavar="N", help="patches per inference call (default: backend's choice)")
    p.add_argument("--blend", choices=BLENDS, default=DEFAULT_BLEND,
                   help="weights for overlapping patches: uniform = the paper's average; linear/cosine ramp across the overlap, which hides patch seams (default: %(default)s)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="jpeg", help="tile compression (default: %(default)s)")
    p.add_argument("--quality", type=quality, default=90, metavar="Q", help="JPEG quality 1..100 (default: %(default)s)")
    p.add_argument("--mpp", type=positive_float, metavar="UM", help="microns per pixel to record (default: taken from the mask)")
    p.add_argument("--colour-tolerance", "--color-tolerance", dest="colour_tolerance", type=colour_tolerance,
                   default=COLOUR_TOLERANCE, metavar="T",
                   help="RGB distance within which a mask colour snaps to the nearest class colour; other colours "
                        f"are errors, except in lossy (JPEG) masks within {SMEAR_RADIUS} px of a class colour, taken "
                        "for the codec's smear along class edges; inf snaps every colour (default: %(default)g)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted render of OUT")
    p.add_argument("--threads", type=threads, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--profile", action="store_true",
                   help="print where the time went (read, infer, accumulate, finalise, journal, encode) and MP/s")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _render_options(args) -> dict:
    """The `engine.render` options both forms of the command pass on, for one mask or for each of many."""
    return dict(model=args.model, backend=args.backend, batch_size=args.batch_size, blend=args.blend,
                compression=args.compression, quality=args.quality, mpp=args.mpp, threads=args.threads,
                colour_tolerance=args.colour_tolerance)


def _render_many(args) -> int:
    """The --out-dir form: exit 0 when every mask is done, 2 when one failed on its input, 1 on an internal error."""
    from ..distributed import STATUSES, render_many

    worst = EXIT_OK

    def command() -> None:
        nonlocal worst
        client = None
        if args.scheduler is not None:
            try:
                from distributed import Client
            except ImportError:
                raise SafronInputError("--scheduler needs Dask distributed: pip install 'dask[distributed]'") from None
            try:
                client = Client(args.scheduler, timeout="10s")
            except OSError as exc:
                raise SafronInputError(f"--scheduler {args.scheduler}: cannot connect ({first_line(exc)})") from None
        try:
            outcomes = render_many(args.paths, args.out_dir, client=client, workers=args.workers,
                                   progress=not args.quiet, **_render_options(args))
        finally:
            if client is not None:
                client.close()
        counts = {status: sum(o.status == status for o in outcomes) for status in STATUSES}
        if not args.quiet:
            print(f"{len(outcomes)} masks: " + ", ".join(f"{n} {status}" for status, n in counts.items() if n),
                  file=sys.stderr)
        failed = [o for o in outcomes if o.status == "failed"]
        for outcome in failed:
            print(f"safron-render: error: {outcome.mask}: {outcome.message}", file=sys.stderr)
        if failed:
            worst = EXIT_INTERNAL if any(o.internal for o in failed) else EXIT_USAGE

    code = run_main("safron-render", command, sigterm=True,
                    interrupted="interrupted; run the same command again to finish the set")
    return code if code != EXIT_OK else worst


def main(argv=None) -> int:
    parser = render_parser()
    args = parser.parse_args(argv)
    if args.out_dir is not None:
        if args.resume:
            parser.error("--resume is automatic with --out-dir: interrupted outputs are resumed, complete ones skipped")
        return _render_many(args)
    if args.scheduler is not None or args.workers is not None:
        parser.error("--scheduler and --workers go with --out-dir (many masks)")
    if len(args.paths) != 2:
        parser.error(f"give MASK OUT, or masks with --out-dir DIR (got {len(args.paths)} path(s) and no --out-dir)")
    args.mask, args.out = args.paths

    def command() -> None:
        from ..engine import render

        result = render(args.mask, args.out, resume=args.resume, progress=not args.quiet, **_render_options(args))
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


if __name__ == "__main__":
    sys.exit(main())
