"""One reader per annotation format (each registered as a source in sources.py). Each returns {split: [Entry, ...]} in file order; per-record problems go to
Drops (counted, or raised under --strict), whole-file problems raise AnnotationError naming the file."""
from __future__ import annotations

import io
import json
import posixpath

from common.fsio import get_fs, read_bytes
from .records import SPLITS, AnnotationError, Drops, Entry, has_visible_text, is_utf8_clean, safe_relpath


def load_json(url: str, top=list, encoding: str = "utf-8"):
    """Parse an annotation file in ``encoding`` (--encoding); undecodable bytes are kept as lone surrogates so that
    one bad record is dropped (reason non_utf8_text) instead of failing the whole file."""
    try:
        raw = read_bytes(url)
    except (FileNotFoundError, IsADirectoryError, PermissionError, OSError) as e:
        raise AnnotationError(f"{url}: cannot read annotation file ({type(e).__name__}: {e})") from None
    try:
        data = json.loads(raw.decode(encoding, errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{url}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(data, top):
        raise AnnotationError(
            f"{url}: wrong top-level type: expected a JSON {top.__name__} of records, got {type(data).__name__}")
    return data


class _Collector:
    """Validates records field by field and accumulates Entries per split, keeping the first of duplicate images."""

    def __init__(self, source: str, drops: Drops):
        self.source, self.drops = source, drops
        self.by_split: dict[str, list[Entry]] = {}
        self.seen: set[str] = set()

    def captions(self, caps, file, idx, split, fieldname="captions"):
        """Valid captions of a record; bad ones are dropped one by one. None when the field itself is unusable."""
        if isinstance(caps, str) and fieldname == "captions":  # docs/DATA.md: a list of strings, not one string
            self.drops.drop("malformed_field", file, idx, fieldname, "a single string where a list of captions is "
                            "expected", split)
            return None
        if isinstance(caps, str):  # one caption per record (generated, csv)
            caps = [caps]
        if not isinstance(caps, list):
            self.drops.drop("malformed_field", file, idx, fieldname, f"expected a list of strings, got "
                            f"{type(caps).__name__}", split)
            return None
        out = []
        for c in caps:
            if not isinstance(c, str):
                self.drops.drop("malformed_field", file, idx, fieldname, "caption is not a string", split)
            elif not c.strip():
                self.drops.drop("empty_caption", file, idx, fieldname, "", split)
            elif not is_utf8_clean(c):
                self.drops.drop("non_utf8_text", file, idx, fieldname, "caption is not valid UTF-8", split)
            elif not has_visible_text(c):
                self.drops.drop("invisible_caption", file, idx, fieldname, f"only control characters or whitespace: "
                                f"{c[:40]!r}", split)
            else:
                out.append(c)
        return out

    def orig_id(self, value, file, idx, split, fieldname="id"):
        if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value):
            self.drops.drop("malformed_field", file, idx, fieldname, f"bad id {value!r}", split)
            return None
        if isinstance(value, str) and not is_utf8_clean(value):
            self.drops.drop("non_utf8_text", file, idx, fieldname, "id is not valid UTF-8", split)
            return None
        return value

    def image(self, value, file, idx, split, fieldname):
        if not isinstance(value, str) or not value:
            self.drops.drop("malformed_field", file, idx, fieldname, f"bad image path {value!r}", split)
            return None
        if not is_utf8_clean(value):
            self.drops.drop("non_utf8_text", file, idx, fieldname, "image path is not valid UTF-8", split)
            return None
        rel = safe_relpath(value)
        if rel is None:
            self.drops.drop("path_escapes_root", file, idx, fieldname, f"{value!r} is outside the image root", split)
        return rel

    def require(self, rec, fields, file, idx, split=None) -> bool:
        if not isinstance(rec, dict):
            self.drops.drop("malformed_record", file, idx, "<record>", f"expected an object, got "
                            f"{type(rec).__name__}", split)
            return False
        for f in fields:
            if f not in rec or rec[f] is None:
                self.drops.drop("missing_field", file, idx, f, "", split)
                return False
        return True

    def add(self, split, orig_id, rel, caps, file, idx, fieldname):
        if rel in self.seen:
            # The same image listed twice: the first listing wins, so output does not depend on later records.
            self.drops.drop("duplicate_image", file, idx, fieldname, f"{rel} already listed", split)
            return
        if not caps:
            self.drops.drop("no_valid_captions", file, idx, "captions", "every caption was dropped", split)
            return
        self.seen.add(rel)
        self.by_split.setdefault(split, []).append(
            Entry(orig_id=orig_id, image=rel, captions=tuple(caps), source=self.source, origin=file, index=idx,
                  image_field=fieldname))


def _split_value(col: _Collector, rec, file, idx, allowed):
    split = rec.get("split")
    if not isinstance(split, str) or split not in allowed:
        col.drops.drop("unknown_split", file, idx, "split", f"{split!r} not in {list(allowed)}", None)
        return None
    return split


def _read_split_list(url, source, drops, id_f, img_f, cap_f, allowed, encoding="utf-8"):
    data = load_json(url, encoding=encoding)
    col = _Collector(source, drops)
    for i, rec in enumerate(data):
        if not col.require(rec, ("split", id_f, img_f, cap_f), url, i):
            continue
        split = _split_value(col, rec, url, i, allowed)
        if split is None:
            continue
        oid = col.orig_id(rec[id_f], url, i, split, id_f)
        rel = oid is not None and col.image(rec[img_f], url, i, split, img_f)
        caps = rel and col.captions(rec[cap_f], url, i, split, cap_f)
        if caps is not None and rel:
            col.add(split, oid, rel, caps, url, i, img_f)
    return col.by_split


def read_cuhkpedes(annotations, drops, encoding="utf-8"):
    """reid_raw.json: [{split, captions, file_path, id, processed_tokens?}]; processed_tokens is ignored."""
    return _read_split_list(annotations, "cuhkpedes", drops, "id", "file_path", "captions", SPLITS, encoding)


def read_icfgpedes(annotations, drops, encoding="utf-8"):
    """Same schema as CUHK-PEDES; ICFG-PEDES itself only has train and test."""
    return _read_split_list(annotations, "icfgpedes", drops, "id", "file_path", "captions", SPLITS, encoding)


def read_rstpreid(annotations, drops, encoding="utf-8"):
    """data_captions.json: [{id, img_path, captions, split}]. Captions are kept verbatim (the trainer cleans the
    missing space after full stops)."""
    return _read_split_list(annotations, "rstpreid", drops, "id", "img_path", "captions", SPLITS, encoding)


def tbps_files(annotations) -> list[tuple[str, str]]:
    """[(split, url)] from repeated --annotations FILE (split = file stem) or one directory holding
    train.json / val.json / test.json."""
    out = []
    for ann in annotations:
        fs, path = get_fs(ann)
        if fs.isdir(path):
            found = [s for s in SPLITS if fs.isfile(posixpath.join(path, f"{s}.json"))]
            if not found:
                raise AnnotationError(f"{ann}: directory holds none of train.json, val.json, test.json")
            out += [(s, ann.rstrip("/") + f"/{s}.json") for s in found]
        else:
            stem = posixpath.splitext(posixpath.basename(path))[0]
            if stem not in SPLITS:
                raise AnnotationError(f"{ann}: cannot tell the split from the file name (expected train.json, "
                                      f"val.json or test.json)")
            out.append((stem, ann))
    splits = [s for s, _ in out]
    if len(set(splits)) != len(splits):
        raise AnnotationError(f"{annotations}: more than one annotation file for the same split")
    return out


def read_tbps(annotations, drops, encoding="utf-8"):
    """One JSON list per split: [{file_path, id, captions, captions_bt?}]. captions_bt (back-translations used as
    augmentation by TBPS-CLIP) are not packed: they are not human annotations."""
    col = _Collector("tbps", drops)
    for split, url in tbps_files(annotations if isinstance(annotations, (list, tuple)) else [annotations]):
        for i, rec in enumerate(load_json(url, encoding=encoding)):
            if not col.require(rec, ("id", "file_path", "captions"), url, i, split):
                continue
            oid = col.orig_id(rec["id"], url, i, split)
            rel = oid is not None and col.image(rec["file_path"], url, i, split, "file_path")
            caps = rel and col.captions(rec["captions"], url, i, split)
            if caps is not None and rel:
                col.add(split, oid, rel, caps, url, i, "file_path")
    return col.by_split


def _grouped(col, rows, url, split, id_key, img_key, cap_key):
    """Records with one caption each, several per image: group by image (order of first appearance)."""
    groups: dict[str, list] = {}
    for i, oid, img, cap in rows:
        oid = col.orig_id(oid, url, i, split, id_key)
        if oid is None:
            continue
        rel = col.image(img, url, i, split, img_key)
        if not rel:
            continue
        caps = col.captions(cap, url, i, split, cap_key)
        if caps is None:
            continue
        if rel in groups:
            g = groups[rel]
            if str(g[1]) != str(oid):
                col.drops.drop("conflicting_id", url, i, id_key, f"{rel} already has id {g[1]!r}", split)
                continue
            if not caps:
                continue
            g[2].extend(caps)
        else:
            groups[rel] = [i, oid, list(caps)]
    for rel, (i, oid, caps) in groups.items():
        col.add(split, oid, rel, caps, url, i, img_key)
    return col.by_split


def read_generated(annotations, drops, split="train", encoding="utf-8"):
    """[{id, image_path, caption}] as text-to-image pipelines write it: one caption per record."""
    data = load_json(annotations, encoding=encoding)
    col = _Collector("generated", drops)
    rows = []
    for i, rec in enumerate(data):
        if col.require(rec, ("id", "image_path", "caption"), annotations, i, split):
            rows.append((i, rec["id"], rec["image_path"], rec["caption"]))
    return _grouped(col, rows, annotations, split, "id", "image_path", "caption")


CSV_COLUMNS = ("image", "image_id", "caption", "caption_id")


def read_csv(annotations, drops, split="train", id_column="image_id", sep=None, encoding="utf-8"):
    """ZeroVL-style table: image, image_id, caption, caption_id; one row per caption, no split column."""
    import pandas as pd

    try:
        raw = read_bytes(annotations)
    except (FileNotFoundError, IsADirectoryError, PermissionError, OSError) as e:
        raise AnnotationError(f"{annotations}: cannot read annotation file ({type(e).__name__}: {e})") from None
    if sep is None:
        sep = "\t" if str(annotations).endswith((".tsv", ".tsv.gz")) else ","
    try:
        df = pd.read_csv(io.BytesIO(raw), sep=sep, dtype=str, keep_default_na=False,
                         encoding=encoding, encoding_errors="surrogateescape")
    except Exception as e:  # pandas raises a zoo of parser errors
        raise AnnotationError(f"{annotations}: not a readable CSV table ({type(e).__name__}: {e})") from None
    need = list(dict.fromkeys(list(CSV_COLUMNS) + [id_column]))
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise AnnotationError(f"{annotations}: missing required column(s) {missing}; found {list(df.columns)}")
    col = _Collector("csv", drops)
    rows = []
    # Sort captions of an image by caption_id (numerically when possible) so the order is that of the table's ids.
    for i, (img, oid, cap, cid) in enumerate(zip(df["image"], df[id_column], df["caption"], df["caption_id"])):
        if img == "" or oid == "":
            col.drops.drop("missing_field", annotations, i, "image" if img == "" else id_column, "", split)
            continue
        rows.append((i, oid, img, cap, cid))
    rows.sort(key=lambda r: (r[2], (0, int(r[4]), "") if r[4].isdigit() else (1, 0, r[4]), r[0]))
    first_seen = {}
    for r in rows:
        first_seen.setdefault(r[2], r[0])
    rows.sort(key=lambda r: first_seen[r[2]])  # stable: keeps caption_id order inside each image
    return _grouped(col, [(i, oid, img, cap) for i, oid, img, cap, _ in rows], annotations, split,
                    id_column, "image", "caption")

