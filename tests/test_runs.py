"""Run folders: a reused --name is refused, two live processes never write one run, fatal errors are recorded in the
run's own folder, and SIGTERM (pre-emption) under 2-process torchrun stops cleanly and resumes bit-identically."""
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shard_fixtures import write_shards

from common import runs

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "src" / "training" / "main.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("runs")), num_ids=16, shard_size=16)


def _common(shards, logs, name, *extra):
    return ["--train-data", shards["dir"], "--model", "PersonTiny", "--batch-size", "8", "--workers", "0",
            "--epochs", "1", "--logs-dir", str(logs), "--name", name, "--warmup", "1", "--loss", "fastclip-v3",
            *map(str, extra)]


def _hashes(d):
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.slow  # a whole training run
def test_a_reused_name_is_refused_and_the_old_run_is_untouched(shards, tmp_path, capsys):
    from training.main import main

    assert main(_common(shards, tmp_path, "r1", "--max-steps", 2)) == 0
    before = _hashes(tmp_path / "r1")
    with pytest.raises(SystemExit, match="already holds a run .*--resume latest"):
        main(_common(shards, tmp_path, "r1"))
    assert _hashes(tmp_path / "r1") == before
    assert main(_common(shards, tmp_path, "r1", "--resume", "latest")) == 0  # continuing it is allowed


def test_two_live_processes_never_write_one_run(shards, tmp_path):
    from training.main import main

    run = tmp_path / "busy"
    run.mkdir()
    with open(run / ".lock", "a+") as held:  # another process's lock (a separate open file: flock conflicts)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242@elsewhere")
        held.flush()
        with pytest.raises(SystemExit, match=r"another live process \(pid 4242@elsewhere\) is writing"):
            main(_common(shards, tmp_path, "busy"))
    assert main(_common(shards, tmp_path, "busy", "--max-steps", 1)) == 0  # released: the run starts


def test_a_fatal_error_is_recorded_in_the_run_and_a_failed_start_keeps_the_name_free(shards, tmp_path):
    from training.main import main

    with pytest.raises(SystemExit, match="--val-data"):
        main(_common(shards, tmp_path, "bad", "--val-data", str(tmp_path / "nowhere")))
    log = (tmp_path / "bad" / "out.log").read_text()
    assert "FATAL error: --val-data" in log
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["status"] == "failed" and "--val-data" in summary["error"]
    assert main(_common(shards, tmp_path, "bad", "--max-steps", 1)) == 0  # nothing trained: the name is free


