#!/usr/bin/env bash
# Set up the environment and run the test suite (CPU; multi-process tests use torchrun with gloo).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
# One thread per process: the suite runs 2-process torchrun jobs on a 2-core machine.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q tests "$@"
