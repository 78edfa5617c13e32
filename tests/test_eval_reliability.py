"""Evaluation never silently wrong (issue #25): a test split checked against its manifest before it is scored, the
model and image size taken from the checkpoint, report names that differ with the data, flags checked up front."""
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from common import shards
from common.shards import make_sample, pack
from evaluation import export_onnx
from evaluation.evaluate import main
from fast_clip.retrieval.testset import EvalError, load_test_set
from test_eval_cli import one_report, write_split


def write_manifest(root: Path, n_images: int) -> None:
    """make_shards' manifest.json for the ``test`` split under ``root`` (shard names, counts, sha256s, totals)."""
    sizes = json.loads((root / "test" / "sizes.json").read_text())
    entries = [{"name": n, "count": c, "sha256": hashlib.sha256((root / "test" / n).read_bytes()).hexdigest()}
               for n, c in sorted(sizes.items())]
    (root / "manifest.json").write_text(json.dumps({"format_version": 1, "splits": {"test": {
        "pairs": sum(sizes.values()), "images": n_images, "captions": sum(sizes.values()), "shards": entries}}}))


@pytest.fixture
def split4(tmp_path):
    """A make_shards-like root with a manifest: test/ of 20 pairs (10 images) in 4 shards of 5."""
    root = tmp_path / "data" / "synthm"
    n, n_images = write_split(root / "test", shards=4, seed=3)
    write_manifest(root, n_images)
    return root, n, n_images


def _run_dir(tmp_path: Path, train_data: str, image_size=(64, 32), name_in_ckpt=True) -> Path:
    from fast_clip.model import create_model

    torch.manual_seed(0)
    model = create_model("PersonTiny", image_size=image_size)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stored = {"model_name": "PersonTiny", "image_size": list(image_size)} if name_in_ckpt else {}
    torch.save({"state_dict": model.state_dict(), "epoch": 1, "step": 5, **stored}, run / "checkpoints" / "epoch_1.pt")
    (run / "params.json").write_text(json.dumps({"model": "PersonTiny", "image_size": list(image_size),
                                                 "train_data": train_data}))
    return run


def _error(argv, capsys, run=main) -> str:
    rc = run(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("reading test set", "  "))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ the split check
def test_check_split_finds_missing_unlisted_and_disagreeing_shards(split4):
    root, _, _ = split4
    test = root / "test"
    files = [str(p) for p in sorted(test.glob("*.tar"))]
    assert shards.check_split(str(test), files).problems == []
    whole = shards.check_split(str(test), files)
    assert whole.listed_in.endswith("manifest.json") and sum(whole.counts.values()) == 20 and len(whole.sha256) == 4
    assert whole.totals["images"] == 10
    # deleted shards, and a spec that names only some of them
    (test / "test-000003.tar").unlink()
    c = shards.check_split(str(test), files[:2])
    assert c.missing == ["test-000002.tar", "test-000003.tar"] and c.not_on_disk == ["test-000003.tar"]
    assert any("1 of 4 shards listed in" in p and "test-000003.tar" in p for p in c.problems)
    assert any("not among the shards given (test-000002.tar)" in p for p in c.problems)
    # an unlisted shard, and a sizes.json that disagrees with the manifest
    shutil.copy(files[0], test / "test-000009.tar")
    (test / "sizes.json").write_text(json.dumps({"test-000000.tar": 7}))
    c = shards.check_split(str(test), files[:3] + [str(test / "test-000009.tar")])
    assert c.extra == ["test-000009.tar"] and c.disagree == ["test-000000.tar"]
    assert any("not listed in" in p for p in c.problems) and any("disagree" in p for p in c.problems)
    # as read: the count and the bytes
    assert c.shard_problem("test-000000.tar", 5, whole.sha256["test-000000.tar"]) is None
    assert "4 samples read where manifest.json lists 5" in c.shard_problem("test-000000.tar", 4)
    assert "sha256" in c.shard_problem("test-000000.tar", 5, "0" * 64)


