"""What the render outset costs (not a test): patches and seconds with and without it, side by side.

`engine.render_array(outset=)` lays the patch grid over the image grown by the outset on every side, so an image
needs one more patch row or column wherever the grown side crosses a stride. This renders synthetic masks of a few
sides with the embedded model at outset 0 and at the default, rounds alternating between the two so that other jobs
on a shared machine slow them alike, and prints each side's patch counts and median seconds with their ratio.

    python bench/outset.py                        # sides 512 728 1024 2048, 2 threads
    python bench/outset.py --sides 775 4096 --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 728, 1024, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from safron import engine, geometry, masks
    from safron.backends import create_backend

    outsets = (0, engine.DEFAULT_OUTSET)
    backend = create_backend("onnxruntime", engine.default_model_path(), threads=args.threads)
    try:
        print(f"embedded model, onnxruntime, {args.threads} threads, median of {args.rounds} rounds")
        print("| side | patches (outset 0) | patches (outset 20) | s (outset 0) | s (outset 20) | time ratio |")
        print("|---|---|---|---|---|---|")
        for side in args.sides:
            labels = masks.synthesize(side, side, seed=side)
            times = {outset: [] for outset in outsets}
            for _ in range(args.rounds):
                for outset in outsets:
                    started = time.perf_counter()
                    engine.render_array(labels, backend=backend, outset=outset)
                    times[outset].append(time.perf_counter() - started)
            patches = [geometry.plan(side + 2 * o, side + 2 * o).count for o in outsets]
            seconds = [statistics.median(times[o]) for o in outsets]
            print(f"| {side} | {patches[0]} | {patches[1]} | {seconds[0]:.2f} | {seconds[1]:.2f} | "
                  f"{seconds[1] / seconds[0]:.2f}x |")
    finally:
        backend.close()


if __name__ == "__main__":
    main()
