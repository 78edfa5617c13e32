"""Test-set loading from webdataset shards and feature extraction.

A test split is read straight from its tar files (local paths; no network). Each sample is one (image, caption) pair:
``KEY.jpg`` (or .jpeg/.png/.webp), ``KEY.txt`` and ``KEY.json`` with at least ``pid`` and ``image_id``. The gallery is
every distinct ``image_id`` once (in order of first appearance, encoded bytes kept once), the queries are every caption.
"""
from __future__ import annotations

import io
import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common import shards
from common.shards import IMAGE_EXTS
from common.transforms import build_transform, clean_caption

__all__ = ["EvalError", "TestSet", "resolve_shards", "load_test_set", "extract_features", "default_transform",
           "IMAGE_EXTS"]


class EvalError(RuntimeError):
    """Bad evaluation input (run directory, checkpoint, shards, model): the message names the file and the problem."""


@dataclass
class TestSet:
    name: str
    shards: list[str]
    captions: list[str] = field(default_factory=list)
    query_pids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    query_gallery_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # the caption's own image
    gallery_pids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    gallery_images: list[bytes] = field(default_factory=list)  # encoded image bytes
    gallery_names: list[str] = field(default_factory=list)     # original image path (json "image") or sample key
    # What the split's listing (manifest.json / sizes.json) promised and what fell short of it: filled by
    # load_test_set; ``problems`` is empty for a whole split (or one with no listing to check against).
    problems: list[str] = field(default_factory=list)
    listed: dict = field(default_factory=dict)  # {"queries", "gallery", "shards"}: the listing's counts, None unknown

    @property
    def num_queries(self) -> int:
        return len(self.captions)

    @property
    def num_gallery(self) -> int:
        return len(self.gallery_images)

    @property
    def partial(self) -> dict | None:
        """None for a whole split; else what was read against what is listed, and why it falls short."""
        if not self.problems:
            return None
        return {"queries": self.num_queries, "queries_listed": self.listed.get("queries"),
                "gallery": self.num_gallery, "gallery_listed": self.listed.get("gallery"),
                "shards": len(self.shards), "shards_listed": self.listed.get("shards"), "problems": self.problems}

    def image(self, index: int):
        from PIL import Image
        return Image.open(io.BytesIO(self.gallery_images[index])).convert("RGB")


