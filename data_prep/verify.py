"""`make_shards.py verify OUTPUT`: re-read everything and check it against manifest.json and sizes.json."""
from __future__ import annotations

import hashlib
import io
import json

from PIL import Image

from common import shards

from . import FORMAT_VERSION
from common.fsio import get_fs, join
from .records import has_visible_text


def _samples(data: bytes, where: str, problems: list):
    """[(key, sample)] in archive order, read by the one shard reader; a key seen twice means its files are not
    adjacent (webdataset would then yield two half samples)."""
    out, seen = [], set()
    for sample in shards.iter_samples(where, lambda _u, msg: problems.append(f"{where}: not a readable tar archive "
                                                                            f"({msg})"), stream=io.BytesIO(data)):
        k = sample["__key__"]
        if k in seen:
            problems.append(f"{where}: files of sample {k} are not adjacent")
        seen.add(k)
        out.append((k, sample))
    return out


def _read_json(fs, path, problems):
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        problems.append(f"{path}: missing")
    except (ValueError, OSError) as e:
        problems.append(f"{path}: unreadable ({e})")
    return None


def verify(output: str, decode: bool = True):
    """(problems, report). problems is empty when the output is complete and consistent."""
    problems: list[str] = []
    fs, root = get_fs(output)
    manifest = _read_json(fs, join(root, shards.MANIFEST_FILE), problems)
    if not isinstance(manifest, dict):
        if manifest is not None:
            problems.append("manifest.json: not an object")
        return problems, "no usable manifest.json (an interrupted or never-finished run?)"
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"manifest.json: format_version {manifest.get('format_version')!r} != {FORMAT_VERSION}")
    rows = [_verify_split(fs, join(root, split), split, info, decode, problems)
            for split, info in manifest.get("splits", {}).items()]
    return problems, _report(rows, manifest.get("dropped"))


def _verify_split(fs, sdir: str, split: str, info: dict, decode: bool, problems: list) -> tuple:
    """Check one split's index files and every sample of its shards; its row of the report."""
    _check_index(fs, sdir, split, info, problems)
    tally = _SplitTally(decode, problems)
    for sh in info.get("shards", []):
        where = f"{split}/{sh['name']}"
        try:
            data = fs.cat_file(join(sdir, sh["name"]))
        except FileNotFoundError:
            problems.append(f"{where}: missing")
            continue
        if hashlib.sha256(data).hexdigest() != sh.get("sha256"):
            problems.append(f"{where}: sha256 does not match the manifest")
        samples = _samples(data, where, problems)
        if len(samples) != sh.get("count"):
            problems.append(f"{where}: {len(samples)} samples, manifest says {sh.get('count')}")
        for k, files in samples:
            tally.sample(f"{where}: sample {k}", k, files)
    return tally.finish(split, info)


def _check_index(fs, sdir: str, split: str, info: dict, problems: list) -> None:
    """sizes.json lists what the manifest lists, and every shard on disk is listed."""
    sizes = _read_json(fs, join(sdir, shards.SIZES_FILE), problems)
    listed = {s["name"]: s["count"] for s in info.get("shards", [])}
    if sizes is not None and sizes != listed:
        problems.append(f"{split}/sizes.json: {sizes} does not match manifest shards {listed}")
    try:
        on_disk = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(sdir, detail=False)}
    except FileNotFoundError:
        on_disk = set()
    for extra in sorted(n for n in on_disk if n.endswith(".tar") and n not in listed):
        problems.append(f"{split}/{extra}: shard on disk not listed in the manifest")


