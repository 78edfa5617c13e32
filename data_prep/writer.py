"""Deterministic shard writer: entries -> (image, caption) samples -> tar shards, sizes.json, manifest.json.

Byte-identical output for the same input: samples are ordered by (person id, image path, caption index), tar
headers carry fixed metadata, JSON is dumped with sorted keys, and worker results are consumed in input order."""
from __future__ import annotations

import gc
import hashlib
import itertools
import json
import multiprocessing as mp
import posixpath
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

STAGING = ".staging"  # SPLIT/.staging/ and (the manifest) OUT/.staging/: new files wait there until all are complete
REPLACED = ".replaced"  # OUT/.replaced/: what a commit replaces or removes, kept until the new manifest is in place


class ShardSink:
    """Cuts samples into shards of at most maxcount samples / maxsize bytes and stages each finished shard in
    SPLIT/.staging/ -- unless identical bytes already sit at its final name (re-runs skip finished work).

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
    """Packs one split into SPLIT/.staging/ (see ShardSink), its sizes.json included; :func:`commit` puts it in
    place."""
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
    write_atomic(fs, join(split_dir, STAGING, shards.SIZES_FILE),
                 shards.sizes_json({s["name"]: s["count"] for s in sink.shards}))
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


class Commit:
    """Renames staged files into place, all or nothing as far as renames allow: the file a rename would replace (or a
    stale shard) is first moved to OUT/.replaced/ under its relative path, and every rename is journaled. On any
    failure (Ctrl-C included) the journal is undone in reverse, which leaves the previous output byte for byte; only
    when undoing fails too does a mix remain, and the error then says what is where and how to repair it. A process
    killed mid-commit leaves OUT/.replaced/ behind, which the next run refuses to overwrite."""

    def __init__(self, fs, out_path: str):
        self.fs, self.out = fs, out_path
        self.journal: list[tuple[str, str]] = []  # (source, destination) of every rename done, in order

    def _mv(self, src: str, dst: str) -> None:
        self.fs.makedirs(posixpath.dirname(dst), exist_ok=True)
        self.fs.mv(src, dst)
        self.journal.append((src, dst))

    def set_aside(self, rel: str) -> None:
        if self.fs.exists(join(self.out, rel)):
            self._mv(join(self.out, rel), join(self.out, REPLACED, rel))

    def place(self, staged: str, rel: str) -> None:
        self.set_aside(rel)
        self._mv(staged, join(self.out, rel))

    def undo(self, error: BaseException) -> None:
        """Every rename back, newest first; PrepError describing the mix when some of them fail."""
        set_aside = join(self.out, REPLACED) + "/"
        failed, restored = [], set()
        for src, dst in reversed(self.journal):
            try:
                self.fs.mv(dst, src)
                restored.add(src)
            except Exception as e:
                failed.append((src, dst, e))
        old = sorted(dst[len(set_aside):] for _, dst, _ in failed if dst.startswith(set_aside))
        # a new file stays in place unless the earlier file it replaced was moved back over it
        new = sorted(dst[len(self.out) + 1:] for _, dst, _ in failed
                     if not dst.startswith(set_aside) and dst not in restored)
        if old or new:
            raise PrepError(self._mixed(error, failed[0][2], old, new)) from error
        _remove(self.fs, join(self.out, REPLACED))

    def _mixed(self, error: BaseException, undo_error: Exception, old: list[str], new: list[str]) -> str:
        set_aside = join(self.out, REPLACED) + "/"
        extra = [n for n in new if n not in old]  # new files that no earlier file will overwrite when moved back
        return (f"--output {self.out}: the commit failed ({_why(error)}) and undoing it failed too "
                f"({_why(undo_error)}), so the output mixes two runs: {_listing(old)} earlier file(s) are set aside "
                f"in {set_aside} and {_listing(new)} file(s) of this run are in place. "
                f"To finish this run's output, delete {set_aside} and run the same command again; to get the "
                f"earlier output back, move every file under {set_aside} back to the same path under {self.out}"
                + (f" and delete these {_listing(extra)} file(s) of this run from it (`make_shards.py verify` "
                   f"names any shard left to delete)" if extra else ""))


def _why(e: BaseException) -> str:
    detail = getattr(e, "strerror", None) or str(e)
    return f"{type(e).__name__}: {detail}" if detail else type(e).__name__


def _listing(names: list[str], most: int = 10) -> str:
    """'3 (a, b, c)': a count and the names, the first ``most`` of them."""
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
    return f"{len(names)} ({shown})" if names else "0"


def _remove(fs, path: str) -> bool:
    """Best effort: False when it could not be removed."""
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
        return True
    except OSError:
        return False


def commit(fs, out_path: str, splits: dict) -> None:
    """Every split's staged shards and sizes.json, then the manifest, into place (see :class:`Commit`). The old
    manifest goes aside first, so that a commit cut short by a kill never looks complete."""
    c = Commit(fs, out_path)
    try:
        c.set_aside(shards.MANIFEST_FILE)
        for s, info in splits.items():
            staging = join(out_path, s, STAGING)
            for name in [*info["_staged"], shards.SIZES_FILE]:
                c.place(join(staging, name), f"{s}/{name}")
            for name in _stale_shards(fs, join(out_path, s), s, {x["name"] for x in info["shards"]}):
                c.set_aside(f"{s}/{name}")
        c.place(join(out_path, STAGING, shards.MANIFEST_FILE), shards.MANIFEST_FILE)
    except BaseException as e:
        try:
            c.undo(e)
        finally:
            _discard_staging(fs, out_path, splits)
        raise
    leftovers = [p for p in (join(out_path, REPLACED), *_staging_dirs(out_path, splits)) if not _remove(fs, p)]
    if leftovers:
        print(f"warning: {out_path} is complete, but {', '.join(leftovers)} could not be removed: delete "
              f"{'them' if len(leftovers) > 1 else 'it'}", file=sys.stderr)


def _staging_dirs(out_path: str, splits) -> list[str]:
    return [join(out_path, STAGING), *(join(out_path, s, STAGING) for s in splits)]


def _discard_staging(fs, out_path: str, splits) -> None:
    for p in _staging_dirs(out_path, splits):
        _remove(fs, p)


def _refuse_unfinished_commit(fs, out_path: str) -> None:
    """OUT/.replaced/ holding files is what a killed commit (or one whose undo failed) leaves: this run would mix its
    own files into it."""
    replaced = join(out_path, REPLACED)
    if fs.exists(replaced) and fs.find(replaced):
        raise PrepError(f"--output {out_path}: {replaced}/ holds files set aside by a commit that did not finish, "
                        f"so the output may mix two runs: to finish a new output, delete {replaced}/ and run again; "
                        f"to get the earlier output back, move every file under it back to the same path under "
                        f"{out_path} (`make_shards.py verify` then names any shard left to delete)")


def _remove_temporaries(fs, split_dir):
    """Leftovers of an interrupted run: hidden .NAME.tmp files and staged files are never committed, remove them."""
    for p in fs.ls(split_dir, detail=False):
        base = p.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith(".") and base.endswith(".tmp"):
            fs.rm(p)
    if fs.exists(join(split_dir, STAGING)):
        fs.rm(join(split_dir, STAGING), recursive=True)


def other_splits(fs, out_path: str, splits) -> list[str]:
    """Folders of the output that hold shards but are not splits of this run (left by an earlier run)."""
    out = []
    for p in fs.ls(out_path, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name not in splits and not name.startswith(".") and fs.isdir(p) and (
                fs.exists(join(p, shards.SIZES_FILE)) or fs.glob(join(p, "*.tar"))):
            out.append(name)
    return sorted(out)


def _stale_shards(fs, split_dir, split, keep) -> list[str]:
    """A previous run with more shards would leave extra SPLIT-*.tar files that a glob would pick up."""
    names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(split_dir, detail=False))
    return sorted(n for n in names if n.startswith(f"{split}-") and n.endswith(".tar") and n not in keep)


def split_order(splits):
    return sorted(splits, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))


def write_dataset(output: str, entries_by_split: dict, loader, drops: Drops, opts: dict, command: list,
                  progress: bool = True) -> dict:
    """Every split and the manifest are staged first; only then does :func:`commit` put them in place."""
    fs, out_path = get_fs(output)
    fs.makedirs(out_path, exist_ok=True)
    _refuse_unfinished_commit(fs, out_path)
    _remove(fs, join(out_path, STAGING))  # a manifest staged by a killed run
    workers = Workers(loader, opts.get("workers", 1))
    splits: dict = {}
    try:
        for s in split_order(entries_by_split):
            splits[s] = write_split(fs, out_path, s, entries_by_split[s], workers, drops, opts, progress)
        manifest = {
            "format_version": FORMAT_VERSION,
            "splits": {s: {k: v for k, v in info.items() if not k.startswith("_")} for s, info in splits.items()},
            "dropped": drops.as_dict(),
            "command": list(command),
            "options": opts,
        }
        write_atomic(fs, join(out_path, STAGING, shards.MANIFEST_FILE),
                     json.dumps(manifest, indent=1, sort_keys=False, default=str).encode())
    except BaseException:
        _discard_staging(fs, out_path, entries_by_split)  # the previous output stays as it was
        raise
    finally:
        workers.close()
    commit(fs, out_path, splits)
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
