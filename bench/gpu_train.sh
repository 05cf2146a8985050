#!/usr/bin/env bash
# Issue 3's wider, longer training, on a lent GPU machine (no network, a few minutes): train from scratch for a
# fixed time, then hand back what is needed to export, evaluate and ship the generator here.
#
#   here:   python bench/pack_training_data.py ../shared/data/glas/train .glas   # 26 MiB; .glas excluded in git
#           # and the openslide wheels (bench/RESULTS.md, "bench/gpu.sh"); imagecodecs is not needed to train
#   there:  SAFRON_TRAIN_DATA=.glas OUT=$OUT bench/gpu_train.sh --ngf 32 --ndf 64 --ema-decay 0.999
#   the recipe to try next (issue 12, sixth session; MODEL_CARD.md): feature matching and DiffAugment improved the
#   whole-image scores of a CPU fine-tune; train with the blend renders use, so seams are trained away:
#           ... bench/gpu_train.sh --ngf 32 --ndf 64 --ema-decay 0.999 --lambda-l1 10 --lambda-fm 10 \
#               --diffaugment translation,cutout --blend cosine [--upsample resize] [--context dilated]
#   (--upsample resize removed the dot lattice of the transposed decoder in a short CPU run but drew axis-aligned
#   streaks there; --context dilated makes CPU inference ~3x faster; neither is judged for quality yet)
#   dry run on a CPU:  SAFRON_GPU_DRY_RUN=1 SAFRON_TRAIN_DATA=DIR OUT=/tmp/x bench/gpu_train.sh
#   batches of tiles (safron-train --tiles-per-step N) are untimed on a GPU: time them first in the same call,
#   `python bench/train_step.py --device cuda --ngf 32 --tiles 492 --tiles-per-step 1 4 8` (about a minute)
#
# Arguments after the script's name go to safron-train (--data, --out, --steps and --device are the script's).
# SAFRON_TRAIN_SECONDS (default 360) bounds the training; it then gets Ctrl-C, on which safron-train saves its
# last step. $OUT receives at most 8 files of at most 16 MB (the device tool's limits): the last checkpoint's
# generator, and its moving average when --ema-decay is given, each as an fp16 safetensors checkpoint (what
# `safron-export` reads; half the size, and `--weights float16` exports it without further rounding) split into
# 15 MiB parts (reassemble: `cat generator.f16.safetensors.part-* > generator.f16.safetensors`), the
# checkpoint's JSON, losses.csv, the last sample grid, and summary.txt with the sha256 of each whole file.
# Width 32 with --ema-decay fills the 8 files (2 x 2 parts of 26 MiB); a wider generator needs the EMA left out.
set -euo pipefail

: "${OUT:?set OUT to the directory that receives the results}"
: "${SAFRON_TRAIN_DATA:?set SAFRON_TRAIN_DATA to a training folder with images/ and masks/}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DATA=$(cd "$SAFRON_TRAIN_DATA" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DRY_RUN=${SAFRON_GPU_DRY_RUN:-0}
TRAIN_SECONDS=${SAFRON_TRAIN_SECONDS:-360}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/safron-train.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# shellcheck source=bench/lent_machine.sh
source "$ROOT/bench/lent_machine.sh"
provide_python "$WORK/bin"
SUMMARY=$OUT/summary.txt
say() { echo "$*" | tee -a "$SUMMARY"; }
: >"$SUMMARY"
say "safron GPU training, $(date -u +%Y-%m-%dT%H:%M:%SZ), dry run $DRY_RUN, data $DATA, ${TRAIN_SECONDS} s"
if command -v nvidia-smi >/dev/null; then say "GPU: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader)"; fi

if [[ $DRY_RUN == 1 ]]; then
  device=cpu
else
  # Training needs the C++ core for the patch plan only, not the CUDA kernels: a quick CPU-only build.
  device=cuda
  build_safron . "$WORK/build" "$(nproc)" -DSAFRON_CUDA=OFF >"$WORK/build.log" 2>&1 ||
    { tail -n 30 "$WORK/build.log"; exit 1; }
  cp "$WORK"/build/_core*.so safron/
  export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
fi

run=$WORK/run
start=$SECONDS
status=0
# SIGINT: safron-train saves the step it finished and exits; --kill-after ends a save that hangs.
timeout -s INT -k 120 "$TRAIN_SECONDS" python -m safron.train --data "$DATA" --out "$run" --steps 100000000 \
  --device "$device" --save-every 1000 --sample-every 500 --quiet "$@" >"$WORK/train.log" 2>&1 || status=$?
say "training: exit $status after $((SECONDS - start)) s (124 or 130: stopped by the time limit, as planned)"
tail -n 5 "$WORK/train.log" | tee -a "$SUMMARY"
if [[ ! -f $run/generator.safetensors ]]; then
  say "no generator was saved"
  exit 1
fi
last_json=$(ls "$run"/checkpoints/step-*.json | tail -n 1)
cp "$last_json" "$OUT/checkpoint.json"
cp "$run/losses.csv" "$OUT/losses.csv"
last_sample=$(ls "$run"/samples/*.png 2>/dev/null | tail -n 1 || true)
if [[ -n $last_sample ]]; then cp "$last_sample" "$OUT/sample.png"; fi
# The generator and its average out of the training state, in fp16, with the config that export needs.
python - "${last_json%.json}.safetensors" "$WORK" <<'PYEOF' | tee -a "$SUMMARY"
import hashlib
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safron.export import CONFIG_METADATA_KEY, EMA_PREFIX, GENERATOR_PREFIX, tensors_under

state, work = Path(sys.argv[1]), Path(sys.argv[2])
step = state.stem.split("-")[-1].lstrip("0") or "0"
with safe_open(str(state), "pt") as f:
    config = f.metadata()[CONFIG_METADATA_KEY]
tensors = load_file(str(state))
for prefix, out_name in ((GENERATOR_PREFIX, "generator.f16.safetensors"), (EMA_PREFIX, "generator_ema.f16.safetensors")):
    model = {name: tensor.half().contiguous() for name, tensor in tensors_under(tensors, prefix).items()}
    if not model:
        continue
    path = work / out_name
    save_file(model, str(path), metadata={CONFIG_METADATA_KEY: config, "safron.step": step})
    print(f"{out_name}: step {step}, {len(model)} tensors, {path.stat().st_size / 2**20:.1f} MiB, "
          f"sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")
PYEOF
for f in "$WORK"/generator*.f16.safetensors; do
  split -b 15M -d -a 1 "$f" "$OUT/$(basename "$f").part-"
done
say "last checkpoint: $(basename "$last_json")"
say "losses (last line): $(tail -n 1 "$run/losses.csv")"
say "steps per second: $(python - "$run/losses.csv" "$((SECONDS - start))" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"{int(rows[-1]['step']) / int(sys.argv[2]):.1f} ({rows[-1]['step']} steps)" if rows else "no steps")
PYEOF
)"
ls "$OUT" | tee -a "$SUMMARY"
