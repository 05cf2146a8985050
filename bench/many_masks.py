"""Many masks on Dask (not a test): throughput of safron-render MASK... --out-dir with 1 and with N local workers.

Draws `--masks` synthetic masks of `--size` px, then renders the set with `safron.distributed.render_many` on a
local cluster of 1 worker and of `--workers` workers (each worker one process with one render thread), alternating
`--rounds` times into fresh folders, beside the plain alternative: one process rendering the masks in turn with
`engine.render(threads=--workers)`. Prints megapixels per second and the ratios. The cluster start-up is outside
the timing (a set of thousands of masks pays it once).

    python bench/many_masks.py                          # 8 masks of 1024 px, 1 vs 2 workers, the embedded model
    python bench/many_masks.py --masks 32 --workers 16  # on a larger machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", help="ONNX model (default: the embedded model)")
    args = parser.parse_args()

    from distributed import Client, LocalCluster
    from PIL import Image

    from safron import engine, masks
    from safron.distributed import render_many

    work = Path(tempfile.mkdtemp(prefix="safron-many-"))
    paths = []
    for index in range(args.masks):
        path = work / f"mask{index}.png"
        Image.fromarray(masks.labels_to_colour(masks.synthesize(args.size, args.size, seed=index))).save(path)
        paths.append(path)
    megapixels = args.masks * args.size * args.size / 1e6
    seconds: dict[int, list[float]] = {1: [], args.workers: []}
    in_turn: list[float] = []
    clusters = {n: LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0")
                for n in seconds}
    clients = {n: Client(cluster) for n, cluster in clusters.items()}
    try:
        for round_ in range(args.rounds):
            for count, client in clients.items():
                started = time.perf_counter()
                outcomes = render_many(paths, work / f"out-{count}-{round_}", client=client, progress=False,
                                       model=args.model, threads=1)
                seconds[count].append(time.perf_counter() - started)
                assert all(o.status == "rendered" for o in outcomes), outcomes
            started = time.perf_counter()
            for index, path in enumerate(paths):
                engine.render(path, work / f"in-turn-{round_}-{index}.tif", model=args.model, progress=False,
                              threads=args.workers)
            in_turn.append(time.perf_counter() - started)
    finally:
        for count in clients:
            clients[count].close()
            clusters[count].close()
    print(f"{args.masks} masks of {args.size} px ({megapixels:.1f} MP), {os.cpu_count()} cores, medians of "
          f"{args.rounds} alternating rounds")
    base = statistics.median(seconds[1])
    median = statistics.median(in_turn)
    print(f"one process, {args.workers} threads, masks in turn: {median:7.1f} s, {megapixels / median:6.2f} MP/s, "
          f"{base / median:5.2f}x")
    for count, times in seconds.items():
        median = statistics.median(times)
        print(f"{count:>3} worker(s): {median:7.1f} s, {megapixels / median:6.2f} MP/s, {base / median:5.2f}x")


if __name__ == "__main__":
    main()
