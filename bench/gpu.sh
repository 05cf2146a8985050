#!/usr/bin/env bash
# GPU benchmark and test run for a lent GPU machine (no network): build with SAFRON_CUDA=ON, run the C++ tests
# and the needs_cuda/needs_tensorrt pytest suites, then compare the bare generator's throughput with end-to-end
# renders of square synthetic masks (PyTorch CUDA backend; TensorRT too where installed), and time one training
# step per tile size if time is left.
#
#   OUT=/some/dir bench/gpu.sh                       # on the GPU machine, from the repository root
#   SAFRON_GPU_DRY_RUN=1 OUT=/tmp/x bench/gpu.sh     # on a CPU: the same flow at tiny sizes, to test the script
#
# The lent machines have no network and no GoogleTest: set SAFRON_GTEST_SOURCE to a carried copy of the
# googletest source tree (Debian's /usr/src/googletest) and the script builds it first. Python packages missing
# there (imagecodecs, openslide) travel as wheels installed before this script runs.
#
# Everything (logs, figures) goes under $OUT; figures are in $OUT/summary.txt. Sizes that would not finish
# within SAFRON_GPU_BUDGET_S (default 420 s, the whole script) are skipped, judged from the previous size's
# time per pixel (pessimistic: small renders pay a fixed start-up), so the script stays under 8 minutes.
# SAFRON_GPU_SIZES overrides the sizes, SAFRON_GPU_RENDER_BACKENDS the renders ("torch torch-eager"; TensorRT is
# added where installed; "torch-noise" renders the same generator with 2 noise channels, whose noise the device-
# resident path draws on the GPU: its bare rate is always measured), SAFRON_GPU_TRAIN_STEP=0 leaves out the
# training-step timing.
#
# Timings only compare within one call (lent machines differ). SAFRON_GPU_BASELINE=DIR adds, at every size, a
# render by another version of safron: DIR holds its sources, e.g. made here with
#   mkdir .baseline && git archive REV safron csrc cpp_tests CMakeLists.txt pyproject.toml \
#     ':!safron/default_model/generator.onnx' | tar -x -C .baseline      # .baseline excluded in git, then carried
# It is built beside this one and renders with the same model and mask ("baseline"). SAFRON_GPU_COMMIT names
# this checkout in the summary (a lent machine's copy of .git may name an older commit).
set -euo pipefail

: "${OUT:?set OUT to the directory that receives logs and figures}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

DRY_RUN=${SAFRON_GPU_DRY_RUN:-0}
BUDGET_S=${SAFRON_GPU_BUDGET_S:-420}
JOBS=${SAFRON_GPU_JOBS:-8}
if [[ $DRY_RUN == 1 ]]; then
  SIZES=${SAFRON_GPU_SIZES:-"600 900"}
  NGF=4
  CUDA_OPTION=AUTO  # this machine may have no GPU; nvcc alone builds the kernels
  JOBS=${SAFRON_GPU_JOBS:-2}
else
  SIZES=${SAFRON_GPU_SIZES:-"8192 32768 100000"}
  NGF=32
  CUDA_OPTION=ON
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/safron-gpu.XXXXXX")
# Ends the background mask writer too when a stage stops the script early.
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
# shellcheck source=bench/lent_machine.sh
source "$ROOT/bench/lent_machine.sh"
provide_python "$WORK/bin"
SUMMARY=$OUT/summary.txt
SCRIPT_START=$SECONDS

say() { echo "$*" | tee -a "$SUMMARY"; }

# stage NAME COMMAND...: run COMMAND with its output in $OUT/NAME.log, and record its wall time.
stage() {
  local name=$1 start=$SECONDS status=0
  shift
  echo "== $name: $*"
  "$@" >"$OUT/$name.log" 2>&1 || status=$?
  say "stage $name: exit $status, $((SECONDS - start)) s"
  if [[ $status != 0 ]]; then
    tail -n 30 "$OUT/$name.log"
    return "$status"
  fi
}

: >"$SUMMARY"
COMMIT=${SAFRON_GPU_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown) (from .git)}
say "safron GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $COMMIT, dry run $DRY_RUN"
if command -v nvidia-smi >/dev/null; then
  say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
else
  say "GPU: none (nvidia-smi not found)"
fi

