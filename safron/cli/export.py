"""safron-export: a trained generator to an ONNX model meeting the model contract, checked against PyTorch."""

from __future__ import annotations

import argparse
import sys

from ..export import (
    DEFAULT_CHECK_SAMPLES, DEFAULT_OPSET, PARITY_TOLERANCE, WEIGHT_DTYPES, ParityError, export_onnx,
)
from .common import Parser, exit_status_help, positive_float, positive_int, run_main


def export_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="safron-export",
        description=(
            "Export a trained generator (a safron-train run directory, or a checkpoint: .safetensors or the "
            "step's .json beside it) to an ONNX "
            "model that meets the model contract (input 'mask' float32 [N,3,296,296], output 'image' float32 "
            "[N,3,256,256]), then check ONNX Runtime against PyTorch on random masks."
        ),
        epilog=exit_status_help(sigterm=False, done="exported", internal="the check failed or an internal error"),
    )
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="safron-train run directory or .safetensors file")
    p.add_argument("out", metavar="OUT.onnx",
                   help="ONNX model to write (under a temporary name, renamed when checked)")
    p.add_argument("--opset", type=positive_int, default=DEFAULT_OPSET, metavar="N",
                   help="ONNX opset (default: %(default)s)")
    p.add_argument("--check-samples", type=positive_int, default=DEFAULT_CHECK_SAMPLES, metavar="N",
                   help="random masks on which ONNX Runtime is checked against PyTorch (default: %(default)s)")
    p.add_argument("--tolerance", type=positive_float, default=PARITY_TOLERANCE, metavar="T",
                   help="largest accepted |ONNX Runtime - PyTorch| on the [-1, 1] output (default: %(default)g)")
    p.add_argument("--no-fold", dest="fold", action="store_false",
                   help="export the layers as trained. By default two exact rewrites make inference cheaper: the "
                        "one-hot input is folded into the context convolution (a third less work in the layer that "
                        "dominates CPU inference), and a resizing decoder is written as the transposed convolutions "
                        "it equals")
    p.add_argument("--weights", choices=WEIGHT_DTYPES, default="float32",
                   help="how the weights are stored: float16 halves the file, computing in float32 all the same "
                        "(default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    return p


def main(argv=None) -> int:
    args = export_parser().parse_args(argv)

    def command() -> None:
        result = export_onnx(
            args.checkpoint, args.out, opset=args.opset, check_samples=args.check_samples, tolerance=args.tolerance,
            weights=args.weights, fold=args.fold,
        )
        if not args.quiet:
            rounding = ""
            rewrites = [name for name, done in (("folding the one-hot input", result.folded),
                                                ("transposing the resizing decoder", result.decoder_transposed))
                        if done]
            if rewrites:
                rounding += f"; {' and '.join(rewrites)} moved the output by at most {result.fold_difference:.3g}"
            if result.weights == "float16":
                rounding += f"; fp16 weights moved the output by at most {result.rounding_difference:.3g}"
            print(
                f"wrote {result.out_path} (opset {result.opset}, {result.parameters:,} parameters, {result.weights} "
                f"weights, from {result.checkpoint} sha256 {result.checkpoint_sha256[:12]}); ONNX Runtime vs "
                f"PyTorch on {result.check_samples} random masks: max |difference| {result.max_abs_difference:.3g} "
                f"(tolerance {result.tolerance:g}){rounding}",
                file=sys.stderr,
            )

    return run_main("safron-export", command, interrupted="interrupted; nothing written", failures=(ParityError,))


if __name__ == "__main__":
    sys.exit(main())
