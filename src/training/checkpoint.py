"""Checkpoints that are atomic on disk and hold everything needed to continue exactly.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then renamed over the target,
and the folder is fsync'ed: a crash at any moment leaves either the old file or the new one, never a torn file that
looks valid. Loading uses ``weights_only=True`` only, so a file carrying pickled code is refused instead of run.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile

import numpy as np
import torch


class CheckpointError(RuntimeError):
    pass


def atomic_save(obj, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: weights_only=True rejected it ({str(e).splitlines()[0]}); "
                              f"a checkpoint must hold only tensors and plain containers") from e
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a training checkpoint (no 'state_dict')")
    return ckpt


def candidates(ckpt_dir: str) -> list[str]:
    """Resume candidates, newest first: latest.pt, then the previous latest, then epoch files by number."""
    out = [os.path.join(ckpt_dir, n) for n in ("latest.pt", "latest_prev.pt")]
    epochs = []
    if os.path.isdir(ckpt_dir):
        for n in os.listdir(ckpt_dir):
            if n.startswith("epoch_") and n.endswith(".pt") and n[6:-3].isdigit():
                epochs.append((int(n[6:-3]), os.path.join(ckpt_dir, n)))
    out += [p for _, p in sorted(epochs, reverse=True)]
    return [p for p in out if os.path.isfile(p)]


def load_latest(ckpt_dir: str, warn=print) -> tuple[dict, str] | None:
    """The newest readable checkpoint that can resume; a corrupt one is reported and the previous one used."""
    for path in candidates(ckpt_dir):
        try:
            ckpt = load(path)
        except CheckpointError as e:
            warn(f"WARNING: {e}; trying an older checkpoint")
            continue
        if not ckpt.get("weights_only"):  # weights-only epoch files cannot resume
            return ckpt, path
    return None


EVAL_KEYS = ("state_dict", "id_head", "model_name", "image_size", "epoch", "step")


def weights_only(ckpt: dict) -> dict:
    """What evaluation and export read, without optimizer, loss state, RNG and counters."""
    return {**{k: ckpt[k] for k in EVAL_KEYS if k in ckpt}, "weights_only": True}


def keep_last_epochs(ckpt_dir: str, k: int) -> list[str]:
    """Delete all but the k newest epoch_N.pt files; returns what was deleted."""
    epochs = sorted((int(n[6:-3]), n) for n in os.listdir(ckpt_dir)
                    if n.startswith("epoch_") and n.endswith(".pt") and n[6:-3].isdigit())
    gone = [n for _, n in epochs[:-k]] if k > 0 else []
    for n in gone:
        os.remove(os.path.join(ckpt_dir, n))
    return gone


def save_latest(obj: dict, ckpt_dir: str) -> str:
    """latest.pt, keeping the previous one as latest_prev.pt so a corrupt newest file still leaves a fallback."""
    path = os.path.join(ckpt_dir, "latest.pt")
    if os.path.exists(path):
        os.replace(path, os.path.join(ckpt_dir, "latest_prev.pt"))
    atomic_save(obj, path)
    return path


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return _plain(st)


def _plain(x):
    """numpy / tuple RNG states as lists of ints and tensors so that weights_only loading accepts them."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.copy())
    if isinstance(x, np.integer):
        return int(x)
    return x


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np_st = st["numpy"]
    np.random.set_state((np_st[0], np_st[1].numpy(), int(np_st[2]), int(np_st[3]), float(np_st[4])))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
