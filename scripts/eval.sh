#!/usr/bin/env bash
# Evaluate a training run (or a weights file) on text-to-image person retrieval. See docs/EVAL.md.
#   bash scripts/eval.sh RUN_DIR [--data TEST_SHARDS ...] [--epoch N]
#   bash scripts/eval.sh --pretrained FILE --model NAME [--image-size H W] --data TEST_SHARDS ... --output DIR
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "$ROOT/.venv/bin/python" ]]; then
    PY="$ROOT/.venv/bin/python"
else
    PY="python3"
fi
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m evaluation.evaluate "$@"
