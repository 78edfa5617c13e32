"""data_prep: readers, the shard contract, determinism, re-runs, bad input, fsspec output, verify."""
from __future__ import annotations

import argparse
import csv
import errno
import hashlib
import io
import itertools
import json
import os
import shutil
import tarfile

import fsspec
import pytest
import webdataset as wds
from PIL import Image

from data_prep import make_shards
from data_prep.records import AnnotationError, Drops, RecordError
from data_prep.readers import read_cuhkpedes


# ------------------------------------------------------------------------------------------------ helpers ---

def img_bytes(color=(200, 30, 30), fmt="JPEG", size=(8, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def put(root, rel, data):
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)


def cuhk_records(n_ids=3, per_id=2, splits=("train", "test")):
    recs = []
    for s in splits:
        for i in range(n_ids):
            for j in range(per_id):
                recs.append({"split": s, "id": 100 * (s == "test") + i, "file_path": f"{s}/p{i}/{j}.jpg",
                             "captions": [f"person {i} image {j} caption a.", f"caption b of {i}/{j}"],
                             "processed_tokens": [["x"]]})
    return recs


def make_images(root, recs, key="file_path"):
    for k, r in enumerate(recs):
        put(root, r[key], img_bytes((10 * k % 255, 80, 160)))


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


def run(argv):
    return make_shards.main([str(a) for a in argv] + ["--no-progress"])


def load(out, split):
    with fsspec.open(f"{out}/manifest.json") as f:
        man = json.load(f)
    samples = []
    for sh in man["splits"][split]["shards"]:
        with fsspec.open(f"{out}/{split}/{sh['name']}", "rb") as f:
            with tarfile.open(fileobj=io.BytesIO(f.read())) as tf:
                for m in tf:
                    k, ext = m.name.split(".", 1)
                    if not samples or samples[-1]["__key__"] != k:
                        samples.append({"__key__": k})
                    samples[-1][ext] = tf.extractfile(m).read()
    return man, samples


def shard_hashes(out):
    man = json.load(open(os.path.join(out, "manifest.json")))
    return {s: [(x["name"], x["sha256"]) for x in v["shards"]] for s, v in man["splits"].items()}


@pytest.fixture
def cuhk(tmp_path):
    recs = cuhk_records()
    make_images(tmp_path / "imgs", recs)
    ann = write_json(tmp_path / "reid_raw.json", recs)
    return ann, str(tmp_path / "imgs"), recs


# ------------------------------------------------------------------------------------------------ readers ---

def test_cuhkpedes_contract_and_webdataset_roundtrip(cuhk, tmp_path):
    ann, imgs, recs = cuhk
    out = tmp_path / "out"
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", out, "--maxcount", 5]) == 0
    man, samples = load(out, "train")
    assert man["format_version"] == 1 and set(man["splits"]) == {"train", "test"}
    tr = man["splits"]["train"]
    assert (tr["pairs"], tr["images"], tr["captions"], tr["identities"]) == (12, 6, 12, 3)
    assert tr["sources"] == {"cuhkpedes": {"pairs": 12, "images": 6, "identities": 3}}
    assert [s["count"] for s in tr["shards"]] == [5, 5, 2]
    assert json.load(open(out / "train" / "sizes.json")) == {"train-000000.tar": 5, "train-000001.tar": 5,
                                                             "train-000002.tar": 2}
    assert man["command"][1:4] == ["cuhkpedes", "--annotations", ann] and man["options"]["maxcount"] == 5
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["key"] for m in metas] == list(range(12))
    assert [s["__key__"] for s in samples] == [f"{k:09d}" for k in range(12)]
    assert [m["pid"] for m in metas] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert [m["image_id"] for m in metas] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert [m["caption_id"] for m in metas] == [0, 1] * 6
    assert metas[2] == {"key": 2, "pid": 0, "orig_id": 0, "source": "cuhkpedes", "image": "train/p0/1.jpg",
                        "image_id": 1, "caption_id": 0}
    assert samples[2]["txt"].decode() == "person 0 image 1 caption a."
    # JPEG input is passed through byte for byte.
    assert samples[2]["jpg"] == open(os.path.join(imgs, "train/p0/1.jpg"), "rb").read()
    # Test split: own dense keys and pids, orig ids kept.
    _, test = load(out, "test")
    tm = [json.loads(s["json"]) for s in test]
    assert [m["key"] for m in tm] == list(range(12)) and {m["pid"] for m in tm} == {0, 1, 2}
    assert {m["orig_id"] for m in tm} == {100, 101, 102}
    # webdataset reads the shards as they are.
    urls = [str(out / "train" / s["name"]) for s in tr["shards"]]
    ds = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(ds) == 12 and isinstance(ds[0]["jpg"], Image.Image) and ds[0]["json"]["key"] == 0
    assert ds[5]["txt"] == samples[5]["txt"].decode()


def test_sort_order_by_pid_then_path(tmp_path):
    recs = [{"split": "train", "id": i, "file_path": p, "captions": ["c"]}
            for i, p in [(10, "z.jpg"), (2, "b.jpg"), (10, "a.jpg"), (2, "a2.jpg")]]
    make_images(tmp_path / "i", recs)
    run(["cuhkpedes", "--annotations", write_json(tmp_path / "a.json", recs), "--images", tmp_path / "i",
         "-o", tmp_path / "o"])
    metas = [json.loads(s["json"]) for s in load(tmp_path / "o", "train")[1]]
    assert [(m["orig_id"], m["image"], m["pid"]) for m in metas] == [(2, "a2.jpg", 0), (2, "b.jpg", 0),
                                                                     (10, "a.jpg", 1), (10, "z.jpg", 1)]


