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
# The project itself, editable (src/ and data_prep/ as installed packages, console scripts fastclip-*); no deps: the
# pinned requirements above are the runtime.
if ! (cd / && "$root/.venv/bin/python" -c "import sys, training; sys.exit(training.__file__ != '$root/src/training/__init__.py')") 2>/dev/null \
    || [ ! -x .venv/bin/fastclip-train ] || [ ! -x .venv/bin/fastclip-export ]; then
  if ! .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . > .venv/pip-install-project.log 2>&1; then
    tail -20 .venv/pip-install-project.log >&2
    echo "[setup] error: installing the project (pip install -e .) failed; full log in .venv/pip-install-project.log" >&2
    exit 1
  fi
fi
.venv/bin/python -c "import torch, torchvision, open_clip, webdataset; print(f'[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, open_clip {open_clip.__version__}, webdataset {webdataset.__version__}')"