# No network here: report every missing piece at once instead of letting pip try to download it.
check_environment() {
  local missing=()
  local tool module
  for tool in cmake ninja; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if [[ $CUDA_OPTION == ON ]] && ! command -v nvcc >/dev/null; then missing+=(nvcc); fi
  for module in numpy onnx onnxruntime tifffile imagecodecs openslide PIL tqdm pybind11 scikit_build_core pytest \
    torch safetensors; do
    python -c "import $module" 2>/dev/null || missing+=("python:$module")
  done
  python - <<'EOF'
import importlib.util
for optional in ("tensorrt", "cupy"):
    print(f"optional {optional}: {'present' if importlib.util.find_spec(optional) else 'absent'}")
EOF
  if ((${#missing[@]})); then
    echo "missing: ${missing[*]}"
    return 1
  fi
}
stage check_environment check_environment

# One CMake build gives the Python module and the C++ tests. GoogleTest comes from SAFRON_GTEST_SOURCE when set
# (built here first); if that fails the C++ tests are left out rather than stopping the GPU figures.
build() {
  local tests=ON prefix=()
  if [[ -n ${SAFRON_GTEST_SOURCE:-} ]]; then
    if cmake -S "$SAFRON_GTEST_SOURCE" -B "$WORK/gtest-build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_GMOCK=OFF \
      -DCMAKE_INSTALL_PREFIX="$WORK/gtest" && cmake --build "$WORK/gtest-build" -j "$JOBS" &&
      cmake --install "$WORK/gtest-build"; then
      prefix=(-DCMAKE_PREFIX_PATH="$WORK/gtest")
    else
      echo "GoogleTest did not build: C++ tests left out"
      tests=OFF
    fi
  fi
  build_safron . "$WORK/build" "$JOBS" -DSAFRON_CUDA="$CUDA_OPTION" -DSAFRON_BUILD_TESTS="$tests" "${prefix[@]}"
}
stage build build
BASELINE=${SAFRON_GPU_BASELINE:-}
if [[ -n $BASELINE ]]; then
  BASELINE=$(cd "$BASELINE" && pwd)
  build_baseline() {
    build_safron "$BASELINE" "$WORK/build-baseline" "$JOBS" -DSAFRON_CUDA="$CUDA_OPTION" -DSAFRON_BUILD_TESTS=OFF &&
      cp "$WORK"/build-baseline/_core*.so "$BASELINE/safron/"
  }
  stage build_baseline build_baseline
fi
# The module goes beside the sources, which the Python stages import (nothing is installed into the machine's
# interpreter, which may be read-only). A dry run keeps the developer's own installation as it is.
if [[ $DRY_RUN != 1 ]]; then
  cp "$WORK"/build/_core*.so safron/
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi
python -c "import json, safron._core as c; print(json.dumps(c.build_info()))" | tee -a "$SUMMARY"

# The square synthetic masks are written in the background (one core, smallest first) while the C++ and GPU
# tests run, so that writing a gigapixel mask does not eat into the time left for rendering it.
python - "$WORK" $SIZES >"$OUT/masks.log" 2>&1 <<'EOF' &
import sys
import time

from safron.synthesis import write_mask

for size in map(int, sys.argv[2:]):
    start = time.perf_counter()
    write_mask(f"{sys.argv[1]}/mask_{size}.tif", size, size, seed=1)
    print(f"mask {size}x{size}: {time.perf_counter() - start:.1f} s", flush=True)
EOF
MASK_PID=$!

# Test failures are recorded and the run goes on, so one failing test still leaves the figures; the script's
# exit status reports them at the end.
failures=0
if [[ -e $WORK/build/cpp_tests/safron_cpp_tests ]]; then
  stage ctest ctest --test-dir "$WORK/build" --output-on-failure --no-tests=error || failures=$((failures + 1))
  grep -E "tests passed|tests failed" "$OUT/ctest.log" | tail -n 1 | tee -a "$SUMMARY" || true
else
  say "C++ tests: not built (see build.log)"
  failures=$((failures + 1))
fi

# pytest exits 5 when every selected test was deselected or skipped, which is a result, not a failure.
run_gpu_tests() {
  local status=0
  python -m pytest -m "needs_cuda or needs_tensorrt" -ra python_tests || status=$?
  [[ $status == 0 || $status == 5 ]]
}
stage pytest_gpu run_gpu_tests || failures=$((failures + 1))
grep -E "passed|failed|skipped|error" "$OUT/pytest_gpu.log" | tail -n 1 | tee -a "$SUMMARY"

# Throughput: a random-weight generator (SAFRON architecture, width $NGF) saved as a checkpoint for the torch
# backend; the bare backend on ready batches, then end-to-end renders of each size.
stage model python - "$WORK" "$NGF" <<'EOF'
import sys
from pathlib import Path

import torch

from safron.export import export_onnx, save_checkpoint
from safron.models import Generator

work, ngf = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
generator = Generator(ngf=ngf).eval()
save_checkpoint(generator, work / "generator.safetensors")
print(export_onnx(work / "generator.safetensors", work / "generator.onnx"))
# The same architecture reading 2 noise channels (safron.noise), for what drawing noise on the GPU costs.
torch.manual_seed(0)
save_checkpoint(Generator(ngf=ngf, noise_channels=2).eval(), work / "generator_noise.safetensors")
EOF

stage bare_generator python - "$WORK" "$DRY_RUN" <<'EOF'
import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np

from safron import geometry
from safron.backends import available_backends, create_backend
from safron.noise import NoiseBatch

work, dry_run = Path(sys.argv[1]), sys.argv[2] == "1"
seconds = 1.0 if dry_run else 15.0
# "torch-eager": the torch backend with its CUDA graphs off (SAFRON_CUDA_GRAPHS=0), to show what they buy.
candidates = [("torch", work / "generator.safetensors"), ("torch-eager", work / "generator.safetensors"),
              ("torch-noise", work / "generator_noise.safetensors")]
if available_backends()["tensorrt"]:
    candidates.append(("tensorrt", work / "generator.onnx"))
def synchronise():
    if importlib.util.find_spec("torch"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


for name, model in candidates:
    os.environ["SAFRON_CUDA_GRAPHS"] = "0" if name == "torch-eager" else "1"
    backend = create_backend(name.removesuffix("-eager").removesuffix("-noise"), model)
    try:
        # The engine's own hooks on ready label windows: for a device-resident backend that is label upload,
        # encoding and the generator, with the patches left on the GPU, which is what the render feeds on.
        batch = backend.default_batch_size
        window = backend.signature.window
        labels = np.random.default_rng(0).integers(0, 3, (batch, window, window), dtype=np.uint8)
        if backend.signature.noise_channels:  # the noise of the first patches of a large canvas
            plan = geometry.plan(4096, 4096)
            ys, xs = plan.origins()
            noise = NoiseBatch.of(plan, ys[:batch], xs[:batch], backend.signature.noise_channels)
            prepared = backend.prepare(labels, noise)
        else:
            prepared = backend.prepare(labels)
        backend.infer(prepared)  # warm-up: kernel selection, allocator
        synchronise()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            backend.infer(prepared)
            runs += 1
        synchronise()
        rate = runs * batch / (time.perf_counter() - start)
        stride = backend.signature.patch - 20  # a patch's new pixels in a large render (20 px overlap)
        gpu = ""
        if importlib.util.find_spec("torch"):
            import torch

            if torch.cuda.is_available():
                gpu = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (torch allocator)"
        resident = getattr(backend, "device_resident", False)
        print(f"bare {name}: batch {batch}, device-resident {resident}, {rate:.1f} patches/s, "
              f"{rate * stride * stride / 1e6:.1f} MP/s{gpu}")
        (work / f"bare_{name}.txt").write_text(f"{rate}\n")
    finally:
        backend.close()
EOF
grep "^bare" "$OUT/bare_generator.log" | tee -a "$SUMMARY"

read -r -a render_backends <<<"${SAFRON_GPU_RENDER_BACKENDS:-torch torch-eager}"
if [[ -f $WORK/bare_tensorrt.txt ]]; then render_backends+=(tensorrt); fi
if [[ -n $BASELINE ]]; then render_backends+=(baseline); fi

previous_pixels=0 previous_seconds=0
for size in $SIZES; do
  pixels=$((size * size))
  elapsed=$((SECONDS - SCRIPT_START))
  if ((previous_pixels > 0)); then
    # Rendering scales with the pixel count (previous_seconds covers every backend).
    predicted=$((previous_seconds * pixels / previous_pixels))
    if ((elapsed + predicted > BUDGET_S)); then
      say "size $size: skipped (predicted ${predicted} s, ${elapsed} s of ${BUDGET_S} s used)"
      continue
    fi
  fi
  while [[ ! -f $WORK/mask_$size.tif ]] && kill -0 "$MASK_PID" 2>/dev/null; do sleep 1; done
  if [[ ! -f $WORK/mask_$size.tif ]]; then
    say "size $size: no mask (see masks.log)"
    failures=$((failures + 1))
    break
  fi
  size_start=$SECONDS
  for backend in "${render_backends[@]}"; do
    model=$WORK/generator.safetensors
    [[ $backend == tensorrt ]] && model=$WORK/generator.onnx
    [[ $backend == torch-noise ]] && model=$WORK/generator_noise.safetensors
    # GPU utilisation sampled every 200 ms during the render: is the GPU the bottleneck or waiting?
    sampler=
    if command -v nvidia-smi >/dev/null; then
      nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$WORK/utilisation.txt" &
      sampler=$!
    fi
    # The baseline's sources come first on the path (its engine, backends and kernels); -P keeps the working
    # directory, this checkout, off the path (Python >= 3.11).
    python_command=(python)
    [[ $backend == baseline ]] && python_command=(env "PYTHONPATH=$BASELINE${PYTHONPATH:+:$PYTHONPATH}" python -P)
    stage "render_${backend}_$size" "${python_command[@]}" - "$WORK" "$size" "$backend" "$model" <<'EOF'
import os
import sys
import time
from pathlib import Path

import safron
from safron.engine import render

sys.path.insert(0, "bench")
from tree_rss import TreePeakRss

work, size, backend, model = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["SAFRON_CUDA_GRAPHS"] = "0" if backend == "torch-eager" else "1"
out = work / f"render_{backend}_{size}.tif"
engine_backend = {"torch-eager": "torch", "torch-noise": "torch", "baseline": "torch"}.get(backend, backend)
print(f"safron from {Path(safron.__file__).parent}")
start = time.perf_counter()
# Host memory of the render and its child processes (mask reader, TIFF encoder) together; issue 15 asks < 2 GiB.
with TreePeakRss() as peak:
    result = render(work / f"mask_{size}.tif", out, model=model, backend=engine_backend, progress=False)
seconds = time.perf_counter() - start
bare = float((work / f"bare_{'torch-noise' if backend == 'torch-noise' else engine_backend}.txt").read_text())
patches_per_second = result.patches / seconds
gpu = ""
try:
    import torch

    if torch.cuda.is_available():
        gpu = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (torch allocator)"
except ImportError:
    pass
print(
    f"render {backend} {size}x{size}: {seconds:.1f} s, {size * size / seconds / 1e6:.1f} MP/s, "
    f"{patches_per_second:.1f} patches/s, end-to-end/bare {patches_per_second / bare:.3f}{gpu}, "
    f"peak host RSS {peak.kib / 2**20:.2f} GiB with child processes ({peak.own_kib / 2**20:.2f} GiB without)"
)
print(result.profile())
out.unlink()
EOF
    grep "^render" "$OUT/render_${backend}_$size.log" | tee -a "$SUMMARY"
    if [[ -n $sampler ]]; then
      kill "$sampler" 2>/dev/null || true
      wait "$sampler" 2>/dev/null || true
      awk '{ sum += $1; n += 1 } END { if (n) printf "    GPU utilisation: mean %.0f %% over %d samples\n", sum / n, n }' \
        "$WORK/utilisation.txt" | tee -a "$SUMMARY"
    fi
    grep -E "^  [a-z]+ " "$OUT/render_${backend}_$size.log" | sed "s/^/  /" | tee -a "$SUMMARY" || true
  done
  rm -f "$WORK/mask_$size.tif"
  previous_pixels=$pixels previous_seconds=$((SECONDS - size_start + 1))
done
kill "$MASK_PID" 2>/dev/null || true  # still writing a size that was skipped
wait "$MASK_PID" 2>/dev/null || true
cat "$OUT/masks.log" | tee -a "$SUMMARY"
# One training step per tile size at the paper's width, against its claim of constant training memory (0.35 GB):
# last, and only with time left, since the renders are this script's main figures.
if [[ $DRY_RUN == 1 ]]; then
  train_args=(--device cpu --tiles 492 --ngf 4 --ndf 4 --steps 1 --threads 2)
else
  train_args=(--device cuda --tiles 492 728 1200 --ngf 64 --ndf 64 --steps 3)
fi
if [[ ${SAFRON_GPU_TRAIN_STEP:-1} == 0 ]]; then
  say "train step: not asked for (SAFRON_GPU_TRAIN_STEP=0)"
elif ((SECONDS - SCRIPT_START + 90 <= BUDGET_S)) || [[ $DRY_RUN == 1 ]]; then
  stage train_step python bench/train_step.py "${train_args[@]}" || true
  grep -E "^ +[0-9]+ " "$OUT/train_step.log" | sed 's/^/train step: /' | tee -a "$SUMMARY" || true
else
  say "train step: skipped ($((SECONDS - SCRIPT_START)) s of ${BUDGET_S} s used)"
fi
say "total: $((SECONDS - SCRIPT_START)) s, failed test stages: $failures"
((failures == 0))
