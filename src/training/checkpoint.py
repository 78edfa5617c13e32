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
from collections import Counter

import numpy as np
import torch

from training import distributed as dist_utils
from training.train import TrainState, gather_counts


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


class Checkpointer:
    """Collects every stateful component of a run into one checkpoint and gives each its state back on resume
    (torchtitan's pattern). ``components`` maps the key a component is stored under (that is the checkpoint format)
    to an object with state_dict()/load_state_dict(), or None when the run has no such component; beside them go the
    stream's plan position, the counters (TrainState), the RNG and what evaluation reads (``meta``).

    Estimators of the global contrastive loss are identical on every rank, so rank 0's copy is the state; only the
    per-rank sample counters are gathered."""

    def __init__(self, ckpt_dir: str, components: dict, stream, meta: dict, *, epoch_weights_only: bool = False,
                 keep_last_k: int = 0):
        self.ckpt_dir, self.components, self.stream, self.meta = ckpt_dir, components, stream, meta
        self.epoch_weights_only, self.keep_last_k = epoch_weights_only, keep_last_k

    def state_dict(self, state) -> dict:
        return {
            **{k: c.state_dict() if c is not None else None for k, c in self.components.items()},
            "scaler": None,  # bf16 autocast needs no loss scaler; the slot keeps the format stable
            "train_state": state.to_dict(),
            "data": {"epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, **self.stream.plan_signature()},
            "rng": rng_state(),
            **self.meta,
            "epoch": state.epoch,
            "step": state.global_step,
        }

    def save(self, state, epoch_file: int | None = None) -> None:
        """latest.pt (every rank calls this: the counters are gathered), and epoch_N.pt when ``epoch_file`` is N."""
        per_rank = gather_counts(state)
        if dist_utils.is_main():
            obj = self.state_dict(state)
            obj["per_rank_counts"] = per_rank
            save_latest(obj, self.ckpt_dir)
            if epoch_file is not None:
                if self.epoch_weights_only:
                    obj = weights_only(obj)
                atomic_save(obj, os.path.join(self.ckpt_dir, f"epoch_{epoch_file}.pt"))
                if self.keep_last_k:
                    keep_last_epochs(self.ckpt_dir, self.keep_last_k)
        dist_utils.barrier()

    def resume(self, resume: str | None, log, warn):
        """The TrainState to continue from, every component loaded: ``resume`` is None (a fresh start), 'latest'
        (the newest readable checkpoint of this run, or a fresh start when there is none yet) or a path."""
        if resume is None:
            return TrainState()
        if resume == "latest":
            found = load_latest(self.ckpt_dir, warn=warn)
            if found is None:
                log(f"--resume latest: no checkpoint in {self.ckpt_dir} yet, starting fresh")
                return TrainState()
            ckpt, path = found
        else:
            if not os.path.isfile(resume):
                raise CheckpointError(f"--resume {resume!r} is not a file (use 'latest' or a checkpoint path)")
            ckpt, path = load(resume), resume
        for key, component in self.components.items():
            if component is not None:
                self._load_component(path, ckpt, key, component)
        set_rng_state(ckpt["rng"])
        state = TrainState.from_dict(ckpt["train_state"])
        per_rank = ckpt.get("per_rank_counts") or []
        if len(per_rank) == dist_utils.world_size():
            mine = per_rank[dist_utils.rank()]
            state.bad_samples = Counter(mine["bad"])
            state.source_counts = Counter({int(k): v for k, v in mine["sources"].items()})
        data = ckpt["data"]
        if not self.stream.same_plan(data) and state.batch_in_epoch:
            warn(f"{path} was written with another data plan ({data}); the order of the rest of epoch "
                 f"{state.epoch} cannot be reproduced, so it restarts at its first batch")
            state.batch_in_epoch = 0
        log(f"resumed from {path}: epoch {state.epoch}, batch {state.batch_in_epoch}, step {state.global_step}")
        return state

    @staticmethod
    def _load_component(path: str, ckpt: dict, key: str, component) -> None:
        if ckpt.get(key) is None:
            raise CheckpointError(f"{path} has no identity head; it was written without --id-loss"
                                  if key == "id_head" else f"{path} has no {key!r}: not a training checkpoint")
        try:
            component.load_state_dict(ckpt[key])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()
            detail = "; ".join(x.strip() for x in first[1:3]) or first[0]
            raise CheckpointError(
                f"{path}: its {key!r} does not fit this run ({detail}); were --model, --loss, --train-data or "
                f"--data_size changed since it was written? Resume with the same settings, or start a new --name") \
                from e
