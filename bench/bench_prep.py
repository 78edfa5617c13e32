#!/usr/bin/env python
"""Benchmark data_prep: packing already-JPEG images, synthetic generation, and a naive webdataset peer.

    python bench/bench_prep.py [--images 4000] [--captions 2] [--workers 2]

Prints a table; numbers go to docs/DATA.md (performance section)."""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import webdataset  # noqa: F401  imported before any timing: it loads torch (~1.4 s), which no row should count

from data_prep import make_shards
from data_prep.records import Entry
from data_prep.synthetic import SyntheticRenderer, make_identities


def make_inputs(tmp, n_images, n_caps, per_id=4):
    """A CUHK-PEDES-style annotation file over real JPEGs (rendered synthetic crops, 256x128)."""
    r = SyntheticRenderer(0, 256, 128, n_caps)
    ids = make_identities(n_images // per_id + 1, 0)
    recs = []
    for k in range(n_images):
        pid, j = divmod(k, per_id)
        jpg, _, caps = r(Entry(orig_id=pid, image="", attributes=ids[pid][0], index=j))
        rel = f"imgs/{pid:05d}/{j}.jpg"
        os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(tmp, rel), "wb") as f:
            f.write(jpg)
        recs.append({"split": "train", "id": pid, "file_path": rel, "captions": list(caps)})
    ann = os.path.join(tmp, "reid_raw.json")
    with open(ann, "w") as f:
        json.dump(recs, f)
    return ann, recs


def naive_peer(tmp, recs, out):
    """What one would write without data_prep: webdataset's own ShardWriter, one process, same samples."""
    import webdataset as wds

    os.makedirs(out, exist_ok=True)
    key = 0
    with wds.ShardWriter(os.path.join(out, "train-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for r in recs:
            with open(os.path.join(tmp, r["file_path"]), "rb") as f:
                jpg = f.read()
            for ci, c in enumerate(r["captions"]):
                sink.write({"__key__": f"{key:09d}", "jpg": jpg, "txt": c,
                            "json": {"key": key, "orig_id": r["id"], "image": r["file_path"], "caption_id": ci}})
                key += 1
    return key


def timed(fn):
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # keep the CLI summaries out of the table
        out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--captions", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--synthetic-images", type=int, default=2000)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_prep_")
    rows = []
    try:
        ann, recs = make_inputs(tmp, a.images, a.captions)
        pairs = sum(len(r["captions"]) for r in recs)
        for w in (1, a.workers):
            out = os.path.join(tmp, f"out{w}")
            _, dt = timed(lambda: make_shards.main(["cuhkpedes", "--annotations", ann, "--images", tmp, "-o", out,
                                                    "--workers", str(w), "--no-progress"]))
            rows.append((f"pack JPEG (cuhkpedes), --workers {w}", pairs, dt, "pairs"))
        _, dt = timed(lambda: make_shards.main(["cuhkpedes", "--annotations", ann, "--images", tmp, "-o", out,
                                                "--workers", str(a.workers), "--no-progress"]))
        rows.append((f"re-run, all shards unchanged, --workers {a.workers}", pairs, dt, "pairs"))
        n, dt = timed(lambda: naive_peer(tmp, recs, os.path.join(tmp, "naive")))
        rows.append(("naive peer: wds.ShardWriter, 1 process", n, dt, "pairs"))

        ids = make_identities(a.synthetic_images // 4 + 1, 1)
        r = SyntheticRenderer(1, 256, 128, 2)
        ents = [Entry(orig_id=k // 4, image="", attributes=ids[k // 4][0], index=k % 4)
                for k in range(a.synthetic_images)]
        _, dt = timed(lambda: [r(e) for e in ents])
        rows.append(("synthetic render+captions+JPEG 256x128, 1 core", a.synthetic_images, dt, "images"))
        n_ids = a.synthetic_images // 4
        _, dt = timed(lambda: make_shards.main(["synthetic", "--num-ids", str(n_ids), "--images-per-id", "4",
                                                "-o", os.path.join(tmp, "syn"), "--workers", str(a.workers),
                                                "--no-progress"]))
        rows.append((f"synthetic CLI end to end, --workers {a.workers}", n_ids * 4, dt, "images"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"{'benchmark':<52} {'items':>8} {'seconds':>8} {'per second':>12}")
    for name, n, dt, unit in rows:
        print(f"{name:<52} {n:>8} {dt:>8.2f} {n / dt:>9.0f} {unit}")
    ours = next(n / dt for name, n, dt, _ in rows if name.startswith(f"pack JPEG (cuhkpedes), --workers {a.workers}"))
    naive = next(n / dt for name, n, dt, _ in rows if name.startswith("naive"))
    print(f"\npacking speed vs naive wds.ShardWriter peer: {ours / naive:.2f}x "
          f"(ours also validates every JPEG, sorts, and hashes every shard)")


if __name__ == "__main__":
    main()
