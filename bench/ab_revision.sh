#!/usr/bin/env bash
# Runs one benchmark command on an older revision and on the working tree, alternately (old, new, old, new, ...), so
# both see the same machine state; prints each run's output under a header. Used for "no slowdown" checks:
#   bash bench/ab_revision.sh 8dfa563 2 -- bench/bench_data.py --shards shards/demo_synth/train --workers 0 2
# The working tree's command runs both times, from the working tree's root; only the library code differs: the older
# tree's src/ and root come first on PYTHONPATH for "old" (the editable install is bypassed).
set -euo pipefail
REV=$1; ROUNDS=$2; shift 2; [ "$1" = "--" ] && shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
OLD=$(mktemp -d /tmp/ab_rev.XXXXXX)
trap 'git -C "$ROOT" worktree remove --force "$OLD" >/dev/null 2>&1 || rm -rf "$OLD"' EXIT
git -C "$ROOT" worktree add --detach -f "$OLD" "$REV" >/dev/null 2>&1
for r in $(seq 1 "$ROUNDS"); do
  for side in old new; do
    tree=$([ $side = old ] && echo "$OLD" || echo "$ROOT")
    echo "=== round $r: $side ($([ $side = old ] && echo "$REV" || echo "working tree")) ==="
    (cd "$ROOT" && PYTHONPATH="$tree/src:$tree" "$PY" "$@")
  done
done
