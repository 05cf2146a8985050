"""Render-pipeline benchmark (not a test): run it, read the figures, record them in bench/RESULTS.md.

(a) Throughput: the bare backend on ready batches vs an end-to-end render (read mask, infer, accumulate,
    encode the pyramidal TIFF) of the same model, batch size and threads. Ratio = end-to-end / bare
    patches per second; the pipeline overlaps its stages so the ratio should approach 1.
(b) Memory: peak RSS of renders of square tiled-TIFF masks of growing size, each in its own process.
    The accumulator keeps a rolling band and the canvas is mapped one band at a time, so memory should
    not grow with the slide.

    python bench/pipeline.py                 # both parts, default sizes
    python bench/pipeline.py --sizes 4096 16384 32768 --skip-throughput
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python_tests"))
import onnx_models  # noqa: E402

from safron import engine  # noqa: E402
from safron.backends import create_backend  # noqa: E402


def write_label_mask(path: Path, size: int, tile: int = 512) -> None:
    """A size x size tiled label TIFF with every class present, written tile by tile (bounded memory)."""

    def tiles():
        for ty in range(0, size, tile):
            for tx in range(0, size, tile):
                yy, xx = np.mgrid[ty:ty + tile, tx:tx + tile]
                yield (((yy // 97) * 7 + (xx // 131) * 3 + (yy * xx // 50021)) % 3).astype(np.uint8)

    tifffile.imwrite(path, tiles(), shape=(size, size), dtype=np.uint8, tile=(tile, tile), compression="zstd",
                     bigtiff=True)


def throughput(model: Path, work: Path, batch: int, threads: int, patches: int) -> None:
    backend = create_backend("onnxruntime", model, threads=threads)
    rng = np.random.default_rng(0)
    masks = np.where(rng.random((batch, 3, 296, 296)) < 0.5, -1.0, 1.0).astype(np.float32)
    backend.run(masks)  # warm-up: graph optimisation and arena allocation
    runs = max(1, patches // batch)
    start = time.perf_counter()
    for _ in range(runs):
        backend.run(masks)
    bare = runs * batch / (time.perf_counter() - start)
    backend.close()

    # A square mask with about `patches` patches: n patches per side at stride 236.
    side = 236 * int(np.sqrt(patches)) + 20
    mask = work / "throughput_mask.tif"
    write_label_mask(mask, side)
    # Rendered twice: as renders of this size do (mask reader and TIFF encoder in child processes from
    # engine.CHILD_PROCESSES_MIN_PIXELS on), and with every stage a thread of this process.
    default_threshold = engine.CHILD_PROCESSES_MIN_PIXELS
    print(f"(a) throughput, model {model.name}, batch {batch}, threads {threads}, {side}x{side} mask")
    print(f"    bare backend  {bare:8.2f} patches/s")
    for label, threshold in (("as rendered", default_threshold), ("all threads", float("inf"))):
        engine.CHILD_PROCESSES_MIN_PIXELS = threshold
        start = time.perf_counter()
        result = engine.render(mask, work / "throughput.tif", model=model, batch_size=batch, threads=threads,
                               progress=False)
        end_to_end = result.patches / (time.perf_counter() - start)
        children = "child processes" if side * side >= threshold else "no child processes"
        print(f"    end to end, {label} ({children}): {end_to_end:8.2f} patches/s ({end_to_end * 236 * 236 / 1e6:.2f} "
              f"MP/s), ratio {end_to_end / bare:.3f} (target >= 0.95)")
    engine.CHILD_PROCESSES_MIN_PIXELS = default_threshold


# The render runs in a fresh interpreter that reports its peak RSS when done, with its child processes' (the mask
# reader and TIFF encoder of large renders; `tree_rss`). The parent's rusage is not used: a child's ru_maxrss also
# counts the forked copy of this (large) benchmark process.
_REPORT_PEAK_RSS = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from tree_rss import TreePeakRss
from safron.cli import render_main
with TreePeakRss() as peak:
    code = render_main(sys.argv[1:])
print(peak.own_kib, peak.kib)
sys.exit(code)
"""


def peak_rss(model: Path, work: Path, sizes: list[int], threads: int) -> None:
    print(f"(b) peak RSS, model {model.name}, threads {threads}")
    baseline = None
    for size in sizes:
        mask = work / f"mask_{size}.tif"
        write_label_mask(mask, size)
        out = work / f"out_{size}.tif"
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _REPORT_PEAK_RSS, str(mask), str(out), "--model", str(model), "--quiet",
             "--threads", str(threads)],
            capture_output=True, text=True,
        )
        seconds = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"render of {size}x{size} failed with exit code {proc.returncode}: {proc.stderr}")
        own_kib, tree_kib = (int(value) for value in proc.stdout.split()[-2:])
        rss_mib = tree_kib / 1024
        baseline = baseline or rss_mib
        print(f"    {size:>6} x {size:<6} peak RSS {rss_mib:8.1f} MiB  ({rss_mib / baseline:5.2f} x first; the render "
              f"alone {own_kib / 1024:.1f} MiB)  {seconds:7.1f} s  output {out.stat().st_size / 2**20:8.1f} MiB")
        mask.unlink()
        out.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--patches", type=int, default=400, help="patches for the throughput part")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        if not args.skip_throughput:
            throughput(onnx_models.conv_generator(work / "conv_generator.onnx"), work, args.batch, args.threads,
                       args.patches)
        if not args.skip_memory:
            peak_rss(onnx_models.centre_crop(work / "centre_crop.onnx"), work, args.sizes, args.threads)


if __name__ == "__main__":
    main()
