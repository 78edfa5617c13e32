"""Numerics shared by the loss terms (contrastive, identity, distillation): they run outside the trainer's bf16/fp16
autocast and in float32 at least, float64 when an input is float64 (the exactness tests)."""
from __future__ import annotations

import torch


def no_autocast(device: torch.device):
    """Similarities feed exp(./tau) with tau down to 0.01, ArcFace logits are scaled by s ~ 30, and squared distances
    of nearly equal unit vectors cancel: none of them is safe in half precision."""
    return torch.autocast(device_type=device.type, enabled=False)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half-precision inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
