"""An open_clip model folder from our weights (fast_clip/open_clip_dir.py, fastclip-export, the trainer's
RUN_DIR/open_clip): plain open_clip, in a process that never imports our code, loads it with
``create_model_and_transforms('local-dir:DIR')`` and ``get_tokenizer('local-dir:DIR')`` and gives our embeddings and
tokens; our evaluator and ONNX export read such a folder as ``--pretrained DIR``."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shard_fixtures import write_shards

ROOT = Path(__file__).resolve().parents[1]
# A square open_clip config (like ViT-B-16) that the trainer builds at 384x128: the case open_clip alone got wrong
SQUARE = {"embed_dim": 64, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32,
                                          "patch_size": 32},
          "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
CAPTIONS = ["a person in a red top and blue trousers", "this pedestrian wears black pants and a white shirt.He walks",
            "A WOMAN with a yellow  bag"]

PLAIN_OPEN_CLIP = r"""
import json, sys, torch, open_clip
from PIL import Image
folder, images, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
model.eval()
with torch.no_grad():
    x = torch.stack([preprocess(Image.open(p)) for p in images])
    tokens = tokenizer(json.loads(sys.argv[4]))
    torch.save({"image": model.encode_image(x), "text": model.encode_text(tokens), "tokens": tokens}, out)
"""


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Test crops of a synthetic shard as image files: as stored (32x64) and rescaled (a larger and a smaller crop,
    so that resizing both up and down is compared)."""
    from PIL import Image
    from fast_clip.retrieval.testset import load_test_set

    tmp = tmp_path_factory.mktemp("crops")
    write_shards(str(tmp / "shards"), split="test", num_ids=4, images_per_id=2)
    ts = load_test_set(str(tmp / "shards" / "test"), name="synth")
    paths = []
    for i in range(ts.num_gallery):
        paths.append(tmp / f"crop{i}.jpg")
        paths[-1].write_bytes(ts.gallery_images[i])
    for i, size in ((0, (53, 160)), (1, (20, 45))):
        paths.append(tmp / f"rescaled{i}.png")
        Image.open(io.BytesIO(ts.gallery_images[i])).convert("RGB").resize(size, Image.BICUBIC).save(paths[-1])
    return [str(p) for p in paths]


@pytest.fixture(scope="module")
def square_config(tmp_path_factory):
    from fast_clip.model import register_model_configs
    import open_clip

    d = tmp_path_factory.mktemp("configs")
    (d / "SquareTiny.json").write_text(json.dumps(SQUARE))
    register_model_configs()
    open_clip.add_model_config(d)  # for our side only: the plain open_clip process never sees it
    return "SquareTiny"


def _checkpoint(path: Path, name: str, size) -> Path:
    """One of our checkpoints (the trainer's top-level keys), weights drawn at random with a fixed seed."""
    from fast_clip.model import create_model

    torch.manual_seed(0)
    model = create_model(name, image_size=size)
    torch.save({"state_dict": model.state_dict(), "model_name": name, "image_size": list(size), "epoch": 3,
                "step": 30}, path)
    return path


