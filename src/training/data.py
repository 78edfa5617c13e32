"""Streaming webdataset input pipeline with an exact, resumable epoch plan.

Why not webdataset's own pipeline: exact mid-epoch resume and "every rank yields the same number of batches" both need
the sample order to be a pure function of (seed, epoch, rank, worker, batch index). So the epoch is planned up front:

* **concat mode** (no ``--train-data-weights``): the shards of all sets, shuffled per epoch with ``(seed, epoch)``, form
  one sequence of N pairs. Each rank gets ``n = N // (world * batch)`` batches; rank r owns the contiguous range
  ``[r*n*b, (r+1)*n*b)`` and splits it into contiguous worker ranges of ``n//W`` or ``n//W + 1`` batches. Ranges are
  disjoint, so no pair is seen twice in an epoch, and fewer than ``world * batch`` pairs are left out (drop-last).
* **debiased mode** (``--debiased-sampling``, ZeroVL): each set is split between ranks and workers as in concat mode,
  and a seeded list identical on all ranks says which set each batch comes from (a shuffle of the multiset with
  n_s = N_s // (world * batch) entries per set), so a global batch is single-source and every set is read once.
* **weighted mode**: every (rank, worker) reads its own slice of each set in endless passes and draws each sample's set
  with probability proportional to its weight, from a seeded RNG.

Within a worker a seeded shuffle buffer mixes samples; augmentation is seeded per batch. With ``--pairs-per-id K``
the buffer mixes groups instead of samples: each person's pairs in the worker's range are cut into groups of K
(shards are written sorted by person id, so a person's pairs arrive together; a bounded buffer also groups unsorted
shards), leftovers are packed into K-sized groups of several persons, and a batch of b = P*K samples is P consecutive
groups: P persons x K pairs, still every pair once per epoch from the same fixed range. The DataLoader reads its
workers round-robin, so batch j of a rank comes from worker j % W. To resume at batch k, every worker replays its
stream and drops the batches it had produced, and the worker roles are rotated by k % W so that physical worker 0
produces batch k next. Unusable samples (bad JPEG, bad UTF-8, missing json, ...) and pairs of the plan that cannot
be read (a shard gone, truncated or shorter than sizes.json lists: read_shard) are counted, by reason and in pairs,
and replaced by the next sample of the stream, so every batch is full and all ranks stay in lock-step; the batches
carry the counts (pairs read, lost, refilled) to the run's tallies.
"""
from __future__ import annotations

import io
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from common import remote, shards
from training.config import LoaderConfig
from training.plan import (batches_done_by_worker, batches_per_rank, debiased_plan, debiased_worker_share,
                           identity_groups, shard_order, shuffle_buffer, worker_batches, worker_range)
from common.seeding import Stream, rng_seed


class DataError(RuntimeError):
    """Unusable training data; the message names the shard set, file and problem."""


class TooSmall(DataError):
    """The epoch holds no full step batch (the trainer names the flags that set the batch)."""


class Tally:
    """Unusable-sample counts of one worker: ``delta`` (by reason: samples, or shards for a shard's problem) and
    ``lost`` (by reason: pairs of the plan not read) are drained into each batch; ``epoch_lost`` is the worker's sum
    for the epoch, held against --max-bad-samples-frac; ``reported`` remembers what was already counted this epoch,
    because refill passes meet the same bad samples and truncated shards again."""

    def __init__(self):
        self.delta: Counter = Counter()
        self.lost: Counter = Counter()
        self.epoch_lost: Counter = Counter()
        self.reported: set = set()

    @property
    def lost_total(self) -> int:
        return sum(self.epoch_lost.values())

    def add(self, reason: str, ident, pairs: int = 1) -> bool:
        if ident in self.reported:
            return False
        self.reported.add(ident)
        self.delta[reason] += 1
        self.lost[reason] += pairs
        self.epoch_lost[reason] += pairs
        return True

    def drain(self) -> tuple[Counter, Counter]:
        out = Counter(self.delta), Counter(self.lost)
        self.delta.clear()
        self.lost.clear()
        return out


# --------------------------------------------------------------------------------------------------------------------
# Shard discovery


