"""Checkpoints that hold everything needed to continue exactly: the Checkpointer collects every component's state.

How a checkpoint file is named, written (atomically) and read (``weights_only=True`` only) is the run folder's
contract, common/runs.py.
"""
from __future__ import annotations

import os

from common.runs import (LATEST, CheckpointError, atomic_save, epoch_name, keep_last_epochs, load, load_latest,
                         save_latest, weights_only)
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
        problem = self._write(obj, epoch_file) if dist_utils.is_main() else None
        problem = dist_utils.broadcast_object(problem)  # every rank stops, none waits in a barrier for rank 0
        if problem is not None:
            raise SystemExit(f"error: {problem}")

    def _write(self, obj: dict, epoch_file: int | None) -> str | None:
        """Rank 0's files; what went wrong (a full disk), in one line, or None."""
        try:
            save_latest(obj, self.ckpt_dir)
        except CheckpointError as e:
            return str(e)
        if epoch_file is None:
            return None
        try:
            atomic_save(weights_only(obj) if self.epoch_weights_only else obj,
                        os.path.join(self.ckpt_dir, epoch_name(epoch_file)))
        except CheckpointError as e:
            return f"{e}; {LATEST} (this step) is intact; free space and --resume latest"
        if self.keep_last_k:
            keep_last_epochs(self.ckpt_dir, self.keep_last_k)
        return None

    def resume(self, resume: str | None, warn) -> str | None:
        """Load every component and return the checkpoint's path, or None for a fresh start: ``resume`` is None,
        'latest' (the newest checkpoint of this run that can resume; a fresh start when the run has none at all, an
        error when it has only unusable ones) or a path."""
        if resume is None:
            return None
        if resume == "latest":
            found = load_latest(self.ckpt_dir, warn=warn)
            if found is None:
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
        except CheckpointError as e:  # a component that names what differs (the loss's recorded settings)
            raise CheckpointError(f"{path}: {e}") from e
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()
            detail = "; ".join(x.strip() for x in first[1:3]) or first[0]
            raise CheckpointError(
                f"{path}: its {key!r} does not fit this run ({detail}); were --model, --loss, --train-data or "
                f"--data_size changed since it was written? Resume with the same settings, or start a new --name") \
                from e
