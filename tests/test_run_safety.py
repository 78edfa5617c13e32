"""What a start or a checkpoint may do to a run folder: a refused resume changes nothing, --resume latest never starts
afresh over checkpoints it cannot use, no run file is written through a planted symbolic link, and a full disk is one
line that says so. (Issue #25.)"""
import errno
import hashlib
import os

import pytest
import torch

from shard_fixtures import write_shards

from common import runs
from common.runs import CheckpointError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return {"a": write_shards(str(root / "a"), num_ids=16, shard_size=16),
            "b": write_shards(str(root / "b"), num_ids=8, shard_size=16, seed=5)}


def _args(data, logs, name, *extra):
    return ["--train-data", data["dir"], "--model", "PersonTiny", "--batch-size", "8", "--workers", "0", "--epochs",
            "1", "--logs-dir", str(logs), "--name", name, "--warmup", "1", "--loss", "fastclip-v1", *map(str, extra)]


def _refused(argv) -> str:
    from training.main import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def _state_files(run):
    """params.json, summary.json and every checkpoint, by content."""
    files = [run / runs.PARAMS, run / runs.SUMMARY, *sorted((run / runs.CHECKPOINTS).iterdir())]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.slow  # a whole training run or a process of its own
def test_a_refused_resume_leaves_params_summary_and_checkpoints_byte_identical(shards, tmp_path):
    from training.main import main

    assert main(_args(shards["a"], tmp_path, "r", "--max-steps", 3)) == 0
    run = tmp_path / "r"
    before = _state_files(run)
    msg = _refused(_args(shards["b"], tmp_path, "r", "--resume", "latest", "--image-size", 96, 48))
    assert "latest.pt" in msg
    assert _state_files(run) == before  # eval.sh RUN still reads the settings the checkpoints were written with
    assert runs.read_params(str(run))["image_size"] == [64, 32]


@pytest.mark.slow  # a whole training run or a process of its own
def test_resume_latest_over_only_weights_only_epoch_files_is_refused_and_deletes_nothing(shards, tmp_path):
    from training.main import main

    assert main(_args(shards["a"], tmp_path, "w", "--epoch-weights-only")) == 0
    ck = tmp_path / "w" / runs.CHECKPOINTS
    for n in (runs.LATEST, runs.LATEST_PREV):
        (ck / n).unlink(missing_ok=True)
    before = _state_files(tmp_path / "w")
    msg = _refused(_args(shards["a"], tmp_path, "w", "--resume", "latest", "--epochs", 3, "--keep-last-k", 1))
    assert "holds no checkpoint that can resume, only epoch_1.pt (weights only)" in msg and "--name" in msg
    assert _state_files(tmp_path / "w") == before  # nothing trained, keep-last-k deleted nothing
    (ck / runs.LATEST).write_bytes(b"torn")  # a corrupt latest.pt beside it: named too
    msg = _refused(_args(shards["a"], tmp_path, "w", "--resume", "latest", "--epochs", 3))
    assert "latest.pt (unreadable), epoch_1.pt (weights only)" in msg


@pytest.mark.slow  # a whole training run or a process of its own
def test_resume_latest_of_a_new_name_says_so_and_lists_the_runs_there(shards, tmp_path, capsys):
    from training.main import main

    assert main(_args(shards["a"], tmp_path, "mine", "--max-steps", 1)) == 0
    capsys.readouterr()
    assert main(_args(shards["a"], tmp_path, "mnie", "--resume", "latest", "--max-steps", 1)) == 0
    out = capsys.readouterr().out
    assert f"there is no run named 'mnie' under {tmp_path} yet; starting it fresh (runs there: mine;" in out, out


@pytest.mark.parametrize("name", [runs.LOCK, runs.OUT_LOG, runs.TRAIN_LOG, runs.PARAMS, runs.SUMMARY, "tmp"])
def test_run_files_are_never_written_through_a_planted_link(shards, tmp_path, name):
    from training.main import main

    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    run = tmp_path / "r"
    run.mkdir()
    # "tmp": the temporary file params.json is first written to
    link = run / (f".{runs.PARAMS}.tmp.{os.getpid()}" if name == "tmp" else name)
    link.symlink_to(target)
    argv = _args(shards["a"], tmp_path, "r", "--max-steps", 1)
    if name in runs.IN_PLACE:  # appended to or truncated in place: refused
        msg = _refused(argv)
        assert "symbolic link" in msg and name in msg
    else:  # replaced by a rename: the link goes, its target stays
        assert main(argv) == 0
        assert not (run / runs.PARAMS).is_symlink() and runs.read_params(str(run))["model"] == "PersonTiny"
    assert target.read_text() == "keep me"


def _fill_disk_after(monkeypatch, nbytes: int):
    """The real torch.save, on a file that reports ENOSPC after ``nbytes`` (torch turns that into 'unexpected pos')."""
    real = torch.save

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > nbytes:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real(obj, Full(f), *a, **k))


def _checkpointer(d, epoch_weights_only=False):
    from training.checkpoint import Checkpointer

    model = torch.nn.Linear(64, 64)
    return Checkpointer(str(d), {"state_dict": model}, lambda: {"step": 1}, epoch_weights_only=epoch_weights_only)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_latest_prev_still_loads(tmp_path, monkeypatch):
    ck = _checkpointer(tmp_path)
    ck.save()
    ck.save()
    _fill_disk_after(monkeypatch, 2000)
    with pytest.raises(SystemExit) as e:
        ck.save()
    assert e.value.code == ("error: no space left on device while writing latest.pt; latest_prev.pt is intact; free "
                            "space and --resume latest")
    assert runs.load(str(tmp_path / runs.LATEST_PREV))["step"] == 1
    assert sorted(os.listdir(tmp_path)) == [runs.LATEST_PREV]  # no temporary file left
    monkeypatch.undo()
    ck.save()
    _fill_disk_after(monkeypatch, 2000)
    monkeypatch.setattr("training.checkpoint.save_latest", lambda obj, d: None)  # latest.pt written, epoch file not
    with pytest.raises(SystemExit, match=r"^error: no space left on device while writing epoch_1.pt; latest.pt "
                                         r"\(this step\) is intact; free space and --resume latest$"):
        _checkpointer(tmp_path).save(epoch_file=1)
    assert runs.load(str(tmp_path / runs.LATEST))["step"] == 1


def test_old_checkpoints_without_the_loss_record_still_load_unless_their_tables_show_other_rules():
    from fast_clip.losses import LossConfig, build_loss

    official = build_loss(LossConfig.from_name("fastclip-v2"), data_size=8).checkpoint_component()
    saved = official.state_dict()
    assert saved["settings"]["--fastclip_rules"] == "official"
    del saved["settings"]  # as written before the record
    exact = build_loss(LossConfig.from_name("fastclip-v2", fastclip_rules="exact"), data_size=8).checkpoint_component()
    exact.load_state_dict(saved)  # all-zero bounds: u is unshifted, the same under both rule sets
    saved["bound1"] = torch.full((8,), 3.0)  # only the official rules shift: u is in units of exp(-bound)
    with pytest.raises(CheckpointError, match="--fastclip_rules: the loss state was written with --fastclip_rules "
                                              "official .*this run has --fastclip_rules exact"):
        exact.load_state_dict(saved)
    official.load_state_dict(saved)
