"""safron-render: a tissue mask in, a pyramidal BigTIFF of synthetic H&E out."""

from __future__ import annotations

import argparse
import contextlib
import sys

from ..errors import WorkerLostError
from .common import (
    EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, Parser, colour_tolerance, exit_status_help, non_negative_int, positive_float,
    positive_int, quality, run_main, threads, tile_side,
)


def render_parser() -> argparse.ArgumentParser:
    from ..backends import BACKEND_NAMES
    from ..engine import BLENDS, DEFAULT_BLEND, DEFAULT_OUTSET
    from ..masks import COLOUR_TOLERANCE, SMEAR_RADIUS
    from ..noise import DEFAULT_SEED
    from ..bands import DEFAULT_BAND_ROWS
    from ..pyramid_tiff import COMPRESSIONS
    from ..zarr_output import DEFAULT_CHUNK

    p = Parser(
        prog="safron-render",
        description=(
            "Render a tissue component mask (gland green, stroma red, background blue; or labels 0 background, "
            "1 stroma, 2 gland) into a synthetic H&E image, written as a pyramidal tiled BigTIFF that OpenSlide, "
            "QuPath and ASAP open, or as an OME-Zarr (OME-NGFF 0.5). Masks may be PNG, JPEG, TIFF (tiled or "
            "stripped, pyramidal) or any format OpenSlide reads, of any size. With --workers or --scheduler one mask "
            "is rendered in row bands on Dask workers, with the same pixels."
        ),
        epilog=(
            "An interrupted render (Ctrl-C, SIGTERM, a killed job, a full disk) keeps OUT.safron-canvas and "
            "OUT.safron-journal next to OUT; run the same command with --resume to continue it. One render at a "
            "time may write to OUT (it holds OUT.safron-lock). "
            + exit_status_help(sigterm=True, usage="bad input or usage, or the disk refused the output (full, failing)")
        ),
    )
    p.usage = ("%(prog)s MASK OUT [--workers N | --scheduler ADDRESS] [options]\n"
               "       %(prog)s MASK [MASK ...] --out-dir DIR [--workers N | --scheduler ADDRESS] [options]")
    p.add_argument("paths", metavar="MASK OUT | MASK...", nargs="+",
                   help="a tissue component mask and its output: a pyramidal BigTIFF, named .tif, .tiff, .btf or .tf8, "
                        "or an OME-Zarr, named .zarr (written under a temporary name, renamed when complete); or, with "
                        "--out-dir, many masks")
    p.add_argument("--out-dir", metavar="DIR",
                   help="render every MASK given to DIR/<mask name>.tif as jobs on Dask workers: a local cluster "
                        "(one worker process per core) unless --scheduler is given. Complete outputs are skipped and "
                        "interrupted ones resumed, so rerunning the command finishes the set; a mask that fails is "
                        "reported and the others go on")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="a Dask scheduler (e.g. tcp://host:8786) whose workers render: one job per mask with "
                        "--out-dir, else MASK in row bands; they need safron and the same paths to the masks, the "
                        "model and the output folder")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help="local worker processes, one render thread each unless --threads: one job per mask with "
                        "--out-dir (default: one per core), else MASK split into row bands across N workers, its "
                        "pixels those of a render in one process")
    p.add_argument("--band-rows", type=positive_int, metavar="N",
                   help=f"with --workers or --scheduler and one MASK: rows per band, a multiple of --chunk (default: "
                        f"{DEFAULT_BAND_ROWS} rounded up to one)")
    p.add_argument("--chunk", type=tile_side, metavar="N",
                   help=f"OME-Zarr chunk side (the chunks are 3 x N x N), a multiple of 16; bands start on chunk rows "
                        f"(default: {DEFAULT_CHUNK})")
    p.add_argument("--model", metavar="ONNX",
                   help="generator: an ONNX file meeting the model contract, or a training run directory or "
                        "checkpoint (RUN_DIR/checkpoints/step-N.json or .safetensors) for --backend torch "
                        "(default: the embedded model)")
    p.add_argument(
        "--backend", choices=BACKEND_NAMES, default="auto",
        help="inference backend (default: %(default)s = tensorrt if installed and a GPU is present; else torch on a "
             "GPU for checkpoints and safron-exported ONNX, rendering on the device; else onnxruntime on the CPU; "
             "torch also runs checkpoints on the CPU)",
    )
    p.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="patches per inference call (default: backend's choice)")
    p.add_argument("--blend", choices=BLENDS, default=DEFAULT_BLEND,
                   help="weights for overlapping patches: uniform = the paper's average; linear/cosine ramp across "
                        "the overlap, which hides patch seams (default: %(default)s)")
    p.add_argument("--outset", type=non_negative_int, default=DEFAULT_OUTSET, metavar="PX",
                   help="how far the patch grid reaches beyond each border of the mask, rendered from the mirrored "
                        "mask and cropped, so that border pixels are blended like any seam instead of being a "
                        "patch's outermost rows (a light frame); 0 renders as safron did before, with fewer patches "
                        "on some small sizes (default: %(default)s)")
    p.add_argument("--compression", choices=COMPRESSIONS, default="jpeg",
                   help="tile compression (default: %(default)s)")
    p.add_argument("--quality", type=quality, default=90, metavar="Q",
                   help="JPEG quality 1..100 (default: %(default)s)")
    p.add_argument("--mpp", type=positive_float, metavar="UM",
                   help="microns per pixel to record (default: taken from the mask)")
    p.add_argument("--colour-tolerance", "--color-tolerance", dest="colour_tolerance", type=colour_tolerance,
                   default=COLOUR_TOLERANCE, metavar="T",
                   help="RGB distance within which a mask colour snaps to the nearest class colour; other colours "
                        f"are errors, except in lossy (JPEG) masks within {SMEAR_RADIUS} px of a class colour, taken "
                        "for the codec's smear along class edges; inf snaps every colour (default: %(default)g)")
    p.add_argument("--seed", type=non_negative_int, default=DEFAULT_SEED, metavar="S",
                   help="seed of the noise that a model with noise channels reads (safron-train --noise-channels): "
                        "the same mask, model and seed give the same image, another seed another texture; models "
                        "without noise ignore it (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted render of OUT")
    p.add_argument("--threads", type=threads, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--profile", action="store_true",
                   help="print where the time went (read, prepare, infer, accumulate, finalise, journal, "
                        "encode) and MP/s")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def _render_options(args) -> dict:
    """The `engine.render` options both forms of the command pass on, for one mask or for each of many."""
    return dict(model=args.model, backend=args.backend, batch_size=args.batch_size, blend=args.blend,
                compression=args.compression, quality=args.quality, mpp=args.mpp, threads=args.threads,
                colour_tolerance=args.colour_tolerance, seed=args.seed, outset=args.outset)


