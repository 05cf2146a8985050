"""safron-render vs MONAI's sliding_window_inference (not a test): run it, read the figures, record them in
bench/RESULTS.md.

Both sides run the same ONNX generator through ONNX Runtime with the same session options, thread count
and batch size on the same synthetic label-TIFF mask, each in its own process (peak RSS = the process's
VmHWM, wall time = opening the model and mask to the output file closed, interpreter start and imports
excluded):

  safron   safron.engine.render -> pyramidal tiled BigTIFF (256 px JPEG tiles), streaming: a rolling fp32
           band, finished rows go to a disk canvas and the encoder.
  MONAI    the whole mask as a ±1 one-hot float32 tensor [1, 3, H + 40, W + 40] (20 px of background
           class on every side, what safron's generator sees beyond the border) through
           sliding_window_inference(roi 296, scan interval 236 = safron's stride, sw_batch_size = the
           batch); the predictor runs the ONNX model and pads its 256 px output with zeros to 296, and
           roi_weight_map is zero in the 20 px margin and the mode's importance map in the 256 px centre
           (constant: ones; gaussian: MONAI's compute_importance_map for 256, sigma 0.125 x 256). MONAI
           holds the input, the output sums and the weight map in memory, whole-slide; the result is
           cropped, mapped to uint8 like safron's finaliser and written with tifffile as a tiled BigTIFF
           (256 px JPEG tiles, same quality), level 0 only: no pyramid, so MONAI does less encoding work.

MONAI constant mode is paired with safron's `uniform` blend (the plain average), gaussian with `cosine`
(both feather each patch towards its edges). The patch grids differ slightly: MONAI steps by 236 and
shifts the last window back to the border, safron spreads its patches evenly; the patch count per axis
is the same.

    python bench/vs_monai.py --check                     # MONAI's stitch reproduces safron's render
    python bench/vs_monai.py --threads 1                 # centre-crop model, 4k 8k 16k, both modes
    python bench/vs_monai.py --model default --sizes 4096 --modes constant
    python bench/vs_monai.py --sizes 20480 --sides monai --modes constant   # one more point on MONAI's fit

Needs MONAI: pip install ".[bench]" (pin torch first, see README).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

from safron import engine, masks, synthesis

ROOT = Path(__file__).resolve().parents[1]

PATCH, MARGIN, OVERLAP = 256, 20, 20
WINDOW, STRIDE = PATCH + 2 * MARGIN, PATCH - OVERLAP
# MONAI's scan interval is int(roi * (1 - overlap)); half a pixel above the stride keeps float rounding
# from giving 235.
MONAI_OVERLAP = (WINDOW - STRIDE - 0.5) / WINDOW
assert int(WINDOW * (1 - MONAI_OVERLAP)) == STRIDE
SAFRON_BLEND = {"constant": "uniform", "gaussian": "cosine"}
# A lower bound of MONAI's peak per pixel of the padded mask: the whole-slide float32 input (3 channels),
# output sums (3), weight count map (1) and the uint8 labels. Used only to refuse, before starting it, a run
# that cannot fit (MONAI 1.6.1 measures more: temporaries during the stitch).
MONAI_BYTES_PER_PIXEL = 4 * (3 + 3 + 1) + 1
MONAI_BASE_BYTES = 400 * 2**20


# -- the MONAI side ------------------------------------------------------------------------------------------

def ort_session(model: Path, threads: int):
    """An InferenceSession with the options of safron's ONNX Runtime backend (safron/backends/onnx_runtime.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])


def monai_weight_map(mode: str):
    """296 x 296 ROI weights: zero on the 20 px margin (the model returns no image there), MONAI's own
    importance map for the 256 px output in the centre."""
    import torch
    from monai.data.utils import compute_importance_map

    weights = torch.zeros((WINDOW, WINDOW), dtype=torch.float32)
    weights[MARGIN:MARGIN + PATCH, MARGIN:MARGIN + PATCH] = compute_importance_map((PATCH, PATCH), mode=mode)
    return weights