def test_icfg_and_rstpreid(tmp_path):
    recs = cuhk_records(2, 1)
    make_images(tmp_path / "icfg", recs)
    assert run(["icfgpedes", "--annotations", write_json(tmp_path / "icfg.json", recs),
                "--images", tmp_path / "icfg", "-o", tmp_path / "o1"]) == 0
    man, s = load(tmp_path / "o1", "test")
    assert json.loads(s[0]["json"])["source"] == "icfgpedes" and man["splits"]["test"]["pairs"] == 4

    rst = [{"id": i, "img_path": f"{i}_c{j}.jpg", "captions": ["A man in red.He has a bag.", "b"],
            "split": s} for i, s in enumerate(["train", "val", "test"]) for j in range(2)]
    make_images(tmp_path / "rst", rst, "img_path")
    assert run(["rstpreid", "--annotations", write_json(tmp_path / "data_captions.json", rst),
                "--images", tmp_path / "rst", "-o", tmp_path / "o2"]) == 0
    man, s = load(tmp_path / "o2", "val")
    assert set(man["splits"]) == {"train", "val", "test"}
    assert s[0]["txt"].decode() == "A man in red.He has a bag."  # verbatim; the trainer cleans it
    assert json.loads(s[0]["json"])["source"] == "rstpreid"


def test_tbps_files_and_dir(tmp_path):
    d = tmp_path / "ann"
    d.mkdir()
    for s in ("train", "test"):
        recs = [{"file_path": f"{s}/{i}.png", "id": i, "captions": [f"{s} {i}"], "captions_bt": ["bt"]}
                for i in range(3)]
        for r in recs:
            put(tmp_path / "imgs", r["file_path"], img_bytes(fmt="PNG"))
        write_json(d / f"{s}.json", recs)
    assert run(["tbps", "--annotations", d / "train.json", "--annotations", d / "test.json",
                "--images", tmp_path / "imgs", "-o", tmp_path / "o1"]) == 0
    assert run(["tbps", "--annotations", d, "--images", tmp_path / "imgs", "-o", tmp_path / "o2"]) == 0
    assert shard_hashes(tmp_path / "o1") == shard_hashes(tmp_path / "o2")
    man, s = load(tmp_path / "o1", "train")
    assert man["splits"]["train"]["pairs"] == 3  # captions_bt are not packed
    assert s[0]["jpg"][:3] == b"\xff\xd8\xff"  # PNG converted to JPEG
    assert Image.open(io.BytesIO(s[0]["jpg"])).format == "JPEG"
    assert run(["tbps", "--annotations", d / "bad_name.json", "--images", tmp_path, "-o", tmp_path / "o3"]) == 2


def test_generated_groups_captions_by_image(tmp_path):
    recs = [{"id": 7, "image_path": "g/0.jpg", "caption": "first"}, {"id": 3, "image_path": "g/1.jpg",
                                                                      "caption": "x"},
            {"id": 7, "image_path": "g/0.jpg", "caption": "second"},
            {"id": 9, "image_path": "g/0.jpg", "caption": "conflict"}]
    for r in recs:
        put(tmp_path / "i", r["image_path"], img_bytes())
    assert run(["generated", "--annotations", write_json(tmp_path / "gen.json", recs), "--images", tmp_path / "i",
                "-o", tmp_path / "o", "--split", "val"]) == 0
    man, s = load(tmp_path / "o", "val")
    metas = [json.loads(x["json"]) for x in s]
    assert [(m["orig_id"], m["image_id"], m["caption_id"]) for m in metas] == [(3, 0, 0), (7, 1, 0), (7, 1, 1)]
    assert [x["txt"].decode() for x in s[1:]] == ["first", "second"]
    assert man["dropped"] == {"conflicting_id": 1}


def test_csv(tmp_path):
    rows = [("a.jpg", "5", "cap a1", "1"), ("b.jpg", "6", "cap b0", "0"), ("a.jpg", "5", "cap a0", "0")]
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "image_id", "caption", "caption_id"])
        w.writerows(rows)
    for r in rows:
        put(tmp_path / "i", r[0], img_bytes())
    assert run(["csv", "--annotations", tmp_path / "t.csv", "--images", tmp_path / "i", "-o", tmp_path / "o"]) == 0
    man, s = load(tmp_path / "o", "train")
    assert [x["txt"].decode() for x in s] == ["cap a0", "cap a1", "cap b0"]
    assert [json.loads(x["json"])["orig_id"] for x in s] == ["5", "5", "6"]
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("image,caption\na.jpg,x\n")
    assert run(["csv", "--annotations", tmp_path / "bad.csv", "--images", tmp_path / "i", "-o", tmp_path / "o2"]) == 2


# ----------------------------------------------------------------------------------- determinism / re-runs ---

