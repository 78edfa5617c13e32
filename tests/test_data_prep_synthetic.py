"""data_prep synthetic source: identity splits, siblings, captions, determinism."""
from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from data_prep import make_shards
from data_prep.synthetic import PALETTE, assign_splits, caption, make_identities

ROOT = Path(__file__).resolve().parents[1]


def read_split(out, split):
    man = json.load(open(os.path.join(out, "manifest.json")))
    samples = []
    for sh in man["splits"][split]["shards"]:
        with tarfile.open(os.path.join(out, split, sh["name"])) as tf:
            files = {m.name: tf.extractfile(m).read() for m in tf}
        for k in sorted({n.split(".")[0] for n in files}):
            samples.append({"json": json.loads(files[f"{k}.json"]), "txt": files[f"{k}.txt"].decode(),
                            "jpg": files[f"{k}.jpg"]})
    return man, samples


def test_synthetic_shards_splits_and_determinism(tmp_path):
    base = ["synthetic", "--num-ids", "30", "--images-per-id", "2", "--height", "64", "--width", "32",
            "--val-frac", "0.2", "--test-frac", "0.2", "--seed", "3", "--no-progress", "--maxcount", "40"]
    assert make_shards.main(base + ["-o", str(tmp_path / "a")]) == 0
    assert make_shards.main(base + ["-o", str(tmp_path / "b"), "--workers", "2"]) == 0
    ma = json.load(open(tmp_path / "a" / "manifest.json"))
    mb = json.load(open(tmp_path / "b" / "manifest.json"))
    assert ma["splits"] == mb["splits"]  # same shard sha256s with 1 and 2 workers
    ids = {}
    for split in ("train", "val", "test"):
        man, s = read_split(tmp_path / "a", split)
        assert man["splits"][split]["pairs"] == len(s) == 2 * man["splits"][split]["images"]
        ids[split] = {x["json"]["orig_id"] for x in s}
        assert all(x["json"]["source"] == "synthetic" and "upper_color" in x["json"]["attributes"] for x in s)
        assert [x["json"]["key"] for x in s] == list(range(len(s)))
        im = Image.open(io.BytesIO(s[0]["jpg"]))
        assert im.size == (32, 64) and im.format == "JPEG"
    assert ids["train"].isdisjoint(ids["val"]) and ids["train"].isdisjoint(ids["test"])
    assert ids["val"].isdisjoint(ids["test"])
    assert sum(len(v) for v in ids.values()) == 30 and 4 <= len(ids["test"]) <= 8
    assert make_shards.main(["verify", str(tmp_path / "a")]) == 0
    # A different seed gives different data.
    assert make_shards.main(base[:-5] + ["--seed", "4", "--no-progress", "-o", str(tmp_path / "c")]) == 0
    mc = json.load(open(tmp_path / "c" / "manifest.json"))
    assert mc["splits"]["train"]["shards"][0]["sha256"] != ma["splits"]["train"]["shards"][0]["sha256"]


def test_siblings_share_most_attributes_and_stay_in_one_split():
    ids = make_identities(200, seed=0)
    fams = {}
    for a, f in ids:
        fams.setdefault(f, []).append(a)
    multi = [m for m in fams.values() if len(m) > 1]
    assert len(multi) >= 20  # a good share of identities has hard negatives
    keys = ["gender", "hair_length", "hair_color", "upper_type", "sleeve", "upper_color", "pattern",
            "pattern_color", "lower_type", "lower_color", "shoe_color", "backpack", "handbag", "hat", "glasses"]
    for members in multi:
        base = members[0]
        for sib in members[1:]:
            diff = [k for k in keys if sib[k] != base[k]]
            assert 1 <= len(diff) <= 4, diff  # 1-2 mutations (a garment change also changes its sleeve etc.)
            assert sib["family"] == base["family"]
    splits = assign_splits(ids, 0.1, 0.1, seed=0)
    for f, members in fams.items():
        assert len({splits[i] for i, (_, ff) in enumerate(ids) if ff == f}) == 1
    assert abs(splits.count("test") - 20) <= 3 and abs(splits.count("val") - 20) <= 3
    # No two identities are exactly alike.
    sig = {json.dumps({k: a[k] for k in keys}, sort_keys=True) for a, _ in ids}
    assert len(sig) == len(ids)


def test_captions_mention_attributes_with_palette_words():
    ids = make_identities(100, seed=1)
    rng = random.Random(0)
    upper_hits = lower_hits = 0
    n = 0
    for a, _ in ids:
        for _ in range(3):
            c = caption(a, rng)
            n += 1
            words = c.lower().replace(",", " ").replace(".", " ").split()
            upper_hits += a["upper_color"] in words
            lower_hits += a["lower_color"] in words
            colours = [w for w in words if w in PALETTE]
            # Every colour word names a colour the identity actually has.
            has = {a["upper_color"], a["lower_color"], a["shoe_color"], a["pattern_color"], a["backpack"],
                   a["handbag"], a["hat"], a["hair_color"]}
            assert set(colours) <= has, (c, a)
            assert 2 <= len(colours) + ("hair" in words) + ("glasses" in words) <= 8
            assert c[0].isupper() and c.endswith(".")
    assert upper_hits / n > 0.9 and lower_hits / n > 0.8


@pytest.mark.slow
def test_ctrl_c_with_workers_exits_at_once_and_keeps_the_previous_output(tmp_path):
    """Ctrl-C reaches the parent and its pool workers alike: the run must end (a worker killed inside a packing job
    would leave the parent waiting for it forever), say so in one line, and leave the earlier output as it was."""
    out = tmp_path / "out"
    base = [sys.executable, "data_prep/make_shards.py", "synthetic", "--images-per-id", "4", "-o", str(out),
            "--workers", "2", "--no-progress", "--maxcount", "200"]
    assert subprocess.run(base + ["--num-ids", "20"], cwd=ROOT, capture_output=True).returncode == 0
    before = {p.name: p.read_bytes() for p in (out / "train").iterdir()}
    proc = subprocess.Popen(base + ["--num-ids", "3000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    staging = out / "train" / ".staging"
    deadline = time.monotonic() + 60
    while not (staging.is_dir() and any(staging.iterdir())) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the whole foreground group
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("make_shards did not exit after Ctrl-C")
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and lines[0].startswith("error: interrupted"), err
    assert not staging.exists()
    assert {p.name: p.read_bytes() for p in (out / "train").iterdir()} == before
    assert make_shards.main(["verify", str(out)]) == 0
