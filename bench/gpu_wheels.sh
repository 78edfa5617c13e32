#!/usr/bin/env bash
# Download, on a machine with package access, the wheels that the GPU machine lacks, for bench/gpu_check.sh.
#
#   bash bench/gpu_wheels.sh              # -> .whl/ (our trainer) and .whl_peer/ (open_clip_train's webdataset)
#   WHEELS=DIR PEER_WHEELS=DIR bash bench/gpu_wheels.sh
#
# The GPU machine (one H200, Python 3.12, x86-64, no network) already has torch 2.11, torchvision 0.26, timm, numpy,
# pandas, pillow, fsspec, tensorboard, pytest, tqdm, regex, huggingface_hub, safetensors, pyyaml, onnx, onnxruntime,
# matplotlib (the device library's KINDS.md lists its image). It lacks open_clip_torch, webdataset, braceexpand, ftfy
# and wcwidth. open_clip_train (the peer, inside the open_clip_torch wheel) needs webdataset 0.2.86 instead of our
# 1.0.2, so that one wheel goes to its own folder and gpu_check.sh installs the two sets into separate targets.
# Both folders are git-ignored; carry them with the run (bench/README.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${WHEELS:-$ROOT/.whl}"
PEER_WHEELS="${PEER_WHEELS:-$ROOT/.whl_peer}"
PY="${PYTHON:-python3}"

# Versions: ours as pinned in requirements-training.txt; the small pure-Python helpers at versions known to work.
OURS=(open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.9.4)
PEER=(webdataset==0.2.86)
# What the GPU machine's image holds (names as in Requires-Dist, lower case, '-' for '_'); anything a carried wheel
# requires that is neither here nor carried is reported below as missing.
ON_GPU_MACHINE="torch torchvision timm numpy pandas pillow fsspec tensorboard pytest tqdm regex huggingface-hub
safetensors pyyaml onnx onnxruntime onnxscript matplotlib requests aiohttp packaging typing-extensions filelock"

download() {  # DEST SPEC...
  local dest="$1"; shift
  rm -rf "$dest"; mkdir -p "$dest"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

download "$WHEELS" "${OURS[@]}"
download "$PEER_WHEELS" "${PEER[@]}"

# Check: every requirement of every carried wheel is either carried or on the GPU machine.
"$PY" - "$WHEELS" "$PEER_WHEELS" "$ON_GPU_MACHINE" <<'EOF'
import re, sys, zipfile
from pathlib import Path
dirs, have = [Path(d) for d in sys.argv[1:3]], set(sys.argv[3].split())
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
carried = {norm(p.name.split("-")[0]) for d in dirs for p in d.glob("*.whl")}
missing = set()
for d in dirs:
    for whl in sorted(d.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
        for r in reqs:
            if "extra ==" in r:
                continue
            name = norm(re.match(r"[A-Za-z0-9_.-]+", r).group(0))
            if name not in carried and name not in have:
                missing.add(f"{name} (needed by {whl.name})")
if missing:
    sys.exit("error: not carried and not on the GPU machine: " + ", ".join(sorted(missing)) +
             "; add them to OURS in bench/gpu_wheels.sh")
EOF

total=$(du -cb "$WHEELS"/*.whl "$PEER_WHEELS"/*.whl | tail -1 | cut -f1)
echo "ours ($WHEELS):"; ls -1 "$WHEELS"
echo "peer ($PEER_WHEELS):"; ls -1 "$PEER_WHEELS"
echo "total $(awk -v b="$total" 'BEGIN{printf "%.2f MiB", b/1048576}') to carry (the device run carries at most 64 MiB)"
