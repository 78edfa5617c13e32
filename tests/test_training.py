"""Trainer behaviour: DDP equals one process, every pair once per epoch, exact resume after a kill, checkpoint format,
launch-script arithmetic, flag validation, and a golden loss curve."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from shard_fixtures import write_shards
from training import data as D
from training import plan as P

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
MAIN = str(ROOT / "src" / "training" / "main.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}


def torchrun(nproc: int, *argv, timeout=240):
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *map(str, argv)]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def run_main(*argv, timeout=240):
    r = subprocess.run([PY, MAIN, *map(str, argv)], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


# ---------------------------------------------------------------------------------------------------------------
# The epoch plan (pure functions)

def test_shuffle_buffer_is_a_seeded_permutation():
    import random
    a = list(P.shuffle_buffer(range(100), 10, random.Random(3)))
    b = list(P.shuffle_buffer(range(100), 10, random.Random(3)))
    c = list(P.shuffle_buffer(range(100), 10, random.Random(4)))
    assert a == b and a != c and sorted(a) == list(range(100)) and a != list(range(100))


# ---------------------------------------------------------------------------------------------------------------
# Distributed equivalence


def assert_same_training(one: dict, two: dict, parts=("model", "loss")) -> None:
    """Parameters and loss state of two float64 runs of tests/dist_train_worker.py agree to rounding. The runs differ
    only in reduction order (~1e-16 relative); AdamW divides each gradient entry by its own size, so on an entry whose
    gradient is near eps that noise grows by up to lr / eps = 1e3 (measured: 3e-14). 1e-10 leaves three orders of
    margin and is ~1e-7 of one lr step, the size of any real difference (a lost gradient term, a wrong gather)."""
    for part in parts:
        for k, v in one[part].items():
            if torch.is_tensor(v) and v.is_floating_point():
                assert v.dtype == torch.float64, f"{part} {k} is {v.dtype}: run the worker with --float64"
                torch.testing.assert_close(two[part][k], v, atol=1e-10, rtol=1e-9, msg=f"{part} {k}")
            elif torch.is_tensor(v):
                assert torch.equal(two[part][k], v), f"{part} {k}"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["openclip", "fastclip-v3"])
def test_two_process_step_equals_one_process(dist_worker, loss):
    assert_same_training(dist_worker(1, loss, "--float64"), dist_worker(2, loss, "--float64"))


@pytest.mark.slow
def test_epoch_sees_every_pair_exactly_once_2_ranks_2_workers(tmp_path):
    info = write_shards(str(tmp_path / "shards"), num_ids=16, shard_size=12)  # 64 pairs in 6 uneven shards
    torchrun(2, MAIN, "--train-data", info["dir"], "--model", "PersonTiny", "--batch-size", 4, "--workers", 2,
             "--epochs", 2, "--logs-dir", tmp_path / "logs", "--name", "cov", "--log-keys", "--local-loss",
             "--warmup", 1, "--loss", "openclip")
    per_epoch, batches = Counter(), Counter()
    for r in (0, 1):
        for line in open(tmp_path / "logs" / "cov" / f"keys_rank{r}.jsonl"):
            rec = json.loads(line)
            per_epoch.update((rec["epoch"], k) for k in rec["keys"])
            batches[(r, rec["epoch"])] += 1
    assert set(batches.values()) == {8}  # 64 pairs / (2 ranks x 4) = 8 batches per rank per epoch
    for epoch in (0, 1):
        keys = [k for (e, k) in per_epoch if e == epoch]
        assert sorted(keys) == list(range(64))
    assert max(per_epoch.values()) == 1


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and resume


def _final_params(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "epoch_2.pt", weights_only=True)


def _assert_same_run(a: dict, b: dict):
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, atol=0, rtol=0, msg=f"parameter {k}")
    for k, v in a["loss"].items():
        if torch.is_tensor(v):
            torch.testing.assert_close(b["loss"][k], v, atol=0, rtol=0, msg=f"loss state {k}")


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return write_shards(str(root), num_ids=16, shard_size=16)


def _args(shards, logs, name, *extra):
    return ["--train-data", shards["dir"], "--model", "PersonTiny", "--batch-size", 8, "--workers", 2, "--epochs", 2,
            "--logs", logs, "--name", name, "--warmup", 2, "--log-keys", "--log-every-n-steps", 1,
            "--loss", "fastclip-v3", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["loader", "device"])
def test_stop_and_resume_equals_uninterrupted_run(tmp_path, tiny_shards, augment):
    aug = ["--augment-device", augment]
    run_main(*_args(tiny_shards, tmp_path, "full", *aug))
    run_main(*_args(tiny_shards, tmp_path, "cut", "--max-steps", 5, *aug))
    run_main(*_args(tiny_shards, tmp_path, "cut", "--resume", "latest", *aug))
    _assert_same_run(_final_params(tmp_path / "full"), _final_params(tmp_path / "cut"))
    keys = lambda n: [json.loads(l)["keys"] for l in open(tmp_path / n / "keys_rank0.jsonl")]
    assert keys("full") == keys("cut")


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path, tiny_shards):
    run_main(*_args(tiny_shards, tmp_path, "full"))
    args = _args(tiny_shards, tmp_path, "killed", "--save-every-n-steps", 1)
    proc = subprocess.Popen([PY, MAIN, *map(str, args)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = tmp_path / "killed" / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and torch.load(latest, weights_only=True)["step"] >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_main(*_args(tiny_shards, tmp_path, "killed", "--resume", "latest"))
    _assert_same_run(_final_params(tmp_path / "full"), _final_params(tmp_path / "killed"))
    # The killed run may have logged batches after its last checkpoint; what the resumed run logs from there on
    # must be the uninterrupted order.
    full = [json.loads(l) for l in open(tmp_path / "full" / "keys_rank0.jsonl")]
    killed = [json.loads(l) for l in open(tmp_path / "killed" / "keys_rank0.jsonl")]
    by_step = {r["step"]: r["keys"] for r in killed}  # later lines (the resumed run) overwrite earlier ones
    assert [by_step[r["step"]] for r in full] == [r["keys"] for r in full]


@pytest.mark.slow
def test_checkpoint_loads_through_open_clip(tmp_path, tiny_shards):
    import open_clip
    from fast_clip.model import register_model_configs
    run_main(*_args(tiny_shards, tmp_path, "oc", "--max-steps", 2))
    ckpt = tmp_path / "oc" / "checkpoints" / "latest.pt"
    register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms("PersonTiny", pretrained=str(ckpt))
    saved = torch.load(ckpt, weights_only=True)
    for k, v in saved["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[k], v)
    for key in ("optimizer", "loss", "rng", "train_state", "data", "epoch", "step", "scaler"):
        assert key in saved
    params = json.load(open(tmp_path / "oc" / "params.json"))
    assert params["model"] == "PersonTiny" and params["image_size"] == [64, 32]


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, tiny_shards):
    run_main(*_args(tiny_shards, tmp_path, "fb", "--max-steps", 4, "--save-every-n-steps", 2))
    ck = tmp_path / "fb" / "checkpoints"
    assert (ck / "latest_prev.pt").exists()
    (ck / "latest.pt").write_bytes(b"garbage, as after a torn write")
    r = run_main(*_args(tiny_shards, tmp_path, "fb", "--resume", "latest", "--max-steps", 5))
    assert "trying an older checkpoint" in r.stdout
    assert "resumed from" in r.stdout and "latest_prev.pt" in r.stdout


def test_state_components_round_trip_and_another_data_plan_restarts_the_epoch(tiny_shards):
    from common.transforms import build_transform, clean_caption
    from fast_clip.model import get_tokenizer
    from training.state import ProcessRng, Tallies, TrainState

    def stream(workers, warnings, batch=8):
        cfg = D.LoaderConfig(step_batch_size=batch, workers=workers, seed=0, shuffle_buffer=8)
        dec = D.SampleDecoder(transform=build_transform((64, 32), train=False), clean=clean_caption)
        sets = D.load_train_sets(tiny_shards["dir"])
        return D.TrainStream(sets, cfg, dec, get_tokenizer("PersonTiny"), 0, 1, warn=warnings.append)

    warnings = []
    a = stream(2, warnings)
    a.set_epoch(1, start_batch=3)
    a.advance()
    same, other = stream(1, warnings), stream(1, warnings, batch=4)  # workers are not the plan; the batch is
    same.load_state_dict(a.state_dict())
    assert (same.epoch, same.batch_in_epoch, warnings) == (1, 4, [])
    other.load_state_dict(a.state_dict())
    assert (other.epoch, other.batch_in_epoch) == (1, 0) and "another data plan" in warnings[0]

    state = TrainState(global_step=7, nonfinite_in_a_row=1, nonfinite_total=2)
    again = TrainState()
    again.load_state_dict(state.state_dict())
    assert again == state
    tallies = Tallies()
    tallies.count({"bad": {"bad_image": 2}, "sources": torch.tensor([0, 0, 1]),
                   "data": {"read": 2, "refilled": 1, "lost": {"bad_image": 1}}}, epoch=0)
    back = Tallies()
    back.load_state_dict(tallies.state_dict())
    assert back.bad_samples == {"bad_image": 2} and back.source_counts == {0: 2, 1: 1}
    assert back.epochs == {0: {"read": 2, "refilled": 1, "lost": {"bad_image": 1}}}  # a resume keeps them
    rng = ProcessRng()
    saved = rng.state_dict()
    first = (torch.rand(2), random.random())
    rng.load_state_dict(saved)
    assert torch.equal(torch.rand(2), first[0]) and random.random() == first[1]


def _layout(ckpt: dict) -> dict:
    """Each top-level key's type, or the sub-keys (in order) of the small dicts and of each rank's counts."""
    out = {}
    for k, v in ckpt.items():
        if k in ("train_state", "data", "rng"):
            out[k] = list(v)
        elif k == "per_rank_counts":
            out[k] = [list(r) for r in v]
        else:
            out[k] = "dict" if isinstance(v, dict) else type(v).__name__
    return out


def _as_written_by_2946cfe(ckpt: dict) -> dict:
    """The same state in the layout of commit 2946cfe: its train_state also held the data position and rank 0's
    tallies, and the per-rank counts (without the per-epoch data counts) came last."""
    data, counts = ckpt["data"], ckpt["per_rank_counts"]
    old = {k: v for k, v in ckpt.items() if k not in ("per_rank_counts", "rng", "model_name", "image_size", "epoch",
                                                     "step")}
    old["train_state"] = {"epoch": data["epoch"], "batch_in_epoch": data["batch_in_epoch"], **ckpt["train_state"],
                          "bad_samples": counts[0]["bad"], "source_counts": counts[0]["sources"]}
    # its data position carried the per-rank plan's signature (training/data.py before "plan": 2)
    old["data"] = {"epoch": data["epoch"], "batch_in_epoch": data["batch_in_epoch"], "seed": data["seed"],
                   "world_size": 1, "workers": 2, "batch_size": data["global_batch"], "train_data": data["train_data"],
                   "debiased_sampling": False, "pairs_per_id": 0}
    old.update({k: ckpt[k] for k in ("rng", "model_name", "image_size", "epoch", "step")})
    old["per_rank_counts"] = [{"bad": r["bad"], "sources": r["sources"]} for r in counts]  # no per-epoch data counts
    return old


@pytest.mark.slow
def test_a_checkpoint_in_the_2946cfe_layout_at_an_epoch_end_resumes_exactly(tmp_path, tiny_shards):
    # Its per-rank plan cannot continue an epoch under the reader plan (test_elastic: such a position restarts its
    # epoch with a warning), but at an epoch's end no plan is needed: the run goes on exactly.
    run_main(*_args(tiny_shards, tmp_path, "full"))
    run_main(*_args(tiny_shards, tmp_path, "old", "--max-steps", 8))
    latest = tmp_path / "old" / "checkpoints" / "latest.pt"
    old = _as_written_by_2946cfe(torch.load(latest, weights_only=True))
    expected = json.loads((ROOT / "tests" / "golden" / "checkpoint_layout_2946cfe.json").read_text())["layout"]
    assert _layout(old) == expected  # what that commit really wrote, recorded from one of its runs
    torch.save(old, latest)
    r = run_main(*_args(tiny_shards, tmp_path, "old", "--resume", "latest"))
    assert "epoch 0, batch 8, step 8" in r.stdout and "another data plan" not in r.stdout
    _assert_same_run(_final_params(tmp_path / "full"), _final_params(tmp_path / "old"))
    summary = json.loads((tmp_path / "old" / "summary.json").read_text())
    assert summary["source_counts"] == {"0": 2 * 64}  # rank 0's tallies came back from the old file


# ---------------------------------------------------------------------------------------------------------------
# Golden losses of a seeded tiny run (a silent change in numerics shows up here)

GOLDEN = ROOT / "tests" / "golden" / "tiny_run_losses.json"


@pytest.mark.slow
def test_golden_tiny_run_losses(tmp_path, tiny_shards):
    run_main("--train-data", tiny_shards["dir"], "--model", "PersonTiny", "--batch-size", 8, "--workers", 1,
             "--epochs", 1, "--logs", tmp_path, "--name", "golden", "--warmup", 2, "--log-every-n-steps", 1,
             "--seed", 7, "--loss", "openclip")
    records = [json.loads(l) for l in open(tmp_path / "golden" / "train_log.jsonl")]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1))
    expected = json.loads(GOLDEN.read_text())["losses"]
    assert len(losses) == len(expected) == 8
    # Tolerance covers kernel differences across torch 2.11-2.14 and CPUs, far below a real change in the math.
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------------------------
# Launch script and flags


def _train_sh(env_extra, *args):
    env = {k: v for k, v in ENV.items() if k not in ("CUDA_VISIBLE_DEVICES", "NPROC")}
    env.update(env_extra, DRY_RUN="1")
    return subprocess.run(["bash", str(ROOT / "scripts" / "train.sh"), "--train-data", "x", *args], env=env,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_train_sh_checks_flags_once_before_torchrun():
    for args, needle in ((["--model", "ViT-B-61"], "did you mean ViT-B-16"), (["--lr", "nan"], "--lr: must be a finite"),
                         (["--device", "gpu"], "invalid choice: 'gpu'")):
        r = _train_sh({"EFFECTIVE_BATCH_SIZE": "8", "NPROC": "2"}, *args)
        assert r.returncode == 2 and needle in r.stderr.strip().splitlines()[-1], r.stderr
        assert "torch.distributed" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_train_sh_batch_arithmetic_and_refusals():
    r = _train_sh({"EFFECTIVE_BATCH_SIZE": "512", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}, "--name", "a b", "--logs", "L")
    assert r.returncode == 0 and "--nproc_per_node 4" in r.stdout and "--batch-size 128" in r.stdout
    assert "--logs-dir L" in r.stdout
    assert "a\\ b" in r.stdout  # arguments are passed through quoted, never re-split
    assert "--master_port" in r.stdout and "--standalone" not in r.stdout
    r = _train_sh({"EFFECTIVE_BATCH_SIZE": "512", "NPROC": "4", "NNODES": "2", "NODE_RANK": "1",
                   "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert r.returncode == 0 and "--batch-size 64" in r.stdout and "--node_rank 1" in r.stdout
    r = _train_sh({"EFFECTIVE_BATCH_SIZE": "4096", "NPROC": "2", "ACCUM_FREQ": "8"})
    assert r.returncode == 0 and "--batch-size 256 --accum-freq 8" in r.stdout
    r = _train_sh({"EFFECTIVE_BATCH_SIZE": "8", "NPROC": "2", "ACCUM_FREQ": "8"})
    assert r.returncode == 2 and "does not divide the 4 samples per process" in r.stderr
    bad = [({"EFFECTIVE_BATCH_SIZE": "100", "NPROC": "3"}, "does not divide"),
           ({"EFFECTIVE_BATCH_SIZE": "2", "NPROC": "4"}, "below 1"),
           ({"EFFECTIVE_BATCH_SIZE": "abc", "NPROC": "1"}, "not a whole number"),
           ({}, "set EFFECTIVE_BATCH_SIZE"),
           ({"EFFECTIVE_BATCH_SIZE": "8", "NPROC": "2", "NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK")]
    for env, msg in bad:
        r = _train_sh(env)
        assert r.returncode == 2 and msg in r.stderr, (env, r.stderr)
    r = _train_sh({"EFFECTIVE_BATCH_SIZE": "8", "NPROC": "1"}, "--batch-size", "4")
    assert r.returncode == 2 and "do not pass --batch-size" in r.stderr


@pytest.mark.parametrize("argv,flag", [
    (["--batch-size", "0"], "--batch-size"),
    (["--train-data-weights", "1::2"], "--train-data-weights"),
    (["--val-frequency", "1"], "--val-frequency"),
    (["--pretrained", "/nonexistent/w.pt"], "--pretrained"),
    (["--loss", "nope"], "loss"),
])
def test_bad_flags_name_the_flag(argv, flag, capsys):
    from training.params import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--train-data", "x"] + argv)
    assert flag in capsys.readouterr().err


@pytest.mark.slow
def test_weighted_sources_mix_by_weight_with_disjoint_keys(tmp_path):
    a = write_shards(str(tmp_path / "a"), num_ids=16, shard_size=16)            # 64 pairs
    b = write_shards(str(tmp_path / "b"), num_ids=16, shard_size=16, seed=1)    # 64 pairs
    run_main("--train-data", f"{a['dir']}::{b['dir']}", "--train-data-weights", "1::3", "--train-num-samples", 256,
             "--model", "PersonTiny", "--batch-size", 8, "--workers", 2, "--epochs", 1, "--logs-dir", tmp_path,
             "--name", "mix", "--log-keys", "--loss", "fastclip-v1", "--warmup", 1)
    keys = [k for l in open(tmp_path / "mix" / "keys_rank0.jsonl") for k in json.loads(l)["keys"]]
    assert len(keys) == 256 and min(keys) >= 0 and max(keys) < 128
    from_b = sum(k >= 64 for k in keys)  # set b's keys are offset by set a's 64 pairs
    assert 0.6 < from_b / 256 < 0.9     # weight 3 of 4; binomial sd ~ 0.027
    summary = json.load(open(tmp_path / "mix" / "summary.json"))
    assert summary["source_counts"] == {"0": 256 - from_b, "1": from_b}


def test_pretrained_openai_format_with_position_embedding_interpolation(tmp_path):
    from fast_clip.model import create_model
    torch.manual_seed(0)
    src = create_model("PersonTiny")  # 64x32 -> an 8x4 patch grid
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    # OpenAI-format files carry these scalars, which are not parameters of open_clip's CLIP.
    sd.update(input_resolution=torch.tensor(64), context_length=torch.tensor(40), vocab_size=torch.tensor(49408))
    torch.save(sd, tmp_path / "openai_style.pt")
    same = create_model("PersonTiny", pretrained=str(tmp_path / "openai_style.pt"))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(same.state_dict()[k], v, atol=0, rtol=0)
    taller = create_model("PersonTiny", pretrained=str(tmp_path / "openai_style.pt"), image_size=(96, 32))
    pos = taller.visual.positional_embedding
    assert tuple(taller.visual.grid_size) == (12, 4) and pos.shape[0] == 12 * 4 + 1
    torch.testing.assert_close(pos[0], src.visual.positional_embedding[0])  # class token kept as is
    torch.testing.assert_close(taller.state_dict()["text_projection"], src.state_dict()["text_projection"])
    with torch.no_grad():
        taller.encode_image(torch.randn(2, 3, 96, 32))


@pytest.mark.cuda
def test_cuda_bf16_run_stops_and_resumes(tmp_path, tiny_shards):
    """The trainer's GPU path: bf16 autocast, batched augmentation on the device, loss tables on the device; a run
    stopped after 5 steps and resumed sees the same batches as an uninterrupted one and ends at the same parameters
    up to GPU reduction-order noise (cuBLAS/atomics are not bit-reproducible across the two processes)."""
    cuda = ["--device", "cuda", "--precision", "amp_bf16", "--augment-device", "device"]
    run_main(*_args(tiny_shards, tmp_path, "full", *cuda))
    run_main(*_args(tiny_shards, tmp_path, "cut", "--max-steps", 5, *cuda))
    run_main(*_args(tiny_shards, tmp_path, "cut", "--resume", "latest", *cuda))
    keys = lambda n: [json.loads(l)["keys"] for l in open(tmp_path / n / "keys_rank0.jsonl")]
    assert keys("full") == keys("cut")
    a, b = _final_params(tmp_path / "full"), _final_params(tmp_path / "cut")
    for k, v in a["state_dict"].items():
        assert torch.isfinite(v).all(), k
        torch.testing.assert_close(b["state_dict"][k], v, atol=5e-3, rtol=5e-2, msg=f"parameter {k}")
    log = [json.loads(l) for l in open(tmp_path / "full" / "train_log.jsonl")]
    assert any(r.get("peak_mem_mib") for r in log), "no CUDA peak memory in train_log.jsonl"


@pytest.mark.slow  # a whole training run
def test_main_in_process_trains_writes_and_resumes(tmp_path, tiny_shards):
    """main(argv) in this process (no subprocess, loader in-process): a run stops at --max-steps, resumes from its
    checkpoint and ends at the same parameters as one uninterrupted run."""
    from training.main import main
    common = ["--train-data", tiny_shards["dir"], "--model", "PersonTiny", "--batch-size", "8", "--workers", "0",
              "--epochs", "1", "--logs-dir", str(tmp_path), "--warmup", "1", "--loss", "fastclip-v3", "--seed", "3"]
    assert main(common + ["--name", "full"]) == 0
    assert main(common + ["--name", "cut", "--max-steps", "2"]) == 0
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"].startswith("stopped")
    assert main(common + ["--name", "cut", "--resume", "latest"]) == 0
    a = torch.load(tmp_path / "full" / "checkpoints" / "epoch_1.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoints" / "epoch_1.pt", weights_only=True)
    _assert_same_run(a, b)
