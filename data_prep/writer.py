"""Deterministic shard writer: entries -> (image, caption) samples -> tar shards, sizes.json, manifest.json.

Byte-identical output for the same input: samples are ordered by (person id, image path, caption index), tar
headers carry fixed metadata, JSON is dumped with sorted keys, and worker results are consumed in input order."""
from __future__ import annotations

import gc
import hashlib
import itertools
import json
import multiprocessing as mp
import signal
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from common import shards

from . import FORMAT_VERSION
from common.fsio import get_fs, is_local, join, sha256_file, write_atomic
from .records import SPLITS, Drops, PrepError, id_sort_key

STAGING = ".staging"  # new shards wait here until every split is complete (then they are renamed into place)


class ShardSink:
    """Cuts samples into shards of at most maxcount samples / maxsize bytes and stages each finished shard in
    SPLIT/.staging/ -- unless identical bytes already sit at its final name (re-runs skip finished work). Nothing
    under a final name changes until :func:`commit_split`.

    A finished shard is packed by :meth:`Workers.pack` (a worker process when there is a pool: packing through
    webdataset's TarWriter costs ~80 us per pair, and in this process it would cap make_shards at one core). Hashing
    is done where it is packed; comparing with the file at its final name and writing run on one I/O thread, in shard
    order, while this process goes on cutting (file I/O releases the GIL). At most ``in_flight`` shards are in the
    air (memory: a shard is up to maxsize bytes). :meth:`close` must be called (write_split does, also on errors)
    before the staged files are used or removed."""

    def __init__(self, fs, split_dir: str, split: str, maxcount: int, maxsize: int, overwrite: bool,
                 workers: "Workers"):
        self.fs, self.dir, self.split = fs, split_dir, split
        self.maxcount, self.maxsize, self.overwrite = maxcount, maxsize, overwrite
        self.workers = workers
        self.in_flight = workers.processes + 1
        self.samples: list[dict] = []
        self.size = 0
        self.shards: list[dict] = []
        self.staged: list[str] = []
        self.written = self.skipped = 0
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-io")
        self._pending: deque = deque()  # (shard record, future of _store) in shard order
        self._aborted = threading.Event()

    def add(self, sample: dict):
        size = shards.tar_size(sample)
        if self.samples and (len(self.samples) >= self.maxcount or self.size + size > self.maxsize):
            self.flush()
        self.samples.append(sample)
        self.size += size

    def flush(self):
        if not self.samples:
            return
        while len(self._pending) >= self.in_flight:
            self._settle_oldest()
        record = {"name": f"{self.split}-{len(self.shards):06d}.tar", "count": len(self.samples), "sha256": None}
        job = self.workers.pack(self.samples, self.fs, self.dir, record["name"], self.overwrite)
        self.samples, self.size = [], 0
        self.shards.append(record)
        self._pending.append((record, self._io.submit(self._store, record["name"], job)))

    def _store(self, name: str, job) -> tuple[str, bool]:
        """(sha256, whether it was staged); runs on the I/O thread."""
        while True:
            try:
                data, sha, staged = job.get(timeout=0.2)
                break
            except mp.TimeoutError:
                if self._aborted.is_set():  # the pool is gone: this job will never finish
                    raise RuntimeError(f"{name}: packing abandoned") from None
        if data is None:  # a worker stored it
            return sha, staged
        return store_shard(self.fs, self.dir, name, data, sha, self.overwrite)

    def _settle_oldest(self):
        record, fut = self._pending.popleft()
        record["sha256"], staged = fut.result()  # a packing or I/O error is raised here, in the cutting thread
        if staged:
            self.staged.append(record["name"])
            self.written += 1
        else:
            self.skipped += 1

    def close(self, raise_errors: bool = True):
        """Waits for every shard in the air and raises the first error. With ``raise_errors=False`` (the caller is
        already failing, e.g. on Ctrl-C) the workers are stopped first, so that nothing writes into the staging
        folder once this returns, and the jobs they held are abandoned."""
        if not raise_errors:
            self._aborted.set()
            self.workers.close()
        try:
            while self._pending:
                try:
                    self._settle_oldest()
                except Exception:
                    if raise_errors:
                        raise
        finally:
            self._io.shutdown(wait=True)