def test_deterministic_across_workers(cuhk, tmp_path):
    ann, imgs, _ = cuhk
    run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", tmp_path / "a", "--maxcount", 4])
    run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", tmp_path / "b", "--maxcount", 4,
         "--workers", 2])
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")
    for name, sha in shard_hashes(tmp_path / "b")["train"]:
        assert hashlib.sha256(open(tmp_path / "b" / "train" / name, "rb").read()).hexdigest() == sha
    with tarfile.open(tmp_path / "a" / "train" / "train-000000.tar") as tf:
        m = tf.getmembers()[0]
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)
    # a re-run with workers: they pack, hash and compare in their own processes and leave finished shards alone
    shard = tmp_path / "b" / "train" / "train-000001.tar"
    os.utime(shard, ns=(1, 1))
    run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", tmp_path / "b", "--maxcount", 4,
         "--workers", 2])
    assert shard.stat().st_mtime_ns == 1
    assert shard_hashes(tmp_path / "a") == shard_hashes(tmp_path / "b")


def test_rerun_skips_finished_shards_and_overwrite(cuhk, tmp_path, capsys):
    ann, imgs, _ = cuhk
    out = tmp_path / "o"
    args = ["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", out, "--maxcount", 4]
    run(args)
    shard = out / "train" / "train-000000.tar"
    os.utime(shard, ns=(1, 1))  # any rewrite would change this
    # An interrupted run leaves a temporary file and no manifest: the re-run cleans up.
    (out / "train" / ".train-000001.tar.tmp").write_bytes(b"partial")
    capsys.readouterr()
    run(args)
    assert "0 written, 3 unchanged and skipped" in capsys.readouterr().out
    assert os.stat(shard).st_mtime_ns == 1
    assert not (out / "train" / ".train-000001.tar.tmp").exists()
    run(args + ["--overwrite"])
    assert "3 written, 0 unchanged" in capsys.readouterr().out
    assert os.stat(shard).st_mtime_ns != 1
    # Fewer, larger shards: the stale third shard is removed, the manifest only lists the new ones.
    run(args[:-1] + ["100"])
    assert sorted(os.listdir(out / "train")) == ["sizes.json", "train-000000.tar"]
    assert make_shards.main(["verify", str(out)]) == 0


def test_changed_content_rewrites_shard(cuhk, tmp_path):
    ann, imgs, _ = cuhk
    out = tmp_path / "o"
    args = ["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", out]
    run(args)
    before = shard_hashes(out)
    put(imgs, "train/p0/0.jpg", img_bytes((0, 255, 0)))
    run(args)
    assert shard_hashes(out)["train"] != before["train"] and shard_hashes(out)["test"] == before["test"]
    assert make_shards.main(["verify", str(out)]) == 0


# ------------------------------------------------------------------------------------------------ bad input ---

def bad_setup(tmp_path):
    imgs = tmp_path / "imgs"
    recs = [
        {"split": "train", "id": 1, "file_path": "ok.jpg", "captions": ["fine", "  "]},      # 1 empty caption
        {"split": "train", "id": 1, "file_path": "missing.jpg", "captions": ["x"]},          # missing_image
        {"split": "train", "id": 2, "file_path": "zero.jpg", "captions": ["x"]},             # empty_image
        {"split": "train", "id": 2, "file_path": "junk.jpg", "captions": ["x"]},             # unreadable_image
        {"split": "train", "id": 3, "file_path": "ok.jpg", "captions": ["dup"]},             # duplicate_image
        {"split": "train", "id": 3, "captions": ["no path"]},                                # missing_field
        {"split": "train", "id": 3, "file_path": "../outside.jpg", "captions": ["x"]},       # path_escapes_root
        {"split": "train", "id": 3, "file_path": "/etc/abs.jpg", "captions": ["x"]},         # path_escapes_root
        {"split": "train", "id": 4, "file_path": "trunc.jpg", "captions": ["x"]},            # unreadable_image
        {"split": "train", "id": 5, "file_path": "e.jpg", "captions": [""]},                 # empty + no captions
        {"split": "weird", "id": 5, "file_path": "w.jpg", "captions": ["x"]},                # unknown_split
        "not a record",                                                                      # malformed_record
        {"split": "train", "id": 6, "file_path": "u.jpg", "captions": ["NONUTF8", "good"]},  # non_utf8_text
    ]
    put(imgs, "ok.jpg", img_bytes())
    put(imgs, "zero.jpg", b"")
    put(imgs, "junk.jpg", b"this is not an image")
    put(imgs, "trunc.jpg", img_bytes(size=(64, 128))[:200])
    put(imgs, "e.jpg", img_bytes())
    put(imgs, "w.jpg", img_bytes())
    put(imgs, "u.jpg", img_bytes())
    put(tmp_path, "outside.jpg", img_bytes())
    raw = json.dumps(recs).encode().replace(b"NONUTF8", b"caf\xe9")  # latin-1 byte inside a UTF-8 file
    (tmp_path / "bad.json").write_bytes(raw)
    return str(tmp_path / "bad.json"), str(imgs)


def test_bad_records_are_dropped_and_counted(tmp_path, capsys):
    ann, imgs = bad_setup(tmp_path)
    out = tmp_path / "o"
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", out]) == 0
    man, s = load(out, "train")
    assert man["dropped"] == {"duplicate_image": 1, "empty_caption": 2, "empty_image": 1, "malformed_record": 1,
                              "missing_field": 1, "missing_image": 1, "no_valid_captions": 1, "non_utf8_text": 1,
                              "path_escapes_root": 2, "unknown_split": 1, "unreadable_image": 2}
    assert man["splits"]["train"]["dropped"]["path_escapes_root"] == 2
    assert [(json.loads(x["json"])["image"], x["txt"].decode()) for x in s] == [("ok.jpg", "fine"),
                                                                              ("u.jpg", "good")]
    printed = capsys.readouterr().out
    assert "path_escapes_root: 2" in printed and "unreadable_image: 2" in printed
    assert make_shards.main(["verify", str(out)]) == 0


