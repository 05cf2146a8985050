"""One large mask in row bands on Dask (not a test): throughput of engine.render(client=) on 1 and on N local workers.

Draws one synthetic mask of `--height` x `--width` px (a tiled label TIFF), then renders it in bands of `--band-rows`
rows (Zarr chunks of `--chunk`) on a local cluster of 1 worker and of `--workers` workers (one process and one render
thread each), to OME-Zarr and, on N workers, to the TIFF assembled from the bands; beside them the plain alternative,
one process rendering the TIFF with `--workers` threads. Alternates `--rounds` times; prints medians, megapixels per
second and the ratios. The cluster start-up is outside the timing. Each band renders the patch row it shares with the
next one again, which costs about 236 / band-rows more inference.

    python bench/bands.py                                   # 4096 x 2048 px, bands of 1024 rows, 1 vs 2 workers
    python bench/bands.py --height 32768 --width 32768 --band-rows 4096 --workers 16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=4096)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--band-rows", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", help="ONNX model (default: the embedded model)")
    args = parser.parse_args()

    import tifffile

    from safron import engine, masks
    from safron.distributed import local_client

    work = Path(tempfile.mkdtemp(prefix="safron-bands-"))
    mask = work / "mask.tif"
    tifffile.imwrite(mask, masks.synthesize(args.height, args.width, seed=1), tile=(256, 256))
    megapixels = args.height * args.width / 1e6
    layout = dict(band_rows=args.band_rows, chunk=args.chunk)
    runs = {"bands, 1 worker -> OME-Zarr": (1, "out.ome.zarr"),
            f"bands, {args.workers} workers -> OME-Zarr": (args.workers, "out.ome.zarr"),
            f"bands, {args.workers} workers -> TIFF": (args.workers, "out.tif"),
            f"one process, {args.workers} threads -> TIFF": (None, "out.tif")}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    try:
        with contextlib.ExitStack() as stack:
            clients = {count: stack.enter_context(local_client(count))
                       for count in sorted({count for count, _ in runs.values() if count is not None})}
            for _ in range(args.rounds):
                for name, (count, out_name) in runs.items():
                    out = work / out_name
                    started = time.perf_counter()
                    if count is None:
                        engine.render(mask, out, model=args.model, progress=False, threads=args.workers)
                    else:
                        engine.render(mask, out, model=args.model, progress=False, threads=1, client=clients[count],
                                      **layout)
                    seconds[name].append(time.perf_counter() - started)
                    shutil.rmtree(out) if out.is_dir() else out.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    bands = -(-args.height // args.band_rows)
    print(f"one mask of {args.height} x {args.width} px ({megapixels:.1f} MP) in {bands} bands of "
          f"{args.band_rows} rows, {os.cpu_count()} cores, medians of {args.rounds} alternating rounds")
    base = statistics.median(seconds[next(iter(runs))])
    for name, times in seconds.items():
        median = statistics.median(times)
        print(f"{name:<36} {median:7.1f} s, {megapixels / median:6.2f} MP/s, {base / median:5.2f}x")


if __name__ == "__main__":
    main()
