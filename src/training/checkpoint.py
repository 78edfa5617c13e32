"""Checkpoints that are atomic on disk and hold everything needed to continue exactly.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then renamed over the target,
and the folder is fsync'ed: a crash at any moment leaves either the old file or the new one, never a torn file that
looks valid. Loading uses ``weights_only=True`` only, so a file carrying pickled code is refused instead of run.
"""
from __future__ import annotations

import os
import pickle
import zipfile

import torch

from training import distributed as dist_utils


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


class Checkpointer:
    """Collects every stateful component of a run into one checkpoint and gives each its state back on resume
    (torchtitan's pattern). ``components`` maps the key a component is stored under (that is the checkpoint format)
    to an object with state_dict()/load_state_dict(), or None when the run has no such component; ``meta()`` gives
    what evaluation reads at the top level beside them. ``absent`` says, per key, why a checkpoint may lack that
    component (the error names it).

    Rank 0 writes: model, optimizer and the global contrastive loss's estimators are identical on every rank, so its
    copy is the state. Every rank still calls :meth:`save`, because a component whose state differs per rank (the
    tallies) gathers it in its ``state_dict()``."""

    def __init__(self, ckpt_dir: str, components: dict, meta, *, absent: dict | None = None,
                 epoch_weights_only: bool = False, keep_last_k: int = 0):
        self.ckpt_dir, self.components, self.meta, self.absent = ckpt_dir, components, meta, absent or {}
        self.epoch_weights_only, self.keep_last_k = epoch_weights_only, keep_last_k

    def state_dict(self) -> dict:
        return {**{k: c.state_dict() if c is not None else None for k, c in self.components.items()}, **self.meta()}

    def save(self, epoch_file: int | None = None) -> None:
        """latest.pt, and epoch_N.pt when ``epoch_file`` is N."""
        obj = self.state_dict()
        if dist_utils.is_main():
            save_latest(obj, self.ckpt_dir)
            if epoch_file is not None:
                if self.epoch_weights_only:
                    obj = weights_only(obj)
                atomic_save(obj, os.path.join(self.ckpt_dir, f"epoch_{epoch_file}.pt"))
                if self.keep_last_k:
                    keep_last_epochs(self.ckpt_dir, self.keep_last_k)
        dist_utils.barrier()

    def resume(self, resume: str | None, log, warn) -> str | None:
        """Load every component and return the checkpoint's path, or None for a fresh start: ``resume`` is None,
        'latest' (the newest readable checkpoint of this run, or a fresh start when there is none yet) or a path."""
        if resume is None:
            return None
        if resume == "latest":
            found = load_latest(self.ckpt_dir, warn=warn)
            if found is None:
                log(f"--resume latest: no checkpoint in {self.ckpt_dir} yet, starting fresh")
                return None
            ckpt, path = found
        else:
            if not os.path.isfile(resume):
                raise CheckpointError(f"--resume {resume!r} is not a file (use 'latest' or a checkpoint path)")
            ckpt, path = load(resume), resume
        for key, component in self.components.items():
            if component is not None:
                self._load_component(path, ckpt, key, component)
        return path

    def _load_component(self, path: str, ckpt: dict, key: str, component) -> None:
        if ckpt.get(key) is None:
            raise CheckpointError(f"{path} has no {key!r}: " + self.absent.get(key, "not a training checkpoint"))
        try:
            component.load_state_dict(ckpt[key])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()
            detail = "; ".join(x.strip() for x in first[1:3]) or first[0]
            raise CheckpointError(
                f"{path}: its {key!r} does not fit this run ({detail}); were --model, --loss, --train-data or "
                f"--data_size changed since it was written? Resume with the same settings, or start a new --name") \
                from e
