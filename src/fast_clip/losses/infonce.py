"""The InfoNCE family: open_clip's symmetric mini-batch loss (with gather-with-grad and coin-flip mixup targets), its
multi-positive form (--id-positives) and IRRA's SDM."""
from __future__ import annotations

from typing import Optional

import torch

from common import collectives as dist_utils
from fast_clip.losses.base import ContrastiveLoss
from fast_clip.losses.config import LossConfig
from fast_clip.losses.kernels import blocked_cross_entropy, blocked_identity_loss, same_person_counts
from fast_clip.precision import compute_dtype as _compute_dtype
from fast_clip.precision import no_autocast as _no_autocast

class OpenClipLoss(ContrastiveLoss):
    """Symmetric InfoNCE, open_clip's local loss with gather-with-grad.

    Rank r scores its b rows against the all_gather_with_grad'ed features of all ranks (labels r*b + i). The gather's
    backward sums the gradient over ranks, so after DDP's average the gradient equals that of the single-process
    mean cross-entropy on the global batch (docs/LOSSES.md, section 5).
    """

    def __init__(self, cfg: LossConfig, data_size: Optional[int] = None, device=None, dtype=torch.float32):
        super().__init__(cfg)
        self.learns_model_temperature = cfg.temperature_scheme == "global_learnable"

    def forward(self, image_features, text_features, logit_scale, keys=None, mix_alpha=None, pids=None):
        with _no_autocast(image_features.device):
            return self._forward(image_features, text_features, logit_scale, mix_alpha, pids)

    def _forward(self, image_features, text_features, logit_scale, mix_alpha=None, pids=None):
        if mix_alpha is not None and self.cfg.mixup_refusal():
            raise ValueError(f"--mixup-beta {self.cfg.mixup_refusal()}")
        several = self.cfg.id_positives or self.cfg.loss == "sdm"  # the targets are a distribution per anchor
        dt = _compute_dtype(image_features, text_features)
        e1 = image_features.to(dt)
        e2 = text_features.to(dt)
        b = e1.shape[0]
        tau = self._global_tau(logit_scale, dt, e1.device)
        scale = 1.0 / tau
        all1 = dist_utils.all_gather_with_grad(e1)
        all2 = dist_utils.all_gather_with_grad(e2)
        off = dist_utils.rank() * b
        metrics = {"tau": float(tau.detach()), "gamma": 1.0}
        if not several:
            if mix_alpha is None:
                labels = torch.arange(b, device=e1.device) + off
            else:
                labels = mixup_targets(b, dist_utils.rank(), dist_utils.world_size(), mix_alpha, e1.device, dt)
            # The mixup target matrix is symmetric (the reversal pairs i with b-1-i both ways), so the text-anchor
            # rows use the same targets as the image-anchor rows.
            loss = 0.5 * (blocked_cross_entropy(e1, all2, scale, labels)
                          + blocked_cross_entropy(e2, all1, scale, labels))
            return loss, metrics
        # Several positives per anchor: with --id-positives every column of the anchor's person (its own pair always);
        # without, the own pair only (sdm is then a KL to it). multi-positive: -sum_j t_ij log p_ij with t uniform
        # over the positives (TBPS-CLIP); sdm: KL(p_i || t_i). The same-person relation is symmetric, so the
        # text-anchor rows use the same pids as the image-anchor rows.
        row_pids = col_pids = None
        if self.cfg.id_positives:
            row_pids, col_pids = self._gather_pids(pids, b, e1.device)
            metrics["positives"] = float(same_person_counts(col_pids)[off:off + b].float().mean())
        sdm = self.cfg.loss == "sdm"
        loss = 0.5 * (blocked_identity_loss(e1, all2, scale, off, sdm, row_pids, col_pids)
                      + blocked_identity_loss(e2, all1, scale, off, sdm, row_pids, col_pids))
        return loss, metrics


def mixup_targets(b: int, rank: int, world: int, alpha: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Soft targets of coin-flip mixup for this rank's b rows over the world*b gathered columns.

    Sample i of a rank's batch was mixed with the reversed batch: x'_i = alpha*x_i + (1-alpha)*x_{b-1-i} (images, or
    text token embeddings), so anchor i matches pair i with weight alpha and pair b-1-i with weight 1-alpha. When
    b is odd the middle sample is mixed with itself and keeps weight 1."""
    t = torch.zeros(b, world * b, device=device, dtype=dtype)
    rows = torch.arange(b, device=device)
    off = rank * b
    t[rows, off + rows] += float(alpha)
    t[rows, off + b - 1 - rows] += 1.0 - float(alpha)
    return t
