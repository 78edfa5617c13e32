"""common/runs.py, the run folder's contract: epoch-file scanning, the one safe loader and its one-line errors, the
one unwrap rule, and the resolution of a run folder vs a checkpoint vs a weights file."""
import io
import json
import os

import pytest
import torch

from common import runs
from common.runs import CheckpointError


def _touch(d, *names):
    for n in names:
        (d / n).write_bytes(b"x")


def test_epoch_files_take_only_the_names_the_trainer_writes(tmp_path):
    _touch(tmp_path, "epoch_1.pt", "epoch_10.pt", "epoch_2.pt", "epoch_0.pt", "latest.pt", "latest_prev.pt",
           "epoch_x.pt", "epoch_1.pt.tmp", ".epoch_3.pt.tmp.123", "epoch_01.pt", "epoch_-1.pt", "epoch_.pt",
           "epoch_1.pth", "my_epoch_4.pt", "epoch_\u00b2.pt")
    (tmp_path / "epoch_5.pt").mkdir()  # a folder is not a checkpoint
    found = runs.epoch_files(str(tmp_path))
    assert list(found) == [0, 1, 2, 10]
    assert found[10] == str(tmp_path / "epoch_10.pt")
    assert runs.epoch_files(str(tmp_path / "nowhere")) == {}
    # resume candidates: newest first, epoch files by number (not by name: 10 before 2)
    assert [os.path.basename(p) for p in runs.candidates(str(tmp_path))] == \
        ["latest.pt", "latest_prev.pt", "epoch_10.pt", "epoch_2.pt", "epoch_1.pt", "epoch_0.pt"]
    assert runs.keep_last_epochs(str(tmp_path), 2) == ["epoch_0.pt", "epoch_1.pt"]
    assert list(runs.epoch_files(str(tmp_path))) == [2, 10]
    assert (tmp_path / "epoch_x.pt").exists() and (tmp_path / "epoch_1.pt.tmp").exists()  # junk left alone
    assert runs.keep_last_epochs(str(tmp_path), 0) == []


def _one_line_error(path, match) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        runs.load_file(str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_loader_says_in_one_line_why_a_file_cannot_be_used(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("garbage, as after a torn write")
    assert "not a PyTorch file" in _one_line_error(text, "cannot read")
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, buf)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(buf.getvalue()[:600])
    _one_line_error(torn, "cannot read")
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "extra": _Payload(marker)}, evil)
    msg = _one_line_error(evil, "refusing to load")
    assert "system" in msg and "weights_only" in msg  # names what was refused
    assert not marker.exists()
    (tmp_path / "empty.pt").write_bytes(b"")
    _one_line_error(tmp_path / "empty.pt", "empty")
    _one_line_error(tmp_path / "missing.pt", "does not exist")
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        runs.load(str(tmp_path / "plain.pt"))
    assert torch.equal(runs.load_file(str(tmp_path / "plain.pt"))["w"], torch.ones(2))


def test_one_unwrap_rule_for_open_clip_ours_ddp_and_plain_state_dicts():
    w, b = torch.ones(2), torch.zeros(3)
    plain = {"visual.w": w, "text.b": b}
    for obj in (plain,  # a weights file
                {"state_dict": plain, "model_name": "PersonTiny", "image_size": [64, 32], "optimizer": {}},  # ours
                {"epoch": 3, "name": "x", "state_dict": {f"module.{k}": v for k, v in plain.items()}},  # open_clip DDP
                {f"module.{k}": v for k, v in plain.items()}):
        sd = runs.model_state(obj, "f.pt")
        assert list(sd) == ["visual.w", "text.b"] and sd["visual.w"] is w
    mixed = {"module.a": w, "b": b}  # not a DDP dict: a parameter may be named module.*
    assert list(runs.model_state(mixed, "f.pt")) == ["module.a", "b"]
    for bad in ({}, {"state_dict": {"w": 1}}, [w], {"w": w, "step": 3}):
        with pytest.raises(CheckpointError, match="f.pt.* holds no state dict of tensors"):
            runs.model_state(bad, "f.pt")
    assert runs.trained_model({"state_dict": plain, "model_name": "M", "image_size": [4, 2]}) == ("M", [4, 2])
    assert runs.trained_model(plain) is None


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    (run / runs.CHECKPOINTS).mkdir(parents=True)
    for e in (1, 3):
        torch.save({"state_dict": {"w": torch.ones(1)}, "model_name": "PersonTiny", "image_size": [64, 32],
                    "epoch": e}, run / runs.CHECKPOINTS / runs.epoch_name(e))
    runs.write_json(str(run / runs.PARAMS), {"model": "PersonTiny", "image_size": [64, 32], "train_data": "x"})
    return run


