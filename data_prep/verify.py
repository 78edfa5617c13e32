"""`make_shards.py verify OUTPUT`: re-read everything and check it against manifest.json and sizes.json."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

from PIL import Image

from . import FORMAT_VERSION
from .fsio import get_fs, join

REQUIRED = {"key": int, "pid": int, "orig_id": (int, str), "source": str, "image": str, "image_id": int,
            "caption_id": int}


def _samples(data: bytes, where: str, problems: list):
    """[(key_str, {ext: bytes})] in archive order; members of one sample must be adjacent."""
    out: list = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    problems.append(f"{where}: member {m.name!r} is not a regular file")
                    continue
                k, _, ext = m.name.partition(".")
                payload = tf.extractfile(m).read()
                if out and out[-1][0] == k:
                    out[-1][1][ext] = payload
                else:
                    if any(k == prev for prev, _ in out[-3:]):
                        problems.append(f"{where}: files of sample {k} are not adjacent")
                    out.append((k, {ext: payload}))
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{where}: not a readable tar archive ({e})")
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
    manifest = _read_json(fs, join(root, "manifest.json"), problems)
    if not isinstance(manifest, dict):
        if manifest is not None:
            problems.append("manifest.json: not an object")
        return problems, "no usable manifest.json (an interrupted or never-finished run?)"
    if manifest.get("format_version") != FORMAT_VERSION:
        problems.append(f"manifest.json: format_version {manifest.get('format_version')!r} != {FORMAT_VERSION}")
    rows = []
    for split, info in manifest.get("splits", {}).items():
        sdir = join(root, split)
        sizes = _read_json(fs, join(sdir, "sizes.json"), problems)
        listed = {s["name"]: s["count"] for s in info.get("shards", [])}
        if sizes is not None and sizes != listed:
            problems.append(f"{split}/sizes.json: {sizes} does not match manifest shards {listed}")
        try:
            on_disk = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(sdir, detail=False)}
        except FileNotFoundError:
            on_disk = set()
        for extra in sorted(n for n in on_disk if n.endswith(".tar") and n not in listed):
            problems.append(f"{split}/{extra}: shard on disk not listed in the manifest")

        next_key, last_img, last_cap = 0, -1, -1
        pids, images, cap_words = set(), 0, 0
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
                sw = f"{where}: sample {k}"
                missing = [e for e in ("jpg", "txt", "json") if e not in files]
                if missing:
                    problems.append(f"{sw}: missing {missing}")
                    next_key += 1
                    continue
                try:
                    meta = json.loads(files["json"])
                except ValueError:
                    problems.append(f"{sw}: json unreadable")
                    next_key += 1
                    continue
                bad = [f for f, t in REQUIRED.items() if not isinstance(meta.get(f), t)]
                if bad:
                    problems.append(f"{sw}: json fields missing or of the wrong type: {bad}")
                    next_key += 1
                    continue
                if k != f"{next_key:09d}" or meta["key"] != next_key:
                    problems.append(f"{sw}: key {meta['key']} (name {k}) where {next_key} was expected")
                next_key += 1
                # Samples of one image are adjacent: image_id either repeats with the next caption or advances by 1.
                if meta["image_id"] == last_img and meta["caption_id"] == last_cap + 1:
                    last_cap += 1
                elif meta["image_id"] == last_img + 1 and meta["caption_id"] == 0:
                    last_img, last_cap = meta["image_id"], 0
                    images += 1
                    if decode:
                        try:
                            with Image.open(io.BytesIO(files["jpg"])) as im:
                                im.load()
                        except Exception as e:  # any PIL failure means an undecodable image
                            problems.append(f"{sw}: image does not decode ({type(e).__name__})")
                else:
                    problems.append(f"{sw}: image_id {meta['image_id']} / caption_id {meta['caption_id']} breaks "
                                    f"the dense, adjacent order (previous {last_img}/{last_cap})")
                    last_img, last_cap = meta["image_id"], meta["caption_id"]
                pids.add(meta["pid"])
                try:
                    text = files["txt"].decode("utf-8")
                    if not text.strip():
                        problems.append(f"{sw}: empty caption")
                    cap_words += len(text.split())
                except UnicodeDecodeError:
                    problems.append(f"{sw}: caption is not UTF-8")
        if pids != set(range(len(pids))):
            problems.append(f"{split}: pids are not dense 0..{len(pids) - 1}")
        for field, got in (("pairs", next_key), ("captions", next_key), ("images", images),
                           ("identities", len(pids))):
            if info.get(field) != got:
                problems.append(f"{split}: manifest {field}={info.get(field)} but shards hold {got}")
        rows.append((split, next_key, images, len(pids), next_key / max(1, images), cap_words / max(1, next_key),
                     len(info.get("shards", []))))
    lines = [f"{'split':>6} {'pairs':>8} {'images':>8} {'ids':>6} {'caps/img':>8} {'words/cap':>9} {'shards':>6}"]
    lines += [f"{s:>6} {p:>8} {i:>8} {n:>6} {c:>8.2f} {w:>9.1f} {k:>6}" for s, p, i, n, c, w, k in rows]
    if manifest.get("dropped"):
        lines.append("dropped at packing time: " + ", ".join(f"{k}: {v}" for k, v in manifest["dropped"].items()))
    return problems, "\n".join(lines)