@contextlib.contextmanager
def _dask_client(args, local_workers: int | None):
    """The client --scheduler names, or a local cluster of `local_workers` processes, or None (when that is None)."""
    from ..distributed import local_client, scheduler_client

    if args.scheduler is not None:
        with scheduler_client(args.scheduler) as client:
            yield client
    elif local_workers is not None:
        with local_client(local_workers) as client:
            yield client
    else:
        yield None


def _render_many(args) -> int:
    """The --out-dir form: exit 0 when every mask is done, 2 when one failed on its input, 1 on an internal error."""
    from ..distributed import STATUSES, render_many

    worst = EXIT_OK

    def command() -> None:
        nonlocal worst
        # Without --scheduler, render_many starts its own local cluster (one worker per mask, up to the cores).
        with _dask_client(args, None) as client:
            outcomes = render_many(args.paths, args.out_dir, client=client, workers=args.workers,
                                   progress=not args.quiet, **_render_options(args))
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
        if args.band_rows is not None or args.chunk is not None:
            parser.error("--band-rows and --chunk split one mask into bands; with --out-dir each mask is one job")
        if args.profile:
            parser.error("--profile times the stages of one render; with --out-dir the renders run on Dask workers "
                         "(time one mask with safron-render MASK OUT --profile)")
        return _render_many(args)
    if args.scheduler is not None and args.workers is not None:
        parser.error("give --workers (a local cluster) or --scheduler (a running one), not both")
    if len(args.paths) != 2:
        parser.error(f"give MASK OUT, or masks with --out-dir DIR (got {len(args.paths)} path(s) and no --out-dir)")
    args.mask, args.out = args.paths

    def command() -> None:
        from ..engine import render

        options = _render_options(args)
        if args.workers is not None and args.threads is None:
            options["threads"] = 1  # one render thread per local worker process: the cores are the workers'
        with _dask_client(args, args.workers) as client:
            result = render(args.mask, args.out, resume=args.resume, progress=not args.quiet, client=client,
                            band_rows=args.band_rows, chunk=args.chunk, **options)
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
                    failures=(WorkerLostError,), sigterm=True)


if __name__ == "__main__":
    sys.exit(main())