@pytest.mark.parametrize("keep, expect", [
    (0, "field 'captions': empty_caption"),
    (1, "record 1: field 'file_path': missing_image"),
    (6, "record 6: field 'file_path': path_escapes_root"),
    (5, "record 5: field 'file_path': missing_field"),
])
def test_strict_names_file_record_field(tmp_path, capsys, keep, expect):
    ann, imgs = bad_setup(tmp_path)
    recs = json.load(open(ann, encoding="utf-8", errors="replace"))
    # Keep the one bad record under test (plus a good one) so the first error is the expected one.
    sub = [r if i == keep else None for i, r in enumerate(recs)]
    sub = [r if r is not None else {"split": "train", "id": 9, "file_path": "ok.jpg", "captions": ["ok"]}
           for r in sub][: keep + 1]
    if keep != 0:
        sub = [{"split": "train", "id": 9, "file_path": f"pad{i}.jpg", "captions": ["ok"]} for i in range(keep)]
        sub.append(recs[keep])
        for i in range(keep):
            put(imgs, f"pad{i}.jpg", img_bytes())
    else:
        sub = [recs[0]]
    write_json(tmp_path / "s.json", sub)
    assert run(["cuhkpedes", "--annotations", tmp_path / "s.json", "--images", imgs, "-o", tmp_path / "o",
                "--strict"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "s.json") in err and expect in err and "Traceback" not in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_strict_raises_record_error_for_non_utf8(tmp_path):
    raw = json.dumps([{"split": "train", "id": 1, "file_path": "a.jpg", "captions": ["NONUTF8"]}]).encode()
    (tmp_path / "a.json").write_bytes(raw.replace(b"NONUTF8", b"caf\xe9"))
    with pytest.raises(RecordError, match=r"a.json: record 0: field 'captions': non_utf8_text"):
        read_cuhkpedes(str(tmp_path / "a.json"), Drops(strict=True))


def test_captions_of_only_control_characters_are_dropped_and_strict_refuses_them(tmp_path, capsys):
    caps = ["a man in a red coat", "\x00\x00\x00", "\x1b\x07 \t\x7f", "\u200b\u200d", "\r\n"]
    ann, imgs = _one_record(tmp_path, "a.jpg", img_bytes())
    recs = json.load(open(ann))
    recs[0]["captions"] = caps
    recs.append({"split": "train", "id": 2, "file_path": "a2.jpg", "captions": ["\x00"]})  # no caption left
    put(imgs, "a2.jpg", img_bytes())
    write_json(ann, recs)
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", tmp_path / "o"]) == 0
    man, samples = load(str(tmp_path / "o"), "train")
    assert [s["txt"].decode() for s in samples] == ["a man in a red coat"]
    assert man["dropped"] == {"empty_caption": 1, "invisible_caption": 4, "no_valid_captions": 1}
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", tmp_path / "o2", "--strict"]) == 2
    assert capsys.readouterr().err.endswith(
        "record 0: field 'captions': invisible_caption (only control characters or whitespace: '\\x00\\x00\\x00')\n")
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("split", ["..", ".", "", "/", "a/b", "../x", ".hidden", "-x", "tr\x00ain"])
def test_split_must_be_a_plain_folder_name(tmp_path, capsys, split):
    ann = write_json(tmp_path / "g.json", [{"id": 1, "image_path": "a.jpg", "caption": "a person"}])
    put(tmp_path / "i", "a.jpg", img_bytes())
    out = tmp_path / "d" / "o"
    assert run(["generated", "--annotations", ann, "--images", tmp_path / "i", "-o", out, f"--split={split}"]) == 2
    assert capsys.readouterr().err == (f"error: --split {split!r}: must be a plain folder name (letters, digits, "
                                       f"'_', '-', '.'; not starting with '.' or '-')\n")
    assert not (tmp_path / "d").exists()
    assert run(["generated", "--annotations", ann, "--images", tmp_path / "i", "-o", out, "--split", "v2.1_x"]) == 0


def test_drops_file_never_overwrites_an_input_or_a_file_of_the_output(cuhk, tmp_path, capsys):
    ann, imgs, _ = cuhk
    out = tmp_path / "o"
    args = ["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", out]
    assert run(args + ["--drops-file", out / "drops.jsonl"]) == 0  # beside the splits: fine
    os.symlink(ann, tmp_path / "link.jsonl")
    before = {**tree_hashes(out), **{f"in/{k}": v for k, v in tree_hashes(imgs).items()},
              "ann": hashlib.sha256(open(ann, "rb").read()).hexdigest()}
    capsys.readouterr()
    for drops, says in [(ann, f"is --annotations {ann}:"), (tmp_path / "link.jsonl", f"is --annotations {ann}:"),
                        (f"{imgs}/train/p0/0.jpg", f"lies in the input --images {imgs} (train/p0/0.jpg):"),
                        (f"{imgs}/new.jsonl", "lies in the input --images"),
                        (out / "manifest.json", f"lies in the output --output {out} (manifest.json):"),
                        (out / "train" / "sizes.json", "(train/sizes.json)"),
                        (out / "test" / "test-000000.tar", "(test/test-000000.tar)"),
                        (out, "is a folder")]:
        assert run(args + ["--strict", "--drops-file", drops]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --drops-file {drops}: ") and says in err and err.count("\n") == 1, err
        assert {**tree_hashes(out), **{f"in/{k}": v for k, v in tree_hashes(imgs).items()},
                "ann": hashlib.sha256(open(ann, "rb").read()).hexdigest()} == before
    # written by temp file + rename: a hard link to the annotation file at the drops file's path is replaced, not
    # written through
    os.link(ann, tmp_path / "hard.jsonl")
    assert run(args + ["--drops-file", tmp_path / "hard.jsonl"]) == 0
    assert hashlib.sha256(open(ann, "rb").read()).hexdigest() == before["ann"]
    assert (tmp_path / "hard.jsonl").read_text() == ""


@pytest.mark.parametrize("content, msg", [
    (b"{not json", "not valid JSON"),
    (b'{"a": 1}', "wrong top-level type"),
    (b'"text"', "wrong top-level type"),
])
def test_malformed_annotation_file(tmp_path, capsys, content, msg):
    (tmp_path / "a.json").write_bytes(content)
    assert run(["cuhkpedes", "--annotations", tmp_path / "a.json", "--images", tmp_path, "-o", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'a.json'}: {msg}" in err and "Traceback" not in err
    with pytest.raises(AnnotationError, match="a.json"):
        read_cuhkpedes(str(tmp_path / "a.json"), Drops())


def test_missing_annotation_file(tmp_path, capsys):
    assert run(["rstpreid", "--annotations", tmp_path / "nope.json", "--images", tmp_path, "-o",
                tmp_path / "o"]) == 2
    assert "nope.json: cannot read annotation file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- fsspec and verify ---

def test_memory_fs_input_and_output(tmp_path):
    fs = fsspec.filesystem("memory")
    recs = cuhk_records(2, 2)
    for r in recs:
        fs.pipe_file(f"/dp_in/imgs/{r['file_path']}", img_bytes())
    fs.pipe_file("/dp_in/reid_raw.json", json.dumps(recs).encode())
    try:
        for w in ("1", "2"):
            assert run(["cuhkpedes", "--annotations", "memory://dp_in/reid_raw.json", "--images",
                        "memory://dp_in/imgs", "-o", f"memory://dp_out{w}", "--workers", w]) == 0
        man, s = load("memory://dp_out1", "train")
        assert man["splits"]["train"]["pairs"] == 8 and len(s) == 8
        assert fs.cat_file("/dp_out1/train/train-000000.tar") == fs.cat_file("/dp_out2/train/train-000000.tar")
        assert json.loads(fs.cat_file("/dp_out1/train/sizes.json")) == {"train-000000.tar": 8}
        assert make_shards.main(["verify", "memory://dp_out1"]) == 0
    finally:
        for p in ("/dp_in", "/dp_out1", "/dp_out2"):
            if fs.exists(p):
                fs.rm(p, recursive=True)


def test_verify_detects_corruption(cuhk, tmp_path, capsys):
    ann, imgs, _ = cuhk
    out = tmp_path / "o"
    run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", out, "--maxcount", 4])
    assert make_shards.main(["verify", str(out)]) == 0
    report = capsys.readouterr().out
    assert "train" in report and "OK" in report
    shard = out / "train" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700:720] = b"\x00" * 20  # inside the first image
    shard.write_bytes(bytes(data))
    assert make_shards.main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "train/train-000001.tar: sha256 does not match" in err
    (out / "test" / "test-000000.tar").unlink()
    (out / "test" / "sizes.json").write_text("{}")
    assert make_shards.main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "test/test-000000.tar: missing" in err and "sizes.json" in err
    (out / "manifest.json").unlink()
    assert make_shards.main(["verify", str(out)]) == 1


def test_verify_detects_bad_keys(tmp_path):
    from common.shards import make_sample, pack

    out = tmp_path / "o"
    (out / "train").mkdir(parents=True)
    meta = {"key": 0, "pid": 0, "orig_id": 1, "source": "x", "image": "a.jpg", "image_id": 0, "caption_id": 0}
    data = pack([make_sample(0, img_bytes(), "a", meta), make_sample(2, img_bytes(), "b",
                                                                    dict(meta, key=2, caption_id=1))])
    (out / "train" / "train-000000.tar").write_bytes(data)
    (out / "train" / "sizes.json").write_text(json.dumps({"train-000000.tar": 2}))
    man = {"format_version": 1, "splits": {"train": {"pairs": 2, "images": 1, "captions": 2, "identities": 1,
           "shards": [{"name": "train-000000.tar", "count": 2, "sha256": hashlib.sha256(data).hexdigest()}]}}}
    (out / "manifest.json").write_text(json.dumps(man))
    from data_prep.verify import verify

    problems, _ = verify(str(out))
    assert any("key 2 (name 000000002) where 1 was expected" in p for p in problems)


def test_help_for_every_source(capsys):
    for src in ["synthetic", "cuhkpedes", "icfgpedes", "rstpreid", "tbps", "generated", "csv", "verify"]:
        with pytest.raises(SystemExit) as e:
            make_shards.main([src, "--help"])
        assert e.value.code == 0
    assert "--annotations" in capsys.readouterr().out


def test_every_source_is_one_registry_entry(capsys):
    """Each SOURCES entry is a subcommand whose --help names every flag the entry declares (and the output flags);
    the only other subcommands are the two that read shards."""
    from data_prep.sources import OUTPUT_OPTIONS, SOURCES

    sub = next(a for a in make_shards.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [*SOURCES, "index", "verify"]
    for name, source in SOURCES.items():
        assert source.name == name
        with pytest.raises(SystemExit) as e:
            make_shards.main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        for o in (*source.options, *OUTPUT_OPTIONS):
            assert all(flag in out for flag in o.flags), (name, o.flags)
    with pytest.raises(SystemExit):
        make_shards.main(["--help"])
    listing = " ".join(capsys.readouterr().out.split())  # each source's line, unwrapped
    assert all(f"{name} {' '.join(s.help.split())}" in listing for name, s in SOURCES.items())


def test_csv_bad_rows_are_counted(tmp_path):
    raw = (b"image,image_id,caption,caption_id\n"
           b"a.jpg,1,good,0\n"
           b"a.jpg,1,caf\xe9,1\n"        # not UTF-8
           b"b.jpg,2,,0\n"               # empty caption -> image has none left
           b"../x.jpg,3,escape,0\n"
           b",4,no image,0\n")
    (tmp_path / "t.csv").write_bytes(raw)
    put(tmp_path / "i", "a.jpg", img_bytes())
    put(tmp_path / "i", "b.jpg", img_bytes())
    assert run(["csv", "--annotations", tmp_path / "t.csv", "--images", tmp_path / "i", "-o", tmp_path / "o",
                "--split", "test"]) == 0
    man, s = load(tmp_path / "o", "test")
    assert [x["txt"].decode() for x in s] == ["good"]
    assert man["dropped"] == {"empty_caption": 1, "missing_field": 1, "no_valid_captions": 1, "non_utf8_text": 1,
                              "path_escapes_root": 1}


# ------------------------------------------------------------------------------- never lose finished work ---

def tree_hashes(root):
    """sha256 of every file under root (hidden staging included), by relative path."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_a_failing_rerun_leaves_the_previous_output_byte_identical(cuhk, tmp_path, capsys):
    ann, imgs, recs = cuhk
    out = tmp_path / "o"
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", out, "--maxcount", 4]) == 0
    before = tree_hashes(out)
    # 1. a mistyped image root
    assert run(["cuhkpedes", "--annotations", ann, "--images", tmp_path / "imgz", "-o", out]) == 2
    assert "--images" in capsys.readouterr().err
    assert tree_hashes(out) == before
    # 2. the root exists but no image of a split is there: the split would be empty
    (tmp_path / "empty").mkdir()
    assert run(["cuhkpedes", "--annotations", ann, "--images", tmp_path / "empty", "-o", out, "--maxcount", 2]) == 2
    err = capsys.readouterr().err
    assert "none of its 6 images could be packed" in err and "missing_image" in err
    assert tree_hashes(out) == before
    # 3. different data that stops half-way under --strict (the test split's last image is missing): the train
    #    split was already packed, with other bytes, but nothing of it may replace the old shards
    recs2 = [dict(r, captions=[c + " (v2)" for c in r["captions"]]) for r in recs]
    recs2[-1]["file_path"] = "test/nowhere.jpg"
    ann2 = write_json(tmp_path / "v2.json", recs2)
    assert run(["cuhkpedes", "--annotations", ann2, "--images", imgs, "-o", out, "--maxcount", 2, "--strict"]) == 2
    assert tree_hashes(out) == before
    assert make_shards.main(["verify", str(out)]) == 0


def test_splits_of_an_earlier_run_are_reported_and_refused(cuhk, tmp_path, capsys):
    from fast_clip.retrieval.testset import EvalError, resolve_shards

    ann, imgs, recs = cuhk
    out = tmp_path / "o"
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", out]) == 0
    train_only = write_json(tmp_path / "train.json", [r for r in recs if r["split"] == "train"])
    capsys.readouterr()
    assert run(["cuhkpedes", "--annotations", train_only, "--images", imgs, "-o", out]) == 0
    assert "note: test/ holds shards of an earlier run" in capsys.readouterr().out
    with pytest.raises(EvalError, match="not a split of the .*manifest.json"):
        resolve_shards(str(out / "test"))
    assert len(resolve_shards(str(out / "train"))) == 1


def test_verify_fails_on_an_empty_split(cuhk, tmp_path, capsys):
    ann, imgs, _ = cuhk
    out = tmp_path / "o"
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", out]) == 0
    man = json.load(open(out / "manifest.json"))
    man["splits"]["val"] = {"pairs": 0, "images": 0, "captions": 0, "identities": 0, "shards": []}
    (out / "val").mkdir()
    (out / "val" / "sizes.json").write_text("{}")
    (out / "manifest.json").write_text(json.dumps(man))
    assert make_shards.main(["verify", str(out)]) == 1
    assert "val: empty split" in capsys.readouterr().err


# A re-run whose commit fails: v1 has 3 shards per split (maxcount 5), v2 other captions and 4 (maxcount 3).

def _v1_then_v2(cuhk, tmp_path):
    ann, imgs, recs = cuhk
    out = tmp_path / "o"
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", out, "--maxcount", 5]) == 0
    ann2 = write_json(tmp_path / "v2.json", [dict(r, captions=[c + " (v2)" for c in r["captions"]]) for r in recs])
    return out, ["cuhkpedes", "--annotations", ann2, "--images", imgs, "-o", out, "--maxcount", 3]


def _failing_mv(monkeypatch, fails):
    """The local file system's mv (every rename make_shards does) raising EIO where ``fails(call number, src, dst)``."""
    from fsspec.implementations.local import LocalFileSystem

    real, calls = LocalFileSystem.mv, [0]

    def mv(self, src, dst, **kw):
        calls[0] += 1
        if fails(calls[0], str(src), str(dst)):
            raise OSError(errno.EIO, "injected")
        return real(self, src, dst, **kw)

    monkeypatch.setattr(LocalFileSystem, "mv", mv)
    return calls


def test_a_rename_failing_anywhere_leaves_the_previous_output_byte_identical(cuhk, tmp_path, monkeypatch, capsys):
    out, v2 = _v1_then_v2(cuhk, tmp_path)
    before = tree_hashes(out)
    capsys.readouterr()
    for n in itertools.count(1):  # fail the 1st rename, then the 2nd, ... until a run gets through
        calls = _failing_mv(monkeypatch, lambda i, src, dst, n=n: i == n)
        rc = run(v2)
        if calls[0] < n:
            break
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, (n, err)
        assert err.startswith(f"error: --output {out}: cannot write (OSError: injected); nothing there was changed")
        assert tree_hashes(out) == before, f"rename {n} of {calls[0]} failed and the output changed"
        assert not (out / ".replaced").exists()
    assert rc == 0 and n == 32  # the sweep went through every rename: 11 that stage, 20 that commit
    monkeypatch.undo()
    assert make_shards.main(["verify", str(out)]) == 0
    assert [s["name"] for s in json.load(open(out / "manifest.json"))["splits"]["test"]["shards"]] == [
        f"test-{i:06d}.tar" for i in range(4)]


def test_a_commit_whose_undo_fails_says_exactly_what_is_where(cuhk, tmp_path, monkeypatch, capsys):
    out, v2 = _v1_then_v2(cuhk, tmp_path)
    before = tree_hashes(out)
    capsys.readouterr()
    # Every rename fails from the one that would put the first test shard in place on, undoing included.
    broken = []
    _failing_mv(monkeypatch, lambda i, src, dst: bool(broken) or bool(
        dst.endswith("/test/test-000000.tar") and ".staging" in src and not broken.append(i)))
    assert run(v2) == 2
    err = capsys.readouterr().err
    aside = ["manifest.json", "test/test-000000.tar", "train/sizes.json"] + [f"train/train-00000{i}.tar"
                                                                             for i in range(3)]
    new = ["train/sizes.json"] + [f"train/train-00000{i}.tar" for i in range(4)]
    assert err == (
        f"error: --output {out}: the commit failed (OSError: injected) and undoing it failed too (OSError: "
        f"injected), so the output mixes two runs: 6 ({', '.join(aside)}) earlier file(s) are set aside in "
        f"{out}/.replaced/ and 5 ({', '.join(new)}) file(s) of this run are in place. To finish this run's output, "
        f"delete {out}/.replaced/ and run the same command again; to get the earlier output back, move every file "
        f"under {out}/.replaced/ back to the same path under {out} and delete these 1 (train/train-000003.tar) "
        f"file(s) of this run from it (`make_shards.py verify` names any shard left to delete)\n")
    monkeypatch.undo()
    # The message is the truth: the files it names are where it says.
    assert {k: v for k, v in tree_hashes(out / ".replaced").items()} == {k: before[k] for k in aside}
    assert not (out / "manifest.json").exists() and (out / "train" / "train-000003.tar").exists()
    # The next run refuses to mix its files in; the repair the message gives brings the earlier output back.
    assert run(v2) == 2
    assert ".replaced/ holds files set aside by a commit that did not finish" in capsys.readouterr().err
    for rel in aside:
        os.replace(out / ".replaced" / rel, out / rel)
    os.remove(out / "train" / "train-000003.tar")
    shutil.rmtree(out / ".replaced")
    assert tree_hashes(out) == before
    assert run(v2) == 0 and make_shards.main(["verify", str(out)]) == 0


# --------------------------------------------------------------------------------------- image and text input ---

def _one_record(tmp_path, rel, data, caption="a person", encoding="utf-8"):
    imgs = tmp_path / "imgs"
    put(imgs, rel, data)
    ann = tmp_path / "a.json"
    ann.write_bytes(json.dumps([{"split": "train", "id": 1, "file_path": rel, "captions": [caption]}],
                               ensure_ascii=False).encode(encoding))
    return str(ann), str(imgs)


def _packed_image(out):
    _, samples = load(str(out), "train")
    return Image.open(io.BytesIO(samples[0]["jpg"]))


def test_exif_orientation_cmyk_and_alpha_are_normalised(tmp_path):
    from data_prep.images import check_or_encode

    # an 8x16 (w x h) photo stored sideways: EXIF orientation 6 (rotate 90 degrees clockwise to view)
    im = Image.new("RGB", (16, 8), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    out, reason = check_or_encode(buf.getvalue())
    assert reason is None and Image.open(io.BytesIO(out)).size == (8, 16)
    # plain RGB JPEG: byte-identical pass-through
    plain = img_bytes()
    assert check_or_encode(plain) == (plain, None)
    # CMYK JPEG -> RGB
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, format="JPEG")
    out, _ = check_or_encode(buf.getvalue())
    assert Image.open(io.BytesIO(out)).mode == "RGB"
    # PNG with a transparent half: composited on the given background
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 4, 8))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    out, _ = check_or_encode(buf.getvalue(), background=(0, 255, 0))
    px = Image.open(io.BytesIO(out)).convert("RGB")
    assert px.getpixel((1, 4))[1] > 200 and px.getpixel((6, 4))[2] > 200


def test_max_side_and_decompression_bomb(tmp_path, monkeypatch, capsys):
    ann, imgs = _one_record(tmp_path, "big.jpg", img_bytes(size=(40, 100)))
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", tmp_path / "o", "--max-side", 50]) == 0
    assert _packed_image(tmp_path / "o").size == (20, 50)
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", tmp_path / "o2"]) == 0
    assert _packed_image(tmp_path / "o2").size == (40, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4000 px > 2 x 1000: PIL's guard refuses to open it
    drops = tmp_path / "drops.jsonl"
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", tmp_path / "o3",
                "--drops-file", drops]) == 2
    (rec,) = [json.loads(x) for x in drops.read_text().splitlines()]
    assert rec["reason"] == "decompression_bomb" and rec["field"] == "file_path" and rec["record"] == 0
    assert rec["file"] == ann and rec["split"] == "train"


