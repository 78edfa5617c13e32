"""Checkpoints that hold everything needed to continue exactly: the Checkpointer and the RNG states it saves.

How a checkpoint file is named, written (atomically) and read (``weights_only=True`` only) is the run folder's
contract, common/runs.py.
"""
from __future__ import annotations

import os
import random
from collections import Counter

import numpy as np
import torch

from common.runs import (CheckpointError, atomic_save, epoch_name, keep_last_epochs, load, load_latest, save_latest,
                         weights_only)
from training import distributed as dist_utils
from training.train import TrainState, gather_counts


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
                atomic_save(obj, os.path.join(self.ckpt_dir, epoch_name(epoch_file)))
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
