"""SLURM's side of a graceful stop: a job stopped by its time-limit warning goes back to the queue.

With ``#SBATCH --signal=TERM@120`` SLURM sends SIGTERM two minutes before the time limit; the trainer finishes its
step and writes latest.pt (training/stop.py), exits 0, and SLURM would record the job COMPLETED, so ``--requeue``
alone never brings it back. Rank 0 therefore asks ``scontrol requeue`` itself, once latest.pt is written, when SLURM
says the job may be requeued (Requeue=1), is still RUNNING (``scancel`` makes it CANCELLED first) and is within
:data:`WARNING_WINDOW_S` of its time limit (a SIGTERM from elsewhere, such as torchrun stopping the ranks that
survive a crash, must not loop the job). The requeued job runs the same script: ``--resume latest`` continues it.
"""
from __future__ import annotations

import os
import re
import subprocess

WARNING_WINDOW_S = 900  # the longest --signal=TERM@N lead honoured, in seconds


def job_fields(text: str) -> dict:
    """``scontrol show job -o`` output as a dict: 'JobState=RUNNING Requeue=1 ...' -> {'JobState': 'RUNNING', ...}."""
    return dict(re.findall(r"(\S+?)=(\S*)", text))


def seconds(t: str) -> int | None:
    """A SLURM duration ('1-02:03:04', '02:03:04', '03:04') in seconds; None for UNLIMITED and the like."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", t or "")
    if not m:
        return None
    d, h, mi, s = (int(g or 0) for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def requeue_reason(fields: dict) -> str | None:
    """Why the job is not to be requeued after a stop (None: requeue it)."""
    if fields.get("Requeue") != "1":
        return "the job may not be requeued (submit it with --requeue)"
    if fields.get("JobState") != "RUNNING":
        return f"the job is {fields.get('JobState', 'in an unknown state')} (scancel, not a time limit)"
    limit, ran = seconds(fields.get("TimeLimit", "")), seconds(fields.get("RunTime", ""))
    if limit is None or ran is None or limit - ran > WARNING_WINDOW_S:
        return (f"the time limit is not near (RunTime {fields.get('RunTime')}, TimeLimit {fields.get('TimeLimit')}): "
                f"the stop did not come from the time-limit warning")
    return None


def requeue_after_stop(log) -> None:
    """(rank 0, after a stop by SIGTERM with latest.pt written) Requeue this SLURM job when the stop is its time-limit
    warning; ``log`` says what was done and why."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
        reason = requeue_reason(job_fields(shown.stdout)) if shown.returncode == 0 else \
            f"scontrol show job failed: {shown.stderr.strip()}"
        if reason is None:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
            reason = None if done.returncode == 0 else f"scontrol requeue failed: {done.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        reason = f"scontrol could not be run ({e})"
    if reason is None:
        log(f"SLURM job {job} requeued (time-limit warning): it will continue from latest.pt with --resume latest")
    else:
        log(f"SLURM job {job} not requeued: {reason}")