@dataclass
class ShardSet:
    """One '::' set: its fixed shard list with sample counts. A pair's *pair index* (the row of its FastCLIP
    estimators, the batch's ``keys``) is its position in this list (shard base + index in the shard) plus the set's
    pair_index_offset: no json ``key`` is read (that is the position in a make_shards split, docs/DATA.md), and the
    state is exactly as large as the data."""
    spec: str
    urls: list[str]
    counts: list[int]
    split_ids: int | None      # identities of the split, when a manifest says so
    is_make_shards_split: bool = False  # manifest.json beside it: every sample has a json with a pid
    pair_index_offset: int = 0
    pid_offset: int = 0
    index: int = 0
    bases: list[int] = field(default_factory=list)  # position of each shard's first sample in the set
    partial: list[str] = field(default_factory=list)  # what its split folders lack (--allow-partial-data)

    def __post_init__(self):
        self.bases = [sum(self.counts[:i]) for i in range(len(self.counts))]

    @property
    def num_pairs(self) -> int:
        return sum(self.counts)


def _shard_counts(d: str, urls: list[str], logger) -> dict:
    """Sample counts (by basename) of the shards ``urls`` in folder ``d``: its sizes.json, else img2dataset's
    ``*_stats.json``, else a one-time scan that is written to ``d/sizes.json`` when the folder is writable."""
    names = [shards.basename(u) for u in urls]
    sizes = shards.read_sizes(d) or shards.read_stats_counts(d, names) or {}
    missing = [(n, u) for n, u in zip(names, urls) if n not in sizes]
    if missing:
        logger(f"{d}: no sample count for {len(missing)} shard(s) (no sizes.json / *_stats.json): counting them once")
        for n, u in missing:
            sizes[n] = shards.count_samples(u)
        if shards.write_sizes(d, sizes):
            logger(f"{d}: wrote {shards.SIZES_FILE} ({len(sizes)} shards)")
        else:
            logger(f"{d}: cannot write {shards.SIZES_FILE} there; every start will count again "
                   f"(python data_prep/make_shards.py index DIR writes it where you can)")
    return sizes


def _partial_split(spec: str, d: str, in_dir: list[str], sizes: dict, allow_partial: bool) -> str | None:
    """A make_shards split folder against its manifest (common.shards.check_split, as evaluation does): None when the
    shards given are the whole split; else what is missing, as a DataError or (``allow_partial``) as the text that the
    log and summary.json report."""
    check = shards.check_split(d, in_dir)
    if not check.problems:
        return None
    listed = sum(c for c in check.counts.values() if isinstance(c, int))
    given = sum(sizes[shards.basename(u)] for u in in_dir)
    what = f"{d} is a partial split: {'; '.join(check.problems)} ({given} of its {listed} listed pairs given)"
    if not allow_partial:
        raise DataError(f"--train-data set {spec!r}: {what}; re-copy or re-make it (check it with: python "
                        f"data_prep/make_shards.py verify OUTPUT), or train on what is there with --allow-partial-data")
    return what


def load_shard_set(spec: str, index: int = 0, logger=None, allow_partial: bool = False) -> ShardSet:
    """Resolve a shard spec and find each shard's sample count (see _shard_counts); a make_shards split must be
    whole (see _partial_split)."""
    logger = logger or _warn
    try:
        urls = shards.resolve(spec)
        by_dir: dict[str, list[str]] = {}
        for u in urls:
            by_dir.setdefault(shards.parent(u), []).append(u)
        sizes, split_ids, is_make_shards_split, partial = {}, None, True, []
        for d, in_dir in by_dir.items():
            info = shards.read_split_info(d)  # (refuses a folder its manifest does not list)
            sizes[d] = _shard_counts(d, in_dir, logger)
            is_make_shards_split = is_make_shards_split and info is not None
            if info is not None:
                partial.append(_partial_split(spec, d, in_dir, sizes[d], allow_partial))
            if info and info.get("identities") is not None:
                split_ids = (split_ids or 0) + int(info["identities"])
        counts = [sizes[shards.parent(u)][shards.basename(u)] for u in urls]
    except shards.ShardError as e:
        raise DataError(f"--train-data set {spec!r}: {e}") from e
    return ShardSet(spec=spec, urls=urls, counts=counts, split_ids=split_ids if is_make_shards_split else None,
                    is_make_shards_split=is_make_shards_split, index=index, partial=[p for p in partial if p])


