"""Remote shards: bytes fetched per epoch with and without --shard-cache, and time per epoch over a flaky store vs a
clean one. The store is tests/fault_server.py (http.server on 127.0.0.1 with seeded 503s, resets and stalls); the
data path is the trainer's (TrainStream, its loader workers, decode and augmentation), without the model. Prints one
table.

    python data_prep/make_shards.py synthetic --num-ids 200 --images-per-id 2 --output /tmp/remote_set --maxcount 100
    python bench/bench_remote.py --shards /tmp/remote_set/train --epochs 3 --workers 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fault_server import FaultServer  # noqa: E402

from common import fsio, remote, shard_cache, shards  # noqa: E402
from common.transforms import build_transform, clean_caption  # noqa: E402
from fast_clip.model import get_tokenizer  # noqa: E402
from training.config import LoaderConfig  # noqa: E402
from training.data import SampleDecoder, TrainStream, build_train_loader, load_train_sets  # noqa: E402


def epochs(server: FaultServer, spec: str, args, cache_dir: str | None) -> list[dict]:
    """Per epoch: seconds, bytes the server sent (the first epoch: with the index files read at the start), the
    remote counters the batches carried."""
    shard_cache.cache = shard_cache.ShardCache(cache_dir) if cache_dir else None
    sets = load_train_sets(spec, logger=lambda m: None)
    dec = SampleDecoder(build_transform((256, 128), train=True), clean_caption)
    stream = TrainStream(sets, LoaderConfig(step_batch_size=args.batch_size, workers=args.workers, seed=0), dec,
                         get_tokenizer("PersonTiny"), rank=0, world=1)
    out, sent, faults = [], 0, 0
    for e in range(args.epochs):
        stream.set_epoch(e)
        t0, counts = time.perf_counter(), {}
        for batch in build_train_loader(stream, pin_memory=False):
            for k, v in batch["remote"].items():
                counts[k] = counts.get(k, 0) + v
        out.append({"s": time.perf_counter() - t0, "sent": server.sent - sent, "faults": server.faults - faults,
                    **counts})
        sent, faults = server.sent, server.faults
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="a local split folder (make_shards output/train)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--faults", type=float, nargs=3, default=(0.1, 0.1, 0.05), metavar=("P503", "PRESET", "PSTALL"),
                    help="per-GET chance of a 503, a reset mid-body, a stall past --data-timeout (flaky store)")
    ap.add_argument("--seed", type=int, default=1, help="of the faults")
    ap.add_argument("--timeout", type=float, default=1.0, help="--data-timeout of the reads (s)")
    args = ap.parse_args()
    split = os.path.abspath(args.shards.rstrip("/"))
    served, name = os.path.dirname(split), os.path.basename(split)
    files = shards.resolve(split)
    set_bytes = sum(os.path.getsize(u) for u in files)
    names = ",".join(os.path.basename(u) for u in files)  # the test server lists no folders: name every shard
    fsio.read_timeout_s = args.timeout
    remote.policy = remote.RetryPolicy(retries=8, backoff_s=0.05)
    rows = []
    for store, faults in (("clean", (0, 0, 0)), ("flaky", args.faults)):
        for cached in (False, True):
            server = FaultServer(served, seed=args.seed, error_p=faults[0], reset_p=faults[1], stall_p=faults[2],
                                 stall_s=args.timeout * 2)
            with tempfile.TemporaryDirectory() as tmp:
                for e, r in enumerate(epochs(server, f"{server.url}/{name}/{{{names}}}", args,
                                             tmp if cached else None)):
                    rows.append((store, "yes" if cached else "no", e, r["sent"], r["faults"], r.get("retries", 0),
                                 r["s"]))
            server.stop()
    print(f"set: {split} ({set_bytes} bytes of shards), {args.epochs} epochs, {args.workers} loader workers, "
          f"batch {args.batch_size}; flaky: P(503, reset, stall) = {tuple(args.faults)}, --data-timeout {args.timeout}")
    print("| store | --shard-cache | epoch | bytes sent by the server | x set | faults | retries | s |")
    print("|---|---|---|---|---|---|---|---|")
    for store, cached, e, sent, faults, retries, s in rows:
        print(f"| {store} | {cached} | {e} | {sent} | {sent / set_bytes:.2f} | {faults} | {retries} | {s:.2f} |")


if __name__ == "__main__":
    main()