def _same_file(fs, path, data, sha) -> bool:
    try:
        if fs.size(path) != len(data):
            return False
    except (FileNotFoundError, OSError):
        return False
    return sha256_file(fs, path) == sha


def store_shard(fs, split_dir: str, name: str, data: bytes, sha: str, overwrite: bool) -> tuple[str, bool]:
    """Stages a packed shard unless identical bytes already sit at its final name: (sha256, whether it was staged)."""
    if not overwrite and _same_file(fs, join(split_dir, name), data, sha):
        return sha, False
    write_atomic(fs, join(split_dir, STAGING, name), data)
    return sha, True


# Worker plumbing: the loader is installed once per process instead of being pickled with every task.
_LOADER = None


def _init_worker(loader):
    global _LOADER
    _LOADER = loader
    # Ctrl-C reaches the whole process group: only the parent handles it (and terminates the pool). A worker killed
    # by it inside a task would leave that task's result pending forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _load_chunk(entries):
    return [_LOADER(e) for e in entries]


def _pack(samples, fs=None, split_dir=None, name=None, overwrite=False) -> tuple:
    """(tar bytes, sha256, None), or with ``fs`` the shard stored right here: (None, sha256, whether it was staged)."""
    data = shards.pack(samples)
    sha = hashlib.sha256(data).hexdigest()
    if fs is None:
        return data, sha, None
    return (None, *store_shard(fs, split_dir, name, data, sha, overwrite))


class _Done:
    """A job run in this process, shaped like the pool's AsyncResult. (Packing on the I/O thread instead, to overlap
    the GIL-free parts of loading, was measured slower: the threads convoy on the GIL.)"""

    def __init__(self, value):
        self.value = value

    def get(self, timeout=None):
        return self.value


