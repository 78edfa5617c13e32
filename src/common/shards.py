"""The shard contract of docs/DATA.md, written once: resolve shard specs, read sizes.json / manifest.json, iterate the
samples of a tar with webdataset's tar iterators, and pack samples into a tar with ``webdataset.TarWriter``.

The writer (data_prep), ``make_shards.py verify``, the trainer's stream and the evaluator all go through this module,
so a key rule or a member name cannot drift between them. It uses no torch itself, but importing webdataset (1.x)
loads torch, so data_prep pays that import (about 1.4 s per command) too.

What is *not* here, on purpose: the epoch plan (training/plan.py) and range reading (training/data.py). webdataset's
``split_by_node``/``split_by_worker`` deal whole shards round-robin, which cannot give every rank the same number of
batches nor an exact mid-epoch resume.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import posixpath
import tarfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator

from braceexpand import braceexpand

from common import fsio, remote, shard_cache

# webdataset (1.x) imports torch when it is imported (~1.4 s): it is imported where a tar is read or packed, so that
# data_prep's worker pool is forked before that, from a small parent.

FORMAT_VERSION = 1
KEY_DIGITS = 9                                    # __key__ = f"{key:09d}"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")       # read in this order of preference
TEXT_EXT, META_EXT = "txt", "json"
# json fields every sample of our format carries, with their types (docs/DATA.md). ``key`` is the sample's position
# in its split, 0..N-1 (its __key__ too). The trainer does not read it: it indexes a pair by the pair's position in
# the --train-data shard list (the *pair index*, training/data.py), which equals ``key`` for one whole split.
META_FIELDS = {"key": int, "pid": int, "orig_id": (int, str), "source": str, "image": str, "image_id": int,
               "caption_id": int}
SIZES_FILE, MANIFEST_FILE = "sizes.json", "manifest.json"

_BLOCK = tarfile.BLOCKSIZE


class ShardError(ValueError):
    """A shard spec, shard or index file that cannot be used; the message names it. Callers add their flag."""


class ShardUnavailable(ShardError):
    """A remote file that still fails after the retries of common.remote (or fails for good: 404, 403)."""


# --------------------------------------------------------------------------------------------------------------------
# Paths: local files and fsspec URLs alike


def is_pipe(path: str) -> bool:
    """webdataset's ``pipe:COMMAND`` convention: the shard is the command's stdout (``aws s3 cp URL -``, ``curl``)."""
    return path.startswith("pipe:")


def is_url(path: str) -> bool:
    return "://" in path or is_pipe(path)


def _pathmod(path: str):
    return posixpath if is_url(path) else os.path


def parent(path: str) -> str:
    """The folder of a shard (where its sizes.json is); a pipe: shard has none: all of them share "pipe:"."""
    return "pipe:" if is_pipe(path) else _pathmod(path).dirname(path)


def basename(path: str) -> str:
    return path if is_pipe(path) else _pathmod(path).basename(path)


def join(base: str, name: str) -> str:
    return _pathmod(base).join(base, name)


def _fs(path: str):
    try:
        return fsio.url_to_fs(path)
    except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs: fsspec's message says what to install
        raise ShardError(f"{path}: {e}") from e


def is_remote(path: str) -> bool:
    """An fsspec URL of a store that is not this machine's disk (not file://, not a local path, not pipe:)."""
    return is_url(path) and not is_pipe(path) and not fsio.is_local(_fs(path)[0])


def open_url(path: str, mode: str = "rb"):
    """``path`` opened for reading; a remote file through common.remote's retrying, resuming reader."""
    if is_pipe(path):
        from webdataset.gopen import gopen  # a Pipe whose close() raises when the command failed
        return gopen(path, mode)
    if is_remote(path) and mode == "rb":
        try:
            return remote.RetryingReader(path)
        except remote.ReadFailed as e:
            raise ShardUnavailable(str(e)) from e
    if is_url(path):
        fs, p = _fs(path)
        return fs.open(p, mode)
    return open(path, mode)


