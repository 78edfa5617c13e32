"""Identity (person-id) classification losses with one head shared by both modalities: sub-center ArcFace, or IRRA's
plain linear classifier (``LinearIdHead`` + ``linear_id_loss``).

Public API (the contract with the trainer)::

    head = ArcFaceHead(num_ids, dim, subcenters=1)       # head(features) -> cos [N, num_ids]
    arcface_logits(cos, labels, scale, margin) -> logits  # s * cos, with the target entry replaced by s * cos(theta_y + m)
    arcface_loss(cos, labels, scale, margin) -> scalar    # mean cross-entropy of those logits
    id_loss(head, image_features, text_features, labels, scale, margin) -> (loss, metrics)
    count_ids(labels) -> int                              # max label + 1 (labels are global ids in [0, num_ids))
    check_labels(labels, num_ids)                         # ValueError when a label is outside [0, num_ids)

ArcFace: Deng et al., CVPR 2019; sub-centers: Deng et al., ECCV 2020. The shared head follows IRRA's ID loss (one
classifier applied to image and text features), so both modalities are pulled towards the same id prototypes. The
formulas and the flags are in docs/LOSSES.md, section 11.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fast_clip.precision import compute_dtype as _compute_dtype
from fast_clip.precision import no_autocast as _no_autocast

__all__ = ["ArcFaceHead", "LinearIdHead", "linear_id_loss", "arcface_logits", "arcface_loss", "id_loss", "id_loss_from_cos", "count_ids", "check_labels"]

# sin(theta) = sqrt(1 - c^2) has an infinite derivative at c = +-1; cos is clamped to [-1+eps, 1-eps] inside the sqrt.
COS_EPS = 1e-6


# ------------------------------------------------------------------------------------------------------- labels
def count_ids(labels: torch.Tensor) -> int:
    """Number of ids implied by global person ids in [0, num_ids): max label + 1. Negative labels are an error."""
    if labels.numel() == 0:
        raise ValueError("count_ids: labels is empty")
    _check_integer(labels)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(f"person id labels must be >= 0 (global ids in [0, num_ids)), got a label {lo}")
    return hi + 1


def check_labels(labels: torch.Tensor, num_ids: int) -> None:
    """Raise ValueError unless every label is an integer id in [0, num_ids).

    Without this an out-of-range id would either index past the classifier (a device-side assert on CUDA, which kills
    the process with an unhelpful message) or, for negative ids, silently pick a wrong row.
    """
    _check_integer(labels)
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())  # one host sync per step: negligible next to a training step
    if lo < 0 or hi >= num_ids:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"person id label {bad} is out of range [0, {num_ids}): labels must be global person ids and the ID head "
            f"must have num_ids >= max label + 1 (= {hi + 1} in this batch). Check that the manifest's person ids are "
            f"remapped to 0..num_ids-1 and that the head was built with the number of ids of the training set.")


def _check_integer(labels: torch.Tensor) -> None:
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"person id labels must be an integer tensor, got dtype {labels.dtype}")


# --------------------------------------------------------------------------------------------------------- head
class ArcFaceHead(nn.Module):
    """Cosine classifier with K sub-centers per id: forward(features) -> cos of shape [N, num_ids].

    weight has shape [num_ids * subcenters, dim], id-major: rows i*K .. i*K+K-1 are the K sub-centers of id i. The
    cosine of a sample to an id is the max over its sub-centers, so noisy or multi-modal ids (e.g. front/back views of
    a person) can occupy several prototypes without pulling one prototype to their mean (sub-center ArcFace).
    """

    def __init__(self, num_ids: int, dim: int, subcenters: int = 1):
        super().__init__()
        if num_ids < 1 or dim < 1 or subcenters < 1:
            raise ValueError(f"ArcFaceHead needs num_ids, dim, subcenters >= 1, got {num_ids}, {dim}, {subcenters}")
        self.num_ids, self.dim, self.subcenters = num_ids, dim, subcenters
        self.weight = nn.Parameter(torch.empty(num_ids * subcenters, dim))
        # Only the direction of each row matters (rows are normalised in forward); xavier keeps the scale sane for
        # optimisers with weight decay.
        nn.init.xavier_normal_(self.weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"ArcFaceHead expects features of shape [N, {self.dim}], got {tuple(features.shape)}")
        with _no_autocast(features.device):
            dt = _compute_dtype(features, self.weight)
            f = F.normalize(features.to(dt), dim=-1)
            w = F.normalize(self.weight.to(dt), dim=-1)
            cos = f @ w.t()                                              # [N, num_ids*K]
            if self.subcenters == 1:
                return cos
            return cos.view(-1, self.num_ids, self.subcenters).amax(dim=-1)

    def extra_repr(self) -> str:
        return f"num_ids={self.num_ids}, dim={self.dim}, subcenters={self.subcenters}"


class LinearIdHead(nn.Module):
    """IRRA's identity classifier: a linear layer (with bias) on the features, forward(features) -> logits
    [N, num_ids]; weights N(0, 0.001), bias 0 as there. Trained with plain cross-entropy (:func:`linear_id_loss`)."""

    def __init__(self, num_ids: int, dim: int):
        super().__init__()
        if num_ids < 1 or dim < 1:
            raise ValueError(f"LinearIdHead needs num_ids, dim >= 1, got {num_ids}, {dim}")
        self.num_ids, self.dim = num_ids, dim
        self.fc = nn.Linear(dim, num_ids)
        nn.init.normal_(self.fc.weight, std=0.001)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"LinearIdHead expects features of shape [N, {self.dim}], got {tuple(features.shape)}")
        with _no_autocast(features.device):
            dt = _compute_dtype(features, self.fc.weight)
            return F.linear(features.to(dt), self.fc.weight.to(dt), self.fc.bias.to(dt))


def linear_id_loss(logits_img: torch.Tensor, logits_txt: torch.Tensor,
                   labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """½ (CE(image logits) + CE(text logits)) of the shared linear head (IRRA's ID loss), with the metrics of
    :func:`id_loss_from_cos`."""
    check_labels(labels, logits_img.shape[1])
    lab = labels.to(logits_img.device).long()
    loss_img = F.cross_entropy(logits_img, lab)
    loss_txt = F.cross_entropy(logits_txt, lab)
    return 0.5 * (loss_img + loss_txt), _id_metrics(loss_img, loss_txt, logits_img, logits_txt, lab)


def _id_metrics(loss_img, loss_txt, out_img, out_txt, lab) -> dict[str, float]:
    with torch.no_grad():
        return {"id_loss_img": loss_img.item(), "id_loss_txt": loss_txt.item(),
                "id_acc_img": (out_img.argmax(dim=1) == lab).float().mean().item(),
                "id_acc_txt": (out_txt.argmax(dim=1) == lab).float().mean().item()}


# ------------------------------------------------------------------------------------------------------- logits
def arcface_logits(cos: torch.Tensor, labels: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """s * cos with the target entry of each row replaced by s * cos(theta_y + m), theta_y = acos(cos_y).

    cos(theta + m) is evaluated as c*cos(m) - sqrt(1 - c^2)*sin(m) (the same value as cos(acos(c) + m), without the
    acos). c is clamped to [-1+eps, 1-eps] only inside the sqrt, so the gradient stays finite at c = +-1 while the
    c*cos(m) term keeps its gradient.

    theta + m > pi: cos(theta + m) would increase again with theta, i.e. the margin would *reward* a sample for being
    further from its id. We use the InsightFace rule ("easy_margin=False"): where cos_y <= cos(pi - m) (theta_y >= pi
    - m) the target logit is cos_y - m*sin(m) (= cos_y - sin(pi - m)*m), a linear fallback that is monotonic in cos_y and
    still subtracts a penalty. It is not continuous at the switch (a jump of 1 - cos(m) - m*sin(m), about -0.12 at
    m = 0.5); this only concerns samples almost opposite to their id, and matches the reference implementations.

    margin == 0 gives exactly s * cos (c*1 - sqrt(.)*0 = c bit for bit). Negative margins are rejected.
    """
    if cos.ndim != 2:
        raise ValueError(f"cos must have shape [N, num_ids], got {tuple(cos.shape)}")
    if labels.shape != (cos.shape[0],):
        raise ValueError(f"labels must have shape [{cos.shape[0]}], got {tuple(labels.shape)}")
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"arcface margin must be a finite number >= 0, got {margin}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"arcface scale must be a finite number > 0, got {scale}")
    check_labels(labels, cos.shape[1])
    with _no_autocast(cos.device):
        cos = cos.to(_compute_dtype(cos))
        labels = labels.long()
        c_y = cos.gather(1, labels[:, None]).squeeze(1)
        target = _cos_theta_plus_m(c_y, margin)
        # Write the target entries with a one-hot blend rather than in place, so autograd sees a pure function.
        onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        logits = cos + onehot * (target - c_y)[:, None]
        return logits * scale


def _cos_theta_plus_m(c: torch.Tensor, margin: float) -> torch.Tensor:
    """cos(acos(c) + m) for theta + m <= pi, the InsightFace fallback c - m*sin(m) beyond (see arcface_logits)."""
    cos_m, sin_m = math.cos(margin), math.sin(margin)
    sin_theta = torch.sqrt(1.0 - c.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS) ** 2)
    phi = c * cos_m - sin_theta * sin_m
    threshold = math.cos(math.pi - margin)
    return torch.where(c > threshold, phi, c - math.sin(math.pi - margin) * margin)


def arcface_loss(cos: torch.Tensor, labels: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
    """Mean over the batch of the cross-entropy of arcface_logits (a float32/float64 scalar)."""
    logits = arcface_logits(cos, labels, scale, margin)
    return F.cross_entropy(logits, labels.long(), reduction="mean")


# --------------------------------------------------------------------------------------------------- id loss
def id_loss(head: ArcFaceHead, image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
            scale: float, margin: float) -> tuple[torch.Tensor, dict[str, float]]:
    """½ (ArcFace(image) + ArcFace(text)) with one head shared by both modalities (IRRA's ID loss).

    Returns the loss and float metrics: id_loss_img, id_loss_txt, id_acc_img, id_acc_txt (accuracy = argmax of the
    plain cosine == label, i.e. without the margin, which is what retrieval-time features would give).
    """
    if image_features.shape[0] != text_features.shape[0] or image_features.shape[0] != labels.shape[0]:
        raise ValueError(f"id_loss: batch sizes differ: image {image_features.shape[0]}, text "
                         f"{text_features.shape[0]}, labels {labels.shape[0]}")
    return id_loss_from_cos(head(image_features), head(text_features), labels, scale, margin)


def id_loss_from_cos(cos_img: torch.Tensor, cos_txt: torch.Tensor, labels: torch.Tensor, scale: float,
                     margin: float) -> tuple[torch.Tensor, dict[str, float]]:
    """:func:`id_loss` from the head's cosines (the trainer computes them inside the model's forward, for DDP)."""
    loss_img = arcface_loss(cos_img, labels, scale, margin)
    loss_txt = arcface_loss(cos_txt, labels, scale, margin)
    loss = 0.5 * (loss_img + loss_txt)
    return loss, _id_metrics(loss_img, loss_txt, cos_img, cos_txt, labels.to(cos_img.device).long())
