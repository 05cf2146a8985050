"""How much a render suffers from the interpreter lock (issue 15), measured without a GPU. Not a test.

On a GPU the generator is nearly free and the render is paced by its Python threads (mask reader, inference feed,
main loop, TIFF encoder), which share one interpreter lock. On a 2-core CPU machine the generator hides that. So the
proxy: a render with a nearly free model (`centre_crop.onnx`, which copies the mask's centre) of a large label mask,
alone and beside one busy pure-Python thread that wants the lock all the time, as a GPU render's other Python work
would. The slowdown beside the busy thread is the render's sensitivity to the lock; each variant is run in
alternation, in one process, and the ratios are printed side by side.

Variants: the TIFF encoder as a thread of the render's process (`PyramidTiffWriter`) or as a process of its own
(`encoder_process.PyramidTiffProcess`, what renders from `engine.ENCODER_PROCESS_MIN_PIXELS` on use).

    python bench/gil_share.py                       # 8192 x 8192, 2 threads, 2 rounds
    python bench/gil_share.py --size 16384 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python_tests"))
sys.path.insert(0, str(ROOT / "bench"))
import onnx_models  # noqa: E402
from pipeline import write_label_mask  # noqa: E402

from safron import engine  # noqa: E402


class BusyThread:
    """A pure-Python loop in a thread of this process; counts its iterations so that its share of the lock shows."""

    def __init__(self):
        self._stop = threading.Event()
        self.iterations = 0
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self):
        while not self._stop.is_set():
            for _ in range(200):
                pass
            self.iterations += 1

    def __enter__(self):
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.rate = self.iterations / (time.perf_counter() - self._started)


def render(mask: Path, model: Path, out: Path, threads: int, in_process: bool):
    out.unlink(missing_ok=True)
    engine.ENCODER_PROCESS_MIN_PIXELS = float("inf") if in_process else 0
    started = time.perf_counter()
    result = engine.render(mask, out, model=model, backend="onnxruntime", batch_size=32, threads=threads,
                           progress=False)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="side of the square label mask (default 8192)")
    parser.add_argument("--threads", type=int, default=2, help="render threads (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of every variant (default 2)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=ROOT / "bench") as work:
        work = Path(work)
        mask, model = work / "mask.tif", work / "centre_crop.onnx"
        write_label_mask(mask, args.size)
        onnx_models.centre_crop(model)
        with BusyThread() as idle:
            time.sleep(2.0)
        variants = [("encoder thread", True), ("encoder process", False)]
        times = {(name, busy): [] for name, _ in variants for busy in (False, True)}
        shares, encode = {name: [] for name, _ in variants}, {name: [] for name, _ in variants}
        render(mask, model, work / "out.tif", args.threads, True)  # warm-up: file cache, ONNX Runtime
        for _ in range(args.rounds):
            for name, in_process in variants:
                seconds, result = render(mask, model, work / "out.tif", args.threads, in_process)
                times[name, False].append(seconds)
                encode[name].append(result.stage_seconds.get("encode", float("nan")))
                with BusyThread() as busy:
                    seconds, _ = render(mask, model, work / "out.tif", args.threads, in_process)
                times[name, True].append(seconds)
                shares[name].append(busy.rate / idle.rate)

    pixels = args.size**2 / 1e6
    print(f"{args.size} x {args.size} label mask, centre-crop model, batch 32, {args.threads} threads, "
          f"{args.rounds} rounds (median seconds)")
    print("| encoder | alone | MP/s | encode busy | beside a busy Python thread | slowdown | busy thread's share of "
          "its idle rate |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = None
    for name, _ in variants:
        alone, busy = statistics.median(times[name, False]), statistics.median(times[name, True])
        base = base or (alone, busy)
        print(f"| {name} | {alone:.2f} s | {pixels / alone:.1f} | {statistics.median(encode[name]):.2f} s | "
              f"{busy:.2f} s | {busy / alone:.2f}x | {statistics.median(shares[name]):.2f} |")
    name = variants[1][0]
    alone, busy = statistics.median(times[name, False]), statistics.median(times[name, True])
    print(f"{name} / encoder thread, seconds: alone {alone / base[0]:.2f}, beside the busy thread {busy / base[1]:.2f}")


if __name__ == "__main__":
    main()
