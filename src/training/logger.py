"""Rank-0 logging: a log file, concise console lines, a per-step JSONL record and tensorboard scalars."""
from __future__ import annotations

import json
import os
import sys
import time

from common.runs import OUT_LOG, TRAIN_LOG, open_run_file


class RunLogger:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.run_dir = run_dir
        self._tb = None
        self._file = None
        self._jsonl = None
        if not enabled:
            return
        self._file = open_run_file(os.path.join(run_dir, OUT_LOG))
        self._jsonl = open_run_file(os.path.join(run_dir, TRAIN_LOG))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} | {msg}"
        print(line, flush=True)
        self._file.write(line + "\n")
        self._file.flush()

    def warning(self, msg: str) -> None:
        if self.enabled:
            self.info(f"WARNING: {msg}")
        else:
            print(f"WARNING: {msg}", file=sys.stderr, flush=True)

    def scalars(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"kind": prefix, "step": step, **{k: _num(v) for k, v in values.items()}}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        for f in (self._file, self._jsonl):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()


def _num(v):
    return float(v) if isinstance(v, (int, float)) else v
