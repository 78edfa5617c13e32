#!/usr/bin/env bash
# Preset: the generated-vs-real switch. Mix synthetic and real shards by weight; MIX_WEIGHTS="1::0" is synthetic only,
# "0::1" real only, "1::1" equal shares (per-source counts are logged to tensorboard under data/source_*).
#   REAL_SHARDS=shards/cuhkpedes MIX_WEIGHTS=1::3 EFFECTIVE_BATCH_SIZE=256 bash scripts/presets/mix.sh
#   --gamma 1 --gamma_schedule constant: as in synthetic.sh and real.sh (docs/BENCHMARKS.md, identity study).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${REAL_SHARDS:?set REAL_SHARDS to a make_shards.py output folder}"
pre=(); [ -n "${PRETRAINED:-}" ] && pre=(--pretrained "$PRETRAINED")
exec bash "$root/scripts/train.sh" --train-data "${SYNTH_SHARDS:-shards/synth}/train::$REAL_SHARDS/train" \
  --train-data-weights "${MIX_WEIGHTS:-1::1}" ${pre[@]+"${pre[@]}"} --model ViT-B-16 --loss fastclip-v3 --gamma 1 --gamma_schedule constant --epochs 30 \
  --lr 5e-4 --wd 0.1 --warmup 500 --precision amp_bf16 --local-loss --workers 8 --report-to tensorboard "$@"