def monai_render_array(labels: np.ndarray, model: Path, threads: int, batch: int, mode: str,
                       phases: dict | None = None) -> np.ndarray:
    """Labels uint8 (H, W) -> uint8 (H, W, 3) RGB through MONAI's sliding_window_inference."""
    import torch
    from monai.inferers import sliding_window_inference

    phases = {} if phases is None else phases
    torch.set_num_threads(threads)
    session = ort_session(model, threads)
    height, width = labels.shape

    start = time.perf_counter()
    inputs = torch.empty((1, 3, height + 2 * MARGIN, width + 2 * MARGIN), dtype=torch.float32)
    for channel, label in enumerate(masks.MODEL_INPUT_CLASSES):
        inputs[0, channel] = 1.0 if label == masks.BACKGROUND else -1.0
    interior = inputs.numpy()[0, :, MARGIN:MARGIN + height, MARGIN:MARGIN + width]
    for y in range(0, height, 1024):  # in row chunks: no second whole-slide float copy
        masks.labels_to_model_input(labels[y:y + 1024], out=interior[:, y:y + 1024])
    del interior
    phases["encode input"] = time.perf_counter() - start

    def predictor(windows):
        (image,) = session.run(["image"], {"mask": windows.numpy()})
        padded = torch.zeros(windows.shape, dtype=torch.float32)
        padded[:, :, MARGIN:MARGIN + PATCH, MARGIN:MARGIN + PATCH] = torch.from_numpy(image)
        return padded

    start = time.perf_counter()
    with torch.no_grad():
        output = sliding_window_inference(
            inputs, roi_size=(WINDOW, WINDOW), sw_batch_size=batch, predictor=predictor, overlap=MONAI_OVERLAP,
            mode=mode, roi_weight_map=monai_weight_map(mode),
        )
    del inputs
    phases["sliding window"] = time.perf_counter() - start

    start = time.perf_counter()
    rgb = np.empty((height, width, 3), np.uint8)
    centre = output[0, :, MARGIN:MARGIN + height, MARGIN:MARGIN + width].numpy()
    for y in range(0, height, 256):
        # safron's finaliser mapping (csrc/include/safron/accumulate.h): round half up, clamp.
        values = np.floor((centre[:, y:y + 256] + 1) * 127.5 + 0.5)
        rgb[y:y + 256] = np.clip(values, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    phases["to uint8"] = time.perf_counter() - start
    return rgb


def monai_render(mask_path: Path, out_path: Path, model: Path, threads: int, batch: int, mode: str,
                 compression: str = "jpeg", quality: int = 90) -> dict:
    phases: dict = {}
    start = time.perf_counter()
    with masks.open_mask(mask_path) as source:
        labels = source.read_labels(0, 0, source.height, source.width)
    phases["read mask"] = time.perf_counter() - start
    rgb = monai_render_array(labels, model, threads, batch, mode, phases)
    del labels
    start = time.perf_counter()
    codec = {"compression": "jpeg", "compressionargs": {"level": quality}} if compression == "jpeg" else {}
    tifffile.imwrite(out_path, rgb, bigtiff=True, tile=(256, 256), photometric="rgb", maxworkers=threads, **codec)
    phases["write tiff"] = time.perf_counter() - start
    return phases


# -- one measurement per process -----------------------------------------------------------------------------

def _child(argv: list[str]) -> None:
    side, mask, out, model, threads, batch, mode = argv
    threads, batch = int(threads), int(batch)
    # Imports are not part of the render (MONAI's take seconds): load what each side needs before timing.
    if side == "safron":
        import safron.pyramid_tiff  # noqa: F401
    else:
        import monai.data.utils
        import monai.inferers  # noqa: F401
    start = time.perf_counter()
    if side == "safron":
        # outset=0: MONAI's grid starts at the image's corner too, so both sides render the same patches.
        result = engine.render(mask, out, model=model, threads=threads, batch_size=batch, blend=SAFRON_BLEND[mode],
                               progress=False, outset=0)
        # Busy time per stage; the stages run in parallel threads, so these overlap.
        phases = {name: seconds for name, seconds in result.stage_seconds.items() if seconds >= 0.05}
    else:
        phases = monai_render(Path(mask), Path(out), Path(model), threads, batch, mode)
    seconds = time.perf_counter() - start
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak, "phases": phases, "torch": "torch" in sys.modules}))


def measure(side: str, mask: Path, out: Path, model: Path, threads: int, batch: int, mode: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", side, str(mask), str(out), str(model), str(threads),
         str(batch), mode],
        check=False, capture_output=True, text=True,
    )
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit code {proc.returncode}: {last}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["output_bytes"] = out.stat().st_size
    out.unlink()
    return result


