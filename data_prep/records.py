"""Shared record types, errors and the drop accounting used by every reader and the writer."""
from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")


class PrepError(Exception):
    """Any error the CLI reports as a one-line message with exit code 2."""


class AnnotationError(PrepError):
    """The annotation file as a whole is unusable (missing, not JSON, wrong top-level type, missing CSV column)."""


class RecordError(PrepError):
    """A per-record problem raised instead of counted because --strict was given."""


@dataclass(frozen=True)
class Entry:
    """One image with its captions, before the image bytes are loaded. Captions may be empty for the synthetic
    source, whose captions are produced together with the image in the worker."""

    orig_id: object
    image: str
    captions: tuple = ()
    source: str = ""
    attributes: dict | None = None
    # Where the entry came from, so late (image-level) drops can still name file and record under --strict.
    origin: str = ""
    index: int = -1
    image_field: str = "image"


@dataclass
class Drops:
    """Counts dropped records by reason (globally and per split); with strict=True raises instead."""

    strict: bool = False
    total: Counter = field(default_factory=Counter)
    per_split: dict = field(default_factory=dict)
    records: list = field(default_factory=list)  # every drop, for --drops-file

    def drop(self, reason: str, file: str, index, fieldname: str, detail: str = "", split: str | None = None):
        if self.strict:
            where = f"record {index}" if index is not None and index >= 0 else "file"
            msg = f"{file}: {where}: field '{fieldname}': {reason}"
            raise RecordError(msg + (f" ({detail})" if detail else ""))
        self.records.append({"reason": reason, "file": file, "record": index, "field": fieldname, "detail": detail,
                             "split": split})
        self.total[reason] += 1
        key = split if split else "unassigned"
        self.per_split.setdefault(key, Counter())[reason] += 1

    def as_dict(self) -> dict:
        return dict(sorted(self.total.items()))

    def split_dict(self, split: str) -> dict:
        return dict(sorted(self.per_split.get(split, Counter()).items()))


def safe_relpath(path) -> str | None:
    """Normalised relative image path, or None when it would escape the image root (absolute, '..', a URL).

    Refusing instead of resolving keeps a hostile or sloppy annotation file from reading files outside --images."""
    if not isinstance(path, str) or not path:
        return None
    p = path.replace("\\", "/")
    if p.startswith("/") or "://" in p or (len(p) > 1 and p[1] == ":"):
        return None
    parts = [x for x in p.split("/") if x not in ("", ".")]
    if not parts or any(x == ".." for x in parts):
        return None
    return posixpath.join(*parts)


def id_sort_key(orig_id):
    """Numeric ids sort numerically, others lexicographically after them; stable across runs."""
    s = str(orig_id)
    if isinstance(orig_id, int) or s.isdigit():
        return (0, int(s), s)
    return (1, 0, s)


def is_utf8_clean(text: str) -> bool:
    """False when the text holds lone surrogates: bytes that were not valid UTF-8 in the source file
    (read with errors='surrogateescape') or JSON \\ud800-style escapes."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def has_visible_text(text: str) -> bool:
    """False when the text is only whitespace, control characters (NULs, escapes), format or unassigned code points:
    nothing a caption could describe with."""
    return any(ch.isprintable() and not ch.isspace() for ch in text)
