"""The InfoNCE family: open_clip's symmetric mini-batch loss (with gather-with-grad and coin-flip mixup targets), its
multi-positive form (--id-positives) and IRRA's SDM."""
from __future__ import annotations

from typing import Optional

import torch

from fast_clip import collectives as dist_utils
from fast_clip.losses.base import ContrastiveLoss
from fast_clip.losses.config import LossConfig
from fast_clip.losses.kernels import blocked_cross_entropy, blocked_identity_loss
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

    supports_mixup = True

    def forward(self, image_features, text_features, logit_scale, keys=None, mix_alpha=None, pids=None):
        with _no_autocast(image_features.device):
            if self.cfg.id_positives or self.cfg.loss == "sdm":
                return self._identity_forward(image_features, text_features, logit_scale, mix_alpha, pids)
            return self._forward(image_features, text_features, logit_scale, mix_alpha)

    def _identity_forward(self, image_features, text_features, logit_scale, mix_alpha, pids):
        """Several positives per anchor: with --id-positives every column of the anchor's person (its own pair
        always); without, the own pair only (then ``openclip`` is the plain loss above and ``sdm`` a KL to it).
        multi-positive: -sum_j t_ij log p_ij with t uniform over the positives (TBPS-CLIP); sdm: KL(p_i || t_i)."""
        if mix_alpha is not None:
            raise ValueError("--mixup-beta does not combine with --id-positives or --loss sdm: a mixed sample shows "
                             "two people")
        dt = _compute_dtype(image_features, text_features)
        e1, e2 = image_features.to(dt), text_features.to(dt)
        b = e1.shape[0]
        scale = 1.0 / self._global_tau(logit_scale, dt, e1.device)
        all1 = dist_utils.all_gather_with_grad(e1)
        all2 = dist_utils.all_gather_with_grad(e2)
        row_pids = col_pids = None
        metrics = {}
        if self.cfg.id_positives:
            if pids is None:
                raise ValueError("--id-positives needs the person ids of the batch (pids=...)")
            row_pids = pids.to(device=e1.device, dtype=torch.long).reshape(-1)
            if row_pids.numel() != b:
                raise ValueError(f"pids has {row_pids.numel()} entries for a batch of {b}")
            col_pids = dist_utils.all_gather_no_grad(row_pids)
            with torch.no_grad():  # the mean number of positives per anchor (1 = no other pair of the same person)
                known = row_pids >= 0
                same = (row_pids[:, None] == col_pids[None, :]).sum(1)
                metrics["positives"] = float(torch.where(known, same, torch.ones_like(same)).float().mean())
        sdm = self.cfg.loss == "sdm"
        off = dist_utils.rank() * b
        # the same-person relation is symmetric, so the text-anchor rows use the same pids as the image-anchor rows
        loss = 0.5 * (blocked_identity_loss(e1, all2, scale, off, sdm, row_pids, col_pids)
                      + blocked_identity_loss(e2, all1, scale, off, sdm, row_pids, col_pids))
        return loss, {"tau": float(1.0 / scale.detach()), "gamma": 1.0, **metrics}

    def _forward(self, image_features, text_features, logit_scale, mix_alpha=None):
        dt = _compute_dtype(image_features, text_features)
        e1 = image_features.to(dt)
        e2 = text_features.to(dt)
        b = e1.shape[0]
        tau = self._global_tau(logit_scale, dt, e1.device)
        scale = 1.0 / tau
        all1 = dist_utils.all_gather_with_grad(e1)
        all2 = dist_utils.all_gather_with_grad(e2)
        if mix_alpha is None:
            labels = torch.arange(b, device=e1.device) + dist_utils.rank() * b
        else:
            labels = mixup_targets(b, dist_utils.rank(), dist_utils.world_size(), mix_alpha, e1.device, dt)
        # The mixup target matrix is symmetric (the reversal pairs i with b-1-i both ways), so the text-anchor rows
        # use the same targets as the image-anchor rows.
        loss = 0.5 * (blocked_cross_entropy(e1, all2, scale, labels) + blocked_cross_entropy(e2, all1, scale, labels))
        return loss, {"tau": float(tau.detach()), "gamma": 1.0}


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