class Workers:
    """Loads entries into (jpeg, drop_reason, captions) in input order, and packs finished shards, in this process or
    in a pool of worker processes; the output does not depend on the number of workers.

    Loading runs at most ``LOOKAHEAD`` chunks per worker ahead of the caller, so that packing jobs, queued behind
    them in the pool's one FIFO, start soon after their shard is cut (``Pool.imap`` would queue every entry first, and
    the loaded images would pile up here)."""

    CHUNK, LOOKAHEAD = 16, 2

    def __init__(self, loader, workers: int):
        self.loader, self.pool, self.processes = loader, None, max(1, workers)
        if workers > 1:
            # Imported before the fork (it loads torch, ~1.4 s): the workers pack with it without importing it again.
            import webdataset  # noqa: F401
            # fork: workers inherit already-read state (e.g. memory:// files) without pickling it.
            ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
            gc.freeze()  # the parent's objects stay out of the workers' collections: no copy-on-write of its heap
            self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=(loader,))
            gc.unfreeze()

    def map(self, entries: list):
        if self.pool is None:
            return map(self.loader, entries)
        return self._ordered(entries)

    def _ordered(self, entries: list):
        chunks = (entries[i:i + self.CHUNK] for i in range(0, len(entries), self.CHUNK))
        window = deque(self.pool.apply_async(_load_chunk, (c,))
                       for c in itertools.islice(chunks, self.LOOKAHEAD * self.processes))
        while window:
            done = window.popleft().get()
            nxt = next(chunks, None)
            if nxt is not None:
                window.append(self.pool.apply_async(_load_chunk, (nxt,)))
            yield from done

    def pack(self, samples: list[dict], fs, split_dir: str, name: str, overwrite: bool):
        """A job whose get() is :func:`_pack`'s result. On a local file system the worker also stores the shard, so
        its bytes need not come back through a pipe (a worker's memory:// is its own; a remote store gets the bytes
        from this process's I/O thread)."""
        if self.pool is None:
            return _Done(_pack(samples))
        args = (samples, fs, split_dir, name, overwrite) if is_local(fs) else (samples,)
        return self.pool.apply_async(_pack, args)

    def close(self):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def write_split(fs, out_path, split, entries, workers: Workers, drops: Drops, opts, progress=True) -> dict:
    """Packs one split into SPLIT/.staging/ (see ShardSink); :func:`commit_split` puts it in place."""
    entries = sorted(entries, key=lambda e: (id_sort_key(e.orig_id), e.image))
    split_dir = join(out_path, split)
    fs.makedirs(split_dir, exist_ok=True)
    _remove_temporaries(fs, split_dir)
    sink = ShardSink(fs, split_dir, split, opts["maxcount"], opts["maxsize"], opts["overwrite"], workers)
    pids: dict[str, int] = {}
    key = image_id = 0
    per_source: dict[str, dict] = {}
    cap_chars = 0
    bar = tqdm(total=len(entries), desc=f"{split}", unit="img", disable=not progress, file=sys.stderr)
    log = _ProgressLines(split, len(entries)) if not progress and not opts.get("no_progress") else None
    try:
        for e, (jpg, reason, caps) in zip(entries, workers.map(entries)):
            bar.update(1)
            if log is not None:
                log.tick()
            if reason is None and not caps:
                reason = "no_valid_captions"
            if reason is not None:
                drops.drop(reason, e.origin, e.index, e.image_field, e.image, split)
                continue
            # pid is assigned on an identity's first surviving image, so it stays dense even if images are dropped.
            pid = pids.setdefault(str(e.orig_id), len(pids))
            src = per_source.setdefault(e.source, {"pairs": 0, "images": 0, "ids": set()})
            for ci, cap in enumerate(caps):
                meta = {"key": key, "pid": pid, "orig_id": e.orig_id, "source": e.source, "image": e.image,
                        "image_id": image_id, "caption_id": ci}
                if e.attributes is not None:
                    meta["attributes"] = e.attributes
                sink.add(shards.make_sample(key, jpg, cap, meta))
                key += 1
                cap_chars += len(cap)
            src["pairs"] += len(caps)
            src["images"] += 1
            src["ids"].add(pid)
            image_id += 1
        sink.flush()
    except BaseException:
        sink.close(raise_errors=False)  # the staged files are removed by the caller: nothing may still write them
        raise
    finally:
        bar.close()
    sink.close()
    if key == 0:
        raise PrepError(f"split {split!r}: none of its {len(entries)} images could be packed "
                        f"(dropped: {drops.split_dict(split)}); is --images right? Nothing in the output was changed")
    return {
        "pairs": key, "images": image_id, "captions": key, "identities": len(pids),
        "shards": sink.shards,
        "sources": {k: {"pairs": v["pairs"], "images": v["images"], "identities": len(v["ids"])}
                    for k, v in sorted(per_source.items())},
        "dropped": drops.split_dict(split),
        "_written": sink.written, "_skipped": sink.skipped, "_mean_caption_chars": cap_chars / max(1, key),
        "_staged": sink.staged,
    }


class _ProgressLines:
    """Without a terminal (a log file, a batch job) a progress bar prints nothing useful: a line every 30 s instead."""

    def __init__(self, split: str, total: int, every_s: float = 30.0):
        import time
        self.split, self.total, self.every_s, self.clock = split, total, every_s, time.monotonic
        self.start = self.last = self.clock()
        self.done = 0

    def tick(self) -> None:
        self.done += 1
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            print(f"{self.split}: {self.done}/{self.total} images ({rate:.0f}/s, about "
                  f"{(self.total - self.done) / max(rate, 1e-9):.0f} s left)", file=sys.stderr, flush=True)


def commit_split(fs, out_path: str, split: str, info: dict) -> None:
    """Staged shards to their final names, shards of an earlier, longer run removed, sizes.json rewritten."""
    split_dir = join(out_path, split)
    for name in info["_staged"]:
        fs.mv(join(split_dir, STAGING, name), join(split_dir, name))
    _remove_stale_shards(fs, split_dir, split, {s["name"] for s in info["shards"]})
    write_atomic(fs, join(split_dir, shards.SIZES_FILE),
                 shards.sizes_json({s["name"]: s["count"] for s in info["shards"]}))
    _remove_staging(fs, split_dir)


