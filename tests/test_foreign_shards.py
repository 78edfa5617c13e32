"""Ordinary webdataset shards (written here by webdataset.ShardWriter, as img2dataset or a user would) train with
every loss, stop and resume bit-identically, and their sample counts come from *_stats.json or a one-time scan."""
import io
import json
import os

import pytest
import torch
from PIL import Image

from training import data as D
from training.config import LoaderConfig

COLOURS = [(220, 30, 30), (30, 180, 60), (30, 60, 220), (230, 220, 40), (15, 15, 15), (240, 240, 240)]
NAMES = ["red", "green", "blue", "yellow", "black", "white"]


def _jpeg(c, k):
    im = Image.new("RGB", (32, 64), (120, 120, 120))
    im.paste(Image.new("RGB", (16, 30), c), (8 + k % 3, 4))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_foreign(root, style: str, n=48, per_shard=16):
    """style 'img2dataset': jpg + txt + json {key, caption, url, ...} and NAME_stats.json; 'bare': jpg + txt only,
    no index file at all."""
    import webdataset as wds

    os.makedirs(root, exist_ok=True)
    with wds.ShardWriter(os.path.join(root, "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(n):
            c = i % len(COLOURS)
            s = {"__key__": f"{i:09d}", "jpg": _jpeg(COLOURS[c], i), "txt": f"a person in a {NAMES[c]} shirt"}
            if style == "img2dataset":
                s["json"] = {"key": f"{i:09d}", "caption": s["txt"], "url": f"http://example.com/{i}.jpg",
                             "width": 32, "height": 64, "status": "success"}
            sink.write(s)
    if style == "img2dataset":
        for k in range(-(-n // per_shard)):
            count = min(per_shard, n - k * per_shard)
            with open(os.path.join(root, f"{k:05d}_stats.json"), "w") as f:
                json.dump({"count": count, "successes": count, "failed_to_download": 0}, f)
    return root


def test_counts_come_from_stats_files_or_one_scan_written_as_sizes_json(tmp_path):
    a = write_foreign(str(tmp_path / "a"), "img2dataset", n=40)
    s = D.load_shard_set(a)
    assert s.counts == [16, 16, 8] and not s.is_make_shards_split and s.split_ids is None
    assert not os.path.exists(os.path.join(a, "sizes.json"))  # the stats files were enough
    b = write_foreign(str(tmp_path / "b"), "bare", n=40)
    logged = []
    s = D.load_shard_set(b, logger=logged.append)
    assert s.counts == [16, 16, 8] and s.bases == [0, 16, 32]
    assert json.load(open(os.path.join(b, "sizes.json"))) == {"00000.tar": 16, "00001.tar": 16, "00002.tar": 8}
    assert any("counting them once" in m for m in logged) and any("wrote sizes.json" in m for m in logged)
    logged.clear()
    D.load_shard_set(b, logger=logged.append)
    assert logged == []  # the second start reads sizes.json


def test_an_unreadable_shard_without_counts_is_a_clear_error(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(D.DataError, match=r"a\.tar cannot be counted"):
        D.load_shard_set(str(tmp_path / "a.tar"))


def test_pair_indices_are_positions_in_the_fixed_shard_list(tmp_path):
    """Each pair's pair index is its position (not a json key): every epoch, every pair once, same index."""
    from fast_clip.model import get_tokenizer
    from common.transforms import build_transform, clean_caption

    a = write_foreign(str(tmp_path / "a"), "img2dataset", n=48)
    b = write_foreign(str(tmp_path / "b"), "bare", n=32)
    sets = D.load_train_sets(f"{a}::{b}")
    assert [s.pair_index_offset for s in sets] == [0, 48]
    dec = D.SampleDecoder(transform=build_transform((64, 32), train=False), clean=clean_caption)
    stream = D.TrainStream(sets, LoaderConfig(step_batch_size=8, workers=0, seed=0, shuffle_buffer=4), dec,
                           get_tokenizer("PersonTiny"), rank=0, world=1)
    seen = {}
    for epoch in range(2):
        stream.set_epoch(epoch)
        keys, caps = [], []
        for batch in stream:
            keys += batch["keys"].tolist()
            caps += [t for t in batch["texts"].tolist()]
            assert batch["pids"].tolist() == [-1] * 8 and batch["bad"] == {}
        assert sorted(keys) == list(range(80))
        for k, c in zip(keys, caps):
            assert seen.setdefault(k, c) == c  # the same pair always has the same index


def test_caption_from_a_json_field_and_missing_caption_names_the_field(tmp_path):
    from common.transforms import build_transform, clean_caption

    dec = D.SampleDecoder(transform=build_transform((64, 32), train=False), clean=clean_caption,
                          caption_key="caption")
    s = D.ShardSet(spec="x", urls=["x"], counts=[1], split_ids=None)
    raw = {"jpg": _jpeg(COLOURS[0], 0), "json": json.dumps({"caption": "a man in red"}).encode()}
    assert dec(raw, s, 5)[1:] == ("a man in red", 5, -1)
    with pytest.raises(D._BadSample) as e:
        dec({"jpg": raw["jpg"], "txt": b"x"}, s, 0)
    assert e.value.reason == "missing_caption" and "'caption'" in e.value.detail
    split = D.ShardSet(spec="x", urls=["x"], counts=[1], split_ids=3, is_make_shards_split=True)
    with pytest.raises(D._BadSample) as e:
        dec({"jpg": raw["jpg"], "caption": b"x", "json": b'{"key": 0}'}, split, 0)
    assert e.value.reason == "bad_json" and "pid" in e.value.detail


@pytest.mark.slow  # a whole training run
@pytest.mark.parametrize("loss", ["openclip", "fastclip-v3"])
def test_foreign_shards_train_stop_and_resume_bit_identically(tmp_path, loss):
    from training.main import main

    a = write_foreign(str(tmp_path / "a"), "img2dataset", n=48)
    b = write_foreign(str(tmp_path / "b"), "bare", n=32)
    common = ["--train-data", f"{a}::{b}", "--model", "PersonTiny", "--batch-size", "8", "--workers", "0",
              "--epochs", "1", "--logs-dir", str(tmp_path), "--warmup", "1", "--loss", loss, "--seed", "3"]
    assert main(common + ["--name", "full"]) == 0
    assert main(common + ["--name", "cut", "--max-steps", "3"]) == 0
    assert main(common + ["--name", "cut", "--resume", "latest"]) == 0
    x = torch.load(tmp_path / "full" / "checkpoints" / "epoch_1.pt", weights_only=True)
    y = torch.load(tmp_path / "cut" / "checkpoints" / "epoch_1.pt", weights_only=True)
    for k, v in x["state_dict"].items():
        torch.testing.assert_close(y["state_dict"][k], v, atol=0, rtol=0, msg=k)
    for k, v in x["loss"].items():
        if torch.is_tensor(v):
            torch.testing.assert_close(y["loss"][k], v, atol=0, rtol=0, msg=k)
    if loss == "fastclip-v3":
        assert x["loss"]["u1"].numel() == 80  # one estimator entry per pair, no more
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["status"] == "finished" and not summary.get("bad_samples")


def test_id_loss_on_foreign_shards_is_a_clear_error(tmp_path, capsys):
    from training.main import main

    a = write_foreign(str(tmp_path / "a"), "bare", n=32)
    with pytest.raises(SystemExit, match="needs person ids"):
        main(["--train-data", a, "--model", "PersonTiny", "--batch-size", "8", "--workers", "0", "--epochs", "1",
              "--logs-dir", str(tmp_path), "--name", "id", "--id-loss", "arcface", "--loss", "openclip"])
