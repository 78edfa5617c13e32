#!/usr/bin/env bash
# Launch src/training/main.py under torchrun with the per-process batch computed from the effective (global) batch.
#
#   EFFECTIVE_BATCH_SIZE=512 bash scripts/train.sh --train-data shards/synth/train --model ViT-B-16 ...
#
# Environment: EFFECTIVE_BATCH_SIZE (required), NPROC (processes per node; default: the number of CUDA_VISIBLE_DEVICES,
# else the GPUs nvidia-smi lists, else 1), NNODES (1), NODE_RANK (0; under srun: SLURM_PROCID), MASTER_ADDR
# (127.0.0.1), MASTER_PORT (single-node runs without it pick a free port; several nodes: 29500, under srun the job
# step's port of training/distributed.py step_port), MAX_RESTARTS (0: torchrun restarts the job this often, and the
# trainer resumes from latest.pt when --resume latest is passed), ACCUM_FREQ (1; open_clip's meaning: each process's
# share of the effective batch is taken as this many micro-batches, the trainer's --batch-size being one micro-batch;
# DGA keeps the gradient that of one pass over the whole batch, memory of one micro-batch), DRY_RUN=1 prints the
# command instead of running it.
# Every other argument is passed to the trainer unchanged; --batch-size is computed here and may not be given.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then py="$PYTHON"; elif [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi

die() { echo "train.sh: error: $*" >&2; exit 2; }
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }

[ -n "${EFFECTIVE_BATCH_SIZE:-}" ] || die "set EFFECTIVE_BATCH_SIZE, the global batch summed over all processes and nodes"
is_int "$EFFECTIVE_BATCH_SIZE" || die "EFFECTIVE_BATCH_SIZE='$EFFECTIVE_BATCH_SIZE' is not a whole number"
args=()
for a in "$@"; do
  case "$a" in
    --batch-size|--batch-size=*) die "do not pass --batch-size: it is EFFECTIVE_BATCH_SIZE / processes";;
    --accum-freq|--accum-freq=*) die "set ACCUM_FREQ instead of --accum-freq";;
    # torchrun would reject --logs as an abbreviation of its own --logs-specs.
    --logs) args+=(--logs-dir);;
    --logs=*) args+=("--logs-dir=${a#--logs=}");;
    *) args+=("$a");;
  esac
done

if [ -n "${NPROC:-}" ]; then
  nproc="$NPROC"
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  IFS=',' read -r -a devs <<< "$CUDA_VISIBLE_DEVICES"
  nproc="${#devs[@]}"
elif command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
  nproc="$(nvidia-smi -L | grep -c '^GPU')"
else
  nproc=1
fi
nnodes="${NNODES:-1}"; node_rank="${NODE_RANK:-0}"
is_int "$nproc" && [ "$nproc" -ge 1 ] || die "NPROC='$nproc' must be a whole number >= 1"
is_int "$nnodes" && [ "$nnodes" -ge 1 ] || die "NNODES='$nnodes' must be a whole number >= 1"
# Under srun every task runs this script: N tasks are N torchrun agents, one world only when they are its N nodes
if [ -n "${SLURM_STEP_ID:-}" ] && [ "${SLURM_NTASKS:-1}" -gt 1 ]; then
  [ "$nnodes" -eq "$SLURM_NTASKS" ] || die "srun started $SLURM_NTASKS tasks of train.sh, each a torchrun with" \
    "NNODES=$nnodes: they would train $SLURM_NTASKS separate worlds into one run folder. Run one train.sh per node" \
    "(srun --ntasks-per-node=1, NNODES=<nodes>, MASTER_ADDR=<first node>), or srun python src/training/main.py" \
    "(one task per GPU)"
  node_rank="${NODE_RANK:-$SLURM_PROCID}"
