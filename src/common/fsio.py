"""Small fsspec helpers so every path (annotations, images, output) may be local or a URL (memory://, s3://, ...)."""
from __future__ import annotations

import hashlib
import posixpath

import fsspec


def get_fs(url: str):
    """(filesystem, path-without-protocol). Trailing slashes are dropped so joins are uniform."""
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, (path.rstrip("/") or path)


def is_local(fs) -> bool:
    """Whether an fsspec filesystem is this machine's disk (fsspec's protocol is a name or a tuple of names)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def join(base: str, *parts: str) -> str:
    # fsspec paths are always '/'-separated, also for local files.
    return posixpath.join(base, *parts)


def read_bytes(url: str) -> bytes:
    with fsspec.open(str(url), "rb") as f:
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
