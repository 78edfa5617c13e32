"""What one training step optimises, as a function of the model's outputs.

The plain step and the DGA step (training/dga.py) call the same two things:

* :class:`TrainModule` — the trainable modules (the open_clip model and, optionally, the identity head). Its forward
  returns a dict of tensors. Everything with parameters runs inside this forward, so DDP sees every parameter used,
  and DGA can cache the gradient of every output and replay it into a chunk's re-forward.
* :class:`Objective` — loss terms on those outputs: the contrastive loss (fast_clip registry), the ArcFace identity
  loss, feature distillation from a frozen reference model, and coin-flip mixup targets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.seeding import Stream, rng_seed
from training.config import IdConfig


def _token_embedding(clip: nn.Module) -> nn.Embedding:
    # open_clip's CLIP keeps it at the top level; CustomTextCLIP (HF or separate text towers) under .text
    emb = getattr(clip, "token_embedding", None) or getattr(getattr(clip, "text", None), "token_embedding", None)
    if emb is None:
        raise ValueError("text mixup needs a model whose text tower has a token_embedding layer (open_clip CLIP)")
    return emb


class TrainModule(nn.Module):
    """The open_clip model plus the optional identity head; forward returns a dict of float tensors."""

    def __init__(self, clip: nn.Module, id_head: nn.Module | None = None):
        super().__init__()
        self.clip = clip
        self.id_head = id_head

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    def forward(self, images: torch.Tensor, texts: torch.Tensor, text_mix: tuple | None = None) -> dict:
        handle = None
        if text_mix is not None:
            # Coin-flip mixup on the text side: tokens are discrete, so the token embeddings are mixed. The pooled
            # (end-of-text) position stays that of the sample's own caption.
            alpha, partner = text_mix
            emb = _token_embedding(self.clip)
            handle = emb.register_forward_hook(
                lambda m, inp, out: alpha * out + (1.0 - alpha) * F.embedding(partner, m.weight))
        try:
            image_features, text_features, logit_scale = self.clip(images, texts)[:3]
        finally:
            if handle is not None:
                handle.remove()
        out = {"image_features": image_features, "text_features": text_features, "logit_scale": logit_scale}
        if self.id_head is not None:
            out["image_id"] = self.id_head(image_features)  # ArcFace: cosines; linear: logits
            out["text_id"] = self.id_head(text_features)
        return out


@dataclass
class Mix:
    """One step's coin-flip mixup draw: alpha ~ Beta(beta, beta); target 'image' or 'text' by a fair coin."""
    alpha: float
    target: str


def draw_mix(beta: float, seed: int, step: int) -> Mix | None:
    """Seeded by (seed, step) only, so every rank draws the same alpha and coin and a resumed run redraws them."""
    if not beta:
        return None
    rng = np.random.default_rng(rng_seed(Stream.MIXUP, seed, step))
    alpha = float(rng.beta(beta, beta))
    return Mix(alpha=alpha, target="image" if rng.random() < 0.5 else "text")


def mix_inputs(images: torch.Tensor, texts: torch.Tensor, mix: Mix | None):
    """(images, text_mix) for the forward: images mixed with the reversed batch, or the text partner tokens."""
    if mix is None:
        return images, None
    if mix.target == "image":
        return mix.alpha * images + (1.0 - mix.alpha) * images.flip(0), None
    return images, (mix.alpha, texts.flip(0))


class Objective:
    """loss = (1 - w_d) * (contrastive + w_id * id) + w_d * distill, each term a mean over this rank's samples.

    ``__call__(outputs, batch, mix, teacher)`` returns (loss, metrics). ``teacher`` holds the reference model's
    features of the same (unmixed) batch, computed without gradients by :meth:`teacher_features`. ``id_loss`` is
    the run's ``cfg.id`` when it has an identity head (kind ``linear`` is IRRA's classifier: plain cross-entropy
    on logits).
    """

    def __init__(self, loss_fn, id_loss: IdConfig | None = None, teacher: nn.Module | None = None,
                 distill_weight: float = 0.0):
        self.loss_fn = loss_fn
        self.id_loss = id_loss
        self.teacher = teacher
        self.distill_weight = distill_weight

    @property
    def needs_teacher(self) -> bool:
        return self.teacher is not None and self.distill_weight > 0

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor, texts: torch.Tensor, chunks: int = 1) -> dict | None:
        if not self.needs_teacher:
            return None
        img, txt = [], []
        for im, tx in zip(images.chunk(chunks), texts.chunk(chunks)):
            f_img, f_txt = self.teacher(im, tx)[:2]
            img.append(f_img)
            txt.append(f_txt)
        return {"image_features": torch.cat(img), "text_features": torch.cat(txt)}

    def __call__(self, out: dict, batch: dict, mix: Mix | None = None, teacher: dict | None = None):
        kw = {"mix_alpha": mix.alpha} if mix is not None else {}
        # Every term below computes in float32 or wider outside autocast (fast_clip.precision): no casts here.
        if self.loss_fn.cfg.id_positives:
            kw["pids"] = batch["pids"]
        loss, metrics = self.loss_fn(out["image_features"], out["text_features"], out["logit_scale"], batch["keys"],
                                     **kw)
        metrics = dict(metrics)
        if self.id_loss is not None:
            from fast_clip.id_head import id_loss_from_cos, linear_id_loss
            c = self.id_loss
            if c.kind == "linear":
                id_term, id_metrics = linear_id_loss(out["image_id"], out["text_id"], batch["pids"])
            else:
                id_term, id_metrics = id_loss_from_cos(out["image_id"], out["text_id"], batch["pids"],
                                                       c.arcface_scale, c.arcface_margin)
            loss = loss + c.weight * id_term
            metrics.update(id_metrics, id_loss=float(id_term.detach()))
        if teacher is not None:
            from fast_clip.distill import combine, feature_distill_loss
            d, _ = feature_distill_loss(out["image_features"], out["text_features"], teacher["image_features"],
                                        teacher["text_features"])
            metrics["distill_loss"] = float(d.detach())
            loss = combine(loss, d, self.distill_weight)
        return loss, metrics
