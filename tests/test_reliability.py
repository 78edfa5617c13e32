"""Fault injection: corrupt shards, non-finite steps, failing disks, hostile checkpoint files, dying ranks."""
import json
import os
import pickle
import subprocess
import time
from pathlib import Path

import pytest
import torch

from shard_fixtures import write_shards
from test_training import ENV, MAIN, PY, ROOT, run_main

from common import runs


def _train_args(shards_dir, logs, name, *extra):
    return ["--train-data", shards_dir, "--model", "PersonTiny", "--batch-size", 8, "--workers", 2, "--epochs", 1,
            "--logs-dir", logs, "--name", name, "--warmup", 1, "--loss", "fastclip-v1", *extra]


@pytest.mark.slow
def test_corrupt_samples_are_counted_exactly_and_training_completes(tmp_path):
    # 128 pairs in 8 shards; faults in shards 0-5, shard 7 truncated in the middle.
    faults = {3: "bad_image", 20: "bad_image", 37: "bad_image", 50: "bad_image", 66: "bad_image", 90: "bad_image",
              5: "caption_not_utf8", 41: "caption_not_utf8", 12: "empty_caption", 77: "missing_json"}
    info = write_shards(str(tmp_path / "s"), num_ids=32, shard_size=16, corrupt=faults)
    last = Path(info["shards"][-1])
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    run_main(*_train_args(info["dir"], tmp_path, "faults"))
    summary = json.load(open(tmp_path / "faults" / "summary.json"))
    # the pairs not read are named: 10 unusable samples and the 7 pairs cut from shard 7 (refilled from the range)
    assert summary["status"] == ("finished: 17 of 128 pairs of the plan were not read (truncated_shard 7, bad_image 6, "
                                 "caption_not_utf8 2, empty_caption 1, missing_json 1)")
    assert summary["global_step"] == 128 // 8
    assert summary["data"]["0"]["read"] == 128 - 17 and summary["data"]["0"]["refilled"] == 17
    bad = summary["bad_samples"]
    assert bad.get("bad_image") == 6 and bad.get("caption_not_utf8") == 2
    assert bad.get("empty_caption") == 1 and bad.get("missing_json") == 1
    assert bad.get("truncated_shard") == 1
    log = (tmp_path / "faults" / "out.log").read_text()
    assert "skipped_bad_image" in (tmp_path / "faults" / "train_log.jsonl").read_text() or "bad_image" in log


