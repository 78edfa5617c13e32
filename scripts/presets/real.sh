#!/usr/bin/env bash
# Preset: fine-tune from a local CLIP weights file on a real dataset's shards (e.g. CUHK-PEDES).
#   PRETRAINED=/path/ViT-B-16.pt REAL_SHARDS=shards/cuhkpedes EFFECTIVE_BATCH_SIZE=128 bash scripts/presets/real.sh
#   --gamma 1 --gamma_schedule constant: on person-retrieval-sized data the estimators' memory (the v3 preset's gamma
#   -> 0.2) cost 4 R@1 points in both loss studies of docs/BENCHMARKS.md (tiny model, 6.4k pairs, 8 and 16 epochs);
#   not measured at this model size: --gamma 0.2 --gamma_schedule cosine gives FastCLIP's own recipe back.
#   Identity-aware options (--id-positives, --pairs-per-id) stay off: they did not beat this (BENCHMARKS).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
: "${REAL_SHARDS:?set REAL_SHARDS to a make_shards.py output folder}"
pre=(); [ -n "${PRETRAINED:-}" ] && pre=(--pretrained "$PRETRAINED")
exec bash "$root/scripts/train.sh" --train-data "$REAL_SHARDS/train" --model ViT-B-16 ${pre[@]+"${pre[@]}"} \
  --loss fastclip-v3 --gamma 1 --gamma_schedule constant --epochs 60 --lr 1e-5 --wd 0.02 --warmup 500 --precision amp_bf16 --local-loss --workers 8 \
  --report-to tensorboard "$@"
