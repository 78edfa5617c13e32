"""--shard-cache: remote shards kept on a node-local disk, one copy per node for all its ranks and loader workers.

Layout of the cache folder: per remote file ``KEY-NAME`` (KEY: a hash of its URL, NAME: its basename), its record
``KEY-NAME.json`` (URL, bytes, sha256 of what was downloaded) and its lock ``KEY-NAME.lock``. A file is downloaded
under an exclusive lock (two processes never fetch the same file), to ``KEY-NAME.part``, fsynced, its record written,
then renamed into place: no partial file is ever read under the real name, and a ``.part`` left by a killed download
is simply fetched again. A file is used only when its size is its record's (and its record's sha256 the one the set's
manifest lists, when it lists one); anything else is fetched again. Readers hold a shared lock while they read, so
eviction (least recently used first, above the size limit) never removes a file being read: it skips it.

Locks are ``flock`` locks: the folder must be on a local disk (NFS and other network filesystems may not honour
them), which is the point of a node-local cache anyway.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
from typing import Callable

from common import remote

_CHUNK = 1 << 20


class ShardCache:
    def __init__(self, root: str, limit_bytes: int | None = None):
        self.root, self.limit = root, limit_bytes
        os.makedirs(root, exist_ok=True)

    def _base(self, url: str) -> str:
        key = hashlib.sha256(url.encode()).hexdigest()[:16]
        return os.path.join(self.root, f"{key}-{posixpath.basename(url.rstrip('/'))}")

    def open(self, url: str, declared_sha256: Callable[[str], str | None] = lambda url: None):
        """The cached copy of ``url`` opened for reading (downloaded first when missing or not whole), holding a
        shared lock until it is closed. ``declared_sha256(url)``: the hash the set lists for it, if any."""
        base = self._base(url)
        lock = os.open(base + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            want = declared_sha256(url)
            if _whole(base, want):
                remote.count("cache_hits")
            else:
                remote.count("cache_misses")
                self._download(url, base, want)
            os.utime(base)  # the last use, for eviction
            f = _LockedFile(open(base, "rb"), lock)  # opened before the lock is shared: an evictor may come then
            fcntl.flock(lock, fcntl.LOCK_SH)  # readers share; an evictor needs it exclusive
        except BaseException:
            os.close(lock)
            raise
        self._evict(keep=base)
        return f

    def _download(self, url: str, base: str, want_sha256: str | None) -> None:
        for stale in (base, base + ".json"):
            if os.path.exists(stale):
                os.remove(stale)
        h, size = hashlib.sha256(), 0
        with remote.RetryingReader(url) as src, open(base + ".part", "wb") as out:
            for block in iter(lambda: src.read(_CHUNK), b""):
                h.update(block)
                out.write(block)
                size += len(block)
            out.flush()
            os.fsync(out.fileno())
        if want_sha256 not in (None, h.hexdigest()):
            os.remove(base + ".part")
            raise remote.ReadFailed(f"{url}: its sha256 is not the one its manifest.json lists (the remote "
                                          f"file was changed or damaged)")
        _write_json(base + ".json", {"url": url, "bytes": size, "sha256": h.hexdigest()})
        os.replace(base + ".part", base)
        _fsync_dir(self.root)

    def _evict(self, keep: str) -> None:
        """Least recently used files first, until the cache is within its limit; a file being read is skipped."""
        if self.limit is None:
            return
        entries = []
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name.endswith((".json", ".lock", ".part")) or not os.path.exists(path + ".json"):
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:  # evicted meanwhile by another process
                continue
            entries.append((st.st_mtime, path, st.st_size))
        total = sum(size for *_, size in entries)
        for _, path, size in sorted(entries):
            if total <= self.limit:
                return
            if path != keep and _remove_unless_read(path):
                total -= size


def _whole(base: str, want_sha256: str | None) -> bool:
    try:
        with open(base + ".json") as f:
            record = json.load(f)
        return os.path.getsize(base) == record["bytes"] and want_sha256 in (None, record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_unless_read(path: str) -> bool:
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # being read or downloaded
        os.close(lock)
        return False
    try:
        for p in (path, path + ".json"):  # the lock file stays: another process may hold it open
            if os.path.exists(p):
                os.remove(p)
        return True
    finally:
        os.close(lock)


def _write_json(path: str, record: dict) -> None:
    with open(path, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LockedFile:
    """A cached file open for reading; closing it releases its shared lock."""

    def __init__(self, f, lock_fd: int):
        self.f, self.lock = f, lock_fd

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def close(self) -> None:
        if self.lock is not None:
            self.f.close()
            os.close(self.lock)  # releases the flock
            self.lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


cache: ShardCache | None = None  # the trainer sets it from --shard-cache; forked loader workers inherit it


def parse_size(text: str) -> int:
    """'200GB', '1.5TiB', '500M', '4096' -> bytes (k/M/G/T decimal, KiB/MiB/GiB/TiB binary); ValueError otherwise."""
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
             "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    t = text.strip().upper()
    number = t.rstrip("KMGTIB")
    unit = t[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value >= 0 or value == float("inf"):
        raise ValueError(f"expected a size such as 200GB, 500MiB or a number of bytes, got {text!r}")
    return int(value * units[unit])
