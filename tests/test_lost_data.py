"""Data the plan expects is data the run reads, or the run says so: shards lost during an epoch, a sizes.json that
disagrees with its shards, and a make_shards split that lacks shards of its listing (issue #25).

Tiny in-process runs on CPU (no loader workers, one reader and a small shuffle buffer, so that shards are opened one
after the other as the steps go): a hook after the first steps deletes shards the run has not opened yet."""
import json
import os

import pytest

from shard_fixtures import write_shards

from common import shards
from training import trainer as trainer_mod
from training.main import main


pytestmark = pytest.mark.slow  # every test here is a (tiny) whole training run


def _args(spec, logs, name, *extra):
    return [str(a) for a in ("--train-data", spec, "--model", "PersonTiny", "--batch-size", 8, "--workers", 0,
                             "--shuffle-buffer", 4, "--data-readers", 1, "--epochs", 1, "--logs-dir", logs, "--name", name,
                             "--warmup", 1, "--loss", "fastclip-v1", *extra)]


def _delete_unopened_after_first_step(monkeypatch, paths, how_many):
    """After step 1, delete ``how_many`` of ``paths`` that no reader has opened yet; returns the deleted list."""
    opened, deleted = set(), []
    real_iter, real_step = shards.iter_samples, trainer_mod.train_step

    def iter_samples(url, *a, **k):
        opened.add(os.path.basename(url))
        return real_iter(url, *a, **k)

    def train_step(*a, **k):
        if not deleted:
            gone = [p for p in paths if os.path.basename(p) not in opened][:how_many]
            assert len(gone) == how_many, "the run opened too many shards before its first step"
            for p in gone:
                os.remove(p)
            deleted.extend(gone)
        return real_step(*a, **k)

    monkeypatch.setattr(shards, "iter_samples", iter_samples)
    monkeypatch.setattr(trainer_mod, "train_step", train_step)
    return deleted


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def test_a_local_shard_deleted_mid_epoch_is_one_error_naming_it_and_latest_pt_is_written(tmp_path, monkeypatch):
    info = write_shards(str(tmp_path / "s"), num_ids=32, shard_size=16)  # 128 pairs in 8 shards
    deleted = _delete_unopened_after_first_step(monkeypatch, info["shards"], 4)
    with pytest.raises(SystemExit) as e:
        main(_args(info["dir"], tmp_path, "local"))
    msg = str(e.value)
    assert msg.startswith("error: --train-data shard ") and "no longer exists" in msg and "\n" not in msg
    assert any(msg.startswith(f"error: --train-data shard {p} ") for p in deleted)
    assert (tmp_path / "local" / "checkpoints" / "latest.pt").is_file()
    assert _summary(tmp_path / "local")["status"] == "stopped: data error"


def test_remote_shards_lost_mid_epoch_are_counted_in_pairs_and_trip_the_bad_fraction(tmp_path, monkeypatch):
    # Before: "finished" with truncated_shard 4 (shards, not pairs) and the lost pairs' places filled by repeats.
    info = write_shards(str(tmp_path / "s"), num_ids=32, shard_size=16)
    _delete_unopened_after_first_step(monkeypatch, info["shards"], 4)  # 64 of 128 pairs: over 20 %
    with pytest.raises(SystemExit) as e:
        main(_args("file://" + info["dir"], tmp_path, "remote"))
    msg = str(e.value)
    # it stops as soon as more than 20 % of the loader process's 128 pairs are lost (2 shards of 16), not at the epoch's end
    assert "32 of the 128 pairs of its loader process's share of epoch 0 cannot be read ({'unreadable_shard': 32})" in msg, msg
    assert "--max-bad-samples-frac 0.2" in msg and "\n" not in msg
    assert (tmp_path / "remote" / "checkpoints" / "latest.pt").is_file()


def test_a_few_lost_pairs_are_counted_refilled_and_named_in_the_status(tmp_path, monkeypatch):
    info = write_shards(str(tmp_path / "s"), num_ids=32, shard_size=16)
    _delete_unopened_after_first_step(monkeypatch, info["shards"], 1)  # 16 of 128 pairs: under 20 %
    assert main(_args("file://" + info["dir"], tmp_path, "few")) == 0
    summary = _summary(tmp_path / "few")
    assert summary["status"] == "finished: 16 of 128 pairs of the plan were not read (unreadable_shard 16)"
    assert summary["data"] == {"0": {"read": 112, "lost": {"unreadable_shard": 16}, "refilled": 16}}
    log = (tmp_path / "few" / "out.log").read_text()
    assert ("epoch 0 data: 112 pairs of the plan read; 16 of 128 pairs of the plan were not read (unreadable_shard "
            "16); 16 pairs read twice to fill the batches") in log


