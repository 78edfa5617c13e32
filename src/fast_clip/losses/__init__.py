"""Contrastive losses: the OpenCLIP mini-batch loss and the FastCLIP family of global contrastive losses (GCL).

Public API (the contract with the trainer)::

    LOSSES                      # name -> class registry
    add_loss_args(parser)       # CLI flags
    LossConfig.from_args(args)  # validated configuration (ValueError names the flag and accepted values)
    build_loss(cfg, data_size, device) -> ContrastiveLoss

Every loss takes THIS rank's L2-normalised features and returns the loss of this rank. Under DDP (which averages
parameter gradients over the K ranks) the averaged gradient equals the gradient of the single-process objective on the
whole global batch B = K*b. The derivation of the GCL surrogate, of its distributed decomposition and of the
temperature gradients is in docs/LOSSES.md; the symbols below follow it.
"""
from __future__ import annotations

from typing import Optional

import torch

from fast_clip.losses.base import ContrastiveLoss
from fast_clip.losses.config import (FASTCLIP_RULES, GAMMA_SCHEDULES, INFONCE_FAMILY, LR_TAU_SCHEDULERS, TEMPERATURE_SCHEMES,
                                     VARIANT_PRESETS, LossConfig, add_loss_args, gamma_at_epoch, state_placement)
from fast_clip.losses.gcl import GCLLoss
from fast_clip.losses.infonce import OpenClipLoss, mixup_targets
from fast_clip.losses.kernels import BLOCK_LOGITS, blocked_cross_entropy, blocked_identity_loss, same_identity

__all__ = [
    "LOSSES", "VARIANT_PRESETS", "TEMPERATURE_SCHEMES", "GAMMA_SCHEDULES", "LR_TAU_SCHEDULERS", "FASTCLIP_RULES",
    "BLOCK_LOGITS", "LossConfig", "ContrastiveLoss", "OpenClipLoss", "GCLLoss", "add_loss_args", "build_loss",
    "blocked_cross_entropy", "blocked_identity_loss", "same_identity", "INFONCE_FAMILY", "gamma_at_epoch", "mixup_targets", "state_placement",
]

# The one registry: every preset name is a loss, computed by InfoNCE or by the GCL family (the preset's settings,
# not a subclass, make the variant).
LOSSES: dict[str, type] = {name: OpenClipLoss if name in INFONCE_FAMILY else GCLLoss for name in VARIANT_PRESETS}


def build_loss(cfg: LossConfig, data_size: Optional[int] = None, device=None,
               dtype: torch.dtype = torch.float32) -> ContrastiveLoss:
    """Instantiate ``cfg.loss``. ``data_size`` (the manifest's pair count) is overridden by ``cfg.data_size``.

    ``dtype`` is the dtype of the estimator / temperature tables (float32; float64 in the exactness tests).
    """
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; valid names: {', '.join(sorted(LOSSES))}")
    cfg.validate()
    cls = LOSSES[cfg.loss]
    # No loss.to(device): the GCL tables are placed by state_placement (accelerator or pinned host), and the scalar
    # buffers (epoch, gamma, step, the lr_tau latch) stay on the host, where reading them costs no device sync.
    if issubclass(cls, GCLLoss):
        n = cfg.data_size if cfg.data_size is not None else data_size
        if n is None:
            raise ValueError(f"loss {cfg.loss!r} needs the number of training pairs (data_size / --data_size)")
        return cls(cfg, int(n), device=device, dtype=dtype)
    return cls(cfg, data_size, device=device, dtype=dtype)
