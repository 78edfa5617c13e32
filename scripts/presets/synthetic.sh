#!/usr/bin/env bash
# Preset: pretrain ViT-B-16 (384x128) on synthetic person shards with FastCLIP-v3.
#   bash data_prep/... synthetic --num-ids 20000 --output shards/synth   (once)
#   EFFECTIVE_BATCH_SIZE=512 bash scripts/presets/synthetic.sh [extra trainer flags]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec bash "$root/scripts/train.sh" --train-data "${SYNTH_SHARDS:-shards/synth}/train" --val-data "${SYNTH_SHARDS:-shards/synth}/val" \
  --val-frequency 1 --model ViT-B-16 --loss fastclip-v3 --epochs 30 --lr 5e-4 --wd 0.1 --warmup 500 \
  --precision amp_bf16 --local-loss --workers 8 --save-every-n-steps 1000 --report-to tensorboard "$@"