def _set_count(info, name, count):
    path = os.path.join(info["dir"], shards.SIZES_FILE)
    sizes = json.load(open(path))
    sizes[name] = count
    with open(path, "wb") as f:
        f.write(shards.sizes_json(sizes))


def test_a_sizes_json_listing_more_than_a_shard_holds_counts_the_missing_pairs_as_lost(tmp_path):
    # Before: "finished", the 8 pairs sizes.json promised filled with repeats without a word.
    info = write_shards(str(tmp_path / "s"), num_ids=32, shard_size=16)
    _set_count(info, "train-000003.tar", 24)  # holds 16: the plan counts 136 pairs
    assert main(_args(info["dir"], tmp_path, "over")) == 0
    summary = _summary(tmp_path / "over")
    assert summary["status"] == "finished: 8 of 136 pairs of the plan were not read (truncated_shard 8)"
    assert summary["data"]["0"] == {"read": 128, "lost": {"truncated_shard": 8}, "refilled": 8}


def test_a_sizes_json_listing_fewer_than_a_shard_holds_is_refused_when_the_shard_is_read(tmp_path):
    # Before: "finished", the shard's last 8 pairs never read and nothing said.
    info = write_shards(str(tmp_path / "s"), num_ids=32, shard_size=16)
    _set_count(info, "train-000003.tar", 8)  # holds 16
    with pytest.raises(SystemExit) as e:
        main(_args(info["dir"], tmp_path, "under"))
    msg = str(e.value)
    shard = os.path.join(info["dir"], "train-000003.tar")
    assert msg.startswith(f"error: --train-data shard {shard} holds 16 samples where sizes.json lists 8"), msg
    assert f"make_shards.py index {info['dir']}" in msg and "\n" not in msg


def test_a_partial_train_split_is_refused_and_with_the_flag_trained_and_reported_partial(tmp_path):
    # Before: trained on 112 of 128 pairs and "finished".
    info = write_shards(str(tmp_path / "s"), num_ids=32, shard_size=16)
    os.remove(info["shards"][2])
    with pytest.raises(SystemExit) as e:
        main(_args(info["dir"], tmp_path, "refused"))
    msg = str(e.value)
    assert msg.startswith(f"error: --train-data set {info['dir']!r}: {info['dir']} is a partial split: 1 of 8 shards "
                          f"listed in {info['dir']}/sizes.json do not exist (train-000002.tar) (112 of its 128 "
                          f"listed pairs given)"), msg
    assert "--allow-partial-data" in msg and "\n" not in msg

    assert main(_args(info["dir"], tmp_path, "allowed", "--allow-partial-data")) == 0
    summary = _summary(tmp_path / "allowed")
    assert summary["status"].startswith("finished: partial --train-data (") and "112 of its 128" in summary["status"]
    assert len(summary["partial_data"]) == 1 and summary["data"]["0"]["read"] == 112
    assert "partial (--allow-partial-data)" in (tmp_path / "allowed" / "out.log").read_text()


@pytest.mark.parametrize("stop_at", [3, 12])
def test_a_resumed_run_keeps_the_epochs_data_counts(tmp_path, stop_at):
    # The counts are state (per_rank_counts): stopped before or after the short shard is met, the resumed run ends
    # with the counts of an uninterrupted one, nothing counted twice by the replay of the epoch's first batches.
    info = write_shards(str(tmp_path / "s"), num_ids=32, shard_size=16)
    _set_count(info, "train-000003.tar", 24)
    args = _args(info["dir"], tmp_path, "cut")
    assert main(args + ["--max-steps", str(stop_at)]) == 0
    assert main(args + ["--resume", "latest"]) == 0
    summary = _summary(tmp_path / "cut")
    assert summary["status"] == "finished: 8 of 136 pairs of the plan were not read (truncated_shard 8)"
    assert summary["data"] == {"0": {"read": 128, "lost": {"truncated_shard": 8}, "refilled": 8}}


@pytest.mark.slow
def test_a_data_error_on_one_rank_stops_every_rank_at_the_same_batch(tmp_path):
    """Ranks read different shards, so one rank's loader can fail while the others hold good batches. Before, that
    rank stopped and saved (collectives) while the others waited in the step's all-reduce: a hang or a crash. Now
    every rank raises the failing rank's error before the same step."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(root / "tests" / "dist_agree_worker.py"), str(tmp_path / "out")],
                       env={**os.environ, "PYTHONPATH": f"{root / 'src'}:{root}"}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = [json.loads((tmp_path / f"out.rank{k}.json").read_text()) for k in (0, 1)]
    assert [g["seen"] for g in got] == [[0, 1], [0, 1]]  # no rank trains the step the other cannot
    assert got[1]["error"] == "--train-data shard /x/train-000003.tar no longer exists"
    assert got[0]["error"] == "rank 1: --train-data shard /x/train-000003.tar no longer exists"