def test_resolution_of_a_run_folder(run_dir):
    w = runs.resolve(str(run_dir), None)
    assert (w.path, w.model, w.image_size, w.epoch) == (str(run_dir / "checkpoints" / "epoch_3.pt"), "PersonTiny",
                                                         (64, 32), 3)
    assert w.run_dir == str(run_dir) and w.params["train_data"] == "x"
    w = runs.resolve(str(run_dir), None, epoch=1, model="Other", image_size=(96, 32))
    assert (os.path.basename(w.path), w.model, w.image_size, w.epoch) == ("epoch_1.pt", "Other", (96, 32), 1)
    with pytest.raises(CheckpointError, match=r"no epoch_7.pt \(available epochs: 1, 3\)"):
        runs.resolve(str(run_dir), None, epoch=7)
    with pytest.raises(CheckpointError, match="does not exist"):
        runs.resolve(str(run_dir / "nope"), None)
    with pytest.raises(CheckpointError, match="is a file; give a checkpoint .* as --pretrained"):
        runs.resolve(str(run_dir / runs.PARAMS), None)
    (run_dir / runs.PARAMS).write_text("{not json")
    with pytest.raises(CheckpointError, match="params.json.* is not readable JSON"):
        runs.resolve(str(run_dir), None)
    (run_dir / runs.PARAMS).write_text(json.dumps({"image_size": [64, 32]}))
    with pytest.raises(CheckpointError, match="has no 'model' entry"):
        runs.resolve(str(run_dir), None)
    (run_dir / runs.PARAMS).unlink()
    with pytest.raises(CheckpointError, match="has no params.json"):
        runs.resolve(str(run_dir), None)


def test_resolution_of_a_checkpoint_and_of_a_weights_file(run_dir, tmp_path):
    ckpt = str(run_dir / "checkpoints" / "epoch_1.pt")
    w = runs.resolve(None, ckpt)  # one of ours: it says its model, size and epoch
    assert (w.path, w.model, w.image_size, w.epoch, w.run_dir) == (ckpt, "PersonTiny", (64, 32), 1, None)
    assert runs.resolve(None, ckpt, image_size=[128, 64]).image_size == (128, 64)
    weights = tmp_path / "open_clip.pt"
    torch.save({"epoch": 32, "state_dict": {"module.w": torch.ones(1)}}, weights)
    with pytest.raises(CheckpointError, match="not a checkpoint of this trainer .*give --model NAME"):
        runs.resolve(None, str(weights))
    w = runs.resolve(None, str(weights), model="ViT-B-16")  # a named architecture: the file is not read here
    assert (w.path, w.model, w.image_size, w.epoch) == (str(weights), "ViT-B-16", None, None)
    (tmp_path / "notes.pt").write_text("garbage")
    with pytest.raises(CheckpointError, match="not a checkpoint of this trainer .*not a PyTorch file"):
        runs.resolve(None, str(tmp_path / "notes.pt"))
    for args, match in (((str(run_dir), ckpt), "either RUN_DIR or --pretrained FILE, not both"),
                        ((None, None), "nothing to do"),
                        ((None, str(tmp_path / "nope.pt")), "--pretrained .*nope.pt' does not exist")):
        with pytest.raises(CheckpointError, match=match):
            runs.resolve(*args, model="M")
    with pytest.raises(CheckpointError, match="--epoch .* does not apply to --pretrained"):
        runs.resolve(None, ckpt, epoch=1)
    with pytest.raises(CheckpointError, match=r"image size \[64\] \(--image-size\) is not \[H, W\]"):
        runs.resolve(None, ckpt, model="M", image_size=[64])


def test_json_files_are_written_whole(tmp_path):
    path = str(tmp_path / runs.SUMMARY)
    runs.write_json(path, {"status": "finished", "n": 3, "when": tmp_path})
    assert runs.read_json(path) == {"status": "finished", "n": 3, "when": str(tmp_path)}
    assert os.listdir(tmp_path) == [runs.SUMMARY]  # no temporary file left