@pytest.mark.slow
def test_val_data_is_validated_at_each_epoch_end_through_the_callable_main_builds(shards, tmp_path):
    from training.main import main

    test = write_shards(str(tmp_path / "val"), split="test", num_ids=4, seed=3)
    assert main(_common(shards, tmp_path, "val", "--val-data", test["dir"], "--val-frequency", "1")) == 0
    log = (tmp_path / "val" / "out.log").read_text()
    assert "val val epoch 1: " in log and "epoch 1 done" in log.split("val val epoch 1: ")[0]  # after the checkpoint
    records = [json.loads(l) for l in open(tmp_path / "val" / "train_log.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "val_val"] == [8]


def _final(run):
    return torch.load(run / "checkpoints" / "epoch_3.pt", weights_only=True)


@pytest.mark.slow
def test_sigterm_under_torchrun_saves_and_resumes_bit_identically(shards, tmp_path):
    args = ["--train-data", shards["dir"], "--model", "PersonTiny", "--batch-size", "4", "--workers", "1",
            "--epochs", "3", "--logs-dir", str(tmp_path), "--warmup", "1", "--loss", "fastclip-v3",
            "--log-every-n-steps", "1", "--seed", "5"]
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", MAIN]
    r = subprocess.run(run + args + ["--name", "full"], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    proc = subprocess.Popen(run + args + ["--name", "term"], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "term" / "train_log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and sum(1 for _ in open(log)) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal"
    proc.send_signal(signal.SIGTERM)  # to the torchrun agent, which passes it to both workers
    out, _ = proc.communicate(timeout=240)
    summary = json.loads((tmp_path / "term" / "summary.json").read_text())
    assert summary["status"] == "stopped by SIGTERM", out[-3000:]
    saved = torch.load(tmp_path / "term" / "checkpoints" / "latest.pt", weights_only=True)
    assert 3 <= saved["step"] < 24  # stopped mid-run, after a finished step
    r = subprocess.run(run + args + ["--name", "term", "--resume", "latest"], env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _final(tmp_path / "full"), _final(tmp_path / "term")
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=0, rtol=0, msg=k)
    for k, v in a["loss"].items():
        if torch.is_tensor(v):
            torch.testing.assert_close(b["loss"][k], v, atol=0, rtol=0, msg=k)


@pytest.mark.slow  # a whole training run
def test_keep_last_k_and_weights_only_epoch_files_still_evaluate_and_resume(shards, tmp_path):
    from evaluation.evaluate import load_model
    from training.main import main

    common = _common(shards, tmp_path, "k", "--keep-last-k", 2, "--epoch-weights-only")
    common[common.index("--epochs") + 1] = "3"
    assert main(common) == 0
    ck = tmp_path / "k" / "checkpoints"
    assert sorted(p.name for p in ck.glob("epoch_*.pt")) == ["epoch_2.pt", "epoch_3.pt"]
    small = torch.load(ck / "epoch_3.pt", weights_only=True)
    full = torch.load(ck / "latest.pt", weights_only=True)
    assert "optimizer" not in small and "loss" not in small and small["epoch"] == 3
    assert (ck / "epoch_3.pt").stat().st_size < (ck / "latest.pt").stat().st_size / 2
    model = load_model("PersonTiny", str(ck / "epoch_3.pt"), (64, 32), "cpu")
    for k, v in full["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=0, rtol=0)
    # resume takes only checkpoints that can resume: past weights-only epoch files
    assert runs.load_latest(str(ck))[1].endswith("latest.pt")
    (ck / "latest.pt").unlink()
    (ck / "latest_prev.pt").unlink(missing_ok=True)
    with pytest.raises(runs.CheckpointError, match=r"only epoch_3.pt \(weights only\), epoch_2.pt \(weights only\)"):
        runs.load_latest(str(ck))
    assert runs.load_latest(str(tmp_path / "nowhere")) is None


@pytest.mark.parametrize("flag,value,saved", [("--loss", "isogclr", "fastclip-v3"), ("--data_size", "500", "64"),
                                              ("--fastclip_rules", "exact", "official")])
def test_resuming_with_another_loss_setting_is_one_error_line_naming_the_flag(shards, tmp_path, flag, value, saved):
    """The checkpoint records the settings its loss state depends on: another rule set (official u is stored in units
    of exp(-bound), which the exact rules misread) is refused like another loss or table size."""
    from training.main import main

    assert main(_common(shards, tmp_path, "r", "--max-steps", 2)) == 0
    args = _common(shards, tmp_path, "r", "--resume", "latest")
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    with pytest.raises(SystemExit) as e:
        main(args)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    assert f"{flag}: the loss state was written with {flag} {saved}, this run has {flag} {value}" in msg, msg


def test_pretrained_of_another_architecture_is_one_error_line(tmp_path, capsys):
    from evaluation.evaluate import main as eval_main
    from fast_clip.model import create_model

    sd = create_model("PersonTiny").state_dict()
    sd["positional_embedding"] = torch.zeros(40, 64)  # a text tower of another width
    torch.save(sd, tmp_path / "other.pt")
    with pytest.raises(runs.CheckpointError, match="does not fit model .*is --model the architecture"):
        create_model("PersonTiny", pretrained=str(tmp_path / "other.pt"))
    test = write_shards(str(tmp_path / "d"), split="test", num_ids=4, shard_size=8)
    capsys.readouterr()
    assert eval_main(["--pretrained", str(tmp_path / "other.pt"), "--model", "PersonTiny", "--data",
                      test["dir"], "--output", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error:") and "does not fit model" in err
    assert "Traceback" not in err


def test_load_for_open_clip_gives_the_trained_size_weights_and_preprocessing(shards, tmp_path):
    import open_clip
    from PIL import Image

    from fast_clip.model import load_for_open_clip
    from common.transforms import build_transform
    from training.main import main

    assert main(_common(shards, tmp_path, "oc", "--max-steps", 2)) == 0
    path = tmp_path / "oc" / "checkpoints" / "latest.pt"
    model, preprocess, tokenizer = load_for_open_clip(path)
    assert isinstance(model, open_clip.CLIP) and not model.training
    saved = torch.load(path, weights_only=True)
    for k, v in saved["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[k], v, atol=0, rtol=0)
    img = Image.new("RGB", (50, 120), (200, 30, 30))
    x = preprocess(img)
    assert x.shape == (3, 64, 32) and torch.equal(x, build_transform((64, 32), train=False)(img))
    with torch.no_grad():
        assert model.encode_image(x[None]).shape == (1, 128) and model.encode_text(tokenizer(["a man"])).shape == (1, 128)
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(runs.CheckpointError, match="not a checkpoint of this trainer"):
        load_for_open_clip(tmp_path / "plain.pt")


def test_open_clip_flags_lock_towers_and_map_or_refuse(shards, tmp_path):
    from fast_clip.model import create_model
    from training.main import main
    from training.params import parse_args
    from common.seeding import Stream, rng_seed

    torch.manual_seed(rng_seed(Stream.MODEL_INIT, 0))  # what main() seeds before it builds the model
    init = create_model("PersonTiny").state_dict()
    for flag, frozen, trained in (("--lock-image", "visual.", "transformer."), ("--lock-text", "transformer.",
                                                                               "visual.")):
        name = flag.strip("-")
        assert main(_common(shards, tmp_path, name, flag, "--max-steps", 2)) == 0
        sd = torch.load(tmp_path / name / "checkpoints" / "latest.pt", weights_only=True)["state_dict"]
        assert all(torch.equal(sd[k], init[k]) for k in sd if k.startswith(frozen))
        assert any(not torch.equal(sd[k], init[k]) for k in sd if k.startswith(trained))
    a = parse_args(["--train-data", "x", "--force-image-size", "96", "--precision", "amp_bfloat16"])
    assert a.model.image_size == (96, 96) and a.optim.precision == "amp_bf16"
    for argv, msg in ((["--precision", "amp"], "use amp_bf16"), (["--dataset-resampled"], "--train-data-weights")):
        with pytest.raises(SystemExit):
            parse_args(["--train-data", "x", *argv])


def test_nothing_of_the_trainer_is_left_for_the_interpreters_teardown(shards, tmp_path):
    """main() frees the trainer (whose components refer to each other) before it destroys the process group: left to
    the interpreter's teardown, a DDP rank's gloo threads ended mid-finalisation and the rank aborted after a finished
    run (exit -6, "terminate called without an active exception"; 3 of the slow tier's torchrun tests in one CI run).
    The cycle collector is off here, so only main's own collection can free the trainer."""
    import gc
    from training.main import main
    from training.trainer import Trainer

    gc.collect()
    gc.disable()
    try:
        assert main(_common(shards, tmp_path, "teardown", "--max-steps", 1)) == 0
        left = [o for o in gc.get_objects() if type(o) is Trainer]
    finally:
        gc.enable()
    assert left == []
