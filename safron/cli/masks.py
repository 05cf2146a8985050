"""safron-masks: a synthetic tissue component mask, calibrated on GlaS."""

from __future__ import annotations

import argparse
import sys
import time

from .common import (
    Parser, exit_status_help, non_negative_int, positive_float, positive_int, probability, run_main, tile_side,
)


def masks_parser() -> argparse.ArgumentParser:
    from ..synthesis import GLAS_RECIPE, PARALLEL_MIN_PIXELS, PNG_MAX_PIXELS

    p = Parser(
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
    p.add_argument("out", metavar="OUT",
                   help="output mask (.png, .tif or .tiff), written under a temporary name and renamed when complete")
    p.add_argument("--size", nargs=2, type=positive_int, metavar=("W", "H"), required=True,
                   help="width and height in pixels")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: %(default)s)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--colour", "--color", dest="colour", action="store_const", const=True,
                      help="class colours, RGB (default for PNG)")
    kind.add_argument("--labels", dest="colour", action="store_const", const=False,
                      help="class labels, one byte per pixel: a third of the size, what safron-render reads fastest "
                           "(default for TIFF)")
    p.add_argument("--scale", type=positive_float, default=1.0, metavar="F",
                   help="gland and spot sizes times F, e.g. 2 for 40x masks (default: %(default)s, GlaS's 20x)")
    p.add_argument("--background", type=probability, default=GLAS_RECIPE.background_fraction, metavar="P",
                   help="probability that a stroma pixel is background, drawn as spots "
                        "(default: %(default)s, the paper's)")
    p.add_argument("--tile", type=tile_side, default=256, metavar="N",
                   help="TIFF tile side, a multiple of 16 (default: %(default)s)")
    p.add_argument("--mpp", type=positive_float, metavar="UM",
                   help="microns per pixel to record in the file (default: none)")
    p.add_argument("--workers", type=positive_int, metavar="N",
                   help=f"processes drawing a TIFF mask (default: one per core; masks under "
                        f"{PARALLEL_MIN_PIXELS / 1e6:.0f} MP are drawn in this one); the file is the same whatever N")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(argv=None) -> int:
    args = masks_parser().parse_args(argv)

    def command() -> None:
        import dataclasses

        from ..synthesis import GLAS_RECIPE, write_mask

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


if __name__ == "__main__":
    sys.exit(main())
