"""Small fsspec helpers so every path (annotations, images, output) may be local or a URL (memory://, s3://, ...)."""
from __future__ import annotations

import hashlib
import posixpath

import fsspec


# Seconds an http(s) connect or read may wait for the server (the trainer's --data-timeout sets it; forked loader
# workers inherit it). Without one, aiohttp waits 5 minutes per request and a stop signal waits with it.
read_timeout_s = 60.0


def url_to_fs(url: str):
    """fsspec's (filesystem, path), http(s) with the connect and read timeout ``read_timeout_s`` (a server that
    accepts and never answers is an error after it, not a hang). Other stores keep their own client's defaults."""
    url = str(url)
    if url.startswith(("http://", "https://")):
        import aiohttp
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=read_timeout_s, sock_read=read_timeout_s)
        return fsspec.core.url_to_fs(url, client_kwargs={"timeout": timeout})
    return fsspec.core.url_to_fs(url)


def get_fs(url: str):
    """(filesystem, path-without-protocol). Trailing slashes are dropped so joins are uniform."""
    fs, path = url_to_fs(url)
    return fs, (path.rstrip("/") or path)


def is_local(fs) -> bool:
    """Whether an fsspec filesystem is this machine's disk (fsspec's protocol is a name or a tuple of names)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def join(base: str, *parts: str) -> str:
    # fsspec paths are always '/'-separated, also for local files.
    return posixpath.join(base, *parts)


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


def write_atomic(fs, path: str, data: bytes) -> None:
    """Write under a hidden temporary name, then rename: a reader never sees a half-written file under its real name."""
    parent, name = posixpath.split(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{name}.tmp")
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def sha256_file(fs, path: str) -> str | None:
    """sha256 of an existing file, None when it does not exist (or cannot be read)."""
    try:
        if not fs.isfile(path):
            return None
        h = hashlib.sha256()
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    except (FileNotFoundError, OSError):
        return None