def test_annotation_encoding(tmp_path, capsys):
    ann, imgs = _one_record(tmp_path, "a.jpg", img_bytes(), caption="une femme en manteau café", encoding="latin-1")
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", tmp_path / "o"]) == 2  # nothing usable
    assert "non_utf8_text" in capsys.readouterr().err
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", tmp_path / "o",
                "--encoding", "latin-1"]) == 0
    _, samples = load(str(tmp_path / "o"), "train")
    assert samples[0]["txt"].decode("utf-8") == "une femme en manteau café"


def test_symlinks_leading_outside_the_image_root_are_refused(tmp_path):
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(img_bytes())
    imgs = tmp_path / "imgs"
    put(imgs, "in.jpg", img_bytes())
    os.symlink(outside, imgs / "link.jpg")
    os.symlink(imgs / "in.jpg", imgs / "inner_link.jpg")  # a link that stays inside is fine
    recs = [{"split": "train", "id": i, "file_path": f, "captions": ["a person"]}
            for i, f in enumerate(["in.jpg", "link.jpg", "inner_link.jpg"])]
    ann = write_json(tmp_path / "a.json", recs)
    drops = tmp_path / "d.jsonl"
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", tmp_path / "o", "--drops-file",
                drops]) == 0
    man, samples = load(str(tmp_path / "o"), "train")
    assert [json.loads(s["json"])["image"] for s in samples] == ["in.jpg", "inner_link.jpg"]
    assert [json.loads(x)["reason"] for x in drops.read_text().splitlines()] == ["path_escapes_root"]


