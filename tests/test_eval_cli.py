"""End-to-end evaluation on a tiny run written by the test: scripts/eval.sh, --pretrained, evaluate_model, errors."""
import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.evaluate import dataset_name, default_datasets, main
from fast_clip.retrieval.protocol import evaluate_model
from fast_clip.retrieval.testset import EvalError, load_test_set, resolve_shards
from common.shards import make_sample, pack

ROOT = Path(__file__).resolve().parents[1]
METRIC_KEYS = {"R1", "R5", "R10", "mAP", "mINP", "i2t_R1", "num_queries", "num_gallery"}
COLOURS = ["red", "green", "blue", "yellow", "black", "white"]


def _jpeg(rng) -> bytes:
    colour = rng.integers(0, 256, 3)
    a = np.clip(colour + rng.integers(-20, 20, (64, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG")
    return buf.getvalue()


def write_split(split_dir: Path, n_pids=5, imgs_per_pid=2, caps_per_img=2, shards=2, seed=0, drop=None):
    """webdataset shards in data_prep's layout: one sample per (image, caption), samples of an image adjacent."""
    rng = np.random.default_rng(seed)
    split_dir.mkdir(parents=True, exist_ok=True)
    samples, image_id = [], 0
    for pid in range(n_pids):
        for _ in range(imgs_per_pid):
            img = _jpeg(rng)
            for c in range(caps_per_img):
                meta = {"key": len(samples), "pid": pid, "image_id": image_id, "caption_id": c, "source": "synth",
                        "image": f"imgs/{pid}/{image_id}.jpg"}
                if drop == "pid":
                    del meta["pid"]
                cap = f"a person number {pid} wearing a {COLOURS[pid % len(COLOURS)]} shirt, caption {c}"
                sample = make_sample(len(samples), img, cap, meta)
                if drop in ("jpg", "txt"):
                    del sample[drop]
                samples.append(sample)
            image_id += 1
    per = -(-len(samples) // shards)
    split = split_dir.name
    for s in range(shards):
        (split_dir / f"{split}-{s:06d}.tar").write_bytes(pack(samples[s * per:(s + 1) * per]))
    (split_dir / "sizes.json").write_text(json.dumps({f"{split}-{s:06d}.tar": per for s in range(shards)}))
    return len(samples), image_id


def one_report(folder: Path, prefix: str) -> Path:
    """The one ``PREFIX*.json`` report in ``folder`` (names of other data end in a hash of the shards read)."""
    found = [p for p in folder.glob(f"{prefix}*.json")]
    assert len(found) == 1, (prefix, sorted(p.name for p in folder.iterdir()))
    return found[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from fast_clip.model import create_model

    tmp = tmp_path_factory.mktemp("evalrun")
    shards = tmp / "shards" / "synth"
    write_split(shards / "train", seed=1)
    n_samples, n_images = write_split(shards / "test", seed=2)
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    model = create_model("PersonTiny")
    for epoch in (1, 2):
        torch.save({"state_dict": model.state_dict(), "epoch": epoch, "step": 10 * epoch},
                   run / "checkpoints" / f"epoch_{epoch}.pt")
    (run / "params.json").write_text(json.dumps({
        "model": "PersonTiny", "image_size": [64, 32], "val_data": None,
        "train_data": str(shards / "train" / "train-{000000..000001}.tar")}))
    return dict(tmp=tmp, run=run, shards=shards, n_samples=n_samples, n_images=n_images, model=model)


@pytest.mark.slow
def test_eval_sh_on_tiny_run(tiny_run):
    run = tiny_run["run"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(["bash", str(ROOT / "scripts" / "eval.sh"), str(run), "--workers", "0"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    out = run / "eval"
    results = json.loads((out / "epoch_2.json").read_text())  # the highest epoch by default
    assert list(results) == ["synth"]  # default: ROOT/test next to the training split
    m = results["synth"]
    assert METRIC_KEYS <= set(m)
    assert m["num_queries"] == tiny_run["n_samples"] and m["num_gallery"] == tiny_run["n_images"]
    assert m["num_queries_without_match"] == 0
    assert len(m["cmc"]) == 50 and m["cmc"][-1] == 100.0
    for k in ("R1", "R5", "R10", "mAP", "mINP", "i2t_R1"):
        assert 0.0 <= m[k] <= 100.0
    assert m["R1"] <= m["R5"] <= m["R10"]
    for f in ("epoch_2.md", "epoch_2_cmc.png", "epoch_2_examples.png"):
        assert (out / f).stat().st_size > 0
    assert (out / "epoch_2_cmc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| synth |" in res.stdout and "| synth |" in (out / "epoch_2.md").read_text()


@pytest.mark.slow
def test_epoch_and_data_options(tiny_run, tmp_path, capsys):
    run, test_dir = tiny_run["run"], tiny_run["shards"] / "test"
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(p) for p in sorted(test_dir.glob("*.tar"))) + "\n")
    rc = main([str(run), "--epoch", "1", "--workers", "0", "--examples", "1", "--output", str(tmp_path / "o"),
               "--data", str(test_dir), str(test_dir / "test-{000000..000001}.tar"), f"mylist={lst}"])
    assert rc == 0, capsys.readouterr().err
    # named by the data it scored (the run's own test split alone keeps epoch_N), which the report records
    report = one_report(tmp_path / "o", "epoch_1_synth+synth_2+mylist_")
    results = json.loads(report.read_text())
    assert list(results) == ["synth", "synth_2", "mylist"]
    assert f"mylist={lst}" in report.with_suffix(".md").read_text()
    assert "reading test set mylist" in capsys.readouterr().err  # progress while it works
    # Same shards, same model: identical numbers whichever way the shards were named.
    assert results["synth"] == results["synth_2"] == results["mylist"]


@pytest.mark.slow
def test_pretrained_mode_and_evaluate_model(tiny_run, tmp_path, capsys):
    from fast_clip.model import get_tokenizer
    from common.transforms import build_transform

    ckpt = tiny_run["run"] / "checkpoints" / "epoch_1.pt"
    test_dir = str(tiny_run["shards"] / "test")
    rc = main(["--pretrained", str(ckpt), "--model", "PersonTiny", "--image-size", "64", "32", "--data", test_dir,
               "--output", str(tmp_path), "--workers", "0"])
    assert rc == 0, capsys.readouterr().err
    report = one_report(tmp_path, "epoch_1_synth_")
    from_cli = json.loads(report.read_text())["synth"]
    assert report.with_name(report.stem + "_examples.png").exists()

    model = tiny_run["model"]
    model.train()
    res = evaluate_model(model, get_tokenizer("PersonTiny"), build_transform((64, 32), train=False),
                         {"synth": test_dir, "pre": load_test_set(test_dir)}, device="cpu", batch_size=7)
    assert model.training  # mode restored
    assert set(res) == {"synth", "pre"}
    for k in ("R1", "R5", "R10", "mAP", "mINP", "i2t_R1"):
        assert res["synth"][k] == pytest.approx(from_cli[k], abs=1e-6)
        assert res["pre"][k] == pytest.approx(from_cli[k], abs=1e-6)


@pytest.mark.slow
def test_dataset_naming_and_defaults(tiny_run):
    shards = tiny_run["shards"]
    assert dataset_name(str(shards / "test")) == "synth"
    assert dataset_name(str(shards / "test" / "test-{000000..000001}.tar")) == "synth"
    assert len(resolve_shards(str(shards / "test"))) == 2
    assert default_datasets(str(shards / "train" / "train-{000000..000001}.tar") + "::" + "/nonexistent/a/train/x.tar") \
        == {"synth": str(shards / "test")}


def _err(argv, capsys) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()  # progress lines may come first; the error is one line, the last
    assert lines[-1].startswith("error: ") and sum(ln.startswith("error") for ln in lines) == 1, err
    assert "Traceback" not in err
    return err


def test_error_run_without_checkpoints(tmp_path, capsys):
    (tmp_path / "params.json").write_text(json.dumps({"model": "PersonTiny", "train_data": "x"}))
    assert "no checkpoints/ folder" in _err([str(tmp_path)], capsys)
    (tmp_path / "checkpoints").mkdir()
    err = _err([str(tmp_path)], capsys)
    assert "checkpoints" in err and "no epoch_N.pt" in err


@pytest.mark.slow
def test_error_missing_epoch_and_missing_run(tiny_run, tmp_path, capsys):
    err = _err([str(tiny_run["run"]), "--epoch", "7"], capsys)
    assert "epoch_7.pt" in err and "1, 2" in err
    assert "does not exist" in _err([str(tmp_path / "nope")], capsys)


@pytest.mark.slow
@pytest.mark.parametrize("drop,needle", [("txt", "lacks txt"), ("jpg", "lacks image"), ("pid", "'pid' and 'image_id'")])
def test_error_bad_shards(tiny_run, tmp_path, capsys, drop, needle):
    bad = tmp_path / "bad" / "test"
    write_split(bad, n_pids=2, shards=1, drop=drop)
    err = _err([str(tiny_run["run"]), "--data", str(bad), "--workers", "0"], capsys)
    assert needle in err and "test-000000.tar" in err and "000000" in err


@pytest.mark.slow
def test_error_no_such_data(tiny_run, tmp_path, capsys):
    assert "does not exist" in _err([str(tiny_run["run"]), "--data", str(tmp_path / "x.tar")], capsys)
    assert "matches no shard" in _err([str(tiny_run["run"]), "--data", str(tmp_path / "*.tar")], capsys)


@pytest.mark.slow
@pytest.mark.parametrize("change,needle", [({"layers": 4}, "missing keys"), ({"width": 64, "head_width": 16},
                                                                                "does not match model")])
def test_error_model_does_not_match_checkpoint(tiny_run, tmp_path, capsys, change, needle):
    import open_clip

    cfg = json.loads((ROOT / "src" / "fast_clip" / "model_configs" / "PersonTiny.json").read_text())
    cfg["vision_cfg"].update(change)
    name = "EvalTestOther" + "".join(f"{k}{v}" for k, v in change.items())
    cfgdir = tmp_path / "cfg"
    cfgdir.mkdir()
    (cfgdir / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(cfgdir)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "epoch_3.pt").write_bytes((tiny_run["run"] / "checkpoints" / "epoch_1.pt").read_bytes())
    (run / "params.json").write_text(json.dumps({"model": name, "image_size": [64, 32], "train_data": ""}))
    err = _err([str(run), "--data", str(tiny_run["shards"] / "test"), "--workers", "0"], capsys)
    assert needle in err and "epoch_3.pt" in err


@pytest.mark.slow
def test_error_unknown_model_and_unsafe_checkpoint(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": argparse.Namespace(a=1)},
               run / "checkpoints" / "epoch_1.pt")
    (run / "params.json").write_text(json.dumps({"model": "PersonTiny", "train_data": ""}))
    err = _err([str(run), "--data", str(tiny_run["shards"] / "test"), "--workers", "0"], capsys)
    assert "epoch_1.pt" in err and "refusing" in err
    # a checkpoint that does not name its model: params.json's name is used, and an unknown one is refused
    torch.save({"state_dict": {"w": torch.zeros(1)}}, run / "checkpoints" / "epoch_1.pt")
    (run / "params.json").write_text(json.dumps({"model": "NoSuchNet", "train_data": ""}))
    assert "NoSuchNet" in _err([str(run), "--data", str(tiny_run["shards"] / "test")], capsys)


@pytest.mark.slow
def test_error_exit_code_from_the_script(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "scripts" / "eval.sh"), str(tmp_path / "missing run")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and "missing run" in res.stderr
