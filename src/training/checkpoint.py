"""Checkpoints that hold everything needed to continue exactly: the Checkpointer collects every component's state.

How a checkpoint file is named, written (atomically) and read (``weights_only=True`` only) is the run folder's
contract, common/runs.py.
"""
from __future__ import annotations

import os

from common.runs import (CheckpointError, atomic_save, epoch_name, keep_last_epochs, load, load_latest, save_latest,
                         weights_only)
from training import distributed as dist_utils


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
                atomic_save(obj, os.path.join(self.ckpt_dir, epoch_name(epoch_file)))
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