class _SplitTally:
    """The samples of one split, in order: each json ``key`` is the sample's position in the split (and its name),
    the samples of one image are adjacent with dense image and caption ids, pids are dense. Also counts what the
    report shows."""

    def __init__(self, decode: bool, problems: list):
        self.decode, self.problems = decode, problems
        self.pairs, self.last_img, self.last_cap = 0, -1, -1
        self.pids, self.images, self.cap_words = set(), 0, 0

    def sample(self, sw: str, k: str, files: dict) -> None:
        meta = self._meta(sw, files)
        position, self.pairs = self.pairs, self.pairs + 1
        if meta is None:
            return
        if k != shards.key_name(position) or meta["key"] != position:
            self.problems.append(f"{sw}: key {meta['key']} (name {k}) where {position} was expected")
        self._image_order(sw, meta, files)
        self.pids.add(meta["pid"])
        self._caption(sw, files)

    def _meta(self, sw: str, files: dict) -> dict | None:
        """The sample's json, or None (a problem recorded) when a member is missing or the json is unusable."""
        missing = [e for e in ("jpg", shards.TEXT_EXT, shards.META_EXT) if e not in files]
        if missing:
            self.problems.append(f"{sw}: missing {missing}")
            return None
        try:
            meta = json.loads(files["json"])
        except ValueError:
            self.problems.append(f"{sw}: json unreadable")
            return None
        bad = [f for f, t in shards.META_FIELDS.items() if not isinstance(meta.get(f), t)]
        if bad:
            self.problems.append(f"{sw}: json fields missing or of the wrong type: {bad}")
            return None
        return meta

    def _image_order(self, sw: str, meta: dict, files: dict) -> None:
        # Samples of one image are adjacent: image_id either repeats with the next caption or advances by 1.
        if meta["image_id"] == self.last_img and meta["caption_id"] == self.last_cap + 1:
            self.last_cap += 1
        elif meta["image_id"] == self.last_img + 1 and meta["caption_id"] == 0:
            self.last_img, self.last_cap = meta["image_id"], 0
            self.images += 1
            if self.decode:
                try:
                    with Image.open(io.BytesIO(files["jpg"])) as im:
                        im.load()
                except Exception as e:  # any PIL failure means an undecodable image
                    self.problems.append(f"{sw}: image does not decode ({type(e).__name__})")
        else:
            self.problems.append(f"{sw}: image_id {meta['image_id']} / caption_id {meta['caption_id']} breaks "
                                 f"the dense, adjacent order (previous {self.last_img}/{self.last_cap})")
            self.last_img, self.last_cap = meta["image_id"], meta["caption_id"]

    def _caption(self, sw: str, files: dict) -> None:
        try:
            text = files["txt"].decode("utf-8")
            if not has_visible_text(text):
                self.problems.append(f"{sw}: empty caption (nothing but whitespace or control characters)")
            self.cap_words += len(text.split())
        except UnicodeDecodeError:
            self.problems.append(f"{sw}: caption is not UTF-8")

    def finish(self, split: str, info: dict) -> tuple:
        """Checks of the split as a whole; its row of the report."""
        pairs, images, pids = self.pairs, self.images, self.pids
        if pairs == 0:
            self.problems.append(f"{split}: empty split (no pair)")
        if pids != set(range(len(pids))):
            self.problems.append(f"{split}: pids are not dense 0..{len(pids) - 1}")
        for field, got in (("pairs", pairs), ("captions", pairs), ("images", images), ("identities", len(pids))):
            if info.get(field) != got:
                self.problems.append(f"{split}: manifest {field}={info.get(field)} but shards hold {got}")
        return (split, pairs, images, len(pids), pairs / max(1, images), self.cap_words / max(1, pairs),
                len(info.get("shards", [])))


def _report(rows: list[tuple], dropped) -> str:
    lines = [f"{'split':>6} {'pairs':>8} {'images':>8} {'ids':>6} {'caps/img':>8} {'words/cap':>9} {'shards':>6}"]
    lines += [f"{s:>6} {p:>8} {i:>8} {n:>6} {c:>8.2f} {w:>9.1f} {k:>6}" for s, p, i, n, c, w, k in rows]
    if dropped:
        lines.append("dropped at packing time: " + ", ".join(f"{k}: {v}" for k, v in dropped.items()))
    return "\n".join(lines)
