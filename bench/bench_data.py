"""Data path throughput: shards -> ready batches (decode, augment, tokenize, collate) without the model, by number of
loader workers, against a peer loader (webdataset 1.x's own pipeline doing the same decode and transforms) and against
what the trainer consumes. Prints one table.

    python bench/bench_data.py --shards shards/demo_synth/train --image-size 384 128 --batch-size 256 --workers 0 1 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

from fast_clip.model import get_tokenizer
from training.config import LoaderConfig
from training.data import SampleDecoder, TrainStream, build_train_loader, load_train_sets
from training.device_augment import DeviceAugment
from common.transforms import build_transform, clean_caption


def ours(shards, image_size, batch, workers, max_batches, uint8=False):
    """uint8: the loader only decodes + resizes and ships uint8 batches (--augment-device device); the batched
    augmentation then runs on the accelerator and is timed separately (augment_ms_per_batch)."""
    sets = load_train_sets(shards)
    dec = SampleDecoder(build_transform(image_size, train=not uint8, uint8=uint8), clean_caption)
    stream = TrainStream(sets, LoaderConfig(step_batch_size=batch, workers=workers, seed=0), dec,
                         get_tokenizer("PersonTiny"), rank=0, world=1)
    stream.set_epoch(0)
    n = min(max_batches, stream.n)
    t0, seen = None, 0
    for i, b in enumerate(build_train_loader(stream, pin_memory=False)):
        if i == 0:
            t0 = time.perf_counter()  # first batch includes worker start-up and buffer fill; not counted
            continue
        seen += b["images"].shape[0]
        if i + 1 >= n:
            break
    return seen / (time.perf_counter() - t0)


def peer(shards, image_size, batch, workers, max_batches):
    import webdataset as wds
    from glob import glob
    from braceexpand import braceexpand
    urls = sorted(glob(os.path.join(shards, "*.tar"))) if os.path.isdir(shards) else list(braceexpand(shards))
    tf = build_transform(image_size, train=True)
    tok = get_tokenizer("PersonTiny")
    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
          .shuffle(2000).decode("pil").to_tuple("jpg", "txt").map_tuple(tf, lambda t: clean_caption(t))
          .batched(batch, partial=False))
    loader = wds.WebLoader(ds, batch_size=None, num_workers=workers)
    t0, seen = None, 0
    for i, (imgs, txts) in enumerate(loader):
        tok(list(txts))
        if i == 0:
            t0 = time.perf_counter()
            continue
        seen += imgs.shape[0]
        if i + 1 >= max_batches:
            break
    return seen / (time.perf_counter() - t0)


def _serve(shard_dir: str):
    """(process, URL of shard_dir) for a python -m http.server serving its parent on 127.0.0.1."""
    import socket
    import subprocess
    d = os.path.abspath(shard_dir.rstrip("/"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                             os.path.dirname(d)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/{os.path.basename(d)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="shards/demo_synth/train")
    ap.add_argument("--image-size", type=int, nargs=2, default=[384, 128])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-batches", type=int, default=20)
    ap.add_argument("--http", action="store_true",
                    help="Also stream the same shards from a local `python -m http.server` (127.0.0.1) and compare "
                         "with local disk.")
    ap.add_argument("--consumption", type=float, default=None,
                    help="The trainer's samples/s for the same model (from a training log) to compare against.")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}; shards {a.shards}; "
          f"{a.image_size[0]}x{a.image_size[1]}, batch {a.batch_size}")
    print("| loader | workers | samples/s | ours / peer |")
    print("|---|---|---|---|")
    server = _serve(a.shards) if a.http else None
    for w in a.workers:
        o = ours(a.shards, tuple(a.image_size), a.batch_size, w, a.max_batches)
        if server is not None:
            h = ours(server[1], tuple(a.image_size), a.batch_size, w, a.max_batches)
            print(f"| ours, float batches, streamed over http from 127.0.0.1 | {w} | {h:,.0f} | "
                  f"{h / o:.2f} of local disk |")
        u = ours(a.shards, tuple(a.image_size), a.batch_size, w, a.max_batches, uint8=True)
        p = peer(a.shards, tuple(a.image_size), a.batch_size, w, a.max_batches)
        print(f"| ours, augment in the loader (float batches) | {w} | {o:,.0f} | {o / p:.2f} |")
        print(f"| ours, uint8 batches (decode + resize; augmentation on the accelerator) | {w} | {u:,.0f} | {u / p:.2f} |")
        print(f"| peer (webdataset pipeline) | {w} | {p:,.0f} | |")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randint(0, 256, (a.batch_size, 3, *a.image_size), dtype=torch.uint8, device=dev)
    aug = DeviceAugment(tuple(a.image_size), train=True)
    aug(x, torch.Generator(device=dev).manual_seed(0))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(5):
        aug(x, torch.Generator(device=dev).manual_seed(i))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    print(f"| batched augmentation of one uint8 batch on {dev} (--augment-device device) | | "
          f"{(time.perf_counter() - t0) / 5 * 1e3:.1f} ms/batch | |")
    if server is not None:
        server[0].terminate()
    if a.consumption:
        print(f"| trainer consumption | | {a.consumption:,.0f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
