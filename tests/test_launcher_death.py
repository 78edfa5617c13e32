"""A SIGKILLed launcher leaves no rank behind: `kill -9 -PGID` of `bash scripts/train.sh` (a closed terminal, tmux,
a container stop) kills bash and torchrun, and torchrun's ranks, each in a session of its own, must stop as on
SIGTERM (finish the step, write latest.pt, release the run) instead of training on as orphans."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from shard_fixtures import write_shards
from test_training import ENV, PY, ROOT


def _last_step(log: Path) -> int:
    return max((json.loads(l)["step"] for l in open(log) if '"kind": "train"' in l), default=0)


def _ranks_of(run_name: str) -> list[int]:
    """pids of this run's ranks and their loader workers (their command line names the run; torchrun's too, but it
    is the launcher)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"src/training/main.py" in b" ".join(cmd) and run_name.encode() in cmd and b"--check-args" not in cmd \
                and b"torch.distributed.run" not in cmd:
            pids.append(int(d.name))
    return pids


@pytest.mark.slow
def test_ranks_stop_after_their_launcher_is_killed_and_the_run_resumes(tmp_path):
    info = write_shards(str(tmp_path / "shards"), num_ids=16, shard_size=16)  # 64 pairs
    name = f"orphan-{os.getpid()}"
    args = ["--train-data", info["dir"], "--model", "PersonTiny", "--workers", "1", "--epochs", "40",
            "--logs-dir", str(tmp_path / "logs"), "--name", name, "--warmup", "1", "--loss", "fastclip-v3",
            "--log-every-n-steps", "1"]
    env = {**ENV, "EFFECTIVE_BATCH_SIZE": "8", "NPROC": "2", "PYTHON": PY, "TMPDIR": str(tmp_path)}
    launcher = subprocess.Popen(["bash", str(ROOT / "scripts" / "train.sh"), *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = tmp_path / "logs" / name / "train_log.jsonl"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (log.exists() and _last_step(log) >= 3):
            assert launcher.poll() is None, "the run ended before the kill"
            time.sleep(0.05)
        ranks = _ranks_of(name)
        assert len(ranks) >= 2, ranks  # two ranks (and their loader workers)
        os.killpg(launcher.pid, signal.SIGKILL)  # bash and torchrun; the ranks live in sessions of their own
        steps_at_kill = _last_step(log)
        launcher.wait(timeout=10)
        deadline = time.time() + 60
        while time.time() < deadline and _ranks_of(name):
            time.sleep(0.1)
        assert _ranks_of(name) == [], "ranks outlived their launcher"
    finally:
        for pid in _ranks_of(name):  # never leave an orphan behind, whatever failed above
            os.kill(pid, signal.SIGKILL)
    summary = json.loads((tmp_path / "logs" / name / "summary.json").read_text())
    assert summary["status"] == "stopped by SIGTERM", summary
    saved = torch.load(tmp_path / "logs" / name / "checkpoints" / "latest.pt", weights_only=True)
    # the step in flight at the kill is finished and saved; no rank trains on past it (8 steps per epoch, 320 in all)
    assert steps_at_kill <= saved["step"] <= steps_at_kill + 2 < 320
    r = subprocess.run(["bash", str(ROOT / "scripts" / "train.sh"), *args, "--resume", "latest",
                        "--max-steps", str(saved["step"] + 4)], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(tmp_path / "logs" / name / "checkpoints" / "latest.pt",
                      weights_only=True)["step"] == saved["step"] + 4
