#!/usr/bin/env bash
# Export a training run's image and text encoders to ONNX (dynamic batch) and check them against PyTorch with
# onnxruntime. See docs/EVAL.md, "Export to ONNX".
#   bash scripts/export_onnx.sh RUN_DIR [--epoch N] [--output DIR] [--opset 17] [--batch-check 3] [--atol 1e-4]
#   bash scripts/export_onnx.sh --pretrained FILE [--model NAME] [--image-size H W] --output DIR
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_python_env.sh"
exec "$PY" -m evaluation.export_onnx "$@"
