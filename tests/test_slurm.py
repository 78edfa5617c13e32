"""srun launches: the SLURM variables form one world (a simulated 2-task srun on 127.0.0.1 trains exactly like
torchrun with 2 processes), node lists give the rendezvous host, and launches that would form separate worlds are
refused."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shard_fixtures import write_shards
from training.distributed import first_host, launcher_env

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "src" / "training" / "main.py")
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "WORLD_SIZE", "RANK",
                                                                   "LOCAL_RANK"))}
ENV.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")


@pytest.mark.parametrize("nodelist, first", [("gpu[03-05,07],cpu1", "gpu03"), ("node7", "node7"),
                                             ("a-b-[1-2]", "a-b-1"), ("n[010,012]", "n010"), ("", "")])
def test_first_host_of_a_node_list(nodelist, first):
    assert first_host(nodelist) == first


def test_launcher_env_rules():
    step = {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "4321", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    assert launcher_env(step) == (2, 4, 0, "tcp://gpu07:24321")
    assert launcher_env({**step, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})[3] == "tcp://10.0.0.1:1234"
    # the batch script itself (no srun step): one process, whatever --ntasks the allocation has
    assert launcher_env({k: v for k, v in step.items() if k != "SLURM_STEP_ID"}) == (0, 1, 0, None)
    # torchrun inside srun, one task per node: torchrun's world governs
    assert launcher_env({**step, "SLURM_NTASKS": "2", "WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1"}) == \
        (9, 16, 1, None)
    with pytest.raises(SystemExit, match="srun started 4 tasks but torchrun formed a world of 1"):
        launcher_env({**step, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _both_succeed_at_the_parameters_of(procs, reference, run) -> list[str]:
    """Wait for the two launched processes of one world, require both to succeed, and the run's final parameters to
    equal the reference run's bit for bit; returns their outputs."""
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    a = torch.load(reference / "checkpoints" / "epoch_1.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "epoch_1.pt", weights_only=True)
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=0, rtol=0, msg=k)
    return outs


@pytest.mark.slow
def test_simulated_two_task_srun_trains_like_torchrun(tmp_path):
    shards = write_shards(str(tmp_path / "d"), num_ids=8, shard_size=8)
    args = ["--train-data", shards["dir"], "--model", "PersonTiny", "--batch-size", "4", "--workers", "0",
            "--epochs", "1", "--logs-dir", str(tmp_path), "--warmup", "1", "--loss", "fastclip-v3", "--seed", "4"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", MAIN,
                        *args, "--name", "torchrun"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, MAIN, *args, "--name", "srun"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**ENV, "SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                                   "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "localhost",
                                   "MASTER_PORT": str(port)})
             for i in range(2)]
    outs = _both_succeed_at_the_parameters_of(procs, tmp_path / "torchrun", tmp_path / "srun")
    assert "| world 2 |" in outs[0]


@pytest.mark.slow
def test_two_nodes_of_train_sh_on_localhost_train_like_one_node(tmp_path):
    """scripts/train.sh with NNODES=2 (NODE_RANK 0 and 1, one process each, 127.0.0.1) forms one world of 2 and ends
    at the parameters of one node with NPROC=2."""
    shards = write_shards(str(tmp_path / "d"), num_ids=8, shard_size=8)
    args = ["--train-data", shards["dir"], "--model", "PersonTiny", "--workers", "0", "--epochs", "1",
            "--logs-dir", str(tmp_path), "--warmup", "1", "--loss", "fastclip-v3", "--seed", "6"]
    sh = str(ROOT / "scripts" / "train.sh")
    env = {**ENV, "EFFECTIVE_BATCH_SIZE": "8", "PYTHON": sys.executable}
    r = subprocess.run(["bash", sh, *args, "--name", "one"], env={**env, "NPROC": "2"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    port = _free_port()
    nodes = [subprocess.Popen(["bash", sh, *args, "--name", "two"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**env, "NPROC": "1", "NNODES": "2", "NODE_RANK": str(i),
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for i in range(2)]
    _both_succeed_at_the_parameters_of(nodes, tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_train_sh_prints_a_ranks_error_line_last_and_forwards_sigterm(tmp_path):
    """A failure after start: torchrun's multi-line report would bury the rank's `error:` line; train.sh prints it
    last. And train.sh no longer exec's torchrun, so a SIGTERM to it must still reach the trainer's graceful stop."""
    sh = str(ROOT / "scripts" / "train.sh")
    env = {**ENV, "EFFECTIVE_BATCH_SIZE": "8", "PYTHON": sys.executable, "NPROC": "1", "TMPDIR": str(tmp_path)}
    bad = write_shards(str(tmp_path / "bad"), num_ids=4, shard_size=8, corrupt={k: "bad_image" for k in range(16)})
    r = subprocess.run(["bash", sh, "--train-data", bad["dir"], "--model", "PersonTiny", "--workers", "0",
                        "--epochs", "1", "--logs-dir", str(tmp_path), "--name", "bad"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    last = r.stderr.rstrip().splitlines()[-1]
    assert last.startswith("train.sh: rank 0 failed: error: ") and "unusable" in last and "bad_image" in last, last
    assert not list(tmp_path.glob("fastclip-error-*"))  # the hand-over files are removed

    good = write_shards(str(tmp_path / "good"), num_ids=64, shard_size=64)
    import signal
    import time
    p = subprocess.Popen(["bash", sh, "--train-data", good["dir"], "--model", "PersonTiny", "--workers", "0",
                          "--epochs", "50", "--logs-dir", str(tmp_path), "--name", "stopped", "--log-every-n-steps",
                          "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "stopped" / "train_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count('"train"') >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    summary = __import__("json").loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["status"] == "stopped by SIGTERM", err[-2000:]
    assert (tmp_path / "stopped" / "checkpoints" / "latest.pt").is_file()