def open_shard(url: str):
    """A tar shard opened for reading: a remote one from the node's shard cache when --shard-cache set one
    (common.shard_cache, checked against the sha256 its manifest lists), else as :func:`open_url` opens it."""
    if shard_cache.cache is not None and is_remote(url):
        return shard_cache.cache.open(url, _listed_sha256)
    return open_url(url)


def _listed_sha256(url: str) -> str | None:
    return _listed_hashes(parent(url)).get(basename(url))


@lru_cache(maxsize=64)
def _listed_hashes(folder: str) -> dict:
    """{shard name: sha256} of the split's manifest.json entry (read once per folder and process); {} without one."""
    try:
        info = read_split_info(folder) or {}
    except ShardError:
        return {}
    listed = info.get("shards") if isinstance(info.get("shards"), list) else []
    return {s["name"]: s["sha256"] for s in listed if isinstance(s, dict) and isinstance(s.get("sha256"), str)}


def exists(path: str) -> bool:
    if is_pipe(path):
        return True  # cannot be known without running the command
    if is_url(path):
        fs, p = _fs(path)
        try:
            return remote.exists(fs, p) if is_remote(path) else fs.exists(p)
        except remote.ReadFailed as e:
            raise ShardUnavailable(str(e)) from e
    return os.path.exists(path)


def is_tar_name(path: str) -> bool:
    return path.endswith((".tar", ".tar.gz", ".tgz"))


# --------------------------------------------------------------------------------------------------------------------
# Shard specs


def resolve(spec: str) -> list[str]:
    """The shard files of one spec, in order: a brace pattern (``dir/train-{000000..000009}.tar``), a glob, a
    directory (every ``*.tar`` inside, sorted), a text file listing shards (one per line, relative to the list's
    folder, ``#`` comments), or a single tar; local paths, fsspec URLs (file://, http(s)://, s3:// with s3fs, ...),
    or ``pipe:COMMAND`` (brace-expanded, not checked: the command runs when the shard is read). Raises ShardError when a part matches
    nothing or names a file that does not exist. ``::`` (several sets) is the caller's business."""
    out: list[str] = []
    for part in braceexpand(spec):
        if is_pipe(part):
            out.append(part)
            continue
        if is_url(part):
            found = _resolve_url(part)
        elif os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, "*.tar")))
            if not found:
                raise ShardError(f"{part!r} is a directory without any *.tar shard")
        elif any(c in part for c in "*?["):
            found = sorted(glob.glob(part))
        elif os.path.isfile(part) and not is_tar_name(part):
            found = _read_list(part)
        elif os.path.isfile(part):
            found = [part]
        else:
            raise ShardError(f"shard {part!r} does not exist")
        if not found:
            raise ShardError(f"{part!r} matches no shard")
        out += found
    return out


def _resolve_url(part: str) -> list[str]:
    fs, p = _fs(part)
    proto = part.split("://", 1)[0]

    def with_proto(x: str) -> str:
        return x if "://" in x else f"{proto}://{x}"

    try:
        if any(c in p for c in "*?["):
            return sorted(with_proto(x) for x in fs.glob(p))
        # a .tar is not asked whether it is a folder: over http that would download it (to look for links)
        if not is_tar_name(p) and fs.isdir(p):
            return sorted(with_proto(x) for x in fs.glob(posixpath.join(p, "*.tar")))
        if not remote.exists(fs, p):
            raise ShardError(f"shard {part!r} does not exist")
    except remote.ReadFailed as e:
        raise ShardUnavailable(str(e)) from e
    except Exception as e:  # noqa: BLE001 -- only a store's transient failure is turned into a message here
        if not remote.is_transient(e):
            raise
        raise ShardUnavailable(f"{part}: cannot be listed ({remote.describe(e)}); try again") from e
    return [part]


def _read_list(path: str) -> list[str]:
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except UnicodeDecodeError as e:
        raise ShardError(f"{path!r} is neither a .tar shard nor a text file listing shards") from e
    files = []
    for lineno, ln in enumerate(lines, 1):
        if not ln or ln.startswith("#"):
            continue
        if is_pipe(ln):  # a list shipped with a data set must not run commands: pipe: only as the spec itself
            raise ShardError(f"shard list {path!r} line {lineno}: {ln!r} is a shell command; pipe: is taken only "
                             f"from a spec given on the command line, never from a list file")
        p = ln if os.path.isabs(ln) or is_url(ln) else os.path.join(base, ln)
        if not exists(p):
            raise ShardError(f"shard list {path!r}: listed shard {ln!r} does not exist")
        files.append(p)
    if not files:
        raise ShardError(f"shard list {path!r} lists no shard")
    return files