def test_check_split_without_a_manifest_uses_sizes_json_and_without_either_checks_nothing(tmp_path):
    test = tmp_path / "x" / "test"
    write_split(test, shards=2)
    files = [str(p) for p in sorted(test.glob("*.tar"))]
    c = shards.check_split(str(test), files[:1])
    assert c.listed_in.endswith("sizes.json") and c.missing == ["test-000001.tar"] and not c.not_on_disk
    (test / "sizes.json").unlink()
    c = shards.check_split(str(test), files[:1])
    assert c.listed_in is None and c.problems == [] and c.shard_problem("test-000000.tar", 0) is None


def test_hashing_reader_hashes_the_whole_file_while_a_tar_is_read(split4):
    path = split4[0] / "test" / "test-000000.tar"
    stream = shards.HashingReader(open(path, "rb"))
    n = sum(1 for _ in shards.iter_samples(str(path), lambda u, p: pytest.fail(p), stream=stream))
    assert n == 5 and stream.hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    stream.close()


def test_load_test_set_refuses_or_reports_every_kind_of_incomplete_split(split4):
    root, n, n_images = split4
    test = root / "test"
    assert load_test_set(str(test)).partial is None
    # a truncated shard: fewer samples than listed
    good = (test / "test-000001.tar").read_bytes()
    (test / "test-000001.tar").write_bytes(good[: len(good) // 2])
    with pytest.raises(EvalError, match=r"split .*test is incomplete: test-000001.tar .*make_shards.py verify"):
        load_test_set(str(test))
    ts = load_test_set(str(test), allow_partial=True)
    assert ts.num_queries < n and ts.partial["queries_listed"] == n and ts.partial["gallery_listed"] == n_images
    # same count, other bytes: the sha256 taken while reading differs from the manifest's
    samples = [s for s in shards.iter_samples(str(test / "test-000000.tar"), lambda u, p: None)]
    other = [make_sample(int(s["__key__"]), s["jpg"], s["txt"].decode() + " changed", json.loads(s["json"]))
             for s in samples]
    (test / "test-000001.tar").write_bytes(good)
    (test / "test-000000.tar").write_bytes(pack(other))
    with pytest.raises(EvalError, match="test-000000.tar: its sha256 is not the one manifest.json lists"):
        load_test_set(str(test))
    # an unlisted shard: refused; with allow_partial it is left out
    (test / "test-000000.tar").write_bytes(pack(samples))
    shutil.copy(test / "test-000002.tar", test / "test-000009.tar")
    with pytest.raises(EvalError, match=r"1 shards are not listed in .*manifest.json \(test-000009.tar\)"):
        load_test_set(str(test))
    ts = load_test_set(str(test), allow_partial=True)
    assert ts.num_queries == n and len(ts.shards) == 4 and "test-000009.tar" in ts.partial["problems"][0]


def test_resolve_shards_refuses_a_split_with_missing_shards_so_a_trainer_stops_at_start(split4):
    from fast_clip.retrieval.testset import resolve_shards

    test = split4[0] / "test"
    (test / "test-000000.tar").unlink()
    with pytest.raises(EvalError, match=r"incomplete: 1 of 4 shards listed in .* \(test-000000.tar\)"):
        resolve_shards(str(test))  # what the trainer calls on --val-data before training
    assert len(resolve_shards(str(test), allow_partial=True)) == 3


# ------------------------------------------------------------------------------------ item 1: a partial test split
@pytest.mark.slow
def test_a_partial_test_split_is_refused_and_with_allow_partial_reported_as_partial(split4, tmp_path, capsys):
    root, n, n_images = split4
    write_split(root / "train", shards=1)  # default data: the test/ split next to the run's training set
    run = _run_dir(tmp_path, str(root / "train" / "train-000000.tar"))
    argv = [str(run), "--workers", "0"]
    assert main(argv) == 0
    capsys.readouterr()
    whole = json.loads((run / "eval" / "epoch_1.json").read_text())["synthm"]
    assert (whole["num_queries"], whole["num_gallery"]) == (n, n_images) and "partial" not in whole
    for k in (2, 3):
        (root / "test" / f"test-{k:06d}.tar").unlink()
    err = _error(argv, capsys)
    for needle in ("'synthm'", "2 of 4 shards listed in", "test-000002.tar, test-000003.tar", "re-copy",
                   f"make_shards.py verify {root}", "--allow-partial"):
        assert needle in err, (needle, err)
    assert sorted(p.name for p in (run / "eval").glob("*.json")) == ["epoch_1.json"]  # nothing written

    assert main(argv + ["--allow-partial"]) == 0
    out = capsys.readouterr()
    report = one_report(run / "eval", "epoch_1_synthm_partial_")
    part = json.loads(report.read_text())["synthm"]
    assert (part["num_queries"], part["num_gallery"]) == (n // 2, n_images // 2)
    assert {k: part["partial"][k] for k in ("queries", "queries_listed", "gallery", "gallery_listed", "shards",
                                             "shards_listed")} == dict(queries=n // 2, queries_listed=n,
                                                                       gallery=n_images // 2,
                                                                       gallery_listed=n_images, shards=2,
                                                                       shards_listed=4)
    row = f"| synthm (PARTIAL) |"
    for text in (out.out, report.with_suffix(".md").read_text()):
        assert row in text and f"| {n // 2} of {n} | {n_images // 2} of {n_images} |" in text
        assert f"PARTIAL synthm: 2 of 4 shards, {n // 2} of {n} queries" in text
    assert "warning: PARTIAL synthm" in out.err
    # the whole split's results are untouched
    assert json.loads((run / "eval" / "epoch_1.json").read_text())["synthm"] == whole


@pytest.mark.slow
def test_a_split_with_only_sizes_json_is_checked_too(tmp_path, capsys):
    test = tmp_path / "d" / "synth" / "test"
    write_split(test, shards=2)
    run = _run_dir(tmp_path, "")
    (test / "test-000001.tar").unlink()
    err = _error([str(run), "--data", str(test), "--workers", "0"], capsys)
    assert "1 of 2 shards listed in" in err and "sizes.json" in err and f"make_shards.py index {test}" in err


# ------------------------------------------------------------------------- item 2: the checkpoint's model and size
@pytest.mark.slow
def test_eval_takes_model_and_image_size_from_the_checkpoint_not_from_a_rewritten_params_json(tmp_path, capsys):
    test = tmp_path / "d" / "synth" / "test"
    write_split(test, shards=2, seed=4)
    run = _run_dir(tmp_path, "")
    argv = [str(run), "--data", str(test), "--workers", "0", "--output", str(tmp_path / "o")]
    assert main(argv) == 0
    capsys.readouterr()
    report = one_report(tmp_path / "o", "epoch_1_")
    honest = json.loads(report.read_text())["synth"]
    # what a refused --resume with another --image-size (and a hand edit of the model) leaves behind
    params = json.loads((run / "params.json").read_text())
    for tamper in ({"image_size": [96, 32]}, {"image_size": [96, 32], "model": "ViT-B-16"}):
        (run / "params.json").write_text(json.dumps({**params, **tamper}))
        report.unlink()
        assert main(argv) == 0, capsys.readouterr().err
        err = capsys.readouterr().err
        md = report.with_suffix(".md").read_text()
        assert "- image_size: 64x32" in md and "- model: PersonTiny" in md
        assert json.loads(report.read_text())["synth"] == honest
        assert "image_size [96, 32] but epoch_1.pt holds [64, 32]: using the checkpoint's" in err
        assert ("model ViT-B-16 but epoch_1.pt holds PersonTiny" in err) == ("model" in tamper)
    # a flag given still wins, with a warning
    assert main(argv + ["--image-size", "96", "32"]) == 0
    assert "--image-size [96, 32] overrides the image_size [64, 32] stored in epoch_1.pt" in capsys.readouterr().err


# ---------------------------------------------------------------------------- item 3: report names from the data
@pytest.mark.slow
def test_evaluations_of_different_data_never_share_a_report(tmp_path, capsys):
    a, b = tmp_path / "a" / "synth" / "test", tmp_path / "b" / "synth" / "test"
    write_split(a, shards=1, seed=5)
    write_split(b, shards=1, seed=6, n_pids=3)
    run = _run_dir(tmp_path, "")
    for d in (a, b, a):  # the same data again writes its own report again
        assert main([str(run), "--data", str(d), "--workers", "0"]) == 0, capsys.readouterr().err
    reports = sorted((run / "eval").glob("epoch_1_synth*.json"))
    assert len(reports) == 2, [p.name for p in reports]
    counts = sorted(json.loads(p.read_text())["synth"]["num_queries"] for p in reports)
    assert counts == [12, 20]


@pytest.mark.slow
def test_the_runs_own_test_split_keeps_epoch_n_but_never_overwrites_another_data_sets(tmp_path, capsys):
    """params.json's train_data changed since (e.g. by a refused --resume with another --train-data): the default
    test split is another one, and its results must not replace the first one's epoch_N report."""
    roots = [tmp_path / "a" / "synth", tmp_path / "b" / "synth"]
    for i, root in enumerate(roots):
        write_split(root / "train", shards=1, seed=7 + i)
        write_split(root / "test", shards=1, seed=9 + i, n_pids=5 - 2 * i)
    run = _run_dir(tmp_path, str(roots[0] / "train"))
    assert main([str(run), "--workers", "0"]) == 0
    first = (run / "eval" / "epoch_1.json").read_text()
    assert main([str(run), "--workers", "0"]) == 0  # the same data again: the same name
    assert sorted(p.name for p in (run / "eval").glob("*.json")) == ["epoch_1.json"]
    params = json.loads((run / "params.json").read_text())
    (run / "params.json").write_text(json.dumps({**params, "train_data": str(roots[1] / "train")}))
    capsys.readouterr()
    assert main([str(run), "--workers", "0"]) == 0
    assert "epoch_1.md holds the results of other data" in capsys.readouterr().err
    assert (run / "eval" / "epoch_1.json").read_text() == first
    other = json.loads(one_report(run / "eval", "epoch_1_synth_").read_text())["synth"]
    assert other["num_queries"] == 12


# ------------------------------------------------------------------------------------ item 4: flags before work
@pytest.mark.parametrize("flags,needle", [(["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                                          (["--workers", "-1"], "--workers must be >= 0, got -1"),
                                          (["--chunk-size", "0"], "--chunk-size must be >= 1"),
                                          (["--examples", "-2"], "--examples must be >= 0"),
                                          (["--image-size", "0", "32"], "--image-size must be two positive"),
                                          (["--device", "cuda"], "--device cuda: no CUDA GPU is usable here"),
                                          (["--device", "cuda:1"], "--device cuda:1: no CUDA GPU"),
                                          (["--device", "gpu0"], "--device 'gpu0' is not a device")])
def test_bad_eval_flags_are_one_error_line_before_any_work(tmp_path, capsys, monkeypatch, flags, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # a run folder that is not there: the flag is named first, nothing is looked at
    assert needle in _error([str(tmp_path / "no-run"), *flags], capsys)


def test_a_gpu_index_beyond_the_machine_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "this machine has 1 GPU(s), cuda:0 to cuda:0" in _error([str(tmp_path), "--device", "cuda:3"], capsys)


@pytest.mark.parametrize("flags,needle", [(["--atol", "-1"], "--atol must be a finite number >= 0"),
                                          (["--atol", "nan"], "--atol must be a finite number >= 0"),
                                          (["--opset", "99"], "--opset must be 7 to 20"),
                                          (["--image-size", "64", "-1"], "--image-size must be two positive"),
                                          (["--batch-check", "0"], "--batch-check must be >= 1")])
def test_bad_export_flags_are_one_error_line_before_any_work(tmp_path, capsys, flags, needle):
    pytest.importorskip("onnxruntime")
    assert needle in _error([str(tmp_path / "no-run"), *flags], capsys, run=export_onnx.main)
