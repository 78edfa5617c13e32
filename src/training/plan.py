"""The epoch plan: which pairs each rank and worker reads, in which order, as pure functions of (seed, epoch, rank,
worker, batch index). Nothing here reads a file; training/data.py's TrainStream applies it to the shards.

Why not webdataset's own ``split_by_node``/``split_by_worker``: they deal whole shards round-robin, which can give
ranks different numbers of batches (a DDP hang at the epoch's end) and cannot resume in the middle of an epoch. The
modes (concat, debiased, weighted), the worker rotation on resume and the identity groups of ``--pairs-per-id`` are
described in training/data.py and docs/TRAINING.md ("The epoch plan: why the order is exact").
"""
from __future__ import annotations

import random

from common.seeding import Stream, rng_seed


def batches_per_rank(num_samples: int, world: int, batch: int) -> int:
    return num_samples // (world * batch)


def worker_batches(n: int, workers: int, w: int) -> int:
    """Batches of logical worker w when a rank's n batches are dealt round-robin."""
    return n // workers + (1 if w < n % workers else 0)


def worker_range(n: int, batch: int, rank: int, workers: int, w: int) -> tuple[int, int]:
    """(first sample, sample count) of logical worker w of ``rank`` in the epoch sequence (concat mode)."""
    before = w * (n // workers) + min(w, n % workers)
    return (rank * n + before) * batch, worker_batches(n, workers, w) * batch


def batches_done_by_worker(start_batch: int, workers: int, w: int) -> int:
    """How many of a rank's first ``start_batch`` batches logical worker w produced (batch j is worker j % W's)."""
    return max(0, (start_batch - w + workers - 1) // workers)


def debiased_plan(batches_per_source: list[int], seed: int, epoch: int) -> list[int]:
    """Debiased sampling (ZeroVL): the source of each of a rank's batches this epoch. A seeded shuffle of the multiset
    {s repeated n_s times}: at every step a source is drawn with probability proportional to its remaining batches
    (so to its size), every rank computes the same list, and each source is read exactly once per epoch."""
    plan = [s for s, n in enumerate(batches_per_source) for _ in range(n)]
    random.Random(rng_seed(Stream.DEBIASED_PLAN, seed, epoch)).shuffle(plan)
    return plan


def debiased_worker_share(plan: list[int], workers: int, w: int, source: int) -> tuple[int, int]:
    """(batches before worker w, batches of worker w) among a rank's batches from ``source``: the rank's range of that
    source is split between workers in worker order, each worker getting as many batches as it will produce."""
    counts = [0] * workers
    for j, s in enumerate(plan):
        if s == source:
            counts[j % workers] += 1
    return sum(counts[:w]), counts[w]


def shard_order(sets: list, seed: int, epoch: int, shuffle: bool, *parts: int) -> list[tuple]:
    """The epoch's shard sequence of (set, url, count, base) (``parts`` tell apart several orders of one epoch, e.g.
    one per set)."""
    order = [(s, u, c, b) for s in sets for u, c, b in zip(s.urls, s.counts, s.bases)]
    if shuffle:
        random.Random(rng_seed(Stream.SHARD_ORDER, seed, epoch, *parts)).shuffle(order)
    return order


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
