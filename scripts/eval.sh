#!/usr/bin/env bash
# Evaluate a training run (or a weights file) on text-to-image person retrieval. See docs/EVAL.md.
#   bash scripts/eval.sh RUN_DIR [--data TEST_SHARDS ...] [--epoch N] [--allow-partial]
#   bash scripts/eval.sh --pretrained FILE [--model NAME] [--image-size H W] --data TEST_SHARDS ... --output DIR
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_python_env.sh"
exec "$PY" -m evaluation.evaluate "$@"
