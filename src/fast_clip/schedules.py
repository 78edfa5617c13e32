"""Learning-rate schedules as pure functions of the step (shared by the trainer's main schedule and the losses'
temperature schedules)."""
from __future__ import annotations

import math


def warmup_cosine(step: int, base_lr: float, warmup: int, total_steps: int, lr_min: float = 0.0) -> float:
    """Linear warm-up to ``base_lr`` over ``warmup`` steps, then cosine to ``lr_min`` at ``total_steps`` (open_clip's
    and FastCLIP's cosine_lr)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return lr_min + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - lr_min)
