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
from training.distributed import (Rendezvous, disagreement, first_host, launcher_env, srun_threads,
                                  step_port)
from training.params import flag_values, parse_args
from training.slurm import requeue_after_stop, seconds

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
    assert launcher_env(step) == (2, 4, 0, Rendezvous("gpu07", step_port(4321, 0), "fastclip/job4321.step0"))
    assert launcher_env({**step, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})[3][:2] == ("10.0.0.1", 1234)
    # the batch script itself (no srun step): one process, whatever --ntasks the allocation has
    assert launcher_env({k: v for k, v in step.items() if k != "SLURM_STEP_ID"}) == (0, 1, 0, None)
    # torchrun inside srun, one task per node: torchrun's world governs
    assert launcher_env({**step, "SLURM_NTASKS": "2", "WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1"}) == \
        (9, 16, 1, None)
    assert launcher_env({**step, "SLURM_NTASKS": "2", "WORLD_SIZE": "16", "RANK": "9", "LOCAL_RANK": "1",
                         "GROUP_WORLD_SIZE": "2"}) == (9, 16, 1, None)
    with pytest.raises(SystemExit, match="srun started 4 tasks but each runs a torchrun with --nnodes 4 .a world of 1"):
        launcher_env({**step, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})


def test_srun_around_torchruns_that_are_not_its_nodes_is_refused():
    """srun -n 2 around a 2-process torchrun (--nnodes 1): two worlds of 2, whose second used to fail on the run lock
    after both had started; refused at launch, naming the fix."""
    env = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "9",
           "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1"}
    with pytest.raises(SystemExit, match=r"^error: srun started 2 tasks .* --nnodes 1 .*--nnodes 2$"):
        launcher_env(env)


def test_each_step_of_a_job_has_its_own_port():
    ports = {step_port(job, s) for job in (1, 77, 4321, 10 ** 7 + 3) for s in range(16)}
    assert len(ports) == 4 * 16  # no two steps of these jobs (nor of one job) share a port
    assert all(20000 <= p < 32768 for p in ports)  # below Linux's ephemeral range
    base = {"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1"}
    a, b = (launcher_env({**base, "SLURM_STEP_ID": s})[3] for s in ("0", "1"))
    assert a.port != b.port and a.tag != b.tag


@pytest.mark.parametrize("env, threads", [
    ({}, None),  # not under srun: torch's default (torchrun sets its own)
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "1"}, None),
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "2"}, 1),  # torchrun's rule for several per node
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "2(x2),1", "SLURM_NODEID": "2"}, None),
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "1,3", "SLURM_NODEID": "1"}, 1),
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "6"}, 6),
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "2", "OMP_NUM_THREADS": "3"}, None),  # theirs stands
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_TASKS_PER_NODE": "2", "WORLD_SIZE": "2"}, None),  # torchrun decides
])
def test_srun_ranks_get_torchruns_threads(env, threads):
    assert srun_threads(env) == threads


def test_a_disagreement_names_the_flags_and_the_ranks():
    same = {"--lr": 1e-05, "--name": None, "--epochs": 2}
    assert disagreement([same, {**same, "--lr": 0.01}, same]) == "ranks disagree on --lr (rank 0: 1e-05, rank 1: 0.01)"
    assert disagreement([same, same, {**same, "--epochs": 3, "--name": "x"}]) == \
        "ranks disagree on --name (rank 0: None, rank 2: 'x'), --epochs (rank 0: 2, rank 2: 3)"
    assert disagreement([same, {"--lr": 1e-05, "--name": None}]) == \
        "ranks disagree on --epochs (rank 0: 2, rank 1: <absent>)"


def test_flag_values_are_keyed_by_the_flags_users_type():
    values = flag_values(parse_args(["--train-data", "x", "--lr", "0.5", "--temperature_scheme", "global_learnable"]))
    assert values["--lr"] == 0.5 and values["--train-data"] == "x"
    assert values["--temperature_scheme"] == "global_learnable"
    assert "step_batch_size" not in values and "loss_config" not in values  # folded from flags compared already


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


