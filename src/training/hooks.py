"""What the epoch loop (training/train.py) calls back into: step logging, the key audit, the profiler, checkpoints
and the agreed stop."""
from __future__ import annotations

import json
import os

import torch

from training import distributed as dist_utils
from training import stop
from training.checkpoint import Checkpointer
from training.config import RunConfig
from training.logger import RunLogger
from training.train import TrainState


class Hooks:
    def __init__(self, run: RunConfig, run_dir: str, logger: RunLogger, checkpointer: Checkpointer, stream):
        self.logger, self.checkpointer, self.stream = logger, checkpointer, stream
        self._keys_file = None
        if run.log_keys:
            self._keys_file = open(os.path.join(run_dir, f"keys_rank{dist_utils.rank()}.jsonl"), "a")
        self.profiler = profiler(run.profile_steps, run_dir, logger) if run.profile and dist_utils.is_main() \
            else None

    def step_done(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def warn(self, msg: str) -> None:
        self.logger.warning(msg)

    def log(self, state: TrainState, values: dict) -> None:
        self.logger.scalars(state.global_step, values)
        if state.source_counts and len(self.stream.sets) > 1:
            counts = {f"source_{k}": v for k, v in sorted(state.source_counts.items())}
            self.logger.scalars(state.global_step, counts, prefix="data")
        if state.bad_samples:
            self.logger.scalars(state.global_step, {f"skipped_{k}": v for k, v in state.bad_samples.items()},
                                prefix="data")
        scalars = " ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float))
        self.logger.info(f"epoch {state.epoch} step {state.global_step} "
                         f"({state.batch_in_epoch}/{self.stream.n}) {scalars}")

    def log_keys(self, state: TrainState, keys: torch.Tensor) -> None:
        if self._keys_file is not None:
            self._keys_file.write(json.dumps({"epoch": state.epoch, "batch": state.batch_in_epoch,
                                              "step": state.global_step, "keys": keys.tolist()}) + "\n")
            self._keys_file.flush()

    def save(self, state: TrainState, epoch_file: int | None = None) -> None:
        self.checkpointer.save(state, epoch_file)

    def stop_requested(self) -> bool:
        """True on every rank at the same step once any rank got SIGTERM/SIGINT (one all-reduce per step)."""
        return stop.agreed()

    def close(self) -> None:
        if self._keys_file is not None:
            self._keys_file.close()
            self._keys_file = None
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None


def profiler(steps: tuple[int, int, int], run_dir: str, logger: RunLogger):
    """--profile: torch.profiler over steps WAIT+1 .. WAIT+WARMUP+ACTIVE of rank 0 (the official FastCLIP code's
    schedule by default), a trace for TensorBoard / Perfetto in RUN/traces and the top operators in out.log."""
    wait, warmup, active = steps
    trace_dir = os.path.join(run_dir, "traces")
    to_tensorboard = torch.profiler.tensorboard_trace_handler(trace_dir, worker_name="rank0")

    def on_ready(prof):
        to_tensorboard(prof)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        logger.info(f"profile of {active} steps (trace in {trace_dir}):\n"
                    + prof.key_averages().table(sort_by=sort, row_limit=15))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=False,
                                  schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                                  on_trace_ready=on_ready)
    prof.start()
    return prof
