"""The two rule sets of the FastCLIP family (--fastclip_rules; docs/LOSSES.md §4b has the table): every place where the
official FastCLIP code and the exact gradients of the papers differ is one question asked of a rules object, so that
the loss reads the same under both and each rule set reads in one class."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch

from fast_clip.losses.config import TAU_GRAD_CLAMP, U_RESET_BELOW, U_RESET_BELOW_OFFICIAL, LossConfig
from fast_clip.losses.kernels import scale_grad


class Rules(ABC):
    """What the official and the exact rules answer differently."""

    name: str
    # Per-pair temperatures: exponents shifted by each pair's running maximum (the bound tables), u stored in units
    # of exp(-bound), so that no exponential overflows.
    shifts_exponents: bool
    # RGCL's feature gradient weights anchor i by its own tau_i (the gradient of Phi), or by 1 only.
    weights_by_pair_tau: bool
    # The per-pair temperature gradient is clamped to +-this before its Adam step (None: not clamped).
    tau_grad_clamp: Optional[float]

    @abstractmethod
    def local_tau(self, tau: torch.Tensor) -> torch.Tensor:
        """The live global temperature as the local-anchor half of the surrogate holds it."""

    @abstractmethod
    def log_u(self, u: torch.Tensor, eps: float) -> torch.Tensor:
        """log u in v3's temperature term (the FCCO estimate of F)."""

    @abstractmethod
    def occurrence(self, keys: torch.Tensor) -> torch.Tensor:
        """Positions of the occurrence of each distinct key whose update the tables keep when a global batch
        repeats a key."""

    @abstractmethod
    def update_estimator(self, old: torch.Tensor, g: torch.Tensor, gamma: float,
                         rescale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """u_new = (1-gamma) u_old + gamma g entry by entry, with the rule set's reset; ``rescale`` (shifted
        exponents) moves u_old from its old bound's units to the new one's first."""

    @abstractmethod
    def estimator_in_use(self, new: torch.Tensor, table: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The u each entry of the global batch uses, once ``table`` holds the kept occurrences' ``new``."""

    @abstractmethod
    def tau_adam_schedule(self, cfg: LossConfig, epoch: int, visits: torch.Tensor, dtype: torch.dtype):
        """(betas, bias-correction step) of the per-pair temperatures' Adam, for pairs visited ``visits`` times."""

    @abstractmethod
    def const_lr_tau(self, lr_tau: float, given: bool) -> Optional[float]:
        """lr of the global temperature under ``--lr_tau_scheduler const`` (None: the main schedule); ``given``:
        --lr_tau was set (else lr_tau is the base --lr)."""

    @abstractmethod
    def tau_lr_dropped(self, below: bool, latch: torch.Tensor) -> bool:
        """step_thresh: whether lr_tau is divided now, ``below``: tau <= TAU_THRESH at this step; ``latch``: the
        loss's saved tau_lr_dropped buffer."""


def _occurrence(keys: torch.Tensor, reduce: str, fill: int) -> torch.Tensor:
    uniq, inv = torch.unique(keys, return_inverse=True)
    pos = torch.arange(keys.numel(), device=keys.device)
    start = torch.full((uniq.numel(),), fill, dtype=pos.dtype, device=keys.device)
    return start.scatter_reduce(0, inv, pos, reduce=reduce)


class OfficialRules(Rules):
    """The update rules of the official FastCLIP code (Optimization-AI/fast_clip), for which its published
    hyper-parameters were tuned."""

    name = "official"
    shifts_exponents = True
    weights_by_pair_tau = False
    tau_grad_clamp = TAU_GRAD_CLAMP

    def local_tau(self, tau):
        # The official surrogate holds the live temperature in both of its halves (local and remote anchors, each of
        # which estimates the whole sum), so its tau-gradient through g is twice the exact one; ours holds it in the
        # local half only: double that half's tau-gradient (values unchanged).
        return scale_grad(tau, 2.0) if tau.requires_grad else tau

    def log_u(self, u, eps):
        return torch.log(u)  # no eps

    def occurrence(self, keys):
        return _occurrence(keys, "amax", -1)  # the last one: the official scatter keeps the last write

    def update_estimator(self, old, g, gamma, rescale=None):
        # reset to g where u is non-finite or < 1e-35, only while gamma < 1 (gamma = 1 is g itself)
        if gamma >= 1.0:
            return g.clone()
        bad = ~torch.isfinite(old) | (old < U_RESET_BELOW_OFFICIAL)
        kept = old if rescale is None else old * rescale
        return torch.where(bad, g, (1.0 - gamma) * kept + gamma * g)

    def estimator_in_use(self, new, table, keys):
        return new  # every occurrence its own new u

    def tau_adam_schedule(self, cfg, epoch, visits, dtype):
        # betas (0, 0) in epoch 0, bias correction with the epoch
        return ((0.0, 0.0) if epoch == 0 else (cfg.tau_beta1, cfg.tau_beta2)), epoch + 1

    def const_lr_tau(self, lr_tau, given):
        return lr_tau

    def tau_lr_dropped(self, below, latch):
        return below  # decided at every step: lr_tau goes back up when tau rises again


class ExactRules(Rules):
    """The exact gradients of the objectives as the papers write them."""

    name = "exact"
    shifts_exponents = False  # exp(X) as is: fp32 overflows when a margin exceeds 88 tau
    weights_by_pair_tau = True
    tau_grad_clamp = None

    def local_tau(self, tau):
        return tau

    def log_u(self, u, eps):
        return torch.log(u + eps)

    def occurrence(self, keys):
        return _occurrence(keys, "amin", keys.numel())  # the first one

    def update_estimator(self, old, g, gamma, rescale=None):
        # reset to g where u is non-finite or <= 1e-30 (never initialised, or underflowed), whatever gamma
        bad = ~torch.isfinite(old) | (old <= U_RESET_BELOW)
        return torch.where(bad, g, (1.0 - gamma) * old + gamma * g)

    def estimator_in_use(self, new, table, keys):
        return table[keys]  # the kept (first) occurrence's u, for every occurrence of the key

    def tau_adam_schedule(self, cfg, epoch, visits, dtype):
        # the configured betas from the first visit, bias correction with the pair's own visit count
        return (cfg.tau_beta1, cfg.tau_beta2), (visits + 1).to(dtype)

    def const_lr_tau(self, lr_tau, given):
        return lr_tau if given else None

    def tau_lr_dropped(self, below, latch):
        if below:  # latched from the first step with tau <= TAU_THRESH (saved in checkpoints)
            latch.fill_(True)
        return bool(latch)


# By --fastclip_rules name (config.FASTCLIP_RULES).
RULES: dict[str, Rules] = {"official": OfficialRules(), "exact": ExactRules()}