def _available_bytes() -> int:
    return int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024


def monai_refusal(size: int, limit: int) -> str | None:
    """Why MONAI is not run at this size, or None: its whole-slide tensors alone exceed the limit or what the
    machine has free (an out-of-memory kill would hit other jobs on a shared machine too)."""
    need = MONAI_BYTES_PER_PIXEL * (size + 2 * MARGIN) ** 2 + MONAI_BASE_BYTES
    if need > limit:
        return f"not run: needs at least {need / 2**30:.1f} GiB > {limit / 2**30:.0f} GiB limit"
    if need > 0.9 * _available_bytes():
        return f"not run: needs at least {need / 2**30:.1f} GiB, {_available_bytes() / 2**30:.1f} GiB available"
    return None


# -- the comparison ------------------------------------------------------------------------------------------

def resolve_model(name: str, work: Path) -> Path:
    if name == "centre-crop":
        return ROOT / "examples" / "centre_crop.onnx"
    if name == "default":
        return engine.default_model_path()
    if name == "conv":
        sys.path.insert(0, str(ROOT / "python_tests"))
        import onnx_models

        return onnx_models.conv_generator(work / "conv_generator.onnx")
    path = Path(name)
    if not path.is_file():
        raise SystemExit(f"--model {name}: no such file (or use centre-crop, conv, default)")
    return path


