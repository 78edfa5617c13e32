"""AdamW parameter groups and the learning-rate schedule (pure functions of the step)."""
from __future__ import annotations

import torch

from fast_clip.schedules import warmup_cosine


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    # Gains, biases, embeddings of scalars and the temperature are not regularised (as in CLIP / open_clip).
    return p.ndim < 2 or "bias" in name or ".ln" in name or name.startswith("ln") or "logit_scale" in name


def build_optimizer(model: torch.nn.Module, lr: float, wd: float, betas=(0.9, 0.98), eps: float = 1e-6,
                    fused: bool | None = None, head_lr_mult: float = 1.0) -> torch.optim.AdamW:
    """Three groups: 'decay', 'no_decay' and 'temperature' (the logit scale, so a loss can give it its own lr); with
    ``head_lr_mult`` != 1 a fourth, 'id_head' (the identity classifier, at that multiple of the lr: a classifier
    trained from scratch next to an encoder, as IRRA's lr factor for its new modules)."""
    decay, no_decay, temperature, head = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if head_lr_mult != 1.0 and name.startswith("id_head."):
            head.append(p)
        elif "logit_scale" in name:
            temperature.append(p)
        elif _no_decay(name, p):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": wd, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": temperature, "weight_decay": 0.0, "name": "temperature"},
        {"params": head, "weight_decay": wd, "name": "id_head", "lr_scale": float(head_lr_mult)},
    ]
    groups = [g for g in groups if g["params"]]
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def lr_at(step: int, base_lr: float, warmup: int, total_steps: int, kind: str = "cosine", lr_min: float = 0.0) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps, then cosine to ``lr_min`` at ``total_steps`` (or
    constant), as open_clip's and FastCLIP's schedulers."""
    if kind == "const":
        return base_lr * (step + 1) / warmup if step < warmup else base_lr
    return warmup_cosine(step, base_lr, warmup, total_steps, lr_min)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, temperature_lr: float | None = None) -> None:
    for g in optimizer.param_groups:
        if g.get("name") == "temperature" and temperature_lr is not None:
            g["lr"] = temperature_lr
        else:
            g["lr"] = lr * g.get("lr_scale", 1.0)
