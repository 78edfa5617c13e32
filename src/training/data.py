"""Streaming webdataset input pipeline that applies the epoch plan (training/plan.py) to the shards.

Why not webdataset's own pipeline: exact mid-epoch resume, "every rank yields the same number of batches" and "the
same global batches on any cluster shape" all need the order to be a pure function of the plan's settings and the
position. The epoch is read by L logical readers (``--data-readers``); global batch g is the g-th chunk of B / L
pairs of every reader, in reader order:

* **concat mode** (no ``--train-data-weights``): the shards of all sets, shuffled per epoch with ``(seed, epoch)``,
  form one sequence of N pairs; the epoch has G = N // B global batches and reader l owns the range
  ``[l*G*c, (l+1)*G*c)``. Ranges are disjoint, so no pair is seen twice in an epoch, and fewer than B pairs are left
  out (drop-last).
* **debiased mode** (``--debiased-sampling``, ZeroVL): each set is split between the readers as in concat mode, and a
  seeded list identical in every process says which set each global batch comes from (a shuffle of the multiset with
  n_s = N_s // B entries per set), so a global batch is single-source and every set is read once.
* **weighted mode**: every reader samples its own slice of each set in endless passes and draws each sample's set
  with probability proportional to its weight, from an RNG seeded by (seed, epoch, reader).

Each reader mixes its stream with a seeded shuffle buffer; with ``--pairs-per-id K`` the buffer mixes groups of K
pairs of one person instead (plan.identity_groups), and a chunk is c / K such groups. Augmentation is seeded per
(reader, batch). Rank r runs the readers ``[r*L/W, (r+1)*L/W)``; its loader workers split them, each yielding its
*part* of every batch, and ``StepBatches`` joins the parts the DataLoader delivers round-robin. To resume at global
batch k, every reader reads and drops its first k chunks. Unusable samples (bad JPEG, bad UTF-8, missing json, ...)
and pairs of the plan that cannot be read (a shard gone, truncated or shorter than sizes.json lists: read_shard) are
counted, by reason and in pairs, and replaced by the next sample of the reader's stream, so every batch is full and
all ranks stay in lock-step; the batches carry the counts (pairs read, lost, refilled) to the run's tallies.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from common import remote, shards
from common.runs import CheckpointError
from training.config import LoaderConfig
from training.plan import (ShardSequence, debiased_plan, default_readers, identity_groups, rank_readers,
                           reader_range, shape_problem, shard_order, shuffle_buffer, weighted_slice, worker_readers)
from training.state import add_data_counts, empty_data_counts
from common.seeding import Stream, derive, rng_seed


class DataError(RuntimeError):
    """Unusable training data; the message names the shard set, file and problem."""


class TooSmall(DataError):
    """The epoch holds no full step batch (the trainer names the flags that set the batch)."""


class ShapeError(DataError):
    """The global batch, --data-readers and the number of ranks do not fit together (training/plan.py)."""


class Tally:
    """Unusable-sample counts of one loader process (all its readers): ``delta`` (by reason: samples, or shards for
    a shard's problem) and ``lost`` (by reason: pairs of the plan not read) are drained into each batch;
    ``epoch_lost`` is the process's sum for the epoch, held against --max-bad-samples-frac; ``reported`` remembers
    what was already counted this epoch, because refill passes meet the same bad samples and truncated shards
    again."""

    def __init__(self):
        self.delta: Counter = Counter()
        self.lost: Counter = Counter()
        self.epoch_lost: Counter = Counter()
        self.reported: set = set()
        self.seen = self.bad = 0  # samples met and unusable ones, held against --max-bad-samples-frac

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
        self.bases = list(itertools.accumulate(self.counts, initial=0))[:-1]

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


def read_range(order: ShardSequence, start: int, end: int, counter: "Tally", reader: int):
    """(sample, set, pair index) at positions [start, end) of an epoch's shard sequence; only overlapping shards are
    read (see read_shard). The pair index is the pair's position in its set's fixed shard list + the set's offset."""
    for sset, url, count, base, lo, hi in order.overlapping(start, end):
        yield from read_shard(sset, url, count, base, lo, hi, counter, reader)


def read_shard(sset: ShardSet, url: str, count: int, base: int, lo: int, hi: int, counter: "Tally", reader: int = 0):
    """Samples [lo, hi) of one shard that sizes.json says holds ``count``, with their pair indices.

    The plan's pairs are what sizes.json counted, so a shard that disagrees is caught here: one holding more samples
    than its count is refused (the rest would go unread, or take other pairs' indices); pairs of [lo, hi) that cannot
    be read (a shard missing, truncated or shorter than listed) are counted as lost, in pairs, against
    --max-bad-samples-frac. A missing shard of a local set is an error at once: it was there when the run started."""
    if not shards.is_url(url) and not os.path.exists(url):
        raise DataError(f"--train-data shard {url} no longer exists (it was there at the start): {hi - lo} pairs of "
                        f"the plan cannot be read; restore it and continue with --resume latest")
    problems, seen = [], {}
    # (a reader whose range starts inside the shard skips to sample lo by the tar headers: iter_samples' start)
    samples = _stop_if_unavailable(shards.iter_samples(url, lambda u, problem: problems.append(problem), start=lo,
                                                       seen=seen))
    i = lo
    for raw in samples:
        if i >= hi:
            if hi == count:
                raise DataError(_more_than_listed(url, count, i + 1 + sum(1 for _ in samples)))
            return
        yield raw, sset, sset.pair_index_offset + base + i
        i += 1
    held = seen.get("samples", i)  # what the shard held up to where it ended or broke
    lost = hi - max(held, lo)
    if lost <= 0:  # what is wrong lies beyond this range: the reader of that part counts it
        return
    # Python's tarfile stops silently at most truncations: a cut file, and a whole one that sizes.json over-counts,
    # both read as fewer samples than listed
    reason = "truncated_shard" if held or not problems else "unreadable_shard"
    if counter.add(reason, ("lost", url, reader), lost):  # two readers' ranges may share a shard
        problem = problems[0] if problems else f"{held} samples where {shards.SIZES_FILE} lists {count}"
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
    """One rank's share of the epoch plan (training/plan.py): the rank runs the readers
    ``rank_readers(L, W, rank)``; each loader worker runs a contiguous share of them and yields, for every global
    batch g, its *part* (the chunks of its readers at g, in reader order). ``StepBatches`` joins a step's parts.
    Every batch carries its counts (dict(images, texts, keys, pids, sources, bad=..., data=...))."""

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
        B = self.global_batch = cfg.step_batch_size * world
        self._use_readers(cfg.readers or default_readers(B, cfg.pairs_per_id, world))
        self.plan = None
        if cfg.debiased:
            self.per_source = [s.num_pairs // B for s in sets]
            for s, n_s in zip(sets, self.per_source):
                if n_s < 1:
                    raise DataError(f"set {s.spec!r} has {s.num_pairs} pairs, less than one global batch of "
                                    f"{B}: debiased sampling needs a full batch from each set")
            self.num_samples = self.total_pairs
        self.n = sum(self.per_source) if cfg.debiased else self.num_samples // B  # global batches of an epoch
        if self.n < 1:
            raise TooSmall(f"{self.num_samples} samples per epoch make no full step batch: a step takes "
                           f"{cfg.step_batch_size} per rank x {world} rank(s) = {B}")
        self._epoch_cache: dict = {}
        self.set_epoch(0)

    def _use_readers(self, readers: int) -> None:
        problem = shape_problem(self.global_batch, readers, self.world, self.cfg.pairs_per_id)
        if problem:
            raise ShapeError(f"{problem}: choose --data-readers L, a divisor of the global batch that the ranks "
                             f"divide (it is part of the plan: keep it for the whole run)")
        self.readers, self.chunk = readers, self.global_batch // readers
        self.my_readers = rank_readers(readers, self.world, self.rank)

    @property
    def loader_workers(self) -> int:
        """Loader processes: --workers, but no more than the rank's readers (a worker runs whole readers)."""
        return min(self.cfg.workers, len(self.my_readers))

    @property
    def dropped_per_epoch(self) -> int:
        """Pairs of the sets that no epoch reads (drop-last: fewer than one global batch; per set when debiased;
        none when sampling with replacement or when --train-num-samples chooses fewer)."""
        if self.cfg.weights is not None or self.cfg.num_samples:
            return 0
        if self.cfg.debiased:
            return sum(s.num_pairs - n_s * self.global_batch for s, n_s in zip(self.sets, self.per_source))
        return self.total_pairs - self.n * self.global_batch

    def describe(self) -> str:
        cfg = self.cfg
        return (f"epoch plan: {self.n} global batches of {self.global_batch} = {self.readers} readers x "
                f"{self.chunk} pairs; rank {self.rank} runs readers {self.my_readers.start}-{self.my_readers.stop - 1}"
                f" in {max(1, self.loader_workers)} loader process(es)"
                + (f" (--workers {cfg.workers}: at most one per reader)" if cfg.workers > self.loader_workers else "")
                + f"; {self.dropped_per_epoch} pairs per epoch left out by drop-last")

    def plan_signature(self) -> dict:
        """What the sequence of global batches depends on besides the position; not the cluster's shape. A resume
        with another plan cannot continue an epoch where it stopped. ("plan": 2, the canonical-reader plan; a
        checkpoint of the earlier per-rank plan has none.)"""
        c = self.cfg
        return {"plan": 2, "seed": c.seed, "global_batch": self.global_batch, "data_readers": self.readers,
                "train_data": "::".join(s.spec for s in self.sets), "train_data_weights": c.weights,
                "train_num_samples": c.num_samples, "debiased_sampling": c.debiased, "pairs_per_id": c.pairs_per_id,
                "shuffle_buffer": c.shuffle_buffer, "shard_shuffle": c.shard_shuffle}

    def same_plan(self, saved: dict) -> bool:
        return all(saved.get(k) == v for k, v in self.plan_signature().items())

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The position: the next iteration starts at global batch ``start_batch`` of ``epoch``."""
        self.epoch, self.batch_in_epoch = epoch, start_batch
        self._epoch_cache = {}
        if self.cfg.debiased:
            self.plan = debiased_plan(self.per_source, self.cfg.seed, epoch)

    def advance(self) -> None:
        """One batch consumed by the training loop (loader workers keep the position their iteration started at)."""
        self.batch_in_epoch += 1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, **self.plan_signature()}

    def load_state_dict(self, saved: dict) -> None:
        """The checkpoint's position; without --data-readers the run keeps its checkpoint's readers, so that it
        continues mid-epoch on any shape that divides them (one that does not is refused, nothing written)."""
        start, theirs = saved["batch_in_epoch"], saved.get("data_readers")
        if (self.cfg.readers is None and saved.get("plan") == 2 and theirs != self.readers
                and saved.get("global_batch") == self.global_batch):
            try:
                self._use_readers(theirs)
            except ShapeError as e:
                raise CheckpointError(f"the checkpoint's epoch plan cannot run on {self.world} rank(s): {e}; or start "
                                      f"its epoch {saved['epoch']} again under a new plan with --data-readers "
                                      f"{default_readers(self.global_batch, self.cfg.pairs_per_id, self.world)}")
        if start and not (start >= self.n and self._same_epoch(saved)) and not self.same_plan(saved):
            changed = sorted(k for k, v in self.plan_signature().items() if saved.get(k) != v)
            self.warn(f"the checkpoint was written with another data plan (it differs in {', '.join(changed)}: "
                      f"{ {k: saved.get(k) for k in changed} }); the order of the rest of epoch {saved['epoch']} "
                      f"cannot be reproduced, so it restarts at its first batch")
            start = 0
        self.set_epoch(saved["epoch"], start)

    def _same_epoch(self, saved: dict) -> bool:
        """Whether a saved position at the end of its epoch is at the end of this run's epoch too: the same sets, mode
        and global batch give the same number of global batches, so nothing of the epoch is left whatever the order
        (a checkpoint of the per-rank plan before "plan": 2 included: its global batch was world_size x batch_size).
        With other data or another batch the position means nothing here: the epoch restarts, with the warning."""
        c = self.cfg
        batch = saved.get("global_batch") or saved.get("world_size", 0) * saved.get("batch_size", 0)
        return (batch == self.global_batch and saved.get("train_data") == "::".join(s.spec for s in self.sets)
                and saved.get("debiased_sampling", False) == c.debiased and saved.get("train_num_samples") ==
                c.num_samples and saved.get("train_data_weights") == c.weights)

    # -- raw streams of one reader -----------------------------------------------------------------------------------
    def _order(self, *parts: int) -> ShardSequence:
        key = parts
        if key not in self._epoch_cache:
            sets = self.sets if not parts else [self.sets[parts[0]]]
            self._epoch_cache[key] = shard_order(sets, self.cfg.seed, self.epoch, self.cfg.shard_shuffle, *parts)
        return self._epoch_cache[key]

    def _concat_stream(self, reader: int, counter: "Tally"):
        start, length = reader_range(self.n, self.chunk, reader)
        # Every pass reads the same range, so a refill pass re-reads this reader's own pairs and never another's
        # (only the shuffle buffer's seed changes with the pass).
        yield from read_range(self._order(), start, start + length, counter, reader)

    def _debiased_stream(self, reader: int, source: int, counter: "Tally"):
        start, length = reader_range(self.per_source[source], self.chunk, reader)
        yield from read_range(self._order(source), start, start + length, counter, reader)

    def _weighted_stream(self, reader: int, counter: "Tally"):
        weights = np.asarray(self.cfg.weights, dtype=np.float64)
        rng = random.Random(rng_seed(Stream.SOURCE_MIX, self.cfg.seed, self.epoch, reader))

        def endless(sset: ShardSet):
            start, end = weighted_slice(sset.num_pairs, self.readers, reader)
            if end <= start:
                raise DataError(f"set {sset.spec!r} has {sset.num_pairs} pairs, fewer than the {self.readers} readers "
                                f"that sample it (--data-readers); lower --data-readers or drop its weight")
            for p in range(1 << 30):
                order = shard_order([sset], self.cfg.seed, (self.epoch * 1000 + p) * 64 + sset.index,
                                    self.cfg.shard_shuffle)
                got = 0
                for item in read_range(order, start, end, counter, reader):
                    got += 1
                    yield item
                if got == 0:
                    raise DataError(f"set {sset.spec!r} yields no readable sample")

        streams = [endless(s) for s in self.sets]
        cum = np.cumsum(weights / weights.sum())
        while True:
            i = int(np.searchsorted(cum, rng.random(), side="right"))
            yield next(streams[min(i, len(streams) - 1)])

    def _mix(self, items, rng: random.Random):
        """The seeded shuffle buffer over samples, or (--pairs-per-id K) over groups of K pairs of one person."""
        k = self.cfg.pairs_per_id
        if not k:
            yield from shuffle_buffer(items, self.cfg.shuffle_buffer, rng)
            return
        groups = identity_groups(items, k, rng, self.cfg.shuffle_buffer, lambda it: raw_pid(it[0], it[1]))
        for group in shuffle_buffer(groups, max(1, self.cfg.shuffle_buffer // k), rng):
            yield from group

    def _refilled(self, make, reader: int, tag: tuple = ()):
        """Shuffled passes over one fixed range: refills for unusable or lost pairs come from the next pass. Each item
        comes with whether it is such a refill (a pair of the range met a second time), so that it is counted."""
        for p in range(1 << 30):
            got = 0
            rng = random.Random(rng_seed(Stream.SHUFFLE_BUFFER, self.cfg.seed, self.epoch, reader, p, *tag))
            for item in self._mix(make(), rng):
                got += 1
                yield item, p > 0
            if got == 0:
                raise DataError(f"reader {reader} of rank {self.rank}: its shard range"
                                f"{' of set ' + str(tag[0] - 1) if tag else ''} yielded no sample in epoch "
                                f"{self.epoch} (every shard unreadable?)")

    def _source_streams(self, reader: int, counter: "Tally"):
        """g -> the stream that global batch g reads: the reader's one stream, or (debiased) one lazily opened stream
        per source, batch g reading source plan[g]."""
        if self.cfg.weights is not None:  # sampling with replacement: no draw is a refill
            rng = random.Random(rng_seed(Stream.SHUFFLE_BUFFER, self.cfg.seed, self.epoch, reader))
            mixed = ((item, False) for item in self._mix(self._weighted_stream(reader, counter), rng))
            return lambda g: mixed
        if self.plan is None:
            raw = self._refilled(lambda: self._concat_stream(reader, counter), reader)
            return lambda g: raw
        streams = {}

        def of(g: int):
            src = int(self.plan[g])
            if src not in streams:
                streams[src] = self._refilled(lambda: self._debiased_stream(reader, src, counter), reader, (src + 1,))
            return streams[src]
        return of

    # -- chunks and parts --------------------------------------------------------------------------------------------
    def _chunks(self, reader: int, counter: "Tally", planned: int):
        """The reader's chunks of the epoch: for each global batch g, c decoded samples and how many of them are
        pairs of the plan read for the first time (the rest refill unusable or lost ones)."""
        stream_of = self._source_streams(reader, counter)
        for g in range(self.n):
            raw = stream_of(g)
            samples, read = [], 0
            while len(samples) < self.chunk:
                (item, sset, pair_index), refill = next(raw)
                counter.seen += 1
                try:
                    samples.append((*self.decoder(item, sset, pair_index), sset.index))
                    read += not refill
                except _BadSample as e:
                    counter.bad += 1
                    counter.add(e.reason, (item.get("__url__"), item.get("__key__")))
                    if counter.bad > max(16, self.cfg.max_bad_frac * counter.seen):
                        raise DataError(self._unusable_message(reader, counter, item, sset, e))
                if counter.lost_total > max(16, self.cfg.max_bad_frac * planned):
                    raise DataError(self._lost_message(reader, counter, planned))
            yield samples, read

    def _parts(self, readers: range):
        """(g, part) for every global batch g of the epoch from ``readers`` (one loader worker's share); the parts
        before the resume position are read (the streams must pass them) but not augmented or collated."""
        counter = Tally()
        planned = self.n * self.chunk * len(readers)
        chunks = [self._chunks(r, counter, planned) for r in readers]
        for g in range(self.n):
            got = [next(c) for c in chunks]
            delta, lost = counter.drain()
            if g < self.batch_in_epoch:
                continue
            read = sum(r for _, r in got)
            # remote reads are drained only here: what skipping to the resume position fetched is counted too
            counts = {"bad": dict(delta), "data": {"read": read, "refilled": len(readers) * self.chunk - read,
                                                   "lost": dict(lost)}, "remote": remote.drain()}
            yield self._collate([s for s, _ in got], readers, g, counts)

    def _unusable_message(self, reader: int, counter: "Tally", item: dict, sset: ShardSet, e: "_BadSample") -> str:
        hint = ("check them with: python data_prep/make_shards.py verify OUTPUT"
                if sset.is_make_shards_split else "list a shard's members with: tar tf SHARD | head")
        return (f"rank {self.rank} (reader {reader}): {counter.bad} of {counter.seen} samples read are unusable "
                f"({dict(counter.epoch_lost)}); the last, key {item.get('__key__')} of {item.get('__url__')}: {e.reason}: "
                f"{e.detail}; {hint}")

    def _lost_message(self, reader: int, counter: "Tally", planned: int) -> str:
        return (f"rank {self.rank} (reader {reader}): {counter.lost_total} of the {planned} pairs of its loader "
                f"process's share of epoch {self.epoch} cannot be read ({dict(counter.epoch_lost)}), more than "
                f"--max-bad-samples-frac {self.cfg.max_bad_frac:g}: shards are gone, truncated or shorter than "
                f"{shards.SIZES_FILE} says (the warnings above name them); restore them, or re-index a folder with "
                f"python data_prep/make_shards.py index DIR")

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        k, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.batch_in_epoch < self.n:  # (resumed at the epoch's end: nothing to read again)
            yield from self._parts(worker_readers(self.my_readers, workers, k))

    def _augment_seed(self, reader: int) -> int:
        key = ("augment", self.epoch, reader)
        if key not in self._epoch_cache:
            self._epoch_cache[key] = rng_seed(Stream.LOADER_AUGMENT, self.cfg.seed, self.epoch, reader)
        return self._epoch_cache[key]

    def _collate(self, chunks: list, readers: range, g: int, counts: dict) -> dict:
        images = []
        for reader, samples in zip(readers, chunks):
            # Augmentation is seeded per (reader, batch): the same flips and crops on any cluster shape and after a
            # resume. (The CPU generator alone: torch.manual_seed also queues seeds for every accelerator backend,
            # with a formatted stack trace each, ~1 ms a call on a CPU-only build.)
            torch.default_generator.manual_seed(derive(self._augment_seed(reader), g))
            images.extend(self.decoder.transform(im) for im, *_ in samples)
        samples = [s for chunk in chunks for s in chunk]
        return {
            "images": torch.stack(images),
            "texts": self.tokenizer([t for _, t, *_ in samples]),
            "keys": torch.tensor([s[2] for s in samples], dtype=torch.long),
            "pids": torch.tensor([s[3] for s in samples], dtype=torch.long),
            "sources": torch.tensor([s[4] for s in samples], dtype=torch.long),
            "part": (g, readers.start, readers.stop),
            **counts,
        }


class StepBatches:
    """A rank's step batches: the DataLoader takes one part from each worker in turn (worker 0, 1, ...; every worker
    yields one part per global batch), so each run of ``parts`` consecutive parts is one batch, in reader order."""

    def __init__(self, loader, parts: int, readers: range, pin: bool = False):
        self.loader, self.parts, self.readers, self.pin = loader, parts, readers, pin

    def __iter__(self):
        it = iter(self.loader)
        while True:
            group = []
            for _ in range(self.parts):
                part = next(it, None)
                if part is None:
                    if group:
                        raise RuntimeError(f"the loader ended inside a batch ({len(group)} of {self.parts} parts)")
                    return
                group.append(part)
            yield join_parts(group, self.readers, self.pin)


def join_parts(group: list[dict], readers: range, pin: bool = False) -> dict:
    """One batch from its parts; they must be the same global batch and cover the rank's readers in order (the
    DataLoader's round-robin order is what the plan relies on: a change in torch's order would fail here, loudly)."""
    g = group[0]["part"][0]
    spans = [(p["part"][1], p["part"][2]) for p in group]
    if (any(p["part"][0] != g for p in group) or any(a[1] != b[0] for a, b in zip(spans, spans[1:]))
            or (spans[0][0], spans[-1][1]) != (readers.start, readers.stop)):
        raise RuntimeError(f"loader parts out of order: {[p['part'] for p in group]} for readers {readers}")
    if len(group) == 1:
        return group[0]
    out = {k: _cat([p[k] for p in group], pin) for k in ("images", "texts", "keys", "pids", "sources")}
    bad, data, reads = Counter(), empty_data_counts(), Counter()
    for p in group:
        bad.update(p["bad"])
        add_data_counts(data, p["data"])
        reads.update(p.get("remote", {}))
    return {**out, "part": (g, readers.start, readers.stop), "bad": dict(bad), "data": data, "remote": dict(reads)}


def _cat(tensors: list, pin: bool) -> torch.Tensor:
    """torch.cat, into page-locked memory when the batch goes to an accelerator (one copy; torch caches the pinned
    blocks), as the DataLoader's pin_memory would have left it."""
    if not pin:
        return torch.cat(tensors)
    out = torch.empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=tensors[0].dtype,
                      pin_memory=True)
    return torch.cat(tensors, out=out)


def build_train_loader(stream: TrainStream, pin_memory: bool) -> StepBatches:
    W = stream.loader_workers
    parts = max(1, W)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=W, pin_memory=pin_memory and parts == 1,
        persistent_workers=False, prefetch_factor=4 if W > 0 else None,
        worker_init_fn=_init_loader_worker if W > 0 else None)
    return StepBatches(loader, parts, stream.my_readers, pin=pin_memory and parts > 1)


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