def _plain_open_clip(folder: Path, images: list[str], tmp: Path) -> dict:
    """Embeddings and tokens from open_clip alone: a fresh interpreter, our src/ not on its path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = tmp / "plain.pt"
    r = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, str(folder), json.dumps(images), str(out),
                        json.dumps(CAPTIONS)], cwd=tmp, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _ours(ckpt: Path, images: list[str]) -> dict:
    from PIL import Image
    from fast_clip.model import load_for_open_clip

    model, preprocess, tokenizer = load_for_open_clip(ckpt)
    with torch.no_grad():
        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
        tokens = tokenizer(CAPTIONS)
        return {"image": model.encode_image(x), "text": model.encode_text(tokens), "tokens": tokens}


@pytest.mark.slow  # a whole training run or a process of its own
@pytest.mark.parametrize("which", ["PersonTiny", "square"])
def test_plain_open_clip_loads_the_folder_and_gives_our_embeddings(which, crops, square_config, tmp_path):
    from common import runs
    from fast_clip import open_clip_dir

    name, size = ("PersonTiny", (64, 32)) if which == "PersonTiny" else (square_config, (384, 128))
    ckpt = _checkpoint(tmp_path / "epoch_3.pt", name, size)
    folder = open_clip_dir.export(runs.resolve(None, str(ckpt)), str(tmp_path / "open_clip"))
    assert sorted(os.listdir(folder)) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors"]
    config = json.loads((Path(folder) / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == list(size)
    assert config["preprocess_cfg"]["resize_mode"] == "squash"
    theirs, ours = _plain_open_clip(Path(folder), crops, tmp_path), _ours(ckpt, crops)
    assert torch.equal(theirs["tokens"], ours["tokens"])
    for what in ("image", "text"):
        cos = F.cosine_similarity(theirs[what].float(), ours[what].float(), dim=-1)
        assert cos.min() >= 0.9999, (what, cos.tolist())
    # the images do differ to the model, so the agreement above is not that of a constant embedding
    img = F.normalize(ours["image"].float(), dim=-1)
    assert (img @ img.t()).min() < 0.999


def test_model_card_and_config(tmp_path):
    from common import runs
    from fast_clip import open_clip_dir

    ckpt = _checkpoint(tmp_path / "c.pt", "PersonTiny", (64, 32))
    w = runs.Weights(str(ckpt), "PersonTiny", None, 3, None, {"train_data": "shards/cuhk/train", "loss": "fastclip-v3"})
    folder = Path(open_clip_dir.export(w, str(tmp_path / "out"), {"cuhk": {"R1": 12.5, "R5": 30.0, "R10": 41.0,
                                                                          "mAP": 10.0, "mINP": 2.0}}))
    card = (folder / "README.md").read_text()
    for needle in ("library_name: open_clip", "shards/cuhk/train", "fastclip-v3", "**Steps:** 30", "| cuhk | 12.50",
                   "local-dir:"):
        assert needle in card, needle
    pre = json.loads((folder / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert pre == {"size": [64, 32], "mode": "RGB", "mean": [0.48145466, 0.4578275, 0.40821073],
                   "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "squash",
                   "fill_color": 0}
    assert json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["context_length"] == 40
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary folder left


def test_fastclip_export_cli(tmp_path, capsys):
    from evaluation.export_open_clip import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    _checkpoint(run / "checkpoints" / "epoch_2.pt", "PersonTiny", (64, 32))
    (run / "params.json").write_text(json.dumps({"model": "PersonTiny", "train_data": "x", "loss": "openclip"}))
    (run / "eval").mkdir()
    (run / "eval" / "epoch_2.json").write_text(json.dumps({"synth": {"R1": 50.0, "R5": 75.0, "R10": 100.0,
                                                                     "mAP": 60.0, "mINP": 40.0}}))
    assert main([str(run)]) == 0
    assert "| synth | 50.00" in (run / "open_clip" / "README.md").read_text()
    assert main([str(run / "checkpoints" / "epoch_2.pt"), "--output", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "open_clip_model.safetensors").stat().st_size > 0
    capsys.readouterr()
    for argv, needle in (([str(run / "checkpoints" / "epoch_2.pt")], "needs --output"),
                         ([str(tmp_path / "nope.pt"), "--output", str(tmp_path / "x")], "does not exist"),
                         ([str(run), "--epoch", "7"], "no epoch_7.pt")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and needle in err and len(err.splitlines()) == 1, err


@pytest.mark.slow  # a whole training run or a process of its own
def test_evaluator_and_onnx_export_read_a_folder(tmp_path, monkeypatch, capsys):
    """``--pretrained DIR`` (an open_clip model folder) needs no --model / --image-size: its config holds both."""
    from common import runs
    from evaluation import evaluate, export_onnx
    from fast_clip import open_clip_dir

    ckpt = _checkpoint(tmp_path / "c.pt", "PersonTiny", (64, 32))
    folder = open_clip_dir.export(runs.resolve(None, str(ckpt)), str(tmp_path / "open_clip"))
    w = runs.resolve(None, folder)
    assert (w.model, w.image_size) == (f"local-dir:{folder}", (64, 32))
    assert w.path.endswith("open_clip_model.safetensors")
    write_shards(str(tmp_path / "shards"), split="test", num_ids=4)
    out = tmp_path / "eval"
    assert evaluate.main(["--pretrained", folder, "--data", str(tmp_path / "shards" / "test"), "--output", str(out),
                          "--workers", "0", "--device", "cpu"]) == 0, capsys.readouterr().err
    ours = evaluate.main(["--pretrained", str(ckpt), "--data", str(tmp_path / "shards" / "test"), "--output",
                          str(tmp_path / "eval2"), "--workers", "0", "--device", "cpu"])
    assert ours == 0
    got = [json.loads(next(d.glob("*.json")).read_text())["shards"] for d in (out, tmp_path / "eval2")]
    for k in ("R1", "R5", "R10", "mAP"):
        assert got[0][k] == pytest.approx(got[1][k], abs=1e-6), k
    assert next(out.glob("*.html")).stat().st_size > 0
    monkeypatch.setattr(export_onnx, "export_encoders", lambda model, size, ctx, out_dir, **kw: {
        "image": os.path.join(out_dir, "image_encoder.onnx"), "text": os.path.join(out_dir, "text_encoder.onnx")})
    monkeypatch.setattr(export_onnx, "verify_encoders", lambda *a, **kw: {
        k: {"max_abs_diff": 0.0, "max_norm_error": 0.0, "dim": 128} for k in ("image", "text")})
    (tmp_path / "onnx").mkdir()
    assert export_onnx.main(["--pretrained", folder, "--output", str(tmp_path / "onnx")]) == 0
    rep = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert (rep["model"], rep["image_size"]) == (f"local-dir:{folder}", [64, 32])


def test_a_folder_without_weights_or_config_is_one_error_line(tmp_path, capsys):
    from evaluation import evaluate

    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "open_clip_config.json").write_text(json.dumps({"model_cfg": SQUARE}))
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "open_clip_config.json").write_text("{not json")
    for folder, needle in (("f", "holds no weights file"), ("g", "is not readable JSON")):
        rc = evaluate.main(["--pretrained", str(tmp_path / folder), "--data", str(tmp_path), "--output",
                            str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error:") and needle in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_a_finished_run_writes_its_open_clip_folder(tmp_path, crops):
    """The trainer's hook: RUN_DIR/open_clip after the last epoch, loadable by plain open_clip with our embeddings."""
    shards = write_shards(str(tmp_path / "data"), num_ids=8, shard_size=16)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    r = subprocess.run([sys.executable, str(ROOT / "src" / "training" / "main.py"), "--train-data", shards["dir"],
                        "--model", "PersonTiny", "--batch-size", "8", "--workers", "1", "--epochs", "1", "--logs",
                        str(tmp_path / "logs"), "--name", "run", "--warmup", "1", "--loss", "openclip"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    run = tmp_path / "logs" / "run"
    folder = run / "open_clip"
    assert "open_clip model folder:" in (run / "out.log").read_text()
    card = (folder / "README.md").read_text()
    assert "openclip" in card and shards["dir"] in card
    theirs, ours = _plain_open_clip(folder, crops, tmp_path), _ours(run / "checkpoints" / "epoch_1.pt", crops)
    assert torch.equal(theirs["tokens"], ours["tokens"])
    for what in ("image", "text"):
        assert F.cosine_similarity(theirs[what], ours[what], dim=-1).min() >= 0.9999, what
