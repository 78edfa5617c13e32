"""One optimizer step and one epoch. The math of the losses lives in fast_clip; this file only orchestrates."""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from training import distributed as dist_utils
from training.dga import forward_backward
from training.objective import draw_mix
from training.optim import lr_at, set_lr
from common.seeding import Stream, rng_seed

# open_clip clamps the learned logit scale at ln(100) (temperature >= 0.01) to keep the softmax stable.
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass
class TrainState:
    epoch: int = 0            # epoch in progress (0-based)
    batch_in_epoch: int = 0   # batches of that epoch already consumed
    global_step: int = 0      # optimizer steps taken (skipped non-finite steps count too: the data moved on)
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0
    bad_samples: Counter = field(default_factory=Counter)
    source_counts: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "global_step": self.global_step,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "nonfinite_total": self.nonfinite_total,
                "bad_samples": dict(self.bad_samples), "source_counts": {str(k): v for k, v in self.source_counts.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        return cls(epoch=d["epoch"], batch_in_epoch=d["batch_in_epoch"], global_step=d["global_step"],
                   nonfinite_in_a_row=d.get("nonfinite_in_a_row", 0), nonfinite_total=d.get("nonfinite_total", 0),
                   bad_samples=Counter(d.get("bad_samples", {})),
                   source_counts=Counter({int(k): v for k, v in d.get("source_counts", {}).items()}))


@dataclass
class LoopConfig:
    """What the epoch loop reads; the trainer builds it from the run's OptimConfig / RunConfig and the stream."""
    batches_per_epoch: int
    total_steps: int                # of the whole run: --max-steps stops early without changing any schedule
    lr: float
    warmup: int
    lr_scheduler: str
    lr_min: float
    seed: int
    precision: str
    grad_clip_norm: float | None
    log_every: int
    save_every: int
    max_steps: int | None
    max_nonfinite_steps: int
    accum_chunks: int = 1
    mixup_beta: float = 0.0
    device_augment: object = None   # a DeviceAugment when the batch is augmented on the accelerator


def gather_counts(state: TrainState) -> list[dict]:
    """Every rank's bad-sample and per-source counters (a collective: every rank calls it), as plain dicts with string
    keys: what a checkpoint stores per rank and what summary.json sums."""
    return dist_utils.all_gather_object({"bad": dict(state.bad_samples),
                                         "sources": {str(k): v for k, v in state.source_counts.items()}})


class NonFiniteError(RuntimeError):
    pass


def unwrap(model):
    """The module under DDP / torch.compile wrappers (a TrainModule or an open_clip model)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def train_step(model, objective, optimizer, batch: dict, device: torch.device, precision: str = "fp32",
               grad_clip_norm: float | None = None, accum_chunks: int = 1, mix=None) -> dict:
    """Forward, loss, backward (in ``accum_chunks`` DGA chunks), optimizer step. Returns scalars; ``skipped`` is True
    when the loss or the gradient was not finite (then no parameter changes). Gradients are all-reduced by DDP, so
    every rank takes the same decision."""
    batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    optimizer.zero_grad(set_to_none=True)
    teacher = objective.teacher_features(batch["images"], batch["texts"], accum_chunks)
    loss, metrics = forward_backward(model, objective, batch, device, precision, accum_chunks, mix, teacher)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip_norm if grad_clip_norm else float("inf"))
    loss_value, grad_norm_value = float(loss.detach()), float(grad_norm)
    if not (math.isfinite(loss_value) and math.isfinite(grad_norm_value)):
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss_value, "grad_norm": grad_norm_value, "skipped": True, **metrics}
    optimizer.step()
    scale = unwrap(model).logit_scale
    if scale.requires_grad:
        with torch.no_grad():
            scale.clamp_(0, MAX_LOGIT_SCALE)
    out = {"loss": loss_value, "grad_norm": grad_norm_value, "skipped": False,
           "logit_scale": float(scale.detach().exp()), **metrics}
    if mix is not None:
        out["mix_alpha"] = mix.alpha
    return out


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20}


def train_one_epoch(model, objective, optimizer, loader, state: TrainState, cfg: LoopConfig, hooks) -> bool:
    """Consume the rest of the epoch ``state.epoch``. ``hooks`` provides log(step, values), save(state),
    log_keys(state, keys) and stop_requested(). Returns False when training must stop (max steps, or a stop signal)."""
    device = dist_utils.env().device
    total_steps = cfg.total_steps
    model.train()
    t_data = time.perf_counter()
    window = {"data": 0.0, "step": 0.0, "samples": 0}
    for batch in loader:
        if state.batch_in_epoch >= cfg.batches_per_epoch:
            break
        data_time = time.perf_counter() - t_data
        lr = lr_at(state.global_step, cfg.lr, cfg.warmup, total_steps, cfg.lr_scheduler, cfg.lr_min)
        tau_now = 1.0 / float(unwrap(model).logit_scale.detach().exp())
        set_lr(optimizer, lr, objective.loss_fn.temperature_lr(
            lr, tau_now, step=state.global_step, base_lr=cfg.lr, warmup=cfg.warmup, total_steps=total_steps,
            lr_min=cfg.lr_min))
        # Per-step seeding keeps dropout and any other main-process randomness identical after a resume.
        torch.manual_seed(rng_seed(Stream.STEP, cfg.seed, state.global_step, dist_utils.rank()))
        t0 = time.perf_counter()
        if cfg.device_augment is not None:
            # seeded per (step, rank): a resumed run augments its batches identically
            g = torch.Generator(device=device)
            g.manual_seed(rng_seed(Stream.DEVICE_AUGMENT, cfg.seed, state.global_step, dist_utils.rank()))
            batch = dict(batch, images=cfg.device_augment(batch["images"].to(device, non_blocking=True), g))
        mix = draw_mix(cfg.mixup_beta, cfg.seed, state.global_step)
        out = train_step(model, objective, optimizer, batch, device, cfg.precision, cfg.grad_clip_norm,
                         cfg.accum_chunks, mix)
        step_time = time.perf_counter() - t0
        hooks.step_done()
        hooks.log_keys(state, batch["keys"])
        state.bad_samples.update(batch.get("bad", {}))
        state.source_counts.update(batch["sources"].tolist())
        state.global_step += 1
        state.batch_in_epoch += 1
        if out["skipped"]:
            state.nonfinite_in_a_row += 1
            state.nonfinite_total += 1
            hooks.warn(f"step {state.global_step}: non-finite loss ({out['loss']}) or gradient norm "
                       f"({out['grad_norm']}); step skipped ({state.nonfinite_in_a_row} in a row)")
            if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                hooks.save(state)
                raise NonFiniteError(
                    f"{state.nonfinite_in_a_row} consecutive non-finite steps (last loss {out['loss']}); stopping. "
                    f"The last good state is in the checkpoint folder; lower --lr or use --grad-clip-norm.")
        else:
            state.nonfinite_in_a_row = 0
        window["data"] += data_time
        window["step"] += step_time
        window["samples"] += batch["images"].shape[0] * dist_utils.world_size()
        if state.global_step % cfg.log_every == 0 or state.batch_in_epoch == cfg.batches_per_epoch:
            elapsed = window["data"] + window["step"]
            hooks.log(state, {**{k: v for k, v in out.items() if k != "skipped"}, "lr": lr,
                              "samples_per_s": window["samples"] / max(elapsed, 1e-9),
                              "data_time_share": window["data"] / max(elapsed, 1e-9),
                              "skipped_steps": state.nonfinite_total, **_memory(device)})
            window = {"data": 0.0, "step": 0.0, "samples": 0}
        if cfg.save_every and state.global_step % cfg.save_every == 0 and state.batch_in_epoch < cfg.batches_per_epoch:
            hooks.save(state)
        if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
            return False
        if hooks.stop_requested():  # SIGTERM/SIGINT: finish the step, then the caller writes latest.pt
            return False
        t_data = time.perf_counter()
    return True