def _sigterm_after_two_steps(p: subprocess.Popen, log: Path) -> None:
    """SIGTERM to ``p`` once its train_log.jsonl holds two training steps (or after 120 s)."""
    import signal
    import time
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count('"train"') >= 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)


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
    p = subprocess.Popen(["bash", sh, "--train-data", good["dir"], "--model", "PersonTiny", "--workers", "0",
                          "--epochs", "50", "--logs-dir", str(tmp_path), "--name", "stopped", "--log-every-n-steps",
                          "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "stopped" / "train_log.jsonl"
    _sigterm_after_two_steps(p, log)
    _, err = p.communicate(timeout=120)
    summary = __import__("json").loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["status"] == "stopped by SIGTERM", err[-2000:]
    assert (tmp_path / "stopped" / "checkpoints" / "latest.pt").is_file()


def fake_scontrol(folder: Path, shown: str) -> Path:
    """An executable `scontrol` that records each call's arguments in FOLDER/scontrol.calls and answers `show job`
    with ``shown`` (CI has no SLURM)."""
    folder.mkdir(parents=True, exist_ok=True)
    calls = folder / "scontrol.calls"
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n[ "$1" = show ] && echo "{shown}"\nexit 0\n')
    script.chmod(0o755)
    return calls


NEAR_THE_LIMIT = "JobId=77 JobName=t JobState=RUNNING Reason=None Requeue=1 Restarts=0 RunTime=00:58:10 " \
                 "TimeLimit=01:00:00 TimeMin=N/A"


@pytest.mark.parametrize("shown, requeued", [
    (NEAR_THE_LIMIT, True),
    (NEAR_THE_LIMIT.replace("Requeue=1", "Requeue=0"), False),  # not submitted with --requeue
    (NEAR_THE_LIMIT.replace("RUNNING", "CANCELLED"), False),  # scancel: its SIGTERM must not requeue
    (NEAR_THE_LIMIT.replace("RunTime=00:58:10", "RunTime=00:10:00"), False),  # a SIGTERM far from the limit
    (NEAR_THE_LIMIT.replace("TimeLimit=01:00:00", "TimeLimit=UNLIMITED"), False),
])
def test_a_stop_near_the_time_limit_requeues_the_job(tmp_path, monkeypatch, shown, requeued):
    calls = fake_scontrol(tmp_path / "bin", shown)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    said = []
    requeue_after_stop(said.append)
    assert calls.read_text().splitlines() == ["show job -o 77"] + (["requeue 77"] if requeued else [])
    assert said[0].startswith("SLURM job 77 requeued" if requeued else "SLURM job 77 not requeued: "), said


@pytest.mark.parametrize("text, secs", [("00:01:00", 60), ("1-02:03:04", 93784), ("03:04", 184),
                                        ("UNLIMITED", None), ("", None)])
def test_slurm_durations(text, secs):
    assert seconds(text) == secs


def _srun_env(ntasks: int, procid: int, job: int, step: int, **extra) -> dict:
    """The variables srun gives task ``procid`` of a step on this one node (127.0.0.1 stands in for the node)."""
    return {**ENV, "SLURM_NTASKS": str(ntasks), "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid),
            "SLURM_NODEID": "0", "SLURM_STEP_ID": str(step), "SLURM_JOB_ID": str(job),
            "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_STEP_TASKS_PER_NODE": str(ntasks), **extra}


def _tiny_run(tmp_path, seed=4) -> list[str]:
    shards = write_shards(str(tmp_path / "d"), num_ids=8, shard_size=8)
    return ["--train-data", shards["dir"], "--model", "PersonTiny", "--batch-size", "4", "--workers", "0",
            "--epochs", "1", "--logs-dir", str(tmp_path / "logs"), "--warmup", "1", "--seed", str(seed)]


def _free_job_id() -> int:
    """A job id whose first two steps' derived ports are free here."""
    for job in range(1000, 1750):
        try:
            for step in (0, 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", step_port(job, step)))
            return job
        except OSError:
            continue
    pytest.skip("no free pair of step ports")


@pytest.mark.slow
def test_two_steps_of_one_job_started_at_once_form_two_worlds(tmp_path):
    """Two concurrent srun steps of one job (a sweep), 2 tasks each, no MASTER_PORT: before, both met at 20000 + job
    id, and one step's rank 0 failed with 'address already in use' while its rank 1 joined the other world."""
    args, job = _tiny_run(tmp_path), _free_job_id()
    procs = [subprocess.Popen([sys.executable, MAIN, *args, "--name", f"step{step}", "--lr", f"{step + 1}e-4"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_srun_env(2, rank, job, step))
             for step in (0, 1) for rank in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n----\n".join(o[-1500:] for o in outs)
    for step in (0, 1):
        assert "| world 2 |" in outs[2 * step]
        assert (tmp_path / "logs" / f"step{step}" / "checkpoints" / "epoch_1.pt").is_file()


@pytest.mark.slow
def test_ranks_given_different_flags_are_refused_with_one_line(tmp_path):
    """A world whose ranks run different flags (another step's rank mixed in, a launch that varies them per rank)
    stops on every rank with one line naming the flag and the ranks, before the run folder is created."""
    args, port = _tiny_run(tmp_path), _free_port()
    procs = [subprocess.Popen([sys.executable, MAIN, *args, "--name", "mixed", "--lr", lr], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_srun_env(2, rank, 5, 0, MASTER_PORT=str(port)))
             for rank, lr in enumerate(("1e-5", "1e-2"))]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode != 0 and "Traceback" not in err, err[-2000:]
        last = err.rstrip().splitlines()[-1]
        assert last.startswith("error: ranks disagree on --lr (rank 0: 1e-05, rank 1: 0.01): "), err[-2000:]
        assert len([line for line in err.splitlines() if "error" in line]) == 1, err[-2000:]
    assert not (tmp_path / "logs").exists()  # nothing written that a correct start would not write


@pytest.mark.slow
def test_the_time_limit_warning_requeues_the_job(tmp_path):
    """SIGTERM under a requeueable SLURM job near its time limit: latest.pt, then rank 0 runs `scontrol requeue`
    (a fake one records the call), so SLURM runs the job again and --resume latest continues it; before, the job
    exited 0 and SLURM recorded it COMPLETED."""
    calls = fake_scontrol(tmp_path / "bin", NEAR_THE_LIMIT)
    shards = write_shards(str(tmp_path / "d"), num_ids=64, shard_size=64)
    env = {**ENV, "SLURM_JOB_ID": "77", "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    p = subprocess.Popen([sys.executable, MAIN, "--train-data", shards["dir"], "--model", "PersonTiny", "--workers",
                          "0", "--epochs", "50", "--logs-dir", str(tmp_path), "--name", "rq", "--log-every-n-steps",
                          "1", "--batch-size", "8"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    log = tmp_path / "rq" / "train_log.jsonl"
    _sigterm_after_two_steps(p, log)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out[-2000:]
    assert (tmp_path / "rq" / "checkpoints" / "latest.pt").is_file()
    assert calls.read_text().splitlines() == ["show job -o 77", "requeue 77"]
    assert "SLURM job 77 requeued (time-limit warning)" in (tmp_path / "rq" / "out.log").read_text()


@pytest.mark.slow
def test_srun_of_several_train_sh_that_are_not_its_nodes_is_refused(tmp_path):
    """srun -n 2 around scripts/train.sh: two torchruns, two worlds, and the second used to fail on the run lock
    after both had started; refused at once with one line, last."""
    r = subprocess.run(["bash", str(ROOT / "scripts" / "train.sh"), "--train-data", "x", "--name", "n"],
                       env={**_srun_env(2, 1, 5, 0), "EFFECTIVE_BATCH_SIZE": "8", "PYTHON": sys.executable},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.rstrip().splitlines()[-1].startswith("train.sh: error: srun started 2 tasks of train.sh"), r.stderr
    assert r.stdout == ""


@pytest.mark.slow
def test_srun_around_train_sh_one_per_node_ends_with_the_trainers_error_line(tmp_path):
    """srun -n 2 --ntasks-per-node 1 around scripts/train.sh with NNODES=2 (both 'nodes' on 127.0.0.1): each task
    takes its node rank from SLURM_PROCID and the port of its job step, the two form one world, and each task's last
    line is the trainer's error (what srun shows above its own 'task N: Exited with exit code' line). Before, both
    tasks were node 0."""
    bad = write_shards(str(tmp_path / "bad"), num_ids=4, shard_size=8, corrupt={k: "bad_image" for k in range(16)})
    job = _free_job_id()
    tasks = [subprocess.Popen(["bash", str(ROOT / "scripts" / "train.sh"), "--train-data", bad["dir"], "--model",
                               "PersonTiny", "--workers", "0", "--epochs", "1", "--logs-dir", str(tmp_path),
                               "--name", "bad"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**_srun_env(2, i, job, 0), "EFFECTIVE_BATCH_SIZE": "8", "NPROC": "1",
                                   "NNODES": "2", "PYTHON": sys.executable, "TMPDIR": str(tmp_path)})
             for i in range(2)]
    results = [t.communicate(timeout=300) for t in tasks]
    for i, (t, (_, err)) in enumerate(zip(tasks, results)):
        assert t.returncode != 0
        last = err.rstrip().splitlines()[-1]
        assert last.startswith(f"train.sh: rank {i} failed: error: ") and "unusable" in last, err[-3000:]


SBATCH_SCRIPTS = sorted((ROOT / "scripts" / "slurm").glob("*.sbatch"))


def _fake_srun(folder: Path, body: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "srun").write_text(f"#!/bin/bash\n{body}\n")
    (folder / "srun").chmod(0o755)
    return {**ENV, "PATH": f"{folder}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_ID": "42",
            "SLURM_JOB_NAME": "t", "PYTHON": sys.executable}


@pytest.mark.slow
@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_launch_flags_the_trainer_accepts(tmp_path, script):
    """The documented sbatch scripts (run by bash with a fake srun that checks the command it is given): their
    #SBATCH lines come before the first command, and the trainer accepts their flags plus the ones passed on."""
    lines = script.read_text().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert any(line.startswith("#SBATCH --signal=TERM@") and "--requeue" in line for line in lines[:first_command])
    assert not any(line.startswith("#SBATCH") for line in lines[first_command:])
    env = _fake_srun(tmp_path / "bin", 'exec "$@" --check-args')
    r = subprocess.run(["bash", str(script), "--lr", "1e-4"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "flags OK", r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_scripts_pass_a_sigterm_on_to_the_step(tmp_path, script):
    """--signal=B:TERM@N signals the batch shell only, and srun takes a SIGTERM as 'cancel the step' (seen on SLURM
    22.05: the ranks were killed, no latest.pt, the job FAILED): the script has the ranks signalled instead (scancel
    --signal=TERM, faked here: it signals the fake srun) and ends with srun's exit status."""
    import signal
    import time
    pid, calls = tmp_path / "srun.pid", tmp_path / "scancel.calls"
    env = _fake_srun(tmp_path / "bin", f'trap \'echo TERM >> "{calls}"; exit 7\' TERM\necho $$ > "{pid}"\n'
                                       f'while true; do sleep 0.1; done')
    (tmp_path / "bin" / "scancel").write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\nkill -TERM "$(cat {pid})"\n')
    (tmp_path / "bin" / "scancel").chmod(0o755)
    p = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and not pid.is_file():
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)
    assert calls.read_text().splitlines() == ["--signal=TERM 42", "TERM"] and p.returncode == 7


def test_a_taken_rendezvous_port_is_one_error_line():
    """Another job on the node holds the step's port (or MASTER_PORT was exported to two steps at once): rank 0 stops
    with one line naming the address and the way out, not torch's traceback."""
    from training.distributed import _step_store
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(SystemExit, match=rf"^error: rank 0: the rendezvous at 127.0.0.1:{port} failed \(.*\); "
                                             r"another process .* export MASTER_PORT=") as e:
            _step_store(Rendezvous("127.0.0.1", port, "fastclip/job1.step0"), 0, 2)
    assert "\n" not in str(e.value.code)
