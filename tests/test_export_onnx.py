"""ONNX export of a tiny run (scripts/export_onnx.sh, evaluation.export_onnx): onnxruntime vs PyTorch round trip."""
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

# A guard only: onnx and onnxruntime are pinned in requirements-eval.txt, so this module normally runs.
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from evaluation import export_onnx  # noqa: E402
from evaluation.export_onnx import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4
CAPTIONS = ["a man in a black jacket and blue jeans", "woman with long hair, red dress", "a child in a yellow coat",
            "a person wearing a white shirt and carrying a backpack", "grey hoodie", "green coat, brown boots"]


def _write_run(run: Path, model, epochs=(1,)) -> None:
    (run / "checkpoints").mkdir(parents=True)
    for epoch in epochs:  # the trainer's checkpoint layout (training/checkpoint.py Checkpointer), less the optimizer/rng entries
        torch.save({"state_dict": model.state_dict(), "model_name": "PersonTiny", "image_size": [64, 32],
                    "epoch": epoch, "step": 10 * epoch}, run / "checkpoints" / f"epoch_{epoch}.pt")
    (run / "params.json").write_text(json.dumps({"model": "PersonTiny", "image_size": [64, 32]}))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from fast_clip.model import create_model

    run = tmp_path_factory.mktemp("onnxrun") / "run"
    torch.manual_seed(0)
    model = create_model("PersonTiny").eval()
    _write_run(run, model)
    rc = main([str(run), "--batch-check", "5"])
    assert rc == 0
    return dict(run=run, out=run / "onnx", model=model)


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_files_and_dynamic_batch(exported):
    out = exported["out"]
    for name, inp, outp, rank in (("image_encoder.onnx", "image", "image_embedding", 4),
                                  ("text_encoder.onnx", "text", "text_embedding", 2)):
        assert (out / name).stat().st_size > 0
        m = onnx.load(str(out / name))
        onnx.checker.check_model(m)
        (i,), (o,) = m.graph.input, m.graph.output
        assert (i.name, o.name) == (inp, outp)
        dims = i.type.tensor_type.shape.dim
        assert len(dims) == rank and dims[0].dim_param == "batch"  # symbolic, not a traced constant
        assert o.type.tensor_type.shape.dim[0].dim_param == "batch"
        assert i.type.tensor_type.elem_type == (onnx.TensorProto.FLOAT if inp == "image" else onnx.TensorProto.INT64)


