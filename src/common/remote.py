"""Reading a remote shard (http(s)://, s3://, any fsspec store that is not this machine's disk) so that a flaky store
changes nothing but the time it takes.

A transient failure (a connection reset, a body cut short, HTTP 5xx / 429 / 408, a read that stalls past
``fsio.read_timeout_s``) is retried with exponential backoff and the read *resumes at the byte where the body
broke*: over http(s) with a ``Range: bytes=N-`` request (a server that ignores Range sends the whole body again and
the first N bytes are skipped), elsewhere by seeking the reopened file. The bytes handed to the tar parser are
therefore exactly those of a fault-free read, and so are the samples and their order. A permanent failure (404,
403, ...) is not retried. When the retries are spent, :class:`ReadFailed` names the URL and the last error
(common/shards.py raises it as a ShardUnavailable; the trainer stops on it: training/data.py ``read_shard``).

The retry budget counts failures *in a row*: bytes that arrive reset it, so a long shard over a store that drops a
connection now and then is read to its end, while a store that is down ends the read after ``retries`` + 1
attempts and at most ``backoff_s * (2**retries - 1)`` seconds of waiting (plus one ``--data-timeout`` per attempt).

Counters (:data:`counts`: retries, bytes fetched, cache hits / misses) are per process; the loader worker that read
drains them into its batches (:func:`drain`), so that the run's log and summary.json sum them.
"""
from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass

from common import fsio


@dataclass
class RetryPolicy:
    retries: int = 5          # failures in a row retried before giving up
    backoff_s: float = 1.0    # the wait before retry k (1-based) is backoff_s * 2**(k-1), at most MAX_WAIT_S
    MAX_WAIT_S = 60.0


policy = RetryPolicy()  # the trainer sets it from --read-retries / --read-backoff; forked loader workers inherit it


class ReadFailed(Exception):
    """A remote file that could not be read after the retries (or failed permanently); the message names it."""


class _BodyCut(ConnectionError):
    """The body ended before the length the server announced."""


# --------------------------------------------------------------------------------------------------------------------
# Counters

counts: Counter = Counter()
_owner = os.getpid()


def _mine() -> Counter:
    """The counters of this process: a forked loader worker starts from zero (its parent's reads are the parent's)."""
    global _owner
    if os.getpid() != _owner:
        counts.clear()
        _owner = os.getpid()
    return counts


def count(key: str, n: int = 1) -> None:
    _mine()[key] += n


def drain() -> dict:
    """This process's counters since the last drain (empty when nothing remote was read)."""
    out = {k: v for k, v in _mine().items() if v}
    counts.clear()
    return out


