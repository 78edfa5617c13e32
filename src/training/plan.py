"""The epoch plan: which pairs form global batch g of an epoch, and who reads them, as pure functions. Nothing here
reads a file; training/data.py's TrainStream applies the plan to the shards.

**Canonical readers (elastic determinism).** An epoch's sequence of global batches depends on (seed, epoch, the
``--train-data`` sets and their mode, the global batch B, ``--data-readers`` L, ``--pairs-per-id``, the shuffle
settings) and on nothing about the cluster: the epoch is read by L *logical readers*, each owning a fixed contiguous
range of the epoch's shard sequence and mixing it with its own seeded shuffle buffer, and global batch g is, in reader
order, the g-th chunk of c = B / L pairs of every reader. The physical processes only decide who runs which reader:
rank r runs readers [r L/W, (r+1) L/W) (so the ranks' batches, concatenated in rank order, are the global batch in
reader order), and its loader workers split those readers between them. W ranks x any number of workers x any
``--accum-freq`` therefore train on the same global batches, and a checkpoint (epoch, g) resumes on any other shape:
every reader skips its first g chunks. Reads inside a shard stay sequential (webdataset tar shards have no index).

Why not webdataset's ``split_by_node``/``split_by_worker``: they deal whole shards round-robin to the processes that
exist, which ties the order to the cluster, can give ranks different numbers of batches (a DDP hang at the epoch's
end) and cannot resume in the middle of an epoch. MosaicML Streaming plans against canonical nodes in the same spirit,
with random access into its own format. See docs/TRAINING.md, "The epoch plan".
"""
from __future__ import annotations

import bisect
import random

import numpy as np

from common.seeding import Stream, rng_seed

# --data-readers' default: the largest divisor of B / K up to this many. More readers mix a global batch from more
# places of the epoch (fewer pairs of one shard or one person in a batch) and allow more loader processes per rank;
# each costs an open shard stream and a shuffle buffer in the process that runs it.
MAX_DEFAULT_READERS = 64


def default_readers(global_batch: int, pairs_per_id: int = 0, world: int = 1) -> int:
    """The L a new run gets without --data-readers: among the divisors of B / K (K = --pairs-per-id, else 1; so that
    a reader's chunk c = B / L is whole K-pair groups) that are at most MAX_DEFAULT_READERS and that the starting
    ``world`` divides, the one that the most rank counts can run (the most divisors), then the largest: 64 for
    B = 256, 48 for B = 384 (1, 2, 3, 4, 6, 8, 12, 16, 24 or 48 ranks). A resume keeps the L of its checkpoint."""
    groups = global_batch // max(1, pairs_per_id)
    fits = [d for d in range(world, min(groups, MAX_DEFAULT_READERS) + 1, world) if groups % d == 0]
    if not fits:  # more ranks than MAX_DEFAULT_READERS: one reader per rank (world divides B / K)
        return world
    return max(fits, key=lambda d: (len(allowed_worlds(d)), d))


def shape_problem(global_batch: int, readers: int, world: int, pairs_per_id: int = 0) -> str | None:
    """Why W ranks cannot run the plan of B pairs per global batch read by L readers (None: they can)."""
    if readers < 1 or global_batch % readers:
        return f"--data-readers {readers} does not divide the global batch {global_batch} into whole chunks"
    if readers % world:
        return (f"the global batch {global_batch} is read by {readers} readers (--data-readers), which do not divide "
                f"over {world} ranks (ranks that can run it: {', '.join(map(str, allowed_worlds(readers)))})")
    chunk = global_batch // readers
    if pairs_per_id and chunk % pairs_per_id:
        return (f"--pairs-per-id {pairs_per_id} does not divide a reader's chunk of {chunk} pairs (global batch "
                f"{global_batch} / {readers} readers)")
    return None


def allowed_worlds(readers: int) -> list[int]:
    """The rank counts that can run a plan read by L readers: the divisors of L."""
    return [w for w in range(1, readers + 1) if readers % w == 0]


def rank_readers(readers: int, world: int, rank: int) -> range:
    per = readers // world
    return range(rank * per, (rank + 1) * per)


