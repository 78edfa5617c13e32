"""A run that cannot work is one `error:` line naming the flag before the first step (issue #25's list): each of these
was a traceback, a failure at step 1 or after the first epoch, or silence."""
import pytest
import torch

from shard_fixtures import write_shards
from test_foreign_shards import write_foreign


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    train = write_shards(str(root), num_ids=8, shard_size=8)["dir"]  # 32 pairs, 8 person ids
    test = write_shards(str(root), split="test", num_ids=8, shard_size=8)["dir"]
    (root / "weights.txt").write_text("not a weights file\n")
    foreign = write_foreign(str(tmp_path_factory.mktemp("foreign")), "img2dataset", n=16)  # no manifest, no pids
    return {"train": train, "test": test, "foreign": foreign,
            "text": str(root / "weights.txt")}


def _main(data, tmp_path, *extra):
    from training.main import main
    return main(["--train-data", data["train"], "--model", "PersonTiny", "--batch-size", "8", "--workers", "0",
                 "--epochs", "1", "--logs-dir", str(tmp_path), "--name", "r", "--warmup", "1", *map(str, extra)])


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "64"], "a step takes 64 per rank x 1 rank(s) = 64 (--batch-size 64: lower it"),
    # the step batch is --batch-size x --accum-freq: lowering --batch-size alone may not be the fix
    (["--batch-size", "16", "--accum-freq", "4"],
     "a step takes 64 per rank x 1 rank(s) = 64 (--batch-size 16 x --accum-freq 4: lower --accum-freq or --batch-size"),
    (["--pretrained", "TEXT"], "error: --pretrained: cannot read"),
    (["--model", "NoSuchModel"], "error: --model 'NoSuchModel' is not a known open_clip model"),
    (["--image-size", "1", "1"], "error: --image-size 1 1 does not fit --model PersonTiny: each side must be a "
                                 "multiple of its patch size 8 (at least 8)"),
    (["--image-size", "64", "30"], "--image-size 64 30 does not fit --model PersonTiny"),
    (["--val-data", "FOREIGN", "--val-frequency", "1"], ".json needs integer 'pid' and 'image_id'"),
    (["--id-loss", "linear", "--num-ids", "3"], "error: --num-ids 3 is below the 8 person ids of --train-data"),
])
def test_a_run_that_cannot_work_is_one_error_line_before_the_first_step(data, tmp_path, extra, message):
    extra = [{"TEXT": data["text"], "FOREIGN": data["foreign"]}.get(x, x) for x in extra]
    with pytest.raises(SystemExit) as e:
        _main(data, tmp_path, *extra)
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: ") and message in e.value.code
    assert "\n" not in e.value.code and "Traceback" not in e.value.code
    assert not (tmp_path / "r" / "checkpoints" / "latest.pt").exists()  # nothing trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(data, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --device cuda: no CUDA GPU is usable here .*use --device cpu"):
        _main(data, tmp_path, "--device", "cuda")


def test_check_args_checks_the_image_size_against_the_model(data, tmp_path):
    with pytest.raises(SystemExit, match="--image-size 60 32 does not fit --model PersonTiny"):
        _main(data, tmp_path, "--check-args", "--image-size", "60", "32")


@pytest.mark.slow  # a whole training run or a process of its own
def test_a_profile_longer_than_the_run_is_said_at_start(data, tmp_path):
    assert _main(data, tmp_path, "--profile", "--profile-steps", "2", "1", "3") == 0
    log = (tmp_path / "r" / "out.log").read_text()
    assert ("--profile: the schedule needs 6 steps (--profile-steps 2 1 3: wait + warmup + active) but this run "
            "takes 4; no trace will be written") in log