# --------------------------------------------------------------------------------------------------------------------
# Index files


def read_json(path: str):
    """The parsed file, or None when it does not exist; ShardError when it is not JSON."""
    if is_pipe(path) or not exists(path):
        return None
    try:
        with open_url(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from e
    except remote.ReadFailed as e:
        raise ShardUnavailable(str(e)) from e


def read_sizes(shard_dir: str) -> dict | None:
    """``{shard basename: sample count}`` of the sizes.json in ``shard_dir``, or None when there is none."""
    path = join(shard_dir, SIZES_FILE)
    sizes = read_json(path)
    if sizes is not None and not isinstance(sizes, dict):
        raise ShardError(f"{path}: expected {{shard name: sample count}}")
    for name, count in (sizes or {}).items():
        _check_count(path, shard_dir, name, count)
    return sizes


def read_stats_counts(shard_dir: str, names: list[str]) -> dict | None:
    """Sample counts from img2dataset's per-shard ``NAME_stats.json`` (its ``successes``), for the shards that have
    one; None when none has."""
    out = {}
    for n in names:
        stem = n[: -len(".tar")] if n.endswith(".tar") else n
        path = join(shard_dir, f"{stem}_stats.json")
        stats = read_json(path)
        if isinstance(stats, dict) and isinstance(stats.get("successes"), int):
            out[n] = _check_count(path, shard_dir, n, stats["successes"])
    return out or None


MAX_SHARD_COUNT = 10 ** 9  # samples one shard may claim: a tar that held more would be over 500 GB (512-byte headers)


def _check_count(index: str, shard_dir: str, name: str, count) -> int:
    """A count read from the index file ``index`` sizes the epoch plan and the per-pair estimators before any shard is
    read: one that is not an integer >= 0, or more than the shard could hold, is refused here instead of becoming a
    traceback or a huge allocation. A local shard holds at most one sample per 512-byte tar header."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        problem = "is not a sample count (an integer >= 0)"
    elif count > MAX_SHARD_COUNT:
        problem = f"is more than any shard holds (at most {MAX_SHARD_COUNT})"
    else:
        shard = join(shard_dir, name)
        size = os.path.getsize(shard) if not is_url(shard) and os.path.isfile(shard) else None
        if size is None or count <= size // _BLOCK:
            return count
        problem = f"is more than its {size} bytes can hold (one {_BLOCK}-byte header per sample at least)"
    raise ShardError(f"{index}: shard {name!r}: count {count!r} {problem}")


def count_samples(url: str) -> int:
    """Samples in one shard, by reading it (ShardError when it cannot be read whole)."""
    def fail(u, problem):
        raise ShardError(f"shard {u} cannot be counted: {problem}")
    return sum(1 for _ in iter_samples(url, fail))


def write_sizes(shard_dir: str, sizes: dict) -> bool:
    """Write sizes.json into a local folder (atomically; a unique temporary name, since every rank may do it).
    False when the folder is a URL or not writable."""
    if is_url(shard_dir):
        return False
    tmp = os.path.join(shard_dir, f".{SIZES_FILE}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(sizes_json(dict(sorted(sizes.items()))))
        os.replace(tmp, os.path.join(shard_dir, SIZES_FILE))
        return True
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass
        return False


def read_split_info(shard_dir: str) -> dict | None:
    """The manifest.json entry of the split whose shards are in ``shard_dir`` (``ROOT/SPLIT``); None without a
    manifest. ShardError when a manifest beside the folder does not list it: a folder left by an earlier make_shards
    run with other data, which would otherwise be read as if it belonged to this one."""
    manifest = read_json(join(parent(shard_dir), MANIFEST_FILE))
    if not (isinstance(manifest, dict) and isinstance(manifest.get("splits"), dict)):
        return None
    info = manifest["splits"].get(basename(shard_dir))
    if info is None:
        raise ShardError(f"{shard_dir} is not a split of the {join(parent(shard_dir), MANIFEST_FILE)} beside it "
                         f"(it lists {', '.join(manifest['splits']) or 'none'}): shards left by an earlier run? "
                         f"Delete the folder or re-make it")
    return info if isinstance(info, dict) else None


@dataclass
class SplitCheck:
    """The shard files a reader was given for one split folder, against what the folder's manifest.json entry (or,
    without one, its sizes.json) lists. Nothing here raises for what is wrong: :attr:`problems` says it and the caller
    decides (evaluation refuses unless told to score a partial split; training may count the pairs as lost).

    The listing is checked before reading (:func:`check_split`: missing and unlisted shards); what can only be known
    by reading (a truncated shard, other bytes) is checked by :meth:`shard_problem` with the count and, where the
    reader hashed the bytes as it streamed them, the sha256 it saw."""
    folder: str
    listed_in: str | None = None                             # the file the listing came from; None: nothing to check
    counts: dict[str, int] = field(default_factory=dict)     # listed shard -> sample count
    sha256: dict[str, str] = field(default_factory=dict)     # listed shard -> hash (manifest.json only)
    missing: list[str] = field(default_factory=list)         # listed, not among the files given
    not_on_disk: list[str] = field(default_factory=list)     # the missing ones that do not exist either
    extra: list[str] = field(default_factory=list)           # given, not listed
    disagree: list[str] = field(default_factory=list)        # sizes.json and manifest.json counts differ
    totals: dict = field(default_factory=dict)               # the manifest's split totals (pairs, images, ...)

    @property
    def problems(self) -> list[str]:
        """One phrase per kind of problem found before reading; empty when the files are the whole listed split."""
        out = []
        if self.not_on_disk:
            out.append(f"{len(self.not_on_disk)} of {len(self.counts)} shards listed in {self.listed_in} do not exist "
                       f"({_some(self.not_on_disk)})")
        named = [n for n in self.missing if n not in self.not_on_disk]
        if named:
            out.append(f"{len(named)} of {len(self.counts)} listed shards are not among the shards given "
                       f"({_some(named)})")
        if self.extra:
            out.append(f"{len(self.extra)} shards are not listed in {self.listed_in} ({_some(self.extra)})")
        if self.disagree:
            out.append(f"{SIZES_FILE} and {MANIFEST_FILE} disagree on the counts of {_some(self.disagree)}")
        return out

    def shard_problem(self, name: str, count: int, sha256: str | None = None) -> str | None:
        """What is wrong with listed shard ``name`` as read (``count`` samples, bytes hashing to ``sha256``)."""
        if name not in self.counts:
            return None
        if count != self.counts[name]:
            return f"{name}: {count} samples read where {basename(self.listed_in)} lists {self.counts[name]}"
        if sha256 is not None and self.sha256.get(name) not in (None, sha256):
            return f"{name}: its sha256 is not the one {MANIFEST_FILE} lists (the file was changed or damaged)"
        return None


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_split(folder: str, files: list[str]) -> SplitCheck:
    """Check ``files`` (the shards of ``folder`` a spec resolved to) against the folder's listing: its entry in the
    manifest.json beside it (shards, counts, sha256s, totals; ShardError when the manifest does not list the folder,
    see :func:`read_split_info`), else its sizes.json. A folder with neither has nothing to check against
    (``listed_in`` None, no problems). Costs two small reads and, for missing shards, an existence test each."""
    info = read_split_info(folder)
    sizes = read_sizes(folder)
    check = SplitCheck(folder)
    shards_info = info.get("shards") if info else None
    if isinstance(shards_info, list) and all(isinstance(s, dict) and "name" in s for s in shards_info):
        check.listed_in = join(parent(folder), MANIFEST_FILE)
        check.counts = {s["name"]: s.get("count") for s in shards_info}
        check.sha256 = {s["name"]: s["sha256"] for s in shards_info if isinstance(s.get("sha256"), str)}
        check.totals = {k: v for k, v in info.items() if isinstance(v, int)}
        check.disagree = sorted(n for n in (sizes or {}) if sizes[n] != check.counts.get(n))
    elif sizes is not None:
        check.listed_in, check.counts = join(folder, SIZES_FILE), dict(sizes)
    else:
        return check
    given = [basename(f) for f in files]
    check.missing = [n for n in check.counts if n not in given]
    check.not_on_disk = [n for n in check.missing if not exists(join(folder, n))]
    check.extra = [n for n in given if n not in check.counts]
    return check


class HashingReader:
    """A binary stream that hashes what is read through it (sha256), for checking a shard against its listed hash
    while it is read anyway: no second pass over the bytes. :meth:`hexdigest` reads what the reader left (a tar's
    end-of-archive padding) first. Used as a context manager it leaves the underlying file open; :meth:`close`."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        return data

    def hexdigest(self) -> str:
        for block in iter(lambda: self.read(1 << 20), b""):
            pass
        return self.h.hexdigest()

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