@pytest.mark.slow
def test_onnxruntime_matches_torch(exported):
    """Independent of the exporter's own check: reload the model from the checkpoint, compare at batch 1 and 5."""
    from fast_clip.model import create_model, get_tokenizer

    ckpt = torch.load(exported["run"] / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    model = create_model("PersonTiny", image_size=(64, 32)).eval()
    model.load_state_dict(ckpt["state_dict"])
    tok = get_tokenizer("PersonTiny")
    img_s, txt_s = _session(exported["out"] / "image_encoder.onnx"), _session(exported["out"] / "text_encoder.onnx")
    gen = torch.Generator().manual_seed(1)
    for b in (1, 5):
        images = torch.randn(b, 3, 64, 32, generator=gen)
        text = tok(CAPTIONS[:b])
        with torch.no_grad():
            ref_i = model.encode_image(images, normalize=True).numpy()
            ref_t = model.encode_text(text, normalize=True).numpy()
        got_i = img_s.run(["image_embedding"], {"image": images.numpy()})[0]
        got_t = txt_s.run(["text_embedding"], {"text": text.numpy().astype(np.int64)})[0]
        assert got_i.shape == (b, 128) and got_t.shape == (b, 128)
        np.testing.assert_allclose(got_i, ref_i, rtol=0, atol=ATOL)
        np.testing.assert_allclose(got_t, ref_t, rtol=0, atol=ATOL)
        np.testing.assert_allclose(np.linalg.norm(got_i, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(got_t, axis=1), 1.0, atol=1e-5)
    # Rows are independent of the batch they are in (no batch size folded into the graph).
    row = txt_s.run(None, {"text": tok(CAPTIONS[2:3]).numpy()})[0]
    np.testing.assert_allclose(row[0], got_t[2], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_export_json(exported):
    rep = json.loads((exported["out"] / "export.json").read_text())
    assert rep["model"] == "PersonTiny" and rep["epoch"] == 1
    assert rep["checkpoint"] == str((exported["run"] / "checkpoints" / "epoch_1.pt").resolve())
    assert rep["image_size"] == [64, 32] and rep["context_length"] == 40 and rep["embed_dim"] == 128
    assert rep["opset"] == export_onnx.DEFAULT_OPSET and rep["exporter"] == "torchscript"
    assert rep["image_encoder"]["input_shape"] == ["batch", 3, 64, 32] and rep["image_encoder"]["dim"] == 128
    assert rep["text_encoder"]["input_shape"] == ["batch", 40] and rep["text_encoder"]["dim"] == 128
    for k, name in (("image_encoder", "image_encoder.onnx"), ("text_encoder", "text_encoder.onnx")):
        assert Path(rep[k]["path"]) == (exported["out"] / name).resolve()
    for m in (onnx.load(rep["image_encoder"]["path"]), onnx.load(rep["text_encoder"]["path"])):
        assert {o.version for o in m.opset_import if o.domain in ("", "ai.onnx")} == {rep["opset"]}
    chk = rep["check"]
    assert chk["passed"] is True and chk["atol"] == ATOL and chk["batch_sizes"] == [1, 5]
    assert chk["provider"] == "CPUExecutionProvider"
    for k in ("image", "text"):
        assert 0.0 <= chk["max_abs_diff"][k] <= ATOL
        assert 0.0 <= chk["max_norm_error"][k] <= 1e-5
    assert rep["versions"] == {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}


@pytest.mark.slow
def test_export_sh(exported, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "my onnx"  # a space: the launcher must quote its arguments
    res = subprocess.run(["bash", str(ROOT / "scripts" / "export_onnx.sh"), str(exported["run"]), "--epoch", "1",
                          "--output", str(out), "--batch-check", "2"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert (out / "image_encoder.onnx").is_file() and (out / "text_encoder.onnx").is_file()
    rep = json.loads((out / "export.json").read_text())
    assert rep["check"]["passed"] and rep["check"]["batch_sizes"] == [1, 2]
    assert res.stdout.count("max abs diff") == 2
    for k in ("image", "text"):
        assert f"{rep['check']['max_abs_diff'][k]:.3e}" in res.stdout


def _err(argv, capsys, rc=2) -> str:
    got = main(argv)
    err = capsys.readouterr().err
    assert got == rc, err
    assert err.startswith("error: ")
    return err


def test_missing_or_bad_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.json").write_text(json.dumps({"model": "PersonTiny", "image_size": [64, 32]}))
    err = _err([str(run)], capsys)
    assert str(run / "checkpoints") in err and "no epoch_N.pt" in err
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, buf)
    (run / "checkpoints" / "epoch_3.pt").write_bytes(buf.getvalue()[:600])  # a torn file
    err = _err([str(run), "--epoch", "2"], capsys)
    assert "epoch_2.pt" in err and "available epochs: 3" in err
    err = _err([str(run)], capsys)
    assert str(run / "checkpoints" / "epoch_3.pt") in err and "cannot read" in err
    missing = tmp_path / "nope.pt"
    err = _err(["--pretrained", str(missing), "--model", "PersonTiny", "--out", str(tmp_path / "o")], capsys)  # alias
    assert str(missing) in err and "does not exist" in err
    assert not (run / "onnx").exists() and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_diff_above_atol_fails(exported, tmp_path, monkeypatch, capsys):
    """The tolerance gate, without a second export: pretend onnxruntime disagrees."""
    src = exported["out"]
    monkeypatch.setattr(export_onnx, "export_encoders", lambda model, size, ctx, out_dir, **kw: {
        "image": str(src / "image_encoder.onnx"), "text": str(src / "text_encoder.onnx")})
    monkeypatch.setattr(export_onnx, "verify_encoders", lambda *a, **kw: {
        "image": {"max_abs_diff": 1e-6, "max_norm_error": 0.0, "dim": 128},
        "text": {"max_abs_diff": 3e-3, "max_norm_error": 0.0, "dim": 128}})
    out = tmp_path / "o"
    out.mkdir()
    err = _err([str(exported["run"]), "--out", str(out)], capsys, rc=1)
    assert "--atol 0.0001" in err and "text 3.000e-03" in err and "image" not in err
    assert json.loads((out / "export.json").read_text())["check"]["passed"] is False


def _fake_export(monkeypatch, max_abs_diff=1e-6):
    monkeypatch.setattr(export_onnx, "export_encoders", lambda model, size, ctx, out_dir, **kw: {
        "image": os.path.join(out_dir, "image_encoder.onnx"), "text": os.path.join(out_dir, "text_encoder.onnx")})
    monkeypatch.setattr(export_onnx, "verify_encoders", lambda *a, **kw: {
        k: {"max_abs_diff": max_abs_diff, "max_norm_error": 0.0, "dim": 128} for k in ("image", "text")})


def test_a_checkpoint_of_this_trainer_says_its_model_and_size(tmp_path, monkeypatch, capsys):
    """--pretrained with one of our checkpoints needs no --model / --image-size: both are stored in it (the export
    itself is stubbed; what is checked is what the report says was loaded)."""
    from fast_clip.model import create_model

    _write_run(tmp_path / "run", create_model("PersonTiny"), epochs=(2,))
    _fake_export(monkeypatch)
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_2.pt"
    out = tmp_path / "o"
    out.mkdir()
    assert main(["--pretrained", str(ckpt), "--output", str(out)]) == 0, capsys.readouterr().err
    rep = json.loads((out / "export.json").read_text())
    assert (rep["model"], rep["image_size"], rep["epoch"]) == ("PersonTiny", [64, 32], 2)
    torch.save(create_model("PersonTiny").state_dict(), tmp_path / "plain.pt")
    err = _err(["--pretrained", str(tmp_path / "plain.pt"), "--output", str(out)], capsys)
    assert "not a checkpoint of this trainer" in err and "--model NAME" in err
