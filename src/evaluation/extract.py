"""Test-set loading from webdataset shards and feature extraction.

A test split is read straight from its tar files (local paths; no network). Each sample is one (image, caption) pair:
``KEY.jpg`` (or .jpeg/.png/.webp), ``KEY.txt`` and ``KEY.json`` with at least ``pid`` and ``image_id``. The gallery is
every distinct ``image_id`` once (in order of first appearance, encoded bytes kept once), the queries are every caption.
"""
from __future__ import annotations

import io
import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common import shards
from common.runs import CheckpointError
from common.shards import IMAGE_EXTS
from common.transforms import build_transform, clean_caption

__all__ = ["EvalError", "TestSet", "resolve_shards", "load_test_set", "extract_features", "default_transform",
           "IMAGE_EXTS"]


class EvalError(RuntimeError):
    """Bad evaluation input (run directory, checkpoint, shards, model): the message names the file and the problem."""


def run_cli(run, args) -> int:
    """The evaluation CLIs' one error rule: bad input (an EvalError, or a run folder / checkpoint / weights file that
    cannot be used) is one ``error:`` line and exit code 2, no traceback."""
    try:
        return run(args)
    except (EvalError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


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

    @property
    def num_queries(self) -> int:
        return len(self.captions)

    @property
    def num_gallery(self) -> int:
        return len(self.gallery_images)

    def image(self, index: int):
        from PIL import Image
        return Image.open(io.BytesIO(self.gallery_images[index])).convert("RGB")


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard files of a test set: ``spec`` is anything :func:`common.shards.resolve` takes (a directory, a brace
    pattern, a glob, a single tar, a text file listing shards; local or fsspec URL), several of those joined with
    ``::``, or a list of them."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for part in parts:
        for sub in str(part).split("::"):
            if sub.strip():
                try:
                    found = shards.resolve(sub.strip())
                    for d in dict.fromkeys(shards.parent(f) for f in found):
                        shards.read_split_info(d)  # refuses a folder its manifest does not list
                    out += found
                except shards.ShardError as e:
                    raise EvalError(f"--data: {e}") from e
    if not out:
        raise EvalError(f"--data {spec!r} names no shard")
    return out


def _iter_samples(path: str):
    """Every sample of one shard; any problem with the shard is an EvalError (a test set must be read whole)."""
    def on_problem(url: str, problem: str):
        raise EvalError(f"shard {url!r} is truncated or not a readable tar file ({problem})")

    for sample in shards.iter_samples(path, on_problem):
        yield sample["__key__"], sample


def load_test_set(spec: str | Sequence[str], name: str = "test", clean: Callable[[str], str] | None = None) -> TestSet:
    """Read every sample of the shards of ``spec`` (see :func:`resolve_shards`) into a :class:`TestSet`."""
    if clean is None:
        clean = clean_caption
    paths = resolve_shards(spec)
    ts = TestSet(name=name, shards=paths)
    gallery_of: dict[int, int] = {}
    q_pids, q_gal, g_pids = [], [], []
    for shard in paths:
        for key, sample in _iter_samples(shard):
            img_ext = shards.image_ext(sample)
            missing = [x for x, ok in (("image (.jpg)", img_ext), ("txt", "txt" in sample), ("json", "json" in sample))
                       if not ok]
            if missing:
                raise EvalError(f"shard {shard!r}: sample {key!r} lacks {', '.join(missing)} "
                                f"(has: {', '.join(sorted(k for k in sample if not k.startswith('_'))) or 'nothing'}); expected KEY.jpg, KEY.txt, KEY.json")
            try:
                meta = json.loads(sample["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise EvalError(f"shard {shard!r}: sample {key!r} has an unreadable .json ({e})") from e
            if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("pid", "image_id")):
                raise EvalError(f"shard {shard!r}: sample {key!r}: .json needs integer 'pid' and 'image_id' "
                                f"(got keys: {', '.join(meta) if isinstance(meta, dict) else type(meta).__name__})")
            pid, image_id = meta["pid"], meta["image_id"]
            gi = gallery_of.get(image_id)
            if gi is None:
                gi = gallery_of[image_id] = len(g_pids)
                g_pids.append(pid)
                ts.gallery_images.append(sample[img_ext])
                ts.gallery_names.append(str(meta.get("image", key)))
            elif g_pids[gi] != pid:
                raise EvalError(f"shard {shard!r}: sample {key!r}: image_id {image_id} has pid {pid} here but "
                                f"pid {g_pids[gi]} in an earlier sample")
            try:
                caption = sample["txt"].decode("utf-8")
            except UnicodeDecodeError as e:
                raise EvalError(f"shard {shard!r}: sample {key!r}: caption is not UTF-8") from e
            ts.captions.append(clean(caption))
            q_pids.append(pid)
            q_gal.append(gi)
    if not ts.captions:
        raise EvalError(f"test set {name!r}: shards {paths} hold no sample")
    ts.query_pids = np.asarray(q_pids, dtype=np.int64)
    ts.query_gallery_index = np.asarray(q_gal, dtype=np.int64)
    ts.gallery_pids = np.asarray(g_pids, dtype=np.int64)
    return ts


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