# --------------------------------------------------------------------------------------------------------------------
# Reading samples


def split_member(name: str) -> tuple[str | None, str | None]:
    """webdataset's rule: the key is the member path up to the first dot of its basename, the rest the extension."""
    from webdataset.tariterators import base_plus_ext
    return base_plus_ext(name)


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: members tar_file_iterator leaves out


def _plain_local(f):
    """The seekable local file under ``f`` (an open file, or the shard cache's locked file), else None."""
    f = getattr(f, "f", f)
    return f if isinstance(f, io.BufferedReader) and f.seekable() else None


def _header(block: bytes) -> tuple[str, int] | None:
    """(name, size) of a regular-file ustar/GNU header, None for anything else (a pax or long-name header, a
    directory, an old header without the ustar magic, the end of the archive): the caller then reads the archive
    the slow way."""
    if len(block) < 512 or block[156:157] not in (b"0", b"\0") or block[257:262] != b"ustar":
        return None
    try:
        size = int(block[124:136].strip(b"\0 ") or b"0", 8)
        name = block[:100].split(b"\0", 1)[0].decode("utf-8")
        if block[257:263] == b"ustar\0" and block[345]:  # POSIX: a name prefix
            name = block[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
    except (ValueError, UnicodeDecodeError):
        return None
    return name, size


def _seek_sample(f, n: int) -> bool:
    """Put the local tar ``f`` at the header of its n-th sample (0-based) by reading only the headers: a reader whose
    range starts inside a shard skips the samples before it without reading their bytes. Samples are counted as
    tar_file_iterator + group_by_keys form them (regular files, meta members left out, a run of members with one
    key). False, and ``f`` back at 0, on anything else (a pax header, a repeated member, an archive that ends first):
    the caller then reads through, and its problems are reported as before."""
    from webdataset.tariterators import base_plus_ext
    count, key, seen, pos = 0, None, set(), 0
    while True:
        f.seek(pos)
        head = _header(f.read(512))
        if head is None:
            break
        name, size = head
        k, ext = base_plus_ext(name)
        if k is not None and not (("/" not in name and name.startswith("__") and name.endswith("__"))
                                  or _META.match(name)):
            if k != key:
                count += key is not None
                if count == n:
                    f.seek(pos)
                    return True
                key, seen = k, set()
            if ext.lower() in seen:
                break
            seen.add(ext.lower())
        pos += 512 + (size + 511) // 512 * 512
    f.seek(0)
    return False


def iter_samples(url: str, on_problem: Callable[[str, str], None], expected: int | None = None,
                 stream=None, start: int = 0, seen: dict | None = None) -> Iterator[dict]:
    """Samples ``{'__key__', '__url__', ext: bytes}`` of one tar, streamed through webdataset's
    ``tar_file_expander`` and ``group_by_keys``.

    Python's tarfile stops silently at a truncated archive and webdataset's handlers see only exceptions, so a problem
    is called ``on_problem(url, message)`` once, after the last good sample: an unreadable archive, a member cut short
    (the sample it belonged to is not yielded), a repeated file name, or fewer samples than ``expected`` (the count
    sizes.json promised). The caller decides: raise, count, or record. A remote shard that cannot be read even after
    common.remote's retries is no such problem: ShardUnavailable is raised. ``stream``: an already open file object
    to read instead of opening ``url`` (which then only names it). ``start``: yield the samples from the start-th on
    (a local shard skips to it by its headers alone); ``seen["samples"]`` is then set to the number of samples the
    shard held up to where reading stopped, the skipped ones included."""
    from webdataset.tariterators import group_by_keys, tar_file_expander
    state = {"reading": None, "problem": None, "bad_key": None}

    def note_member(fname: str) -> bool:  # called by tar_file_iterator just before it reads a member
        state["reading"] = fname
        return True

    def handler(exn: Exception) -> bool:
        if isinstance(exn, remote.ReadFailed):
            raise exn
        if state["problem"] is None:
            state["problem"] = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
            if state["reading"] is not None:
                state["bad_key"] = split_member(state["reading"])[0]
        return False  # stop: after a read error the rest of a stream is not trustworthy

    n = 0
    try:
        with (open_shard(url) if stream is None else stream) as f:
            local = _plain_local(f) if start else None
            n = start if local is not None and _seek_sample(local, start) else 0
            members = tar_file_expander([{"url": url, "stream": f}], handler=handler, select_files=note_member,
                                        eof_value=None)
            held = None  # one sample of look-ahead: the sample being read when an error struck is not yielded
            for sample in group_by_keys(members, handler=handler):
                if held is not None:
                    n += 1
                    if n > start:
                        yield held
                held = sample
            if held is not None and not (state["problem"] and held["__key__"] == state["bad_key"]):
                n += 1
                if n > start:
                    yield held
    except (remote.ReadFailed, ShardUnavailable) as e:
        raise ShardUnavailable(f"shard {e}") from e
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # opening the file or the archive failed
        if state["problem"] is None:
            state["problem"] = f"{type(e).__name__}: {e}"
    if seen is not None:
        seen["samples"] = n
    problem = state["problem"]
    if problem is None and expected is not None and n < expected:
        problem = f"{n} samples where {SIZES_FILE} lists {expected}"
    if problem is not None:
        on_problem(url, problem)


def image_ext(sample: dict) -> str | None:
    return next((e for e in IMAGE_EXTS if sample.get(e)), None)


# --------------------------------------------------------------------------------------------------------------------
# Writing


def key_name(key: int) -> str:
    """The ``__key__`` (member name stem) of the sample whose json ``key`` is ``key``."""
    return f"{key:0{KEY_DIGITS}d}"


def make_sample(key: int, jpg: bytes, caption: str, meta: dict) -> dict:
    """One pair of our format; ``key``: its position in the split. JSON with sorted keys so that the bytes depend
    only on the content."""
    return {"__key__": key_name(key), "jpg": jpg,
            META_EXT: json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8"),
            TEXT_EXT: caption.encode("utf-8")}


def tar_size(sample: dict) -> int:
    """Bytes a sample takes in a tar (a 512-byte header per member, data padded to 512)."""
    total = 0
    for k, v in sample.items():
        if not k.startswith("_"):
            total += _BLOCK + len(v) + (-len(v)) % _BLOCK
    return total


def pack(samples) -> bytes:
    """One in-memory tar of our samples, written by ``webdataset.TarWriter`` with fixed metadata (mtime 0,
    root-owned, empty user/group names, mode 0444, USTAR headers), so the archive depends only on its content: a
    re-run can compare hashes and skip finished shards."""
    from webdataset.writer import TarWriter
    buf = io.BytesIO()
    writer = TarWriter(buf, user="", group="", mode=0o444, mtime=0, encoder=False, compress=False)
    # webdataset 1.0.2's TarWriter computes its `format` argument but never passes it to tarfile.open, so headers
    # would go through the PAX checks: set USTAR on the stream itself (same bytes for our ASCII names, ~8 % faster)
    writer.tarstream.format = tarfile.USTAR_FORMAT
    for sample in samples:
        writer.write(sample)
    writer.close()  # end-of-archive blocks, padded to a full record as tar(1) does
    return buf.getvalue()


def sizes_json(sizes: dict[str, int]) -> bytes:
    return json.dumps(sizes, indent=1).encode()