def load_train_sets(train_data: str, logger=None, allow_partial: bool = False) -> list[ShardSet]:
    """Each '::' set gets pair index and pid offsets so that the loss state (one entry per pair) covers all sets."""
    sets, index_off, pid_off = [], 0, 0
    for i, spec in enumerate(train_data.split("::")):
        s = load_shard_set(spec.strip(), index=i, logger=logger, allow_partial=allow_partial)
        s.pair_index_offset, s.pid_offset = index_off, pid_off
        index_off += s.num_pairs
        # Person ids of different sets are different people; without a manifest, leave a wide gap.
        pid_off += s.split_ids if s.split_ids is not None else 10_000_000
        sets.append(s)
    return sets


# --------------------------------------------------------------------------------------------------------------------
# Raw tar reading


def _warn(msg: str) -> None:
    import sys
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def read_range(order: list[tuple], start: int, end: int, counter: "Tally"):
    """(sample, set, pair index) at positions [start, end) of the sequence formed by ``order``; only overlapping
    shards are read (see read_shard). The pair index is the pair's position in its set's fixed shard list + the
    set's offset."""
    pos = 0
    for sset, url, count, base in order:
        if pos + count <= start:
            pos += count
            continue
        if pos >= end:
            break
        yield from read_shard(sset, url, count, base, max(start, pos) - pos, min(end, pos + count) - pos, counter)
        pos += count


def read_shard(sset: ShardSet, url: str, count: int, base: int, lo: int, hi: int, counter: "Tally"):
    """Samples [lo, hi) of one shard that sizes.json says holds ``count``, with their pair indices.

    The plan's pairs are what sizes.json counted, so a shard that disagrees is caught here: one holding more samples
    than its count is refused (the rest would go unread, or take other pairs' indices); pairs of [lo, hi) that cannot
    be read (a shard missing, truncated or shorter than listed) are counted as lost, in pairs, against
    --max-bad-samples-frac. A missing shard of a local set is an error at once: it was there when the run started."""
    if not shards.is_url(url) and not os.path.exists(url):
        raise DataError(f"--train-data shard {url} no longer exists (it was there at the start): {hi - lo} pairs of "
                        f"the plan cannot be read; restore it and continue with --resume latest")
    problems = []
    samples = _stop_if_unavailable(shards.iter_samples(url, lambda u, problem: problems.append(problem)))
    i = 0
    for raw in samples:
        if i >= hi:
            if hi == count:
                raise DataError(_more_than_listed(url, count, i + 1 + sum(1 for _ in samples)))
            return
        if i >= lo:
            yield raw, sset, sset.pair_index_offset + base + i
        i += 1
    lost = hi - max(i, lo)
    if lost <= 0:  # what is wrong lies beyond this range: the worker reading it counts it
        return
    # Python's tarfile stops silently at most truncations: a cut file, and a whole one that sizes.json over-counts,
    # both read as fewer samples than listed
    reason = "truncated_shard" if i or not problems else "unreadable_shard"
    if counter.add(reason, ("lost", url), lost):
        problem = problems[0] if problems else f"{i} samples where {shards.SIZES_FILE} lists {count}"
        _warn(f"shard {url} is truncated or unreadable ({problem}): {lost} pairs of the plan in it are not read "
              f"(counted against --max-bad-samples-frac); if the file is whole, its {shards.SIZES_FILE} is stale: "
              f"python data_prep/make_shards.py index {shards.parent(url)}")


def _stop_if_unavailable(samples):
    """A remote shard that still fails after common.remote's retries (or for good: 404) stops the run, all ranks at
    the same batch (agreed_batches): its pairs are not counted lost, since a store that is down would lose them all."""
    try:
        yield from samples
    except shards.ShardUnavailable as e:
        raise DataError(f"--train-data {e}; continue with --resume latest once it can be read") from e


def _more_than_listed(url: str, count: int, real: int) -> str:
    return (f"--train-data shard {url} holds {real} samples where {shards.SIZES_FILE} lists {count}: the plan "
            f"would leave {real - count} pairs unread; {shards.SIZES_FILE} is stale: rewrite it with python "
            f"data_prep/make_shards.py index {shards.parent(url)} (a make_shards split: python "
            f"data_prep/make_shards.py verify OUTPUT)")


