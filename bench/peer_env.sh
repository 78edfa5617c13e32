#!/usr/bin/env bash
# Isolated environment for the peer trainer of bench/bench_train.py: open_clip's own trainer `open_clip_train`
# (shipped inside the open_clip_torch 3.3.0 wheel), which needs webdataset <= 0.2.86 while our trainer uses 1.0.2.
#
#   bash bench/peer_env.sh [VENV_DIR]        (default: bench/.peer_venv, git-ignored)
#   PYTHON=/path/to/python3.11 bash bench/peer_env.sh
#
# Same torch / torchvision as our .venv so both trainers run the same kernels. pip uses whatever indexes are
# configured (pip.conf / PIP_* variables). Re-running on an existing venv only installs what is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/bench/.peer_venv}"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1; then PY="$(command -v "$c")"; break; fi
  done
fi
[[ -n "$PY" ]] || { echo "error: no python3 found; set PYTHON=/path/to/python3.11" >&2; exit 1; }

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating $VENV with $PY ($("$PY" --version 2>&1))"
  "$PY" -m venv "$VENV"
fi

# open_clip_train imports: webdataset, braceexpand, pandas, fsspec (data.py / file_utils.py); tqdm, ftfy, regex,
# timm, huggingface-hub, safetensors come with open_clip_torch; tensorboard only for --report-to tensorboard
# (installed so the peer can log like ours). wandb / horovod / transformers are not needed for this benchmark.
"$VENV/bin/python" -m pip install --quiet \
  "torch==2.14.1" "torchvision==0.29.1" "open_clip_torch==3.3.0" "webdataset==0.2.86" \
  "braceexpand>=0.1.7" "pandas>=2.0" "fsspec>=2023.1" "tensorboard>=2.14"

# Verify: the exact versions, and that the peer trainer's entry point parses its flags.
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
want = {"torch": "2.14.1", "torchvision": "0.29.1", "open_clip_torch": "3.3.0", "webdataset": "0.2.86"}
got = {k: md.version(k) for k in want}
bad = {k: v for k, v in got.items() if not v.startswith(want[k])}
print("peer env:", ", ".join(f"{k} {v}" for k, v in got.items()))
if bad:
    raise SystemExit(f"error: unexpected versions {bad}")
import torch
print("torch cuda:", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
EOF
"$VENV/bin/python" -m open_clip_train.main --help >/dev/null
echo "ok: $VENV/bin/python -m open_clip_train.main works"
