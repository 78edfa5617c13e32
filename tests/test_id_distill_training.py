"""The identity head and the reference model inside the trainer: DDP equivalence, checkpoint/resume, init-from-ref
and distillation wiring."""
import json

import pytest
import torch

from fast_clip.model import create_model
from test_training import MAIN, ROOT, assert_same_training, run_main, tiny_shards, torchrun  # noqa: F401 (fixture)


ARCFACE = ["--id-loss", "arcface", "--id-loss-weight", "0.5", "--arcface-margin", "0.3"]
# IRRA's linear head at 5x the lr, with identity-aware positives (pid = key // 4: same persons across the two ranks)
LINEAR_IDS = ["--id-loss", "linear", "--id-loss-weight", "0.5", "--id-head-lr-mult", "5", "--id-positives"]


@pytest.mark.slow
# (DGA replays a head's gradient the same way whichever head it is: the linear case covers it for both)
@pytest.mark.parametrize("base,extra", [(ARCFACE, ["--arcface-subcenters", "2"]), (LINEAR_IDS, ["--accum-freq", "2"])],
                         ids=["arcface-subcenters", "linear-id-aware-dga"])
def test_id_head_two_processes_equal_one_process(tmp_path, base, extra):
    worker = str(ROOT / "tests" / "dist_train_worker.py")
    sub = extra if "--arcface-subcenters" in extra else []
    torchrun(1, worker, tmp_path / "one.pt", "fastclip-v3", "--float64", *base, *sub)   # reference: one process
    torchrun(2, worker, tmp_path / "two.pt", "fastclip-v3", "--float64", *base, *extra)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    plain = create_model("PersonTiny").state_dict()
    assert_same_training(one, two, parts=("model", "id_head", "loss"))
    assert set(one["model"]) == set(plain)  # the head is not inside the open_clip state dict


@pytest.mark.slow
def test_id_loss_run_logs_it_and_resumes_with_the_head(tmp_path, tiny_shards):
    common = ["--train-data", tiny_shards["dir"], "--model", "PersonTiny", "--batch-size", 8, "--workers", 1,
              "--epochs", 1, "--logs-dir", tmp_path, "--warmup", 1, "--log-every-n-steps", 1, "--loss", "openclip",
              "--id-loss", "arcface", "--arcface-subcenters", 2]
    run_main(*common, "--name", "full")
    run_main(*common, "--name", "cut", "--max-steps", 3)
    run_main(*common, "--name", "cut", "--resume", "latest")
    full = torch.load(tmp_path / "full" / "checkpoints" / "epoch_1.pt", weights_only=True)
    cut = torch.load(tmp_path / "cut" / "checkpoints" / "epoch_1.pt", weights_only=True)
    assert full["id_head"]["weight"].shape == (tiny_shards["ids"] * 2, 128)
    torch.testing.assert_close(cut["id_head"]["weight"], full["id_head"]["weight"], rtol=0, atol=0)
    for k, v in full["state_dict"].items():
        torch.testing.assert_close(cut["state_dict"][k], v, rtol=0, atol=0)
    logs = [json.loads(l) for l in open(tmp_path / "full" / "train_log.jsonl") if '"train"' in l]
    assert all("id_loss" in r and "id_acc_img" in r and "id_acc_txt" in r for r in logs)


@pytest.mark.slow
def test_reference_model_init_distill_and_locked_temperature(tmp_path, tiny_shards):
    torch.manual_seed(123)
    teacher = create_model("PersonTiny")
    ref = tmp_path / "teacher.pt"
    torch.save({"state_dict": teacher.state_dict()}, ref)
    run_main("--train-data", tiny_shards["dir"], "--model", "PersonTiny", "--batch-size", 8, "--workers", 1,
             "--epochs", 1, "--logs-dir", tmp_path, "--name", "kd", "--warmup", 1, "--log-every-n-steps", 1,
             "--ref-model", "PersonTiny", "--ref-pretrained", ref, "--distill", "feature", "--distill-weight", 0.3,
             "--init-from-ref", "--lock-logit-scale", "--max-steps", 2)
    report = json.load(open(tmp_path / "kd" / "init_from_ref.json"))
    assert set(teacher.state_dict()) <= set(report["copied"]) and not report["shape_mismatch"]
    logs = [json.loads(l) for l in open(tmp_path / "kd" / "train_log.jsonl") if '"train"' in l]
    assert logs and all(r["distill_loss"] >= 0 for r in logs)
    # the first step starts from the teacher's weights: distillation loss 0 (same features), then it moves
    assert logs[0]["distill_loss"] < 1e-10
    ck = torch.load(tmp_path / "kd" / "checkpoints" / "latest.pt", weights_only=True)
    torch.testing.assert_close(ck["state_dict"]["logit_scale"], teacher.state_dict()["logit_scale"])


def test_reference_flags_are_checked(tmp_path, capsys):
    from training.params import parse_args
    for argv, flag in ((["--distill", "feature"], "--ref-model"),
                       (["--ref-model", "PersonTiny"], "--ref-pretrained"),
                       (["--ref-model", "PersonTiny", "--ref-pretrained", str(tmp_path / "nope.pt")], "--ref-pretrained"),
                       (["--id-loss", "arcface", "--arcface-subcenters", "0"], "--arcface-subcenters"),
                       (["--id-loss", "arcface", "--mixup-beta", "1"], "--mixup-beta")):
        with pytest.raises(SystemExit):
            parse_args(["--train-data", "x", *argv])
        assert flag in capsys.readouterr().err