def test_captions_as_a_plain_string_are_dropped_as_documented(tmp_path):
    d = Drops()
    recs = [{"split": "train", "id": 1, "file_path": "a.jpg", "captions": "just one string"}]
    assert read_cuhkpedes(write_json(tmp_path / "a.json", recs), d) == {}
    assert d.records[0]["reason"] == "malformed_field" and "single string" in d.records[0]["detail"]


def test_index_writes_sizes_for_foreign_shards(tmp_path, capsys):
    d = tmp_path / "wds"
    d.mkdir()
    with wds.ShardWriter(str(d / "%05d.tar"), maxcount=3, verbose=0) as w:
        for i in range(7):
            w.write({"__key__": f"k{i}", "jpg": img_bytes(), "txt": "x"})
    assert make_shards.main(["index", str(d)]) == 0
    assert json.loads((d / "sizes.json").read_text()) == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 1}


def test_a_wrong_source_type_names_the_missing_field(tmp_path, capsys):
    recs = [{"id": 1, "img_path": "a.jpg", "captions": ["x"], "split": "train"}]  # an RSTPReid record
    ann = write_json(tmp_path / "r.json", recs)
    (tmp_path / "imgs").mkdir()
    assert run(["cuhkpedes", "--annotations", ann, "--images", tmp_path / "imgs", "-o", tmp_path / "o"]) == 2
    err = capsys.readouterr().err
    assert "missing_field of field 'file_path'" in err and "right source type" in err


def test_unwritable_output_is_one_error_line_and_nothing_changes(cuhk, tmp_path, capsys):
    ann, imgs, _ = cuhk
    blocker = tmp_path / "afile"
    blocker.write_text("a file where a folder is needed")
    assert run(["cuhkpedes", "--annotations", ann, "--images", imgs, "-o", blocker / "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output") and "cannot write" in err and "Traceback" not in err
    assert blocker.read_text() == "a file where a folder is needed"


def test_progress_lines_without_a_terminal(capsys):
    from data_prep.writer import _ProgressLines

    t = iter([0.0, 10.0, 31.0, 40.0, 62.0])
    p = _ProgressLines("train", 4)
    p.clock = lambda: next(t)  # start at 0 s, then ticks at 10, 31, 40, 62 s
    p.start = p.last = p.clock()
    for _ in range(4):
        p.tick()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["train: 2/4 images (0/s, about 31 s left)", "train: 4/4 images (0/s, about 0 s left)"]
