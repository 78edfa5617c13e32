"""What every loss shares: the trainer hooks (epoch, gamma, the temperature's lr) and the global temperature."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from common import collectives as dist_utils
from common.runs import CheckpointError
from fast_clip.losses.config import STEP_THRESH_FACTOR, TAU_THRESH, LossConfig, gamma_at_epoch
from fast_clip.losses.rules import RULES, Rules
from fast_clip.schedules import warmup_cosine

class ContrastiveLoss(nn.Module):
    learns_model_temperature: bool = False
    # Where the official FastCLIP code and the exact gradients differ (rules.py): the GCL family picks its rule set from
    # --fastclip_rules; the InfoNCE family has one form, whose temperature lr follows the exact rules.
    rules: Rules = RULES["exact"]

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("epoch", torch.zeros((), dtype=torch.long))
        self.register_buffer("gamma", torch.ones((), dtype=torch.float64))
        # step_thresh latch: once tau <= TAU_THRESH the temperature lr stays divided by 3 (saved in checkpoints).
        self.register_buffer("tau_lr_dropped", torch.zeros((), dtype=torch.bool))

    # -------------------------------------------------------------- trainer hooks
    def initial_logit_scale(self) -> Optional[float]:
        return math.log(1.0 / self.cfg.temperature)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(int(epoch))
        self.gamma.fill_(gamma_at_epoch(int(epoch), self.cfg.gamma, self.cfg.gamma_schedule,
                                        self.cfg.gamma_decay_epochs))

    def current_gamma(self) -> float:
        return float(self.gamma)

    def temperature_lr(self, lr_now: float, tau: float, step: int = 0, base_lr: Optional[float] = None,
                       warmup: int = 0, total_steps: int = 1, lr_min: float = 0.0) -> Optional[float]:
        """Lr of the param group holding model.logit_scale at optimizer step ``step`` (None = the main schedule's
        ``lr_now``). Only meaningful when ``learns_model_temperature``. ``lr_tau`` stands for --lr_tau, or the base
        --lr (``base_lr``) when it is not set, as in the official code.

        ``const``: lr_tau constant, no warm-up (exact rules without --lr_tau: None, the main schedule).
        ``cosine``: linear warm-up over ``warmup`` steps, then cosine from lr_tau to ``lr_min`` at ``total_steps``.
        ``step_thresh``: lr_tau, divided by 3 while tau <= 0.03: official: decided at every step (it goes back up
        when tau rises again); exact: latched from the first step with tau <= 0.03 (saved in checkpoints).
        """
        if not self.learns_model_temperature:
            return None
        cfg = self.cfg
        base = float(lr_now if base_lr is None else base_lr)
        lr_tau = base if cfg.lr_tau is None else float(cfg.lr_tau)
        if cfg.lr_tau_scheduler == "const":
            return self.rules.const_lr_tau(lr_tau, cfg.lr_tau is not None)
        if cfg.lr_tau_scheduler == "cosine":
            return warmup_cosine(step, lr_tau, warmup, total_steps, lr_min)
        dropped = self.rules.tau_lr_dropped(float(tau) <= TAU_THRESH, self.tau_lr_dropped)
        return lr_tau / STEP_THRESH_FACTOR if dropped else lr_tau

    def _gather_pids(self, pids, b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """--id-positives: this rank's person ids (b,) and those of the global batch (B,), gathered like the keys."""
        if pids is None:
            raise ValueError("--id-positives needs the person ids of the batch (pids=...)")
        local = pids.to(device=device, dtype=torch.long).reshape(-1)
        if local.numel() != b:
            raise ValueError(f"pids has {local.numel()} entries for a batch of {b}")
        return local, dist_utils.all_gather_no_grad(local)

    def _global_tau(self, logit_scale, dtype, device) -> torch.Tensor:
        """tau = 1/logit_scale (live) for global_learnable, the fixed --temperature otherwise."""
        if self.cfg.temperature_scheme == "global_learnable":
            if logit_scale is None:
                raise ValueError("global_learnable temperature needs the model's logit_scale")
            ls = torch.as_tensor(logit_scale, device=device)
            return 1.0 / ls.to(dtype).reshape(())
        return torch.tensor(float(self.cfg.temperature), dtype=dtype, device=device)

    # -------------------------------------------------------------- the checkpoint's record of the settings
    def recorded_settings(self) -> dict:
        """{flag: value} of the settings that give this loss's saved state its meaning; the checkpoint keeps them
        beside the state (:class:`CheckpointedLoss`) and resuming under other values is refused. The loss itself: its
        variant decides which tables exist and what they estimate. (The InfoNCE family keeps only the epoch / gamma
        scalars, recomputed every epoch, and the lr_tau latch of the exact rules it always uses; its record still
        names the loss, so that a resumed run is one loss throughout, as its params.json says.)"""
        return {"--loss": self.cfg.loss}

    def check_settings(self, saved: dict) -> None:
        for flag, mine in self.recorded_settings().items():
            theirs = saved.get(flag, "(not recorded)")
            if theirs != mine:
                raise CheckpointError(f"{flag}: the loss state was written with {flag} {theirs}, this run has "
                                      f"{flag} {mine}; resume with {flag} {theirs}, or start a new --name "
                                      f"(--pretrained takes its weights)")

    def check_unrecorded(self) -> None:
        """After loading a checkpoint written before the record: it resumes under this run's settings. The strict
        load has already checked what its tables show (their names: the loss and scheme; their length:
        --data_size)."""

    def checkpoint_component(self) -> "CheckpointedLoss":
        return CheckpointedLoss(self)

    def extra_repr(self) -> str:
        return f"loss={self.cfg.loss!r}, scheme={self.cfg.temperature_scheme!r}"


class CheckpointedLoss:
    """The loss as a Checkpointer component: its state_dict() plus, under ``settings``, the settings that state
    means something under. The module's own state_dict stays tensors only; the record is checked before a tensor is
    loaded, so a changed setting is named rather than shown by a table's shape or the optimizer's groups."""
    KEY = "settings"

    def __init__(self, loss: ContrastiveLoss):
        self.loss = loss

    def state_dict(self) -> dict:
        return {**self.loss.state_dict(), self.KEY: self.loss.recorded_settings()}

    def load_state_dict(self, saved: dict) -> None:
        saved = dict(saved)
        settings = saved.pop(self.KEY, None)
        if settings is not None:
            self.loss.check_settings(settings)
        self.loss.load_state_dict(saved)
        if settings is None:
            self.loss.check_unrecorded()