def _fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares peak RSS = base + per_pixel * pixels over (pixels, bytes) points."""
    pixels, rss = np.array(points, dtype=np.float64).T
    per_pixel, base = np.polyfit(pixels, rss, 1)
    return base, per_pixel


def compare(args, work: Path) -> None:
    model = resolve_model(args.model, work)
    limit = int(args.limit_gib * 2**30)
    print(f"model {args.model} ({model.name}), threads {args.threads}, batch {args.batch}, "
          f"MONAI overlap {MONAI_OVERLAP:.6f} (scan interval {int(WINDOW * (1 - MONAI_OVERLAP))})")
    header = f"{'size':>13} {'method':<17} {'wall s':>8} {'MP/s':>6} {'peak RSS':>11} {'output':>10}  notes"
    print(header)
    results: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for size in args.sizes:
        mask = synthesis.write_mask(work / f"mask_{size}.tif", size, size, seed=0)
        measured = {}
        for mode in args.modes:
            for side in args.sides:
                name = f"safron {SAFRON_BLEND[mode]}" if side == "safron" else f"MONAI {mode}"
                refusal = monai_refusal(size, limit) if side == "monai" else None
                r = {"error": refusal} if refusal else measure(side, mask, work / f"out_{size}.tif", model,
                                                                args.threads, args.batch, mode)
                if "error" in r:
                    print(f"{size:>6} x {size:<6} {name:<17} {'-':>8} {'-':>6} {'-':>11} {'-':>10}  {r['error']}")
                    continue
                measured[side, mode] = r
                results.setdefault((side, mode), []).append((size * size, r["peak_rss"]))
                notes = ", ".join(f"{k} {v:.1f} s" for k, v in r["phases"].items())
                if side == "safron":
                    notes = f"busy (in parallel): {notes}"
                if side == "monai" and ("safron", mode) in measured:
                    ours = measured["safron", mode]
                    notes = (f"{r['seconds'] / ours['seconds']:.2f}x the time, {r['peak_rss'] / ours['peak_rss']:.1f}x "
                             f"the memory of safron; " + notes)
                if side == "safron" and r["torch"]:
                    notes += " (torch was imported!)"
                print(f"{size:>6} x {size:<6} {name:<17} {r['seconds']:8.1f} {size * size / 1e6 / r['seconds']:6.2f} "
                      f"{r['peak_rss'] / 2**20:7.0f} MiB {r['output_bytes'] / 2**20:6.1f} MiB  {notes}", flush=True)
        mask.unlink()

    print(f"largest square within {args.limit_gib:g} GiB (fit peak RSS = base + bytes/pixel x pixels; from three "
          f"sizes on, the largest is left out of the fit and compared with its prediction):")
    for (side, mode), points in results.items():
        name = f"safron {SAFRON_BLEND[mode]}" if side == "safron" else f"MONAI {mode}"
        if len(points) < 2:
            print(f"    {name:<17} needs two sizes to fit")
            continue
        held_out = max(points) if len(points) >= 3 else None
        base, per_pixel = _fit([p for p in points if p != held_out])
        side_px = int(np.sqrt(max(limit - base, 0) / per_pixel)) if per_pixel > 0 else None
        reach = f"{side_px} x {side_px}" if side_px else "unbounded by RAM"
        line = f"    {name:<17} base {base / 2**20:6.0f} MiB + {per_pixel:7.3f} B/pixel -> {reach}"
        if held_out:
            predicted = base + per_pixel * held_out[0]
            line += (f"; {int(np.sqrt(held_out[0]))} px measured {held_out[1] / 2**20:.0f} MiB, predicted "
                     f"{predicted / 2**20:.0f} MiB ({held_out[1] / predicted - 1:+.1%})")
        print(line)
    # safron's canvas (3 B/pixel) and its JPEG pyramid must fit the scratch disk.
    free = shutil.disk_usage(work).free
    print(f"    safron's canvas and output on this disk ({free / 2**30:.0f} GiB free): up to about "
          f"{int(np.sqrt(free / (3 + 3 * 4 / 3 / 8)))} px square")


def check(args, work: Path) -> None:
    """MONAI's result must equal safron's decoded render, so the comparison is like for like."""
    sys.path.insert(0, str(ROOT / "python_tests"))
    import onnx_models

    failures = 0
    cases = [
        # The centre-crop model reproduces the mask colours wherever the stitch is right, whatever the grid.
        ("centre-crop", ROOT / "examples" / "centre_crop.onnx", 600, 700, 0),
        # 728 x 964: both grids put patches at multiples of 236, so a real conv generator sees the same
        # windows in the same batches on both sides; only fp32 summation order may differ.
        ("conv", onnx_models.conv_generator(work / "conv_generator.onnx"), 728, 964, 1),
    ]
    for name, model, height, width, tolerance in cases:
        mask = synthesis.write_mask(work / f"check_{height}x{width}.tif", height, width, seed=3)
        with masks.open_mask(mask) as source:
            labels = source.read_labels(0, 0, height, width)
        for mode in ("constant", "gaussian"):
            out = work / "check.tif"
            engine.render(mask, out, model=model, threads=args.threads, batch_size=args.batch,
                          blend=SAFRON_BLEND[mode], compression="none", progress=False, outset=0)
            ours = tifffile.imread(out)
            theirs = monai_render_array(labels, model, args.threads, args.batch, mode)
            diff = int(np.abs(ours.astype(np.int16) - theirs).max())
            if name == "centre-crop":
                diff = max(diff, int(np.abs(masks.labels_to_colour(labels).astype(np.int16) - theirs).max()))
                ok = diff == 0
            else:
                # Only constant mode is like for like here: safron's cosine window is not MONAI's gaussian.
                ok = diff <= tolerance if mode == "constant" else True
            failures += not ok
            verdict = "ok" if ok else "FAIL"
            if name == "conv" and mode == "gaussian":
                verdict = "(different blend windows, shown only)"
            print(f"{name:<12} {height} x {width} MONAI {mode:<8} vs safron {SAFRON_BLEND[mode]:<8} "
                  f"max |difference| {diff:3d}  {verdict}")
    if failures:
        raise SystemExit(f"{failures} check(s) failed")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that both sides give the same image")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--model", default="centre-crop", help="centre-crop, conv, default, or an ONNX file")
    parser.add_argument("--modes", nargs="+", choices=["constant", "gaussian"], default=["constant", "gaussian"])
    parser.add_argument("--sides", nargs="+", choices=["safron", "monai"], default=["safron", "monai"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--limit-gib", type=float, default=20.0, help="memory limit for the reach (default 20)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    if min(args.sizes) < 1 or args.batch < 1 or args.threads < 1 or args.limit_gib <= 0:
        parser.error("sizes, --batch, --threads and --limit-gib must be positive")
    if args.work and not args.work.is_dir():
        parser.error(f"--work {args.work}: not a folder")
    try:
        import monai
    except ImportError:
        raise SystemExit("MONAI is not installed: pip install '.[bench]'") from None
    import onnxruntime
    import torch

    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; python "
          f"{platform.python_version()}, MONAI {monai.__version__}, torch {torch.__version__}, "
          f"ONNX Runtime {onnxruntime.__version__}")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        (check if args.check else compare)(args, Path(tmp))


if __name__ == "__main__":
    main()