def _remove_temporaries(fs, split_dir):
    """Leftovers of an interrupted run: hidden .NAME.tmp files and staged shards are never committed, remove them."""
    for p in fs.ls(split_dir, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(".") and base.endswith(".tmp"):
            fs.rm(p)
    _remove_staging(fs, split_dir)


def _remove_staging(fs, split_dir):
    staging = join(split_dir, STAGING)
    if fs.exists(staging):
        fs.rm(staging, recursive=True)


def other_splits(fs, out_path: str, splits) -> list[str]:
    """Folders of the output that hold shards but are not splits of this run (left by an earlier run)."""
    out = []
    for p in fs.ls(out_path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name not in splits and not name.startswith(".") and fs.isdir(p) and (
                fs.exists(join(p, shards.SIZES_FILE)) or fs.glob(join(p, "*.tar"))):
            out.append(name)
    return sorted(out)


def _remove_stale_shards(fs, split_dir, split, keep):
    """A previous run with more shards would leave extra SPLIT-*.tar files that a glob would pick up."""
    for p in fs.ls(split_dir, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(f"{split}-") and base.endswith(".tar") and base not in keep:
            fs.rm(p)


def split_order(splits):
    return sorted(splits, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))


def write_dataset(output: str, entries_by_split: dict, loader, drops: Drops, opts: dict, command: list,
                  progress: bool = True) -> dict:
    fs, out_path = get_fs(output)
    fs.makedirs(out_path, exist_ok=True)
    manifest_path = join(out_path, shards.MANIFEST_FILE)
    workers = Workers(loader, opts.get("workers", 1))
    splits: dict = {}
    try:
        for s in split_order(entries_by_split):
            splits[s] = write_split(fs, out_path, s, entries_by_split[s], workers, drops, opts, progress)
    except BaseException:
        for s in entries_by_split:  # the previous output stays as it was: drop what this run staged
            if fs.exists(join(out_path, s)):
                _remove_staging(fs, join(out_path, s))
        raise
    finally:
        workers.close()
    # Every split is complete: now the old manifest goes (an interrupted commit must not look complete), the staged
    # shards take their names, and the new manifest is written last.
    if fs.exists(manifest_path):
        fs.rm(manifest_path)
    for s, info in splits.items():
        commit_split(fs, out_path, s, info)
    manifest = {
        "format_version": FORMAT_VERSION,
        "splits": {s: {k: v for k, v in info.items() if not k.startswith("_")} for s, info in splits.items()},
        "dropped": drops.as_dict(),
        "command": list(command),
        "options": opts,
    }
    write_atomic(fs, manifest_path, json.dumps(manifest, indent=1, sort_keys=False, default=str).encode())
    manifest["_runtime"] = {s: {k: v for k, v in info.items() if k.startswith("_")} for s, info in splits.items()}
    manifest["_other_splits"] = other_splits(fs, out_path, splits)
    return manifest


def summary(manifest: dict) -> str:
    lines = []
    rt = manifest.get("_runtime", {})
    for s, info in manifest["splits"].items():
        r = rt.get(s, {})
        lines.append(f"{s:>6}: {info['pairs']} pairs, {info['images']} images, {info['identities']} identities, "
                     f"{len(info['shards'])} shards ({r.get('_written', 0)} written, {r.get('_skipped', 0)} "
                     f"unchanged and skipped)")
    for name in manifest.get("_other_splits", []):
        lines.append(f"note: {name}/ holds shards of an earlier run and is not in this manifest: the trainer and "
                     f"evaluator refuse it; delete it or include that split")
    dropped = manifest.get("dropped", {})
    total = sum(dropped.values())
    lines.append(f"dropped: {total}" + (" (" + ", ".join(f"{k}: {v}" for k, v in dropped.items()) + ")"
                                        if total else ""))
    return "\n".join(lines)
