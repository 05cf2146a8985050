"""How much a render suffers from the interpreter lock (issue 15), measured without a GPU. Not a test.

On a GPU the generator is nearly free and the render is paced by its Python threads (mask reader, inference feed,
main loop, TIFF encoder), which share one interpreter lock. On a 2-core CPU machine the generator hides that. So the
proxy: a render with a nearly free model (`centre_crop.onnx`, which copies the mask's centre) of a large label mask,
alone and beside one busy pure-Python thread that wants the lock all the time, as a GPU render's other Python work
would. The slowdown beside the busy thread is the render's sensitivity to the lock; each variant is run in
alternation, in one process, and the ratios are printed side by side.

Variants: every stage a thread of the render's process; the TIFF encoder in a process of its own
(`encoder_process`); the encoder and the mask reader in processes of their own (`reader_process`), which is what
renders from `engine.CHILD_PROCESSES_MIN_PIXELS` on do.

    python bench/gil_share.py                       # 8192 x 8192, 2 threads, 2 rounds
    python bench/gil_share.py --size 16384 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
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
    """A pure-Python loop in a thread of this process, for as long as the `with` block runs."""

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self):
        while not self._stop.is_set():
            for _ in range(200):
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


VARIANTS = ("threads", "encoder process", "reader and encoder processes")
SHOWN = ("read", "prepare", "encode")


def render(mask: Path, model: Path, out: Path, threads: int, variant: str):
    out.unlink(missing_ok=True)
    engine.CHILD_PROCESSES_MIN_PIXELS = float("inf") if variant == "threads" else 0
    window_reader = engine._Renderer.start_window_reader
    if variant == "encoder process":
        engine._Renderer.start_window_reader = lambda self, *args: None
    try:
        started = time.perf_counter()
        result = engine.render(mask, out, model=model, backend="onnxruntime", batch_size=32, threads=threads,
                               progress=False)
        return time.perf_counter() - started, result
    finally:
        engine._Renderer.start_window_reader = window_reader


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
        times = {(name, busy): [] for name in VARIANTS for busy in (False, True)}
        stages = {(name, busy): [] for name in VARIANTS for busy in (False, True)}
        render(mask, model, work / "out.tif", args.threads, "threads")  # warm-up: file cache, ONNX Runtime
        for _ in range(args.rounds):
            for name in VARIANTS:
                for busy in (False, True):
                    with BusyThread() if busy else contextlib.nullcontext():
                        seconds, result = render(mask, model, work / "out.tif", args.threads, name)
                    times[name, busy].append(seconds)
                    stages[name, busy].append(result.stage_seconds)

    def median_stage(key, stage):
        return statistics.median(seconds[stage] for seconds in stages[key])

    pixels = args.size**2 / 1e6
    print(f"{args.size} x {args.size} label mask, centre-crop model, batch 32, {args.threads} threads, "
          f"{args.rounds} rounds (medians; busy seconds of some stages in brackets)")
    print("| variant | alone | MP/s | beside a busy Python thread | slowdown | vs threads, alone "
          "| vs threads, beside |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = {busy: statistics.median(times["threads", busy]) for busy in (False, True)}
    for name in VARIANTS:
        alone, beside = (statistics.median(times[name, busy]) for busy in (False, True))
        detail = {busy: f"({', '.join(f'{stage} {median_stage((name, busy), stage):.2f}' for stage in SHOWN)})"
                  for busy in (False, True)}
        print(f"| {name} | {alone:.2f} s {detail[False]} | {pixels / alone:.1f} | {beside:.2f} s {detail[True]} | "
              f"{beside / alone:.2f}x | {alone / base[False]:.2f} | {beside / base[True]:.2f} |")


if __name__ == "__main__":
    main()
