"""Observers of the training loop: objects the Trainer notifies after every optimizer step (``step_done``) and at
every epoch end (``epoch_done``): step logging, the key audit, the profiler, checkpoints and validation. The loop
itself decides when to stop; an observer only watches and writes."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from training import distributed as dist_utils


@dataclass
class StepDone:
    """What one optimizer step leaves for the observers. ``step`` and ``batch`` are the 0-based indices of the step
    and of its batch in the epoch (the counters before it was taken)."""
    epoch: int
    batch: int
    step: int
    batches_per_epoch: int
    keys: torch.Tensor
    metrics: dict                   # the step's scalars, the learning rate included
    data_time: float                # seconds waiting for the batch
    step_time: float                # seconds of the step itself
    samples: int                    # pairs of the global batch


class Observer:
    def step_done(self, s: StepDone) -> None:
        pass

    def epoch_done(self, epoch: int, step: int) -> None:
        """``epoch`` epochs are complete, after ``step`` optimizer steps."""

    def close(self) -> None:
        pass


class StepLog(Observer):
    """Every ``every`` steps and at each epoch's last step: the step's scalars, throughput over the steps since the
    last line, the tallies (per-source counts when there are several sets) and the non-finite count."""

    def __init__(self, logger, every: int, state, tallies, several_sources: bool, device: torch.device):
        self.logger, self.every, self.state, self.tallies = logger, every, state, tallies
        self.several_sources, self.device = several_sources, device
        self.window = {"data": 0.0, "step": 0.0, "samples": 0}

    def step_done(self, s: StepDone) -> None:
        w = self.window
        w["data"] += s.data_time
        w["step"] += s.step_time
        w["samples"] += s.samples
        step, batch = s.step + 1, s.batch + 1
        if step % self.every and batch != s.batches_per_epoch:
            return
        elapsed = max(w["data"] + w["step"], 1e-9)
        values = {**s.metrics, "samples_per_s": w["samples"] / elapsed, "data_time_share": w["data"] / elapsed,
                  "skipped_steps": self.state.nonfinite_total, **_memory(self.device)}
        self.window = {"data": 0.0, "step": 0.0, "samples": 0}
        self.logger.scalars(step, values)
        t = self.tallies
        if t.source_counts and self.several_sources:
            self.logger.scalars(step, {f"source_{k}": v for k, v in sorted(t.source_counts.items())}, prefix="data")
        if t.bad_samples:
            self.logger.scalars(step, {f"skipped_{k}": v for k, v in t.bad_samples.items()}, prefix="data")
        scalars = " ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float))
        self.logger.info(f"epoch {s.epoch} step {step} ({batch}/{s.batches_per_epoch}) {scalars}")


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20}


class KeyAudit(Observer):
    """--log-keys: every step's sample keys in keys_rank{R}.jsonl, to check what each rank read (and a resume)."""

    def __init__(self, run_dir: str):
        self.file = open(os.path.join(run_dir, f"keys_rank{dist_utils.rank()}.jsonl"), "a")

    def step_done(self, s: StepDone) -> None:
        self.file.write(json.dumps({"epoch": s.epoch, "batch": s.batch, "step": s.step, "keys": s.keys.tolist()})
                        + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class Checkpoints(Observer):
    """latest.pt every ``save_every`` steps within an epoch and at every epoch end (the resume point); epoch_N.pt
    every ``save_frequency`` epochs and at the last one (eval.sh scores the final epoch)."""

    def __init__(self, checkpointer, save_every: int, save_frequency: int, epochs: int, log):
        self.checkpointer, self.save_every, self.save_frequency, self.epochs = checkpointer, save_every, \
            save_frequency, epochs
        self.log = log

    def step_done(self, s: StepDone) -> None:
        if self.save_every and (s.step + 1) % self.save_every == 0 and s.batch + 1 < s.batches_per_epoch:
            self.checkpointer.save()

    def epoch_done(self, epoch: int, step: int) -> None:
        every = self.save_frequency
        keep = every > 0 and (epoch % every == 0 or epoch == self.epochs)
        self.checkpointer.save(epoch_file=epoch if keep else None)
        self.log(f"epoch {epoch} done; checkpoint {f'epoch_{epoch}.pt' if keep else 'latest.pt'}")


class Validation(Observer):
    """--val-data every --val-frequency epochs, on rank 0 (the others wait): ``validate()`` returns
    {name: metrics} (built by training/main.py from the evaluator)."""

    def __init__(self, validate, every: int, logger):
        self.validate, self.every, self.logger = validate, every, logger

    def epoch_done(self, epoch: int, step: int) -> None:
        if epoch % self.every:
            return
        if dist_utils.is_main():
            for name, metrics in self.validate().items():
                scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
                self.logger.scalars(step, scalars, prefix=f"val_{name}")
                self.logger.info(f"val {name} epoch {epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        dist_utils.barrier()


class Profile(Observer):
    """--profile: torch.profiler over steps WAIT+1 .. WAIT+WARMUP+ACTIVE of rank 0 (the official FastCLIP code's
    schedule by default), a trace for TensorBoard / Perfetto in RUN/traces and the top operators in out.log."""

    def __init__(self, steps: tuple[int, int, int], run_dir: str, logger):
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
        self.prof = torch.profiler.profile(
            activities=activities, profile_memory=True, record_shapes=False, on_trace_ready=on_ready,
            schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1))
        self.prof.start()

    def step_done(self, s: StepDone) -> None:
        self.prof.step()

    def close(self) -> None:
        self.prof.stop()
