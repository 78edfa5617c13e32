#!/usr/bin/env bash
# Create .venv and install the pinned requirements (idempotent: skipped when the requirement files are unchanged).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PYTHON_BIN="${PYTHON_BIN:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $("$PYTHON_BIN" --version 2>&1)"
  "$PYTHON_BIN" -m venv .venv
fi
want="$(cat requirements-training.txt requirements-eval.txt | sha256sum | cut -d' ' -f1)"
have="$(cat .venv/.requirements.sha256 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
  echo "[setup] installing pinned requirements (torch 2.14.1, torchvision 0.29.1, open_clip_torch 3.3.0, webdataset 1.0.2) ..."
  if ! .venv/bin/python -m pip install -q -r requirements-eval.txt > .venv/pip-install.log 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" .venv/pip-install.log | tail -30 >&2
    echo "[setup] error: pip install failed; full log in .venv/pip-install.log" >&2
    exit 1
  fi
  echo "$want" > .venv/.requirements.sha256
fi
.venv/bin/python -c "import torch, torchvision, open_clip, webdataset; print(f'[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, open_clip {open_clip.__version__}, webdataset {webdataset.__version__}')"
