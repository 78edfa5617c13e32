"""Tiny shard sets in the data_prep format, written by the tests themselves through the one shard module
(common/shards.py), not data_prep's CLI, so that they can carry faults.

Each identity gets an upper and a lower colour; its images are those two colour blocks with noise, and its captions
name the colours, so a tiny model can learn something in a few steps.
"""
from __future__ import annotations

import io
import json
import os
import random

from PIL import Image

from common import shards

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 220, 40),
           "black": (15, 15, 15), "white": (240, 240, 240), "purple": (140, 40, 170), "orange": (250, 140, 20)}


def _jpeg(upper, lower, rng: random.Random, size=(32, 64)) -> bytes:
    w, h = size
    im = Image.new("RGB", (w, h), tuple(rng.randrange(90, 160) for _ in range(3)))
    top, bottom = Image.new("RGB", (w // 2, h // 2), upper), Image.new("RGB", (w // 2, h // 2 - 4), lower)
    im.paste(top, (w // 4 + rng.randrange(-2, 3), 2))
    im.paste(bottom, (w // 4 + rng.randrange(-2, 3), h // 2 + 2))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: str, split: str = "train", num_ids: int = 16, images_per_id: int = 2,
                 captions_per_image: int = 2, shard_size: int = 16, seed: int = 0,
                 corrupt: dict | None = None) -> dict:
    """Write ``root/split/split-%06d.tar`` + sizes.json + manifest.json. Returns {'pairs', 'ids', 'shards'}.

    ``corrupt`` maps a key to a fault: 'bad_image', 'caption_not_utf8', 'empty_caption', 'missing_json'."""
    rng = random.Random(seed)
    names = list(COLOURS)
    samples, key, image_id = [], 0, 0
    for pid in range(num_ids):
        upper, lower = names[pid % len(names)], names[(pid * 3 + 1 + pid // len(names)) % len(names)]
        for _ in range(images_per_id):
            jpg = _jpeg(COLOURS[upper], COLOURS[lower], rng)
            for c in range(captions_per_image):
                text = (f"a person in a {upper} top and {lower} trousers" if c % 2 == 0
                        else f"this pedestrian wears {lower} pants and a {upper} shirt")
                meta = {"key": key, "pid": pid, "orig_id": pid, "source": "fixture", "image": f"{pid}/{image_id}.jpg",
                        "image_id": image_id, "caption_id": c}
                samples.append(shards.make_sample(key, jpg, text, meta))
                key += 1
            image_id += 1
    for k, fault in (corrupt or {}).items():
        s = samples[k]
        if fault == "bad_image":
            s["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
        elif fault == "caption_not_utf8":
            s["txt"] = b"\xff\xfe\xfa bad"
        elif fault == "empty_caption":
            s["txt"] = b"   "
        elif fault == "missing_json":
            del s["json"]
        else:
            raise ValueError(fault)
    out = os.path.join(root, split)
    os.makedirs(out, exist_ok=True)
    sizes, paths = {}, []
    for i in range(0, len(samples), shard_size):
        name = f"{split}-{i // shard_size:06d}.tar"
        with open(os.path.join(out, name), "wb") as f:
            f.write(shards.pack(samples[i:i + shard_size]))
        sizes[name] = len(samples[i:i + shard_size])
        paths.append(os.path.join(out, name))
    with open(os.path.join(out, shards.SIZES_FILE), "wb") as f:
        f.write(shards.sizes_json(sizes))
    manifest_path = os.path.join(root, "manifest.json")
    manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {"format_version": 1, "splits": {}}
    manifest["splits"][split] = {"pairs": len(samples), "images": image_id, "identities": num_ids,
                                 "captions": len(samples)}
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    return {"pairs": len(samples), "ids": num_ids, "shards": paths, "dir": out}


def rank_batches(stream, workers: int | None = None) -> list[dict]:
    """A rank's batches of the stream's epoch (from its position) as ``StepBatches`` joins them with ``workers``
    loader processes (default: the stream's), computed in this process: each worker's parts, then the DataLoader's
    round-robin (one part of each worker per batch)."""
    from training import data as D
    from training.plan import worker_readers
    w = max(1, min(workers if workers is not None else stream.cfg.workers, len(stream.my_readers)))
    parts = [list(stream._parts(worker_readers(stream.my_readers, w, k))) for k in range(w)]
    return [D.join_parts([p[g] for p in parts], stream.my_readers) for g in range(len(parts[0]))]