def global_pid(pid, sset: ShardSet) -> int:
    """A json pid as a global person id: + the set's offset, so that two '::' sets never share one; -1 (unknown)
    for a missing or negative pid."""
    return pid + sset.pid_offset if isinstance(pid, int) and pid >= 0 else -1


def raw_pid(raw: dict, sset: ShardSet) -> int:
    """The global person id of a raw sample, read before decoding so that the identity grouping can use it."""
    try:
        return global_pid(json.loads(raw["json"].decode("utf-8")).get("pid"), sset)
    except (KeyError, AttributeError, UnicodeDecodeError, json.JSONDecodeError):
        return -1


# --------------------------------------------------------------------------------------------------------------------
# The dataset


@dataclass
class SampleDecoder:
    """Raw sample -> (image, caption, pair index, pid); raises _BadSample with a reason and what exactly is wrong.

    A make_shards split needs its json (with the pid). Any other webdataset shard set needs only an image
    (jpg/jpeg/png/webp) and a caption: the ``caption_key`` member (default ``txt``) or, failing that, the json field
    of that name (img2dataset writes both); the pid is the json's ``pid`` when there is one, else -1 (unknown)."""
    transform: object
    clean: object
    caption_key: str = "txt"

    def _meta(self, raw: dict, required: bool):
        if "json" not in raw:
            if required:
                raise _BadSample("missing_json", "no .json member (make_shards writes one per sample)")
            return None
        try:
            meta = json.loads(raw["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            if required:
                raise _BadSample("bad_json", ".json is not UTF-8 JSON")
            return None
        if required and not (isinstance(meta, dict) and isinstance(meta.get("pid"), int)):
            raise _BadSample("bad_json", ".json lacks an integer 'pid'")
        return meta if isinstance(meta, dict) else None

    def _caption(self, raw: dict, meta) -> str:
        k = self.caption_key
        if k in raw:
            try:
                return raw[k].decode("utf-8")
            except UnicodeDecodeError:
                raise _BadSample("caption_not_utf8", f".{k} is not UTF-8")
        if meta is not None and isinstance(meta.get(k), str):
            return meta[k]
        raise _BadSample("missing_caption", f"no .{k} member and no '{k}' field in the json (--caption-key)")

    def __call__(self, raw: dict, sset: ShardSet, pair_index: int):
        meta = self._meta(raw, required=sset.is_make_shards_split)
        text = self.clean(self._caption(raw, meta))
        if not text:
            raise _BadSample("empty_caption", "the caption is empty after clean-up")
        ext = shards.image_ext(raw)
        if ext is None:
            raise _BadSample("missing_image", f"no image member ({', '.join(shards.IMAGE_EXTS)})")
        try:
            with Image.open(io.BytesIO(raw[ext])) as im:
                im = im.convert("RGB")
        except Exception:  # PIL raises many types for corrupt data
            raise _BadSample("bad_image", f".{ext} does not decode")
        return im, text, pair_index, global_pid(meta.get("pid") if meta is not None else None, sset)


class _BadSample(Exception):
    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail


class TrainStream(torch.utils.data.IterableDataset):
    """Yields ready batches for one rank: dict(images, texts, keys, pids, sources, bad=Counter delta)."""

    def __init__(self, sets: list[ShardSet], cfg: LoaderConfig, decoder: SampleDecoder, tokenizer,
                 rank: int, world: int, warn=print):
        super().__init__()
        self.sets, self.cfg, self.decoder, self.tokenizer = sets, cfg, decoder, tokenizer
        self.rank, self.world, self.warn = rank, world, warn
        self.total_pairs = sum(s.num_pairs for s in sets)
        self.num_samples = cfg.num_samples or self.total_pairs
        if cfg.weights is None and self.num_samples > self.total_pairs:
            raise DataError(f"--train-num-samples {self.num_samples} exceeds the {self.total_pairs} pairs of "
                            f"--train-data; give --train-data-weights to sample with replacement")
        self.plan = None
        b = cfg.step_batch_size
        if cfg.debiased:
            per_source = [batches_per_rank(s.num_pairs, world, b) for s in sets]
            for s, n_s in zip(sets, per_source):
                if n_s < 1:
                    raise DataError(f"set {s.spec!r} has {s.num_pairs} pairs, less than one global batch of "
                                    f"{world * b}: debiased sampling needs a full batch from each set")
            self.per_source = per_source
            self.num_samples = sum(per_source) * world * b
        self.n = batches_per_rank(self.num_samples, world, b)
        if self.n < 1:
            raise TooSmall(f"{self.num_samples} samples per epoch make no full step batch: a step takes {b} per "
                           f"rank x {world} rank(s) = {b * world}")
        self.set_epoch(0)

    @property
    def num_workers(self) -> int:
        return max(1, self.cfg.workers)

    def plan_signature(self) -> dict:
        """What the sample order depends on besides the position: a resume with another plan cannot continue an
        epoch where it stopped. (Its key "batch_size" is the step batch: the name saved checkpoints carry.)"""
        return {"seed": self.cfg.seed, "world_size": self.world, "workers": self.cfg.workers,
                "batch_size": self.cfg.step_batch_size, "train_data": "::".join(s.spec for s in self.sets),
                "debiased_sampling": self.cfg.debiased, "pairs_per_id": self.cfg.pairs_per_id}

    def same_plan(self, saved: dict) -> bool:
        # checkpoints written before a key existed have none: they ran with its off value
        off = {"debiased_sampling": False, "pairs_per_id": 0}
        return all(saved.get(k, off.get(k)) == v for k, v in self.plan_signature().items())

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The position: the next iteration starts at batch ``start_batch`` of ``epoch``."""
        self.epoch, self.batch_in_epoch = epoch, start_batch
        if self.cfg.debiased:
            self.plan = debiased_plan(self.per_source, self.cfg.seed, epoch)

    def advance(self) -> None:
        """One batch consumed by the training loop (loader workers keep the position their iteration started at)."""
        self.batch_in_epoch += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, **self.plan_signature()}

    def load_state_dict(self, saved: dict) -> None:
        start = saved["batch_in_epoch"]
        if start and not self.same_plan(saved):
            self.warn(f"the checkpoint was written with another data plan ({saved}); the order of the rest of "
                      f"epoch {saved['epoch']} cannot be reproduced, so it restarts at its first batch")
            start = 0
        self.set_epoch(saved["epoch"], start)

    # -- raw streams ---------------------------------------------------------------------------------------------
    def _concat_stream(self, w: int, counter: "Tally"):
        start, length = worker_range(self.n, self.cfg.step_batch_size, self.rank, self.num_workers, w)
        # Every pass reads the same shard order, so a refill pass re-reads this worker's own range and never a pair
        # of another worker's (only the shuffle buffer's seed changes with the pass).
        order = shard_order(self.sets, self.cfg.seed, self.epoch, self.cfg.shard_shuffle)
        yield from read_range(order, start, start + length, counter)

    def _weighted_stream(self, w: int, counter: "Tally"):
        slots = self.world * self.num_workers
        slot = self.rank * self.num_workers + w
        weights = np.asarray(self.cfg.weights, dtype=np.float64)
        rng = random.Random(rng_seed(Stream.SOURCE_MIX, self.cfg.seed, self.epoch, self.rank, w))

        def endless(sset: ShardSet):
            n_s = sset.num_pairs
            start, end = slot * n_s // slots, (slot + 1) * n_s // slots
            if end <= start:
                raise DataError(f"set {sset.spec!r} has {n_s} pairs, fewer than the {slots} (rank, worker) slots "
                                f"that read it; use fewer workers or drop its weight")
            for p in range(1 << 30):
                order = shard_order([sset], self.cfg.seed, (self.epoch * 1000 + p) * 64 + sset.index,
                                    self.cfg.shard_shuffle)
                got = 0
                for item in read_range(order, start, end, counter):
                    got += 1
                    yield item
                if got == 0:
                    raise DataError(f"set {sset.spec!r} yields no readable sample")

        streams = [endless(s) for s in self.sets]
        cum = np.cumsum(weights / weights.sum())
        while True:
            i = int(np.searchsorted(cum, rng.random(), side="right"))
            yield next(streams[min(i, len(streams) - 1)])

    def _debiased_stream(self, w: int, source: int, counter: "Tally"):
        sset = self.sets[source]
        before, mine = debiased_worker_share(self.plan, self.num_workers, w, source)
        b = self.cfg.step_batch_size
        start = (self.rank * self.per_source[source] + before) * b
        order = shard_order([sset], self.cfg.seed, self.epoch, self.cfg.shard_shuffle, sset.index)
        yield from read_range(order, start, start + mine * b, counter)

    def _mix(self, items, rng: random.Random):
        """The seeded shuffle buffer over samples, or (--pairs-per-id K) over groups of K pairs of one person."""
        k = self.cfg.pairs_per_id
        if not k:
            yield from shuffle_buffer(items, self.cfg.shuffle_buffer, rng)
            return
        groups = identity_groups(items, k, rng, self.cfg.shuffle_buffer, lambda it: raw_pid(it[0], it[1]))
        for group in shuffle_buffer(groups, max(1, self.cfg.shuffle_buffer // k), rng):
            yield from group

    def _refilled(self, make, w: int, tag: tuple = ()):
        """Shuffled passes over one fixed range: refills for unusable or lost pairs come from the next pass. Each item
        comes with whether it is such a refill (a pair of the range met a second time), so that it is counted."""
        for p in range(1 << 30):
            got = 0
            for item in self._mix(make(), random.Random(rng_seed(Stream.SHUFFLE_BUFFER, self.cfg.seed, self.epoch,
                                                                 self.rank, w, p, *tag))):
                got += 1
                yield item, p > 0
            if got == 0:
                raise DataError(f"rank {self.rank} worker {w}: its shard range{' of set ' + str(tag[0] - 1) if tag else ''}"
                                f" yielded no sample in epoch {self.epoch} (every shard unreadable?)")

    def _raw(self, w: int, counter: "Tally"):
        if self.cfg.weights is not None:  # sampling with replacement: no draw is a refill
            mixed = self._mix(self._weighted_stream(w, counter),
                              random.Random(rng_seed(Stream.SHUFFLE_BUFFER, self.cfg.seed, self.epoch, self.rank, w)))
            yield from ((item, False) for item in mixed)
            return
        yield from self._refilled(lambda: self._concat_stream(w, counter), w)

    def _source_streams(self, w: int, counter: "Tally"):
        """j -> the stream batch j reads: the worker's one stream, or (debiased) one lazily opened stream per source,
        batch j of the rank reading source plan[j]."""
        if self.plan is None:
            raw = self._raw(w, counter)
            return lambda j: raw
        streams = {}

        def of(j: int):
            src = self.plan[w + j * self.num_workers]
            if src not in streams:
                streams[src] = self._refilled(lambda: self._debiased_stream(w, src, counter), w, (src + 1,))
            return streams[src]
        return of

    # -- batches ---------------------------------------------------------------------------------------------------
    def _batches(self, w: int):
        """All batches of logical worker w for this epoch, as (batch_index, samples, counts): "bad", the unusable
        samples and damaged shards by reason, and "data", the batch's share of the epoch's data counts: pairs of the
        plan read, pairs of the plan lost (by reason: unusable sample, lost shard) and refills (pairs met again)."""
        counter = Tally()
        n_batches = worker_batches(self.n, self.num_workers, w)
        b = self.cfg.step_batch_size
        stream_of = self._source_streams(w, counter)
        seen = bad = 0
        for j in range(n_batches):
            raw = stream_of(j)
            samples, read = [], 0
            while len(samples) < b:
                (item, sset, pair_index), refill = next(raw)
                seen += 1
                try:
                    samples.append((*self.decoder(item, sset, pair_index), sset.index))
                    read += not refill
                except _BadSample as e:
                    bad += 1
                    counter.add(e.reason, (item.get("__url__"), item.get("__key__")))
                    if bad > max(16, self.cfg.max_bad_frac * seen):
                        raise DataError(self._unusable_message(w, bad, seen, counter, item, sset, e))
                if counter.lost_total > max(16, self.cfg.max_bad_frac * n_batches * b):
                    raise DataError(self._lost_message(w, counter, n_batches * b))
            delta, lost = counter.drain()
            yield j, samples, {"bad": dict(delta), "data": {"read": read, "refilled": b - read, "lost": dict(lost)},
                               "remote": remote.drain()}

    def _unusable_message(self, w: int, bad: int, seen: int, counter: "Tally", item: dict, sset: ShardSet,
                          e: "_BadSample") -> str:
        hint = ("check them with: python data_prep/make_shards.py verify OUTPUT"
                if sset.is_make_shards_split else "list a shard's members with: tar tf SHARD | head")
        return (f"rank {self.rank} worker {w}: {bad} of {seen} samples read are unusable ({dict(counter.delta)}); "
                f"the last, key {item.get('__key__')} of {item.get('__url__')}: {e.reason}: {e.detail}; {hint}")

    def _lost_message(self, w: int, counter: "Tally", planned: int) -> str:
        return (f"rank {self.rank} worker {w}: {counter.lost_total} of the {planned} pairs of its share of epoch "
                f"{self.epoch} cannot be read ({dict(counter.epoch_lost)}), more than --max-bad-samples-frac "
                f"{self.cfg.max_bad_frac:g}: shards are gone, truncated or shorter than {shards.SIZES_FILE} says "
                f"(the warnings above name them); restore them, or re-index a folder with python "
                f"data_prep/make_shards.py index DIR")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical = info.id if info is not None else 0
        W = self.num_workers
        w = (physical + self.batch_in_epoch) % W
        skip = batches_done_by_worker(self.batch_in_epoch, W, w)
        for j, samples, counts in self._batches(w):
            if j < skip:
                continue
            yield self._collate(samples, counts, w, j)

    def _collate(self, samples, counts: dict, w: int, j: int) -> dict:
        # Augmentation is seeded per batch so that a resumed run draws the same flips and crops.
        torch.manual_seed(rng_seed(Stream.LOADER_AUGMENT, self.cfg.seed, self.epoch, self.rank, w, j))
        images = torch.stack([self.decoder.transform(im) for im, *_ in samples])
        texts = self.tokenizer([t for _, t, *_ in samples])
        return {
            "images": images,
            "texts": texts,
            "keys": torch.tensor([s[2] for s in samples], dtype=torch.long),
            "pids": torch.tensor([s[3] for s in samples], dtype=torch.long),
            "sources": torch.tensor([s[4] for s in samples], dtype=torch.long),
            **counts,
        }


def build_train_loader(stream: TrainStream, pin_memory: bool) -> torch.utils.data.DataLoader:
    W = stream.cfg.workers
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=W, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=4 if W > 0 else None,
        worker_init_fn=_init_loader_worker if W > 0 else None)


def agreed_batches(loader, device: torch.device):
    """The loader's batches, with a data error agreed by every rank before the step it would break: ranks read
    different shards, so one rank's loader can fail (a shard gone, a sizes.json that lies) while the others hold good
    batches. Alone, that rank would stop and save while the others wait in the step's all-reduce: mismatched
    collectives, a hang or a crash. Here every rank reports whether its batch came (one all-reduce of a flag per
    step), and on a failure anywhere all ranks raise the lowest failing rank's DataError at the same batch, so they
    write latest.pt together and print the same error line."""
    from training import distributed as dist_utils
    batches = iter(loader)
    while True:
        try:
            batch, error = next(batches), None
        except StopIteration:
            return
        except DataError as e:
            batch, error = None, e
        if dist_utils.is_dist():
            failed = torch.tensor([0.0 if error is None else 1.0], device=device)
            dist_utils.all_reduce_sum(failed)
            if failed.item() > 0:
                messages = dist_utils.all_gather_object(None if error is None else str(error))
                rank, first = next((r, m) for r, m in enumerate(messages) if m is not None)
                error = error or DataError(first if rank == 0 else f"rank {rank}: {first}")
        if error is not None:
            raise error
        yield batch


def _init_loader_worker(_worker_id: int) -> None:
    """A forked loader worker: the main process decides when it ends (stop signals are the main process's), and it
    must not hold the run's lock (a SIGKILLed trainer's lingering workers would keep its own resume out)."""
    from training import runlock, stop
    stop.ignore_signals()
    runlock.close_in_child()