fi
is_int "$node_rank" && [ "$node_rank" -lt "$nnodes" ] || die "NODE_RANK='$node_rank' must be in 0..$((nnodes - 1))"
world=$((nproc * nnodes))
per=$((EFFECTIVE_BATCH_SIZE / world))
[ "$per" -ge 1 ] || die "EFFECTIVE_BATCH_SIZE=$EFFECTIVE_BATCH_SIZE is below 1 per process for $world processes ($nproc per node x $nnodes nodes)"
[ $((per * world)) -eq "$EFFECTIVE_BATCH_SIZE" ] || die "EFFECTIVE_BATCH_SIZE=$EFFECTIVE_BATCH_SIZE does not divide over $world processes ($nproc per node x $nnodes nodes); use a multiple of $world"

accum="${ACCUM_FREQ:-1}"
is_int "$accum" && [ "$accum" -ge 1 ] || die "ACCUM_FREQ='$accum' must be a whole number >= 1"
# open_clip's meaning: each process steps on ACCUM_FREQ micro-batches of --batch-size (DGA keeps the gradient exact)
micro=$((per / accum))
[ "$micro" -ge 1 ] && [ $((micro * accum)) -eq "$per" ] || die "ACCUM_FREQ=$accum does not divide the $per samples per process into whole micro-batches; use a divisor of $per"

# Static rendezvous (explicit address and port, a free one on a single node) rather than --standalone: one code path
# for one and several nodes. Restarts (MAX_RESTARTS > 0) work with both; see training/distributed.py for why the
# trainer prefixes the rendezvous store's keys per attempt.
port="${MASTER_PORT:-}"
if [ -z "$port" ]; then
  if [ "$nnodes" -eq 1 ]; then
    port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  elif [ -n "${SLURM_STEP_ID:-}" ]; then  # concurrent steps of one job must not meet: step_port's formula
    port=$((20000 + ${SLURM_JOB_ID:-0} % 750 * 16 + SLURM_STEP_ID % 16))
  else
    port=29500
  fi
fi
launch=("$py" -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "$nproc" --max-restarts "${MAX_RESTARTS:-0}"
        --node_rank "$node_rank" --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "$port")
cmd=("${launch[@]}" "$root/src/training/main.py" --batch-size "$micro" --accum-freq "$accum" ${args[@]+"${args[@]}"})
echo "train.sh: $world process(es) x batch $per = effective batch $EFFECTIVE_BATCH_SIZE$([ "$accum" -gt 1 ] && echo " ($accum micro-batches of $micro per process, DGA)")" >&2
# Flags and batch arithmetic are checked once here, before torchrun starts N processes that would each print the
# same error inside torchrun's failure report.
if ! check="$("$py" "$root/src/training/main.py" --check-args --batch-size "$micro" --accum-freq "$accum" \
                ${args[@]+"${args[@]}"} 2>&1)"; then
  echo "$check" | grep -v '^usage:\|^  ' >&2 || true
  exit 2
fi
if [ "${DRY_RUN:-0}" = "1" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
# torchrun ends a failed job with its own multi-line report, under which a rank's one-line `error:` would be buried:
# each rank also writes that line to $FASTCLIP_ERROR_FILE.rank<R>, and the lowest rank's is printed last here.
export FASTCLIP_ERROR_FILE="${TMPDIR:-/tmp}/fastclip-error-$$"
rm -f "$FASTCLIP_ERROR_FILE".rank*
"${cmd[@]}" &
child=$!
# Not exec'd any more, so pass a stop on (as SIGTERM: the trainer's graceful stop) and wait for the job to end.
trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
set +e
wait "$child"; rc=$?
while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done
set -e
if [ "$rc" -ne 0 ]; then
  # a rank's own `error:` line names the cause; the others' are often just the broken collective it left behind
  first="$(grep -l '^error:' "$FASTCLIP_ERROR_FILE".rank* 2>/dev/null | sort -t k -k 2 -n | head -1 || true)"
  [ -n "$first" ] || first="$(ls "$FASTCLIP_ERROR_FILE".rank* 2>/dev/null | sort -t k -k 2 -n | head -1 || true)"
  [ -n "$first" ] && echo "train.sh: rank ${first##*.rank} failed: $(cat "$first")" >&2
fi
rm -f "$FASTCLIP_ERROR_FILE".rank*
exit "$rc"
