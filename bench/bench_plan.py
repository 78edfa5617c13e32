"""The epoch plan's cost and its shuffle quality, without decoding an image.

  python bench/bench_plan.py cost [--pairs 1e6 1e8 1e9] [--shards 1000 10000 100000]
  python bench/bench_plan.py quality [--pairs 20000] [--shards 20] [--batch 256] [--world 1 2 4]

``cost``: a declared set (a folder of sparse *.tar files and a sizes.json with the counts: nothing is read) is loaded
as the trainer loads --train-data, the stream planned for rank 0 of 8 ranks, and every reader of that rank located at
its epoch start (what a loader worker does before it opens a shard). Time and peak Python memory (tracemalloc) per
step; the planner must not grow with the pairs.

``quality``: the global batches of one epoch over a set written sorted by person (pairs p = 4 i .. 4 i + 3 are person
i, as make_shards writes them), with the tar reads replaced by the pair indices themselves. Per global batch: pairs
of the batch that share a shard, pairs that share a person (a contrastive false negative), and Spearman's correlation
of the step with the pair's position in the epoch's shard sequence and with its index in the set. Runs on any
revision's TrainStream (``bash bench/ab_revision.sh REV 1 -- bench/bench_plan.py quality``): the per-worker plan of
before had ``_batches(w)``, the reader plan has ``_parts(readers)``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import tracemalloc

import numpy as np

from training import data as D
from training.config import LoaderConfig

PAIRS_PER_PERSON = 4


def _declared_set(root: str, pairs: int, shards: int) -> str:
    os.makedirs(root, exist_ok=True)
    counts = {f"s-{i:06d}.tar": pairs // shards + (1 if i < pairs % shards else 0) for i in range(shards)}
    for name, n in counts.items():  # sparse files as large as n samples need (sizes.json is checked against them)
        with open(os.path.join(root, name), "wb") as f:
            f.truncate(n * 1024 + 1024)
    with open(os.path.join(root, "sizes.json"), "w") as f:
        json.dump(counts, f)
    return root


def _timed(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, dt, peak


def cost(pairs_list: list[int], shards_list: list[int], batch: int, world: int) -> None:
    print(f"| pairs | shards | load sets (s / MiB) | plan rank 0 of {world} (s / MiB) | locate its readers (s / MiB) |")
    print("|---|---|---|---|---|")
    for shards in shards_list:
        with tempfile.TemporaryDirectory() as tmp:
            for pairs in pairs_list:
                folder = _declared_set(os.path.join(tmp, f"p{pairs}"), pairs, shards)
                sets, t_load, m_load = _timed(lambda: D.load_train_sets(folder))
                cfg = LoaderConfig(step_batch_size=batch, workers=0, seed=0)
                stream, t_plan, m_plan = _timed(lambda: D.TrainStream(sets, cfg, None, None, 0, world))
                _, t_loc, m_loc = _timed(lambda: _locate(stream))
                print(f"| {pairs:.0e} | {shards} | {t_load:.3f} / {m_load / 2**20:.1f} | {t_plan:.4f} / "
                      f"{m_plan / 2**20:.2f} | {t_loc:.3f} / {m_loc / 2**20:.1f} |", flush=True)


def _locate(stream) -> int:
    """Each reader of the rank: its range and the shards that overlap its start (the epoch's order included); on the
    per-worker plan of before, each worker's range and the walk of the shard order to its first shard."""
    if not hasattr(stream, "my_readers"):
        from training import plan as P
        order, found = P.shard_order(stream.sets, 0, 0, True), 0
        for w in range(8):
            start, _ = P.worker_range(stream.n, stream.cfg.step_batch_size, stream.rank, 8, w)
            pos = 0
            for _, _, count, _ in order:
                if pos + count > start:
                    found += 1
                    break
                pos += count
        return found
    from training.plan import reader_range
    found = 0
    for r in stream.my_readers:
        start, length = reader_range(stream.n, stream.chunk, r)
        found += sum(1 for _ in zip(range(1), stream._order().overlapping(start, start + length)))
    return found


def _fake_read(sset, url, count, base, lo, hi, counter, reader=0):
    for i in range(lo, hi):
        key = sset.pair_index_offset + base + i
        yield {"__key__": str(key), "__url__": url}, sset, key


class _Passthrough:
    transform = None

    def __call__(self, raw, sset, pair_index):
        return None, "", pair_index, pair_index // PAIRS_PER_PERSON


def _global_batches(sets, batch: int, world: int, workers: int) -> list[list[int]]:
    per_rank = []
    for rank in range(world):
        cfg = LoaderConfig(step_batch_size=batch // world, workers=workers, seed=0)
        st = D.TrainStream(sets, cfg, _Passthrough(), None, rank, world)
        st.set_epoch(0)
        if hasattr(st, "_batches"):  # the per-worker plan: batch j of a rank is worker j % W's
            W = max(1, workers)
            by_worker = [[[s[2] for s in samples] for _, samples, _ in st._batches(w)] for w in range(W)]
            per_rank.append([by_worker[j % W][j // W] for j in range(st.n)])
        else:
            from training.plan import worker_readers
            st._collate = lambda chunks, readers, g, counts: [s[2] for c in chunks for s in c]
            W = max(1, st.loader_workers)
            parts = [list(st._parts(worker_readers(st.my_readers, W, k))) for k in range(W)]
            per_rank.append([[k for p in parts for k in p[g]] for g in range(len(parts[0]))])
    return [[k for rank_batch in step for k in rank_batch] for step in zip(*per_rank)]


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def quality(pairs: int, shards: int, batch: int, worlds: list[int], workers: int) -> None:
    D.read_shard = _fake_read
    with tempfile.TemporaryDirectory() as tmp:
        sets = D.load_train_sets(_declared_set(tmp, pairs, shards))
        print("| ranks x workers | global batches | same-shard pairs / batch | same-person pairs / batch | "
              "corr(step, position in epoch order) | corr(step, pair index) |")
        print("|---|---|---|---|---|---|")
        for world in worlds:
            batches = _global_batches(sets, batch, world, workers)
            order = [(u, c, b) for s in sets for u, c, b in zip(s.urls, s.counts, s.bases)]
            shard_of = np.repeat(np.arange(len(order)), [c for _, c, _ in order])
            same_shard = np.mean([_pairs_sharing(shard_of[b]) for b in batches])
            same_person = np.mean([_pairs_sharing(np.asarray(b) // PAIRS_PER_PERSON) for b in batches])
            steps = np.repeat(np.arange(len(batches)), batch)
            keys = np.concatenate(batches)
            position = _epoch_positions(sets, keys)
            print(f"| {world} x {workers} | {len(batches)} | {same_shard:.1f} | {same_person:.2f} | "
                  f"{_spearman(steps, position):+.3f} | {_spearman(steps, keys):+.3f} |", flush=True)


def _pairs_sharing(labels) -> float:
    _, n = np.unique(labels, return_counts=True)
    return float((n * (n - 1) // 2).sum())


def _epoch_positions(sets, keys) -> np.ndarray:
    """Each pair's position in epoch 0's shard sequence (the order the readers' ranges are cut from)."""
    from training.plan import shard_order
    seq = shard_order(sets, 0, 0, True)
    order = seq.order if hasattr(seq, "order") else seq
    pos = np.empty(sum(s.num_pairs for s in sets), dtype=np.int64)
    at = 0
    for sset, _, count, base in order:
        first = sset.pair_index_offset + base
        pos[first:first + count] = np.arange(at, at + count)
        at += count
    return pos[keys]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--pairs", type=float, nargs="+", default=[1e6, 1e8, 1e9])
    c.add_argument("--shards", type=int, nargs="+", default=[1000, 10000, 100000])
    c.add_argument("--batch", type=int, default=64, help="per rank")
    c.add_argument("--world", type=int, default=8)
    q = sub.add_parser("quality")
    q.add_argument("--pairs", type=int, default=20000)
    q.add_argument("--shards", type=int, default=20)
    q.add_argument("--batch", type=int, default=256, help="global")
    q.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    q.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    if a.what == "cost":
        cost([int(x) for x in a.pairs], a.shards, a.batch, a.world)
    else:
        quality(a.pairs, a.shards, a.batch, a.world, a.workers)


if __name__ == "__main__":
    main()