def worker_readers(mine: range, workers: int, k: int) -> range:
    """Loader worker k's contiguous share of a rank's readers (sizes differ by at most one; workers in order hold the
    readers in order, so the DataLoader's round-robin delivers a batch's parts in reader order)."""
    n = len(mine)
    return mine[k * n // workers:(k + 1) * n // workers]


def reader_range(global_batches: int, chunk: int, reader: int) -> tuple[int, int]:
    """(first position, length) of a reader's range in the epoch's pair sequence: G chunks of c pairs."""
    return reader * global_batches * chunk, global_batches * chunk


def weighted_slice(num_pairs: int, readers: int, reader: int) -> tuple[int, int]:
    """[start, end) of a set that a reader samples from in endless passes (--train-data-weights)."""
    return reader * num_pairs // readers, (reader + 1) * num_pairs // readers


def debiased_plan(batches_per_source: list[int], seed: int, epoch: int) -> np.ndarray:
    """Debiased sampling (ZeroVL): the source of each global batch of the epoch. A seeded shuffle of the multiset
    {s repeated n_s times} (n_s = N_s // B), the same in every process: each set is read once per epoch, and a batch
    comes from set s with probability proportional to its size. One byte per global batch (uint8 up to 255 sets)."""
    dtype = np.uint8 if len(batches_per_source) <= 256 else np.int32
    plan = np.repeat(np.arange(len(batches_per_source), dtype=dtype), batches_per_source)
    np.random.default_rng(rng_seed(Stream.DEBIASED_PLAN, seed, epoch)).shuffle(plan)
    return plan


class ShardSequence:
    """An epoch's shard sequence of (set, url, count, base) with each shard's first position: the shards that
    overlap a range are found by bisection, so starting a reader costs O(log shards), not a walk over the set."""

    def __init__(self, order: list[tuple]):
        self.order = order
        self.starts = np.concatenate([[0], np.cumsum([c for _, _, c, _ in order], dtype=np.int64)])

    def overlapping(self, start: int, end: int):
        """(set, url, count, base, lo, hi) of every shard overlapping positions [start, end), [lo, hi) within it."""
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while i < len(self.order) and self.starts[i] < end:
            sset, url, count, base = self.order[i]
            pos = int(self.starts[i])
            if pos + count > start:
                yield sset, url, count, base, max(start, pos) - pos, min(end, pos + count) - pos
            i += 1


def shard_order(sets: list, seed: int, epoch: int, shuffle: bool, *parts: int) -> ShardSequence:
    """The epoch's shard sequence (``parts`` tell apart several orders of one epoch, e.g. one per set)."""
    order = [(s, u, c, b) for s in sets for u, c, b in zip(s.urls, s.counts, s.bases)]
    if shuffle:
        random.Random(rng_seed(Stream.SHARD_ORDER, seed, epoch, *parts)).shuffle(order)
    return ShardSequence(order)


def identity_groups(items, k: int, rng: random.Random, max_pending: int, pid_of):
    """Cut a stream into groups of exactly k items (the last one may be shorter), every item once.

    A run of consecutive items of one person (how sorted shards deliver them) is added to that person's pending
    items; at the run's end the pending items are shuffled and every full k of them is a group. What stays pending
    (fewer than k) waits for more of the same person (unsorted shards) until more than ``max_pending`` items wait:
    then the oldest person's rest is packed, with other rests and the items without an id, into mixed groups of k."""
    pending: dict[int, list] = {}
    mixed: list = []
    waiting = 0
    last = None

    def close(pid):
        nonlocal waiting
        items_p = pending[pid]
        rng.shuffle(items_p)
        full = len(items_p) // k * k
        for a in range(0, full, k):
            yield items_p[a:a + k]
        waiting -= full
        if full == len(items_p):
            del pending[pid]
        else:
            pending[pid] = items_p[full:]

    def spill(rest):
        mixed.extend(rest)
        while len(mixed) >= k:
            yield mixed[:k]
            del mixed[:k]

    for item in items:
        pid = pid_of(item)
        if pid != last and last is not None and last in pending:
            yield from close(last)
        last = pid
        if pid < 0:
            yield from spill([item])
            continue
        pending.setdefault(pid, []).append(item)
        waiting += 1
        while waiting > max_pending:
            oldest = next(iter(pending))
            rest = pending.pop(oldest)
            waiting -= len(rest)
            yield from spill(rest)
    if last is not None and last in pending:
        yield from close(last)
    for rest in list(pending.values()):
        yield from spill(rest)
    if mixed:
        yield list(mixed)


def shuffle_buffer(items, size: int, rng: random.Random):
    """Seeded reservoir shuffle: output depends only on the input order and the RNG seed."""
    if size <= 1:
        yield from items
        return
    buf = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = x
    rng.shuffle(buf)
    yield from buf
