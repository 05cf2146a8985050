"""CPU speed of generators side by side (not a test): per patch, and per pixel of a whole render.

Issue 12 bounds a new default model's CPU speed against the current one's ("no worse than 1.5x slower per
patch"). This times ONNX generators in one process, rounds alternating between them so that other jobs on a
shared machine slow them alike, and prints each one's ratio to the first:
  * per patch: ONNX Runtime on one batch of random one-hot windows (the model alone);
  * per pixel: `engine.render_array` of a synthetic mask (reading, inference, blending: what a user waits for),
    each model at its own overlap where one is given as MODEL@OVERLAP (default: the engine's).

    python bench/model_speed.py CANDIDATE.onnx                       # against the embedded default model
    python bench/model_speed.py A.onnx B.onnx@48 --threads 2 --size 2048 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="ONNX generators, each MODEL or MODEL@OVERLAP; the embedded "
                        "default model comes first unless --no-default")
    parser.add_argument("--no-default", action="store_true", help="compare the given models only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=2048, help="side of the rendered synthetic mask (px; at 1024 "
                        "overlaps 20 and 64 need the same 5 x 5 patches, at 2048 9 x 9 and 11 x 11)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import onnxruntime as ort
    import numpy as np

    from safron import engine, export, synthesis
    from safron.noise import canvas_noise

    specs = [] if args.no_default else [(str(engine.default_model_path()), engine.DEFAULT_OVERLAP)]
    for spec in args.models:
        path, _, overlap = spec.partition("@")
        specs.append((path, int(overlap) if overlap else engine.DEFAULT_OVERLAP))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    sessions = [ort.InferenceSession(path, options, providers=["CPUExecutionProvider"]) for path, _ in specs]
    windows = export.random_masks(args.batch, 296, seed=3)
    labels = synthesis.synthesize(args.size, args.size, seed=1)

    def feeds(session) -> dict:
        """The mask windows, and the canvas noise for a model that reads noise (safron.noise)."""
        inputs = {i.name: i for i in session.get_inputs()}
        if "noise" not in inputs:
            return {"mask": windows}
        channels = inputs["noise"].shape[1]
        noise = np.stack([canvas_noise(300 * k, 0, 296, 296, channels) for k in range(args.batch)])
        return {"mask": windows, "noise": noise}

    def per_patch(session) -> float:
        inputs = feeds(session)
        started = time.perf_counter()
        session.run(None, inputs)
        return (time.perf_counter() - started) / args.batch

    def per_megapixel(path: str, overlap: int) -> float:
        started = time.perf_counter()
        engine.render_array(labels, model=path, backend="onnxruntime", overlap=overlap, threads=args.threads)
        return (time.perf_counter() - started) / (args.size * args.size / 1e6)

    for session in sessions:  # warm-up: kernel selection, allocator
        per_patch(session)
    patch = [[] for _ in specs]
    pixels = [[] for _ in specs]
    for _ in range(args.rounds):
        for i, (session, (path, overlap)) in enumerate(zip(sessions, specs)):
            patch[i].append(per_patch(session))
            pixels[i].append(per_megapixel(path, overlap))

    print(f"ONNX Runtime on the CPU, {args.threads} thread(s); per patch: batch {args.batch}; per pixel: "
          f"render_array of a {args.size} px synthetic mask; medians of {args.rounds} alternating rounds")
    base_patch, base_pixel = statistics.median(patch[0]), statistics.median(pixels[0])
    print(f"{'model':<44} {'overlap':>7} {'s/patch':>8} {'ratio':>6} {'s/MP':>7} {'ratio':>6}")
    for (path, overlap), p, q in zip(specs, patch, pixels):
        p, q = statistics.median(p), statistics.median(q)
        print(f"{Path(path).name[-44:]:<44} {overlap:>7} {p:>8.3f} {p / base_patch:>5.2f}x {q:>7.2f} "
              f"{q / base_pixel:>5.2f}x")


if __name__ == "__main__":
    main()
