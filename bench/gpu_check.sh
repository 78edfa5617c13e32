#!/usr/bin/env bash
# Every GPU figure of the project in ONE command on the GPU machine (no network there): installs the carried wheels
# (bench/gpu_wheels.sh made them) into two package targets, ours and open_clip_train's, then runs bench/gpu_check.py:
# env, shards, CUDA tests, trainer throughput vs open_clip_train, torch.compile, loss-only and DGA benches, each step
# under its own hard time limit, results written as each step ends, one summary table last. 9 minutes at most.
#
#   bash bench/gpu_check.sh                 # on the GPU machine; results to $OUT, else bench/results/gpu/
#   bash bench/gpu_check.sh --cpu-smoke     # the same steps on CPU, tiny (the test suite runs this)
#   bash bench/gpu_check.sh --total 480 --budget compile=0 ...   (see python bench/gpu_check.py --help)
#
# Environment: PYTHON (default python3; with --cpu-smoke .venv/bin/python when present), WHEELS / PEER_WHEELS (default
# .whl and .whl_peer), SITE (default /tmp/gpu_check_site: where the targets go).
set -uo pipefail
export GPU_CHECK_T0="$(date +%s.%N)"   # the total time limit counts from here, the install included
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
smoke=0
for arg in "$@"; do [[ "$arg" == "--cpu-smoke" ]] && smoke=1; done
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  [[ $smoke == 1 && -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
WHEELS="${WHEELS:-$ROOT/.whl}"
PEER_WHEELS="${PEER_WHEELS:-$ROOT/.whl_peer}"
SITE="${SITE:-/tmp/gpu_check_site}"

shopt -s nullglob
ours=("$WHEELS"/*.whl)
peer_extra=("$PEER_WHEELS"/*.whl)
if (( ${#ours[@]} == 0 || ${#peer_extra[@]} == 0 )); then
  echo "error: no wheels in $WHEELS or $PEER_WHEELS: run 'bash bench/gpu_wheels.sh' on a machine with package access" \
       "and carry both folders (bench/README.md)" >&2
  exit 2
fi
# The peer's target: the same wheels but its own webdataset (0.2.86 instead of our 1.0.2).
peer=("${peer_extra[@]}")
for w in "${ours[@]}"; do [[ "$(basename "$w")" == webdataset-* ]] || peer+=("$w"); done

install() {  # TARGET WHEEL...
  local target="$1"; shift
  rm -rf "$target"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$target" "$@" 2>&1 | grep -v "is ignored: it is neither a file nor a directory"
  return "${PIPESTATUS[0]}"
}
t=$(date +%s.%N)
install "$SITE/ours" "${ours[@]}" || { echo "error: pip could not install ${ours[*]} into $SITE/ours" >&2; exit 2; }
install "$SITE/peer" "${peer[@]}" || { echo "error: pip could not install ${peer[*]} into $SITE/peer" >&2; exit 2; }
echo "[gpu_check] installed ${#ours[@]} wheels into $SITE/ours and ${#peer[@]} into $SITE/peer in" \
     "$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s with $("$PYTHON" --version 2>&1)"

# the carried wheels, then this checkout's packages (nothing is installed on the GPU machine)
export PYTHONPATH="$SITE/ours:$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export GPU_CHECK_PEER_SITE="$SITE/peer"
export PYTHONUNBUFFERED=1
out="${OUT:-$ROOT/bench/results/gpu}"
mkdir -p "$out"
# Everything printed also goes to gpu_check.log beside the results (only the end of the console may come back).
"$PYTHON" bench/gpu_check.py "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
