"""Distillation from a frozen reference (teacher) CLIP model, and initialising the student from it.

Public API (the contract with the trainer)::

    feature_distill_loss(student_img, student_txt, teacher_img, teacher_txt) -> (loss, metrics)
    combine(main_loss, distill_loss, weight) -> (1 - w) * main + w * distill
    init_from_ref(student, teacher) -> {"copied": [...], "shape_mismatch": [...], "missing_in_teacher": [...]}

The formulas and the flags are in docs/LOSSES.md, section 12.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from fast_clip.precision import compute_dtype, no_autocast

__all__ = ["feature_distill_loss", "combine", "init_from_ref"]


def _check_pair(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if teacher.requires_grad:
        # A teacher graph would both waste memory and, if the teacher shares no parameters, silently train nothing;
        # if it does share them (e.g. the same module), it would pull the teacher towards the student.
        raise ValueError(f"teacher {name} features require grad: compute them under torch.no_grad() (or .detach() "
                         f"them); the reference model is frozen")
    if student.ndim != 2 or teacher.ndim != 2:
        raise ValueError(f"{name} features must be [N, dim], got student {tuple(student.shape)}, teacher "
                         f"{tuple(teacher.shape)}")
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"{name} embedding size differs: student dim {student.shape[1]} vs teacher dim {teacher.shape[1]}. "
            f"Feature distillation compares embeddings directly: use a reference model (--ref-model) with the same "
            f"embedding size (embed_dim) as --model.")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{name} batch sizes differ: student {student.shape[0]} vs teacher {teacher.shape[0]}; the "
                         f"teacher must encode the same batch")


def feature_distill_loss(student_img: torch.Tensor, student_txt: torch.Tensor, teacher_img: torch.Tensor,
                         teacher_txt: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """mean_i ( ||t_img_i - s_img_i||^2 + ||t_txt_i - s_txt_i||^2 ), features as given (the caller normalises them).

    Gradient w.r.t. the student features: 2 (s - t) / N. Metrics (floats): distill_img, distill_txt, the two batch
    means of the squared distances (their sum is the loss).
    """
    _check_pair("image", student_img, teacher_img)
    _check_pair("text", student_txt, teacher_txt)
    if student_img.shape[0] != student_txt.shape[0]:
        raise ValueError(f"image and text batch sizes differ: {student_img.shape[0]} vs {student_txt.shape[0]}")
    with no_autocast(student_img.device):
        dt = compute_dtype(student_img, student_txt)
        d_img = (teacher_img.to(dt) - student_img.to(dt)).pow(2).sum(dim=1).mean()
        d_txt = (teacher_txt.to(dt) - student_txt.to(dt)).pow(2).sum(dim=1).mean()
        loss = d_img + d_txt
    return loss, {"distill_img": d_img.item(), "distill_txt": d_txt.item()}


def combine(main_loss: torch.Tensor, distill_loss: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - w) * main + w * distill, w in [0, 1].

    The endpoints return the one loss untouched, so w = 0 is bit-identical to training without distillation (and a
    non-finite distill value cannot leak in through 0 * inf = nan).
    """
    w = float(weight)
    if not (0.0 <= w <= 1.0) or math.isnan(w):
        raise ValueError(f"--distill-weight must be in [0, 1], got {weight}")
    if w == 0.0:
        return main_loss
    if w == 1.0:
        return distill_loss
    return (1.0 - w) * main_loss + w * distill_loss


@torch.no_grad()
def init_from_ref(student: nn.Module, teacher: nn.Module) -> dict[str, list]:
    """Copy every parameter and buffer of ``teacher`` whose name and shape match into ``student``.

    The copy goes into the student's existing tensors (``copy_``, which also casts dtype and moves device), so an
    optimizer, DDP or EMA built before the call still references the student's parameters. Returns the report:

        copied:             [name, ...]                                  (student order: parameters, then buffers)
        shape_mismatch:     [(name, student_shape, teacher_shape), ...]   left untouched
        missing_in_teacher: [name, ...]                                  left untouched
    """
    src = dict(teacher.named_parameters())
    src.update(teacher.named_buffers())
    report: dict[str, list] = {"copied": [], "shape_mismatch": [], "missing_in_teacher": []}
    targets = list(student.named_parameters()) + list(student.named_buffers())
    for name, dst in targets:
        t = src.get(name)
        if t is None:
            report["missing_in_teacher"].append(name)
        elif t.shape != dst.shape:
            report["shape_mismatch"].append((name, tuple(dst.shape), tuple(t.shape)))
        else:
            dst.copy_(t)
            report["copied"].append(name)
    return report
