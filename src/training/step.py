"""One optimizer step, read top to bottom: the batch split into micro-batches and taken forward and backward (DGA,
training/dga.py), the loss on the model's outputs (training/objective.py), then the optimizer step. The loss math
lives in fast_clip; the epoch loop that calls this is the Trainer's (training/trainer.py)."""
from __future__ import annotations

import math

import torch

from training.dga import forward_backward

# open_clip clamps the learned logit scale at ln(100) (temperature >= 0.01) to keep the softmax stable.
MAX_LOGIT_SCALE = math.log(100.0)


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
    """Forward, loss, backward (in ``accum_chunks`` DGA micro-batches), optimizer step. Returns scalars; ``skipped``
    is True when the loss or the gradient was not finite (then no parameter changes). Gradients are all-reduced by
    DDP, so every rank takes the same decision."""
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