def _resolve(spec: str | Sequence[str]) -> tuple[list[str], dict[str, shards.SplitCheck]]:
    """Shard files of ``spec`` and the check of each split folder they lie in (see :func:`resolve_shards`)."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for part in parts:
        for sub in str(part).split("::"):
            if sub.strip():
                try:
                    out += shards.resolve(sub.strip())
                except shards.ShardError as e:
                    raise EvalError(f"--data: {e}") from e
    if not out:
        raise EvalError(f"--data {spec!r} names no shard")
    by_folder: dict[str, list[str]] = {}
    for f in out:
        by_folder.setdefault(shards.parent(f), []).append(f)
    try:
        checks = {d: shards.check_split(d, files) for d, files in by_folder.items()}
    except shards.ShardError as e:  # a folder its manifest does not list
        raise EvalError(f"--data: {e}") from e
    return out, checks


def resolve_shards(spec: str | Sequence[str], allow_partial: bool = False) -> list[str]:
    """Shard files of a test set: ``spec`` is anything :func:`common.shards.resolve` takes (a directory, a brace
    pattern, a glob, a single tar, a text file listing shards; local or fsspec URL), several of those joined with
    ``::``, or a list of them. A folder that the manifest.json beside it does not list is refused, and so, unless
    ``allow_partial``, is one that lacks listed shards or holds unlisted ones (what reading finds is
    :func:`load_test_set`'s). The trainer calls this on --val-data at start, so a partial split costs no epoch."""
    paths, checks = _resolve(spec)
    _check_listing(checks, str(spec), allow_partial)
    return paths


def _fix(check: shards.SplitCheck) -> str:
    if check.listed_in and check.listed_in.endswith(shards.MANIFEST_FILE):
        return (f"re-copy the split (python data_prep/make_shards.py verify {shards.parent(check.folder)} checks "
                f"a copy)")
    return (f"re-copy the split, or if the shards there are the whole split re-count them (python "
            f"data_prep/make_shards.py index {check.folder})")


def _check_listing(checks: dict[str, shards.SplitCheck], name: str, allow_partial: bool) -> None:
    for check in checks.values():
        if check.problems and not allow_partial:
            raise _refuse(name, check, check.problems)


def _refuse(name: str, check: shards.SplitCheck, problems: list[str]) -> EvalError:
    return EvalError(f"test set {name!r}: split {check.folder} is incomplete: {'; '.join(problems)}; {_fix(check)}, "
                     f"or score what is there with eval.sh --allow-partial (reported as partial)")


class _Builder:
    """Gallery and queries of a test set as its samples come in."""

    def __init__(self, ts: TestSet, clean: Callable[[str], str]):
        self.ts, self.clean = ts, clean
        self.gallery_of: dict[int, int] = {}
        self.q_pids: list[int] = []
        self.q_gal: list[int] = []
        self.g_pids: list[int] = []

    def add(self, shard: str, key: str, sample: dict) -> None:
        img_ext = shards.image_ext(sample)
        missing = [x for x, ok in (("image (.jpg)", img_ext), ("txt", "txt" in sample), ("json", "json" in sample))
                   if not ok]
        if missing:
            raise EvalError(f"shard {shard!r}: sample {key!r} lacks {', '.join(missing)} "
                            f"(has: {', '.join(sorted(k for k in sample if not k.startswith('_'))) or 'nothing'}); "
                            f"expected KEY.jpg, KEY.txt, KEY.json")
        try:
            meta = json.loads(sample["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EvalError(f"shard {shard!r}: sample {key!r} has an unreadable .json ({e})") from e
        if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("pid", "image_id")):
            raise EvalError(f"shard {shard!r}: sample {key!r}: .json needs integer 'pid' and 'image_id' "
                            f"(got keys: {', '.join(meta) if isinstance(meta, dict) else type(meta).__name__})")
        pid, image_id = meta["pid"], meta["image_id"]
        gi = self.gallery_of.get(image_id)
        if gi is None:
            gi = self.gallery_of[image_id] = len(self.g_pids)
            self.g_pids.append(pid)
            self.ts.gallery_images.append(sample[img_ext])
            self.ts.gallery_names.append(str(meta.get("image", key)))
        elif self.g_pids[gi] != pid:
            raise EvalError(f"shard {shard!r}: sample {key!r}: image_id {image_id} has pid {pid} here but "
                            f"pid {self.g_pids[gi]} in an earlier sample")
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise EvalError(f"shard {shard!r}: sample {key!r}: caption is not UTF-8") from e
        self.ts.captions.append(self.clean(caption))
        self.q_pids.append(pid)
        self.q_gal.append(gi)

    def finish(self) -> TestSet:
        if not self.ts.captions:
            raise EvalError(f"test set {self.ts.name!r}: shards {self.ts.shards} hold no sample")
        self.ts.query_pids = np.asarray(self.q_pids, dtype=np.int64)
        self.ts.query_gallery_index = np.asarray(self.q_gal, dtype=np.int64)
        self.ts.gallery_pids = np.asarray(self.g_pids, dtype=np.int64)
        return self.ts


def _read_shard(shard: str, check: shards.SplitCheck, build: _Builder, allow_partial: bool) -> None:
    """Every sample of one shard into ``build``, then its count (and, where the listing has one, the sha256 of the
    bytes as they streamed past) against the listing. A problem is an EvalError, or with ``allow_partial`` one more
    entry of the test set's problems, the samples read before it kept."""
    name, found = shards.basename(shard), []

    def on_problem(url: str, problem: str):
        found.append(f"{name} is truncated or not a readable tar file ({problem})")

    try:
        stream = shards.HashingReader(shards.open_url(shard)) if name in check.sha256 else None
    except OSError as e:
        raise EvalError(f"shard {shard!r} cannot be opened: {e}") from e
    n = 0
    try:
        for sample in shards.iter_samples(shard, on_problem, stream=stream):
            build.add(shard, sample["__key__"], sample)
            n += 1
        wrong = check.shard_problem(name, n, stream.hexdigest() if stream is not None and not found else None)
    finally:
        if stream is not None:
            stream.close()
    found += [wrong] if wrong and not found else []
    if found and not allow_partial:
        raise _refuse(build.ts.name, check, found)
    build.ts.problems += [f"{check.folder}: {p}" for p in found]


def check_first_sample(shard: str) -> None:
    """The first sample of ``shard`` read as :func:`load_test_set` reads every one (an image, a caption, a json with
    integer pid and image_id): the trainer checks --val-data this way at start, not after the first epoch."""
    def on_problem(url: str, problem: str):
        raise EvalError(f"shard {shard!r} is not a readable tar file ({problem})")

    try:
        for sample in shards.iter_samples(shard, on_problem):
            _Builder(TestSet(name="check", shards=[shard]), clean_caption).add(shard, sample["__key__"], sample)
            return
    except OSError as e:
        raise EvalError(f"shard {shard!r} cannot be opened: {e}") from e


def _listed(checks: dict[str, shards.SplitCheck]) -> dict:
    """The listing's query / gallery / shard counts over the folders read; None where a folder does not say."""
    known = all(c.listed_in for c in checks.values())
    images = [c.totals.get("images") for c in checks.values()]
    return {"queries": sum(sum(c.counts.values()) for c in checks.values()) if known else None,
            "gallery": sum(images) if known and None not in images else None,
            "shards": sum(len(c.counts) for c in checks.values()) if known else None}


def load_test_set(spec: str | Sequence[str], name: str = "test", clean: Callable[[str], str] | None = None,
                  allow_partial: bool = False) -> TestSet:
    """Read every sample of the shards of ``spec`` (see :func:`resolve_shards`) into a :class:`TestSet`.

    Each split folder is checked against its manifest.json entry or sizes.json (:func:`common.shards.check_split`):
    a missing, unlisted, truncated or changed shard is an EvalError naming the split, what is wrong and how to fix
    it. With ``allow_partial`` the set is read anyway (unlisted shards left out) and ``ts.partial`` says what it
    lacks."""
    paths, checks = _resolve(spec)
    _check_listing(checks, name, allow_partial)
    paths = [p for p in paths if shards.basename(p) not in checks[shards.parent(p)].extra]
    ts = TestSet(name=name, shards=paths, listed=_listed(checks),
                 problems=[f"{c.folder}: {p}" for c in checks.values() for p in c.problems])
    build = _Builder(ts, clean or clean_caption)
    for shard in paths:
        _read_shard(shard, checks[shards.parent(shard)], build, allow_partial)
    return build.finish()


def default_transform(image_size: tuple[int, int]):
    """The training pipeline's evaluation transform (resize to (H, W), CLIP normalisation)."""
    return build_transform(tuple(image_size), train=False)


class _Images(torch.utils.data.Dataset):
    def __init__(self, ts: TestSet, transform):
        self.images, self.names, self.transform = ts.gallery_images, ts.gallery_names, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        try:
            img = Image.open(io.BytesIO(self.images[i])).convert("RGB")
        except Exception as e:  # PIL raises several types
            raise EvalError(f"image {self.names[i]!r} cannot be decoded: {e}") from e
        return self.transform(img)


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel / DataParallel


@torch.no_grad()
def extract_features(model, tokenizer, transform, ts: TestSet, device: str | torch.device = "cpu",
                     batch_size: int = 256, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised fp32 (image_features [G, D], text_features [Q, D]) on ``device``. bf16 autocast on CUDA, fp32
    elsewhere. The model's train/eval mode is restored afterwards."""
    device = torch.device(device)
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    amp = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext())
    try:
        loader = torch.utils.data.DataLoader(_Images(ts, transform), batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers, pin_memory=device.type == "cuda")
        img_feats = []
        for x in loader:
            with amp:
                f = net.encode_image(x.to(device, non_blocking=True))
            img_feats.append(F.normalize(f.float(), dim=-1))
        txt_feats = []
        for lo in range(0, len(ts.captions), batch_size):
            tokens = tokenizer(ts.captions[lo:lo + batch_size]).to(device, non_blocking=True)
            with amp:
                f = net.encode_text(tokens)
            txt_feats.append(F.normalize(f.float(), dim=-1))
    finally:
        net.train(was_training)
    return torch.cat(img_feats), torch.cat(txt_feats)