# --------------------------------------------------------------------------------------------------------------------
# Which errors are worth a retry


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a failed response (aiohttp's error; fsspec raises it for any status but 404)."""
    import aiohttp
    return exc.status if isinstance(exc, aiohttp.ClientResponseError) else None


def _transient_types() -> tuple:
    import aiohttp  # fsspec's http(s) client
    from fsspec.exceptions import FSTimeoutError
    return (ConnectionError, TimeoutError, asyncio.TimeoutError, FSTimeoutError, aiohttp.ClientPayloadError,
            aiohttp.ClientConnectionError)


def is_transient(exc: BaseException) -> bool:
    """A failure another attempt may not meet: a dropped or stalled connection, a cut body, a busy server."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    status = _status(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return isinstance(exc, _transient_types())


def describe(exc: BaseException) -> str:
    status = _status(exc)
    if status is not None:
        return f"HTTP {status} {getattr(exc, 'message', '')}".strip()
    if isinstance(exc, FileNotFoundError):
        return "not found (HTTP 404 or no such key)"
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


# --------------------------------------------------------------------------------------------------------------------
# The reader


def _is_http(fs) -> bool:
    return "http" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def _open_at(fs, path: str, pos: int):
    """(file, bytes to skip, total length or None) for reading ``path`` from byte ``pos`` on."""
    if not _is_http(fs):
        f = fs.open(path, "rb")
        f.seek(pos)
        return f, 0, getattr(f, "size", None)
    f = _HttpBody(fs, path, {"Range": f"bytes={pos}-"} if pos else {})  # Range only to resume
    r = f.r
    length = r.headers.get("Content-Length")
    length = int(length) if length is not None and "Content-Encoding" not in r.headers else None
    if pos and r.status == 206:
        start = r.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
        if start != str(pos):
            f.close()
            raise ConnectionError(f"the server answered Range bytes={pos}- with Content-Range "
                                  f"{r.headers.get('Content-Range')!r}")
        return f, 0, None if length is None else pos + length
    return f, pos, length  # 200: the whole body again, its first pos bytes already delivered


class _HttpBody:
    """One streamed GET on fsspec's http session (what fsspec's HTTPStreamFile does, with the response of a failed
    request released at once instead of left to the garbage collector's "Unclosed connection" warnings)."""

    def __init__(self, fs, url: str, headers: dict, method: str = "GET"):
        from fsspec.asyn import sync
        self.fs, self.sync = fs, sync
        session = sync(fs.loop, fs.set_session)
        kw = {**fs.kwargs, "headers": {**fs.kwargs.get("headers", {}), **headers}}  # the user's headers kept

        async def get():
            r = await session.request(method, fs.encode_url(url), **kw)
            if r.status >= 400:
                r.release()
                fs._raise_not_found_for_status(r, url)  # FileNotFoundError for 404, aiohttp's error otherwise
            return r
        self.r = sync(fs.loop, get)

    def read(self, n: int = -1) -> bytes:
        return self.sync(self.fs.loop, self.r.content.read, n)

    def close(self) -> None:
        self.fs.loop.call_soon_threadsafe(self.r.close)  # aiohttp's objects belong to fsspec's event loop thread


def _exists_once(fs, path: str) -> bool:
    """One existence check: over http(s) a HEAD of our own (fsspec's ``info`` turns a 503 into "not found"); a
    server that refuses HEAD (405, or 403 for a URL signed for GET only) is asked through fsspec's ``info``."""
    if _is_http(fs):
        try:
            _HttpBody(fs, path, {}, method="HEAD").close()
            return True
        except FileNotFoundError:
            return False
        except Exception as e:  # noqa: BLE001 -- a transient failure is the caller's to retry
            if is_transient(e) or _status(e) is None:
                raise
    try:
        fs.info(path)
        return True
    except FileNotFoundError:
        return False


class RetryingReader:
    """A binary file object over a remote file that retries and resumes (see the module doc)."""

    def __init__(self, url: str, retry: RetryPolicy | None = None):
        self.url, self.retry = url, retry or policy
        self.fs, self.path = fsio.url_to_fs(url)
        self.pos, self.length, self.f, self.failures = 0, None, None, 0
        self._attempt(self._reopen)

    def _reopen(self) -> None:
        self._close_quietly()
        f, skip, length = _open_at(self.fs, self.path, self.pos)
        self.f, self.length = f, length if length is not None else self.length
        while skip:
            got = f.read(min(skip, 1 << 20))
            if not got:
                raise _BodyCut(f"the body ended {skip} bytes before byte {self.pos}, where the read resumes")
            count("bytes_fetched", len(got))
            skip -= len(got)

    def _attempt(self, op):
        while True:
            try:
                return op()
            except Exception as e:  # noqa: BLE001 -- sorted by is_transient; anything else is raised as it is
                if not is_transient(e):
                    if isinstance(e, (FileNotFoundError, PermissionError)) or _status(e) is not None:
                        raise ReadFailed(f"{self.url}: {describe(e)}") from e
                    raise
                self.failures += 1
                if self.failures > self.retry.retries:
                    raise ReadFailed(f"{self.url}: still failing after {self.retry.retries} retries at byte "
                                     f"{self.pos} (last error: {describe(e)})") from e
                count("retries")
                time.sleep(min(self.retry.backoff_s * 2 ** (self.failures - 1), RetryPolicy.MAX_WAIT_S))
                self._close_quietly()  # reopened at self.pos by the next attempt

    def read(self, n: int = -1) -> bytes:
        def once() -> bytes:
            if self.f is None:
                self._reopen()
            data = self.f.read(n)
            if not data and n != 0 and self.length is not None and self.pos < self.length:
                raise _BodyCut(f"the body ended at byte {self.pos} of {self.length}")
            return data
        data = self._attempt(once)
        if data:
            self.failures = 0  # progress: the budget is for failures in a row
            self.pos += len(data)
            count("bytes_fetched", len(data))
        return data

    def _close_quietly(self) -> None:
        if self.f is not None:
            try:
                self.f.close()
            except Exception:  # noqa: BLE001 -- a broken connection may fail to close; it is dropped anyway
                pass
            self.f = None

    def close(self) -> None:
        self._close_quietly()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def exists(fs, path: str, retry: RetryPolicy | None = None) -> bool:
    """Whether a remote file exists, with the retries of a read (ReadFailed when they are spent). fsspec's http
    ``exists`` GETs the whole file and calls any failure "missing"; ``info`` asks with a HEAD first."""
    retry = retry or policy
    for attempt in range(retry.retries + 1):
        try:
            return _exists_once(fs, path)
        except Exception as e:  # noqa: BLE001 -- retried when transient, raised as it is otherwise
            if not is_transient(e):
                raise
            if attempt == retry.retries:
                raise ReadFailed(f"{path}: still failing after {retry.retries} retries (last error: "
                                 f"{describe(e)})") from e
            count("retries")
            time.sleep(min(retry.backoff_s * 2 ** attempt, RetryPolicy.MAX_WAIT_S))
    return False
