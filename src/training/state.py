"""What a run counts and draws, as checkpoint components: each has ``state_dict()`` / ``load_state_dict()`` and is
registered with the Checkpointer under the key it is stored under (``train_state``, ``per_rank_counts``, ``rng``).
The data position (epoch, batch in epoch) is the stream's own state (training/data.py ``TrainStream``)."""
from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from training import distributed as dist_utils


@dataclass
class TrainState:
    global_step: int = 0            # optimizer steps taken (skipped non-finite steps count too: the data moved on)
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        # Checkpoints up to 2946cfe also hold the data position and rank 0's tallies here; "data" and
        # "per_rank_counts" hold both in every version, so those keys are left unread.
        self.global_step = d["global_step"]
        self.nonfinite_in_a_row = d.get("nonfinite_in_a_row", 0)
        self.nonfinite_total = d.get("nonfinite_total", 0)


class Tallies:
    """This rank's unusable samples by reason, pairs read per source set, and per epoch the data counts of the plan
    (:func:`add_data_counts`). The checkpoint keeps every rank's (``state_dict`` is a collective: every rank calls
    it), and summary.json their sum."""

    def __init__(self):
        self.bad_samples, self.source_counts = Counter(), Counter()
        self.epochs: dict[int, dict] = {}

    def count(self, batch: dict, epoch: int) -> None:
        self.bad_samples.update(batch.get("bad", {}))
        self.source_counts.update(batch["sources"].tolist())
        add_data_counts(self.epochs.setdefault(epoch, empty_data_counts()), {**batch["data"],
                                                                              "remote": batch.get("remote", {})})

    def state_dict(self) -> list[dict]:
        """Every rank's counts as plain dicts with string keys."""
        return dist_utils.all_gather_object({"bad": dict(self.bad_samples),
                                             "sources": {str(k): v for k, v in self.source_counts.items()},
                                             "epochs": {str(k): v for k, v in self.epochs.items()}})

    def load_state_dict(self, per_rank: list[dict]) -> None:
        # Written by another number of ranks: the counts cannot be split back onto ranks, so they start again.
        if len(per_rank) != dist_utils.world_size():
            return
        mine = per_rank[dist_utils.rank()]
        self.bad_samples = Counter(mine["bad"])
        self.source_counts = Counter({int(k): v for k, v in mine["sources"].items()})
        self.epochs = {int(k): v for k, v in mine.get("epochs", {}).items()}  # none before the counts existed


def empty_data_counts() -> dict:
    """One epoch's data counts: pairs of the plan read, pairs of the plan lost by reason (an unusable sample; a
    shard gone, truncated or shorter than sizes.json), and refills (pairs of a reader's range met a second time to
    keep its batches full, as many as were lost once the range has been read). Runs that read remote shards also
    have "remote": retries, bytes_fetched, cache_hits, cache_misses (common.remote)."""
    return {"read": 0, "lost": {}, "refilled": 0}


def add_data_counts(into: dict, counts: dict) -> None:
    into["read"] += counts["read"]
    into["refilled"] += counts["refilled"]
    for reason, n in counts["lost"].items():
        into["lost"][reason] = into["lost"].get(reason, 0) + n
    for key, n in counts.get("remote", {}).items():  # only runs that read remote shards have these
        into.setdefault("remote", {})[key] = into.get("remote", {}).get(key, 0) + n


def remote_reads(counts: dict) -> str:
    """'; remote reads: ...' for an epoch's log line, '' when nothing remote was read."""
    r = counts.get("remote")
    if not r:
        return ""
    cache = (f", shard cache {r.get('cache_hits', 0)} hits / {r.get('cache_misses', 0)} misses"
             if "cache_hits" in r or "cache_misses" in r else "")
    return f"; remote reads: {r.get('bytes_fetched', 0)} bytes fetched, {r.get('retries', 0)} retries{cache}"


def data_counts(per_rank: list[dict]) -> dict[str, dict]:
    """Every rank's per-epoch data counts (``Tallies.state_dict()``), summed: {epoch: counts}."""
    out: dict[str, dict] = {}
    for r in per_rank:
        for epoch, counts in r.get("epochs", {}).items():
            add_data_counts(out.setdefault(epoch, empty_data_counts()), counts)
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def not_read(counts: list[dict]) -> str | None:
    """'N of M pairs of the plan were not read (reason n, ...)' over the given epochs' counts; None when none was
    lost."""
    lost = Counter()
    for c in counts:
        lost.update(c["lost"])
    if not sum(lost.values()):
        return None
    planned = sum(c["read"] for c in counts) + sum(lost.values())
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(lost.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{sum(lost.values())} of {planned} pairs of the plan were not read ({reasons})"


class ProcessRng:
    """The torch / numpy / python (/ CUDA) generators of this process. The checkpoint keeps rank 0's; every rank
    also reseeds per step from the step number, so the generators matter only for what runs between steps."""

    def state_dict(self) -> dict:
        st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return _plain(st)

    def load_state_dict(self, st: dict) -> None:
        torch.set_rng_state(st["torch"])
        np_st = st["numpy"]
        np.random.set_state((np_st[0], np_st[1].numpy(), int(np_st[2]), int(np_st[3]), float(np_st[4])))
        py = st["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])


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