@pytest.mark.slow
def test_shards_with_no_usable_sample_stop_with_a_clear_error(tmp_path):
    info = write_shards(str(tmp_path / "s"), num_ids=8, shard_size=16,
                        corrupt={k: "bad_image" for k in range(32)})
    t0 = time.time()
    r = subprocess.run([PY, MAIN, *map(str, _train_args(info["dir"], tmp_path, "dead"))], env=ENV,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode != 0
    assert "unusable" in r.stderr and "bad_image" in r.stderr and "verify" in r.stderr
    last = r.stderr.strip().splitlines()[-1]  # one error line, the worker's traceback left out
    assert last.startswith("error: rank 0 (reader") and "Traceback" not in r.stderr.split("error: ")[-1]
    assert time.time() - t0 < 120


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_repeated_ones_stop_the_run(tmp_path, monkeypatch):
    from fast_clip.losses import LossConfig, build_loss
    from fast_clip.model import create_model, get_tokenizer
    from training.main import main
    from training.optim import build_optimizer
    from training.objective import Objective, TrainModule
    from training.step import train_step

    torch.manual_seed(0)
    model = TrainModule(create_model("PersonTiny"))
    loss_fn = Objective(build_loss(LossConfig.from_name("openclip"), data_size=16, device=torch.device("cpu")))
    opt = build_optimizer(model, 1e-3, 0.1)
    tok = get_tokenizer("PersonTiny")
    batch = {"images": torch.full((4, 3, 64, 32), float("nan")), "texts": tok(["a"] * 4), "keys": torch.arange(4),
             "sources": torch.zeros(4, dtype=torch.long)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = train_step(model, loss_fn, opt, batch, torch.device("cpu"))
    assert out["skipped"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    # The trainer's loop on a loss that is never finite: 3 skipped steps, each warned about, then one checkpoint
    # of the state after them and the run stops.
    real_call = Objective.__call__

    def nan_loss(self, *a, **k):
        loss, metrics = real_call(self, *a, **k)
        return loss * float("nan"), metrics

    monkeypatch.setattr(Objective, "__call__", nan_loss)
    info = write_shards(str(tmp_path / "s"), num_ids=16, shard_size=16)
    args = _train_args(info["dir"], tmp_path, "nan", "--workers", 0, "--max-nonfinite-steps", 3, "--loss", "openclip")
    assert main(list(map(str, args))) == 3
    run = tmp_path / "nan"
    warnings = [l for l in (run / "out.log").read_text().splitlines() if "non-finite loss" in l]
    assert len(warnings) == 3
    assert sorted(os.listdir(run / "checkpoints")) == ["latest.pt"]  # saved once
    assert torch.load(run / "checkpoints" / "latest.pt", weights_only=True)["step"] == 3
    summary = json.load(open(run / "summary.json"))
    assert summary["status"] == "stopped: non-finite" and summary["nonfinite_total"] == 3


def test_failed_checkpoint_write_leaves_previous_valid(tmp_path, monkeypatch):
    d = str(tmp_path)
    runs.save_latest({"state_dict": {"w": torch.ones(3)}, "step": 1}, d)
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(runs.CheckpointError, match="^no space left on device while writing latest.pt; latest_prev.pt "
                                                   "is intact; free space and --resume latest$"):
        runs.save_latest({"state_dict": {"w": torch.zeros(3)}, "step": 2}, d)
    monkeypatch.setattr(torch, "save", real_save)
    assert not any(".tmp" in n for n in os.listdir(d))  # no half-written file left behind
    assert not os.path.exists(os.path.join(d, "latest.pt"))
    ckpt, path = runs.load_latest(d, warn=lambda m: None)
    assert path.endswith("latest_prev.pt") and ckpt["step"] == 1


@pytest.mark.slow
def test_unwritable_log_dir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a folder")
    info = write_shards(str(tmp_path / "s"), num_ids=4, shard_size=16)
    r = subprocess.run([PY, MAIN, *map(str, _train_args(info["dir"], blocker, "x"))], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not writable" in r.stderr


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_pickled_code_payload_is_refused_never_run(tmp_path):
    from fast_clip.model import create_model
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        torch.save({"state_dict": {"w": torch.ones(1)}, "extra": _Payload(marker)}, f)
    with pytest.raises(runs.CheckpointError, match="refusing"):
        runs.load(str(evil))
    with pytest.raises(runs.CheckpointError, match="refusing"):
        create_model("PersonTiny", pretrained=str(evil))
    assert not marker.exists()
    # Through the CLI: --resume with such a file stops with the message, and nothing ran.
    info = write_shards(str(tmp_path / "s"), num_ids=4, shard_size=16)
    r = subprocess.run([PY, MAIN, *map(str, _train_args(info["dir"], tmp_path, "r", "--resume", evil))], env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "refusing" in (r.stderr + r.stdout)
    assert not marker.exists()


def _restart_args(shards_dir, logs):
    return ["--train-data", shards_dir, "--model", "PersonTiny", "--batch-size", 4, "--workers", 1, "--epochs", 2,
            "--logs-dir", logs, "--warmup", 1, "--loss", "fastclip-v3", "--local-loss", "--save-every-n-steps", 2,
            "--resume", "latest"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run both restart tests must end at: the same job without a crash (one run for both rendezvous kinds)."""
    root = tmp_path_factory.mktemp("restart")
    info = write_shards(str(root / "s"), num_ids=32, shard_size=16)
    base = [PY, "-m", "torch.distributed.run", "--nnodes", "1", "--standalone", "--nproc_per_node", "2"]
    subprocess.run(base + [MAIN, *map(str, _restart_args(info["dir"], root)), "--name", "clean"], env=ENV, check=True,
                   capture_output=True, timeout=240)
    return info["dir"], root / "clean"


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["static", "standalone"])
def test_torchrun_restarts_a_dead_rank_and_resumes(tmp_path, rendezvous, uninterrupted):
    shards_dir, clean = uninterrupted
    common = _restart_args(shards_dir, tmp_path)
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Both rendezvous kinds: the static one is what scripts/train.sh uses. (Before the per-attempt store prefix in
    # training/distributed.py, restarted ranks could hang in init_process_group on stale keys of the dead attempt.)
    rdzv = (["--master_addr", "127.0.0.1", "--master_port", str(port)] if rendezvous == "static"
            else ["--standalone"])
    base = [PY, "-m", "torch.distributed.run", "--nnodes", "1", *rdzv, "--nproc_per_node", "2"]
    proc = subprocess.Popen(base + ["--max-restarts", "2", MAIN, *map(str, common), "--name", "crash"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = tmp_path / "crash" / "checkpoints" / "latest.pt"
    deadline = time.time() + 180
    while time.time() < deadline and not (latest.exists() and torch.load(latest, weights_only=True)["step"] >= 4):
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before a rank could be killed"
    # Kill one rank as an OOM killer would: a direct child of the torchrun agent (not one of its data workers, which
    # carry the same command line).
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert ranks, "no rank process found to kill"
    os.kill(int(ranks[-1]), 9)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out
    a = torch.load(clean / "checkpoints" / "epoch_2.pt", weights_only=True)
    b = torch.load(tmp_path / "crash" / "checkpoints" / "epoch_2.pt", weights_only=True)
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=0, rtol=0, msg=k)
    torch.testing.assert_close(b["loss"]["u1"], a["loss"]["u1"], atol=0, rtol=0)
