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

import argparse
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fast_clip.precision import compute_dtype as _compute_dtype
from fast_clip.precision import no_autocast as _no_autocast
from fast_clip import collectives as dist_utils

__all__ = [
    "LOSSES",
    "VARIANT_PRESETS",
    "TEMPERATURE_SCHEMES",
    "GAMMA_SCHEDULES",
    "LR_TAU_SCHEDULERS",
    "FASTCLIP_RULES",
    "LossConfig",
    "ContrastiveLoss",
    "OpenClipLoss",
    "GCLLoss",
    "add_loss_args",
    "build_loss",
    "gamma_at_epoch",
    "state_placement",
]

TEMPERATURE_SCHEMES = ("global_constant", "global_learnable", "individual_learnable")
GAMMA_SCHEDULES = ("constant", "cosine")
LR_TAU_SCHEDULERS = ("const", "cosine", "step_thresh")
# How the FastCLIP family updates its temperatures (docs/LOSSES.md, "Differences from the official code"):
#   official  the update rules of the official FastCLIP code (Optimization-AI/fast_clip), so that its published
#             hyper-parameters (rho, lr_tau, gamma, step_thresh) mean here what they mean there;
#   exact     the exact gradients of the objectives as written in the papers (this project's earlier default).
FASTCLIP_RULES = ("official", "exact")
STATE_DEVICES = ("auto", "accelerator", "host")
# --loss_state_device auto keeps the per-pair tables on the accelerator while they take at most this share of its
# total memory (H100 80 GB: 10 GB, i.e. 400M pairs of a global-temperature variant at 8 B/pair), else in pinned host
# memory. The rest of the accelerator is for the model, its optimizer state and the activations.
STATE_AUTO_SHARE = 1 / 8

# Per-pair temperatures are clamped to this range; step_thresh divides lr_tau by 3 while tau <= TAU_THRESH (official:
# decided again every step; exact: latched from the first such step).
TAU_MIN, TAU_MAX = 0.01, 1.0
TAU_THRESH = 0.03
STEP_THRESH_FACTOR = 3.0
# exact: an estimator entry at or below this value (never initialised, or underflowed) is reset to the fresh batch
# value, whatever gamma. official: below U_RESET_BELOW_OFFICIAL (or non-finite), and only while gamma < 1.
U_RESET_BELOW = 1e-30
U_RESET_BELOW_OFFICIAL = 1e-35
# official: the per-pair temperature gradient is clamped to +-this before its Adam step.
TAU_GRAD_CLAMP = 5.0

# Per-variant defaults; any explicit flag overrides them. FastCLIP's CC3M recipes (the smallest data scale of the
# paper, the closest to person-retrieval datasets of 10^4-10^5 pairs) are used where the paper gives a value.
_COMMON = dict(
    gamma=0.2, gamma_schedule="cosine", gamma_decay_epochs=None, temperature=0.07, lr_tau=None,
    lr_tau_scheduler="const", rho=0.0, multiply_tau=False, fastclip_eps=1e-14, tau_beta1=None, tau_beta2=None,
    tau_adam_eps=None, fastclip_rules="official",
)
VARIANT_PRESETS: dict[str, dict] = {
    # InfoNCE with open_clip's learnable logit scale (main lr schedule, trainer clamps it to ln 100).
    "openclip": dict(_COMMON, temperature_scheme="global_learnable", gamma=1.0, gamma_schedule="constant"),
    # SogCLR: GCL, constant tau, constant gamma.
    "sogclr": dict(_COMMON, temperature_scheme="global_constant", gamma=0.8, gamma_schedule="constant"),
    # iSogCLR: RGCL with individual temperatures, constant gamma.
    "isogclr": dict(_COMMON, temperature_scheme="individual_learnable", gamma=0.8, gamma_schedule="constant",
                    temperature=0.03, lr_tau=0.0133, rho=7.0),
    # FastCLIP-v0: GCL, the model's logit scale learnt through the GCL gradient, cosine gamma; lr_tau = lr on the
    # main cosine schedule (the official defaults: --lr_tau -1, --lr_tau_scheduler cosine).
    "fastclip-v0": dict(_COMMON, temperature_scheme="global_learnable", lr_tau_scheduler="cosine"),
    # FastCLIP-v1: GCL, constant tau, cosine gamma.
    "fastclip-v1": dict(_COMMON, temperature_scheme="global_constant"),
    # FastCLIP-v2: RGCL with individual temperatures, cosine gamma.
    "fastclip-v2": dict(_COMMON, temperature_scheme="individual_learnable", temperature=0.03, lr_tau=0.0133,
                        rho=7.0),
    # FastCLIP-v3: RGCL-g (global learnable tau, loss multiplied by tau, + rho*tau), step_thresh lr_tau.
    "fastclip-v3": dict(_COMMON, temperature_scheme="global_learnable", multiply_tau=True, rho=6.5, lr_tau=2e-4,
                        lr_tau_scheduler="step_thresh"),
}
DEFAULT_GAMMA_DECAY_EPOCHS = 10


def _fmt_choices(choices) -> str:
    return ", ".join(repr(c) for c in choices)


def _infer_fastclip_variant(scheme: Optional[str], multiply_tau: Optional[bool]) -> str:
    """Map FastCLIP's own flags (--fastclip --temperature_scheme ... [--multiply_tau]) to a variant name."""
    scheme = scheme or "global_learnable"  # FastCLIP's default scheme
    if scheme == "global_constant":
        return "fastclip-v1"
    if scheme == "individual_learnable":
        return "fastclip-v2"
    if scheme == "global_learnable":
        return "fastclip-v3" if multiply_tau else "fastclip-v0"
    raise ValueError(f"--temperature_scheme must be one of {_fmt_choices(TEMPERATURE_SCHEMES)}, got {scheme!r}")


@dataclass
class LossConfig:
    loss: str = "openclip"
    temperature_scheme: str = "global_learnable"
    temperature: float = 0.07
    gamma: float = 1.0
    gamma_schedule: str = "constant"
    gamma_decay_epochs: int = DEFAULT_GAMMA_DECAY_EPOCHS
    lr_tau: Optional[float] = None
    lr_tau_scheduler: str = "const"
    rho: float = 0.0
    multiply_tau: bool = False
    fastclip_eps: float = 1e-14
    data_size: Optional[int] = None
    tau_beta1: float = 0.9
    tau_beta2: float = 0.999
    tau_adam_eps: float = 1e-8
    state_device: str = "auto"
    fastclip_rules: str = "official"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_name(cls, loss: str, epochs: Optional[int] = None, **overrides) -> "LossConfig":
        """Preset of ``loss`` with ``overrides`` (None values are ignored) applied, validated."""
        if loss not in VARIANT_PRESETS:
            raise ValueError(f"--loss must be one of {_fmt_choices(sorted(VARIANT_PRESETS))}, got {loss!r}")
        values = dict(VARIANT_PRESETS[loss])
        values.update({k: v for k, v in overrides.items() if v is not None})
        # The per-pair temperatures' Adam: official takes beta2/eps from the model optimizer (from_args passes them;
        # the trainer's defaults 0.98 / 1e-6 otherwise), exact uses textbook Adam's 0.999 / 1e-8.
        official = values.get("fastclip_rules") == "official"
        for name, off_value, exact_value in (("tau_beta1", 0.9, 0.9), ("tau_beta2", 0.98, 0.999),
                                             ("tau_adam_eps", 1e-6, 1e-8)):
            if values.get(name) is None:
                values[name] = off_value if official else exact_value
        if values.get("gamma_decay_epochs") is None:
            values["gamma_decay_epochs"] = max(1, int(epochs) // 2) if epochs else DEFAULT_GAMMA_DECAY_EPOCHS
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown loss option(s): {sorted(unknown)}")
        cfg = cls(loss=loss, **{k: v for k, v in values.items() if k != "loss"})
        cfg.validate()
        return cfg

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LossConfig":
        """Build from parsed flags: the variant's preset, then every flag that was given explicitly (not None)."""
        loss = getattr(args, "loss", None)
        if loss is None:
            if getattr(args, "fastclip", False):
                loss = _infer_fastclip_variant(getattr(args, "temperature_scheme", None),
                                               getattr(args, "multiply_tau", None))
            else:
                loss = "openclip"
        overrides = {f.name: getattr(args, f.name, None) for f in fields(cls) if f.name != "loss"}
        if (overrides.get("fastclip_rules") or VARIANT_PRESETS.get(loss, {}).get("fastclip_rules")) == "official":
            # official: the per-pair temperatures' Adam uses the model optimizer's betas and eps
            for name, opt_name in (("tau_beta1", "beta1"), ("tau_beta2", "beta2"), ("tau_adam_eps", "eps")):
                if overrides.get(name) is None and getattr(args, opt_name, None) is not None:
                    overrides[name] = getattr(args, opt_name)
        return cls.from_name(loss, epochs=getattr(args, "epochs", None), **overrides)

    def to_dict(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(flag, accepted, value):
            raise ValueError(f"--{flag} must be {accepted}, got {value!r}")

        if self.loss not in VARIANT_PRESETS:
            bad("loss", "one of " + _fmt_choices(sorted(VARIANT_PRESETS)), self.loss)
        if self.temperature_scheme not in TEMPERATURE_SCHEMES:
            bad("temperature_scheme", "one of " + _fmt_choices(TEMPERATURE_SCHEMES), self.temperature_scheme)
        if self.gamma_schedule not in GAMMA_SCHEDULES:
            bad("gamma_schedule", "one of " + _fmt_choices(GAMMA_SCHEDULES), self.gamma_schedule)
        if self.state_device not in STATE_DEVICES:
            bad("loss_state_device", "one of " + _fmt_choices(STATE_DEVICES), self.state_device)
        if self.lr_tau_scheduler not in LR_TAU_SCHEDULERS:
            bad("lr_tau_scheduler", "one of " + _fmt_choices(LR_TAU_SCHEDULERS), self.lr_tau_scheduler)
        if self.fastclip_rules not in FASTCLIP_RULES:
            bad("fastclip_rules", "one of " + _fmt_choices(FASTCLIP_RULES), self.fastclip_rules)
        if self.loss == "openclip":
            if self.temperature_scheme == "individual_learnable":
                bad("temperature_scheme", "'global_constant' or 'global_learnable' with --loss openclip",
                    self.temperature_scheme)
            if self.multiply_tau:
                bad("multiply_tau", "off with --loss openclip", self.multiply_tau)
        if not (0.0 < float(self.gamma) <= 1.0):
            bad("gamma", "in (0, 1]", self.gamma)
        if int(self.gamma_decay_epochs) < 1:
            bad("gamma_decay_epochs", "a positive integer", self.gamma_decay_epochs)
        if not (float(self.temperature) > 0.0 and math.isfinite(self.temperature)):
            bad("temperature", "a positive number", self.temperature)
        if self.temperature_scheme == "individual_learnable" and not (TAU_MIN <= self.temperature <= TAU_MAX):
            bad("temperature", f"in [{TAU_MIN}, {TAU_MAX}] for individual_learnable", self.temperature)
        if self.lr_tau is not None and not (float(self.lr_tau) >= 0.0):
            bad("lr_tau", "a non-negative number", self.lr_tau)
        if self.temperature_scheme == "individual_learnable" and self.lr_tau is None:
            bad("lr_tau", "set (a non-negative number) for individual_learnable", self.lr_tau)
        if not (float(self.rho) >= 0.0):
            bad("rho", "a non-negative number", self.rho)
        if not (float(self.fastclip_eps) >= 0.0):
            bad("fastclip_eps", "a non-negative number", self.fastclip_eps)
        if not (float(self.tau_adam_eps) > 0.0):
            bad("tau_adam_eps", "a positive number", self.tau_adam_eps)
        if self.data_size is not None and int(self.data_size) <= 0:
            bad("data_size", "a positive integer", self.data_size)
        for name in ("tau_beta1", "tau_beta2"):
            if not (0.0 <= float(getattr(self, name)) < 1.0):
                bad(name, "in [0, 1)", getattr(self, name))


def add_loss_args(parser: argparse.ArgumentParser) -> None:
    """Add the loss flags (snake_case as in FastCLIP, dashed aliases too). Defaults are None: the variant's preset
    fills whatever was not given (see VARIANT_PRESETS / docs/LOSSES.md)."""
    g = parser.add_argument_group("loss")

    def add(name, **kw):
        names = [f"--{name}"]
        if "_" in name:
            names.append("--" + name.replace("_", "-"))
        g.add_argument(*names, dest=name, **kw)

    add("loss", type=str, default=None, choices=sorted(VARIANT_PRESETS),
        help="Loss variant (default: openclip, or inferred from --fastclip/--temperature_scheme/--multiply_tau).")
    add("fastclip", action="store_true", default=False,
        help="FastCLIP-style selection when --loss is not given: global_constant->v1, individual_learnable->v2, "
             "global_learnable->v0 (v3 with --multiply_tau).")
    add("gamma", type=float, default=None, help="Inner lr of the u estimators (cosine: final value).")
    add("gamma_schedule", type=str, default=None, choices=GAMMA_SCHEDULES)
    add("gamma_decay_epochs", type=int, default=None, help="Cosine decay length (default: half of --epochs).")
    add("temperature_scheme", type=str, default=None, choices=TEMPERATURE_SCHEMES)
    add("temperature", type=float, default=None, help="(Initial) temperature tau0.")
    add("lr_tau", type=float, default=None, help="Temperature learning rate (None: the main lr).")
    add("lr_tau_scheduler", type=str, default=None, choices=LR_TAU_SCHEDULERS)
    add("rho", type=float, default=None, help="rho of the robust losses (RGCL / RGCL-g).")
    add("multiply_tau", action=argparse.BooleanOptionalAction, default=None,
        help="Global learnable tau: optimise tau*GCL + rho*tau (RGCL-g, FastCLIP-v3).")
    add("fastclip_eps", type=float, default=None, help="epsilon in 1/(u+eps).")
    add("data_size", type=int, default=None, help="Number of training pairs (size of the estimator tables).")
    add("tau_beta1", type=float, default=None, help="Adam beta1 of the individual temperatures.")
    add("tau_beta2", type=float, default=None,
        help="Adam beta2 of the individual temperatures (official rules: --beta2 of the model optimizer).")
    add("tau_adam_eps", type=float, default=None,
        help="Adam eps of the individual temperatures (official rules: --eps of the model optimizer).")
    add("fastclip_rules", type=str, default=None, choices=FASTCLIP_RULES,
        help="Temperature and estimator update rules of the FastCLIP family: 'official' (default; those of the "
             "official FastCLIP code, for which its published hyper-parameters were tuned) or 'exact' (the exact "
             "gradients of the objectives as written in the papers). docs/LOSSES.md lists the differences.")
    g.add_argument("--loss_state_device", "--loss-state-device", dest="state_device", default=None,
                   choices=STATE_DEVICES,
                   help="Where the per-pair estimator / temperature tables live: on the accelerator, in pinned host "
                        "memory, or auto (accelerator while they take at most 1/8 of its memory).")


def state_placement(table_bytes: int, device, choice: str = "auto",
                    accelerator_bytes: Optional[int] = None) -> tuple[torch.device, bool]:
    """(device, pinned) for the per-pair tables of a loss computed on ``device``.

    On a CPU run everything is host memory anyway. ``accelerator_bytes`` is the accelerator's total memory (queried
    for CUDA when None; other accelerators keep the tables on the device under auto)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if choice not in STATE_DEVICES:
        raise ValueError(f"--loss_state_device must be one of {_fmt_choices(STATE_DEVICES)}, got {choice!r}")
    if device.type == "cpu" or choice == "accelerator":
        return device, False
    host = torch.device("cpu")
    if choice == "host":
        return host, True
    if accelerator_bytes is None and device.type == "cuda":
        accelerator_bytes = torch.cuda.get_device_properties(device).total_memory
    if accelerator_bytes is None or table_bytes <= STATE_AUTO_SHARE * accelerator_bytes:
        return device, False
    return host, True


def gamma_at_epoch(epoch: int, gamma: float, schedule: str, decay_epochs: int) -> float:
    """gamma = 1 in epoch 0; then ``gamma`` (constant) or cosine from 1 (epoch 0) to ``gamma`` (epoch decay_epochs)."""
    if epoch <= 0:
        return 1.0
    if schedule == "constant":
        return float(gamma)
    if schedule == "cosine":
        e = min(epoch, decay_epochs)
        return float(gamma + (1.0 - gamma) * 0.5 * (1.0 + math.cos(math.pi * e / decay_epochs)))
    raise ValueError(f"--gamma_schedule must be one of {_fmt_choices(GAMMA_SCHEDULES)}, got {schedule!r}")


# ====================================================================================================== base class
class ContrastiveLoss(nn.Module):
    learns_model_temperature: bool = False
    supports_mixup: bool = False  # soft (mixed) targets; only the InfoNCE loss has them

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

    @property
    def official(self) -> bool:
        """The official FastCLIP update rules (GCL family only; InfoNCE has one form)."""
        return self.cfg.fastclip_rules == "official" and self.cfg.loss != "openclip"

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
            if cfg.lr_tau is None and not self.official:
                return None
            return lr_tau
        if cfg.lr_tau_scheduler == "cosine":
            if step < warmup:
                return lr_tau * (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return lr_min + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr_tau - lr_min)
        below = float(tau) <= TAU_THRESH
        if self.official:
            return lr_tau / STEP_THRESH_FACTOR if below else lr_tau
        if below:
            self.tau_lr_dropped.fill_(True)
        return lr_tau / STEP_THRESH_FACTOR if bool(self.tau_lr_dropped) else lr_tau

    def _global_tau(self, logit_scale, dtype, device) -> torch.Tensor:
        """tau = 1/logit_scale (live) for global_learnable, the fixed --temperature otherwise."""
        if self.cfg.temperature_scheme == "global_learnable":
            if logit_scale is None:
                raise ValueError("global_learnable temperature needs the model's logit_scale")
            ls = torch.as_tensor(logit_scale, device=device)
            return 1.0 / ls.to(dtype).reshape(())
        return torch.tensor(float(self.cfg.temperature), dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return f"loss={self.cfg.loss!r}, scheme={self.cfg.temperature_scheme!r}"


# ====================================================================================================== openclip
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

    def forward(self, image_features, text_features, logit_scale, keys=None, mix_alpha=None):
        with _no_autocast(image_features.device):
            return self._forward(image_features, text_features, logit_scale, mix_alpha)

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


# Above this many logits (b x world*b) the InfoNCE rows are processed in blocks, each recomputed in the backward, so
# the loss never holds the whole b x B matrix and its softmax: at b = B = 16384 that is 1 GiB per fp32 matrix, more
# than the activations of a DGA chunk. 2^24 logits = 64 MiB in fp32.
BLOCK_LOGITS = 1 << 24


def _row_blocks(n: int, m: int, max_logits: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most max_logits // m rows (one row at least) covering n rows."""
    rows = max(1, max_logits // max(m, 1))
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def _ce_rows(anchors, others, scale, targets):
    return F.cross_entropy(scale * anchors @ others.t(), targets, reduction="sum")


def blocked_cross_entropy(anchors: torch.Tensor, others: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor,
                          max_logits: int = BLOCK_LOGITS) -> torch.Tensor:
    """mean_i CE(scale * anchors_i . others^T, targets_i), in row blocks of at most ``max_logits`` logits, each under
    activation checkpointing (same value and gradient as the one-matrix form, up to float summation order)."""
    n, m = anchors.shape[0], others.shape[0]
    if n * m <= max_logits or not torch.is_grad_enabled():
        return F.cross_entropy(scale * anchors @ others.t(), targets)
    from torch.utils.checkpoint import checkpoint
    total = anchors.new_zeros(())
    for a, z in _row_blocks(n, m, max_logits):
        total = total + checkpoint(_ce_rows, anchors[a:z], others, scale, targets[a:z], use_reentrant=False)
    return total / n


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


# ====================================================================================================== GCL family
def _exp_rows(anchors, cands, pos, tau, diag_start: Optional[int], shift=None, shift_floor=None):
    """P = exp((anchors @ cands^T - pos) / tau - shift) and X = the exponent without the shift; when ``diag_start`` is
    given, anchor row i's own pair sits in column diag_start + i and its P entry is zeroed (g sums over j != i only).

    ``shift`` (a detached column, per anchor) is the official code's running maximum of X ("bounds"), which keeps the
    per-pair-temperature exponentials finite; their estimators are then stored in units of exp(-shift). With
    ``shift_floor`` (the old bounds) the shift is the new bound, max(old, max_j X_ij), returned third."""
    X = (anchors @ cands.t() - pos) / tau
    if shift_floor is not None:
        shift = _new_shift(X, shift_floor)
    P = torch.exp(X if shift is None else X - shift)
    if diag_start is not None:
        rows = torch.arange(anchors.shape[0], device=P.device)
        P = P.index_put((rows, diag_start + rows), P.new_zeros(()))  # out of place: X and P stay valid for autograd
    return (P, X) if shift_floor is None else (P, X, shift)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by a constant."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _ScaleGrad.apply(x, factor)


def _per_row(t, sl: slice):
    """A temperature is a scalar (global) or a column of per-row values (individual): slice only the latter."""
    return t[sl] if t.dim() > 0 else t


def _new_shift(X, floor):
    """The official running maximum: max(old bound, max_j X_ij) per row, the row's own pair (X = 0) included."""
    return torch.maximum(floor, X.detach().amax(1, keepdim=True))


def _exp_row_stats(anchors, cands, pos, tau, diag_start, max_logits, with_h: bool, shift_floor=None):
    """Row sums of P and (``with_h``) of P*X (see _exp_rows), in row blocks of at most ``max_logits`` entries; with
    ``shift_floor`` (old bounds, a column) P is shifted by each row's new bound, returned third (else None)."""
    g, h, shifts = [], [], []
    for a, z in _row_blocks(anchors.shape[0], cands.shape[0], max_logits):
        sl = slice(a, z)
        out = _exp_rows(anchors[sl], cands, pos[sl], _per_row(tau, sl), None if diag_start is None else diag_start + a,
                        shift_floor=None if shift_floor is None else shift_floor[sl])
        P, X = out[0], out[1]
        if shift_floor is not None:
            shifts.append(out[2])
        g.append(P.sum(1))
        if with_h:
            h.append((P * X).sum(1))
    return torch.cat(g), (torch.cat(h) if with_h else None), (torch.cat(shifts) if shifts else None)


def _weighted_rows(anchors, cands, pos, tau, weights, diag_start, shift=None):
    return (weights * _exp_rows(anchors, cands, pos, tau, diag_start, shift)[0].sum(1)).sum()


def _weighted_exp_sum(anchors, cands, pos, tau, weights, diag_start: Optional[int], max_logits: int, shift=None):
    """sum_i weights_i * sum_j P_ij (P of _exp_rows), differentiable in anchors, cands, pos and a live tau; in row
    blocks under activation checkpointing once the matrix exceeds ``max_logits`` entries, so that the forward keeps
    one block at a time and the backward recomputes it (same value and gradient up to summation order)."""
    n, m = anchors.shape[0], cands.shape[0]
    if n * m <= max_logits or not torch.is_grad_enabled():
        return _weighted_rows(anchors, cands, pos, tau, weights, diag_start, shift)
    from torch.utils.checkpoint import checkpoint
    total = anchors.new_zeros(())
    for a, z in _row_blocks(n, m, max_logits):
        sl = slice(a, z)
        total = total + checkpoint(_weighted_rows, anchors[sl], cands, pos[sl], _per_row(tau, sl), weights[sl],
                                   None if diag_start is None else diag_start + a,
                                   None if shift is None else shift[sl], use_reentrant=False)
    return total


class GCLLoss(ContrastiveLoss):
    """Global contrastive losses optimised with FCCO (SogCLR / iSogCLR / FastCLIP-v0..v3).

    State (registered buffers, one entry per training pair, indexed by the dataset key):
      u1, u2             moving-average estimators of g1 (image anchors) and g2 (text anchors)
      tau1, tau2         individual temperatures (individual_learnable only)
      tau1_m, tau1_v, tau2_m, tau2_v, tau_count   their Adam moments and per-pair step counters
      bound1, bound2     official rules: the running maximum of each pair's exponents (the official "bounds");
                         u1, u2 are then stored in units of exp(-bound) so that no exponential overflows
    plus the epoch / gamma / step scalars. Every rank applies the updates of the whole global batch, so all ranks hold
    identical tables.

    ``block_logits``: above this many b x B entries the exp matrices are built in row blocks (memory O(block x B)
    instead of O(b x B), for very large per-rank batches such as DGA at 16k on one GPU), at the cost of computing
    them three times (statistics, surrogate forward, its recompute in the backward) instead of once.
    """

    block_logits = BLOCK_LOGITS

    def __init__(self, cfg: LossConfig, data_size: int, device=None, dtype: torch.dtype = torch.float32):
        super().__init__(cfg)
        n = int(cfg.data_size if cfg.data_size is not None else data_size)
        if n <= 0:
            raise ValueError(f"--data_size must be a positive integer, got {n}")
        self.data_size = n
        self.scheme = cfg.temperature_scheme
        self.individual = self.scheme == "individual_learnable"
        self.learns_model_temperature = self.scheme == "global_learnable"
        self.state_device, self.state_pinned = state_placement(n * self._bytes_per_pair(self.individual, dtype),
                                                               device, cfg.state_device)

        def table(fill, dt=dtype):
            t = torch.full((n,), fill, dtype=dt, device=self.state_device)
            # Pinned: the B-entry gathers/scatters of each step copy to and from the accelerator without staging.
            return t.pin_memory() if self.state_pinned else t

        self.register_buffer("u1", table(0.0))
        self.register_buffer("u2", table(0.0))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # host scalar: no device sync to count
        if self.individual:
            for name in ("tau1", "tau2"):
                self.register_buffer(name, table(float(cfg.temperature)))
            for name in ("tau1_m", "tau1_v", "tau2_m", "tau2_v", "bound1", "bound2"):
                self.register_buffer(name, table(0.0))
            self.register_buffer("tau_count", table(0, torch.int32))
        # the running-max shift of the official per-pair temperature code (exact rules: exp without a shift)
        self.shifted = self.individual and self.official

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the bound tables existed: all-zero bounds, i.e. unshifted estimators, which is
        # what those tables held.
        if self.individual:
            for name in ("bound1", "bound2"):
                if prefix + "tau1" in state_dict and prefix + name not in state_dict:
                    state_dict[prefix + name] = torch.zeros_like(getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _bytes_per_pair(individual: bool, dtype: torch.dtype) -> int:
        """u1, u2; plus tau1, tau2, their four Adam moments and two bounds in ``dtype`` and an int32 counter
        (individual)."""
        item = torch.empty((), dtype=dtype).element_size()
        return 10 * item + 4 if individual else 2 * item

    def state_bytes_per_pair(self) -> int:
        return self._bytes_per_pair(self.individual, self.u1.dtype)

    def state_bytes(self) -> int:
        return self.data_size * self.state_bytes_per_pair()

    def state_summary(self) -> str:
        """One line for the run log: size and place of the per-pair tables."""
        n = self.state_bytes()
        size = f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.2f} MiB"
        where = "pinned host memory" if self.state_pinned else str(self.state_device)
        return (f"loss state: {self.data_size} pairs x {self.state_bytes_per_pair()} B = {size} on {where} "
                f"(every rank holds the whole table)")

    # -------------------------------------------------------------- helpers
    def _occurrence(self, keys: torch.Tensor) -> torch.Tensor:
        """Positions of the occurrence of each distinct key whose update is written when a global batch repeats a key:
        the last one under the official rules (its scatter keeps the last write), the first one under exact rules."""
        uniq, inv = torch.unique(keys, return_inverse=True)
        pos = torch.arange(keys.numel(), device=keys.device)
        if self.official:
            last = torch.full((uniq.numel(),), -1, dtype=pos.dtype, device=keys.device)
            return last.scatter_reduce(0, inv, pos, reduce="amax")
        first = torch.full((uniq.numel(),), keys.numel(), dtype=pos.dtype, device=keys.device)
        return first.scatter_reduce(0, inv, pos, reduce="amin")

    def _update_estimator(self, table: torch.Tensor, keys: torch.Tensor, pick: torch.Tensor, g: torch.Tensor,
                          gamma: float, rescale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """u[key] <- (1-gamma) u[key] + gamma g for the B entries of the global batch; returns the u each entry uses.

        official: reset to g where the old u is non-finite or < 1e-35, and only while gamma < 1 (gamma = 1 is g
        itself); every entry uses its own new u, and the table keeps the last occurrence's.
        exact: reset where u is non-finite or <= 1e-30, whatever gamma; the table keeps the first occurrence's, which
        every occurrence of the key then uses. ``rescale`` (shifted estimators) multiplies the old u first: it moves
        it from the old bound's units to the new one's."""
        g = g.to(table.dtype)
        old = table[keys]
        if self.official:
            if gamma < 1.0:
                bad = ~torch.isfinite(old) | (old < U_RESET_BELOW_OFFICIAL)
                kept = old if rescale is None else old * rescale.to(table.dtype)
                new = torch.where(bad, g, (1.0 - gamma) * kept + gamma * g)
            else:
                new = g.clone()
            table[keys[pick]] = new[pick]
            return new
        bad = ~torch.isfinite(old) | (old <= U_RESET_BELOW)
        new = torch.where(bad, g, (1.0 - gamma) * old + gamma * g)
        table[keys[pick]] = new[pick]
        return table[keys]

    def _adam_tau(self, keys, pick, grad, which: str) -> None:
        """One Adam step on the per-pair temperatures of the picked occurrences (see _occurrence).

        official: betas (0, 0) in epoch 0, the configured ones from epoch 1 on, bias correction with (epoch + 1).
        exact: the configured betas throughout, bias correction with the pair's own visit count."""
        cfg = self.cfg
        tau, m, v = getattr(self, which), getattr(self, which + "_m"), getattr(self, which + "_v")
        k = keys[pick]
        grad = grad[pick].to(tau.dtype)
        if self.official:
            epoch = int(self.epoch)
            beta1, beta2 = (0.0, 0.0) if epoch == 0 else (cfg.tau_beta1, cfg.tau_beta2)
            m_new = beta1 * m[k] + (1.0 - beta1) * grad
            v_new = beta2 * v[k] + (1.0 - beta2) * grad * grad
            m_hat = m_new / (1.0 - beta1 ** (epoch + 1))
            v_hat = v_new / (1.0 - beta2 ** (epoch + 1))
            tau[k] = (tau[k] - float(cfg.lr_tau) * m_hat / (v_hat.sqrt() + cfg.tau_adam_eps)).clamp(TAU_MIN, TAU_MAX)
            m[k] = m_new
            v[k] = v_new
            return
        t = (self.tau_count[k] + 1).to(tau.dtype)
        m_new = cfg.tau_beta1 * m[k] + (1.0 - cfg.tau_beta1) * grad
        v_new = cfg.tau_beta2 * v[k] + (1.0 - cfg.tau_beta2) * grad * grad
        m_hat = m_new / (1.0 - cfg.tau_beta1 ** t)
        v_hat = v_new / (1.0 - cfg.tau_beta2 ** t)
        tau_new = tau[k] - float(cfg.lr_tau) * m_hat / (v_hat.sqrt() + cfg.tau_adam_eps)
        tau[k] = tau_new.clamp(TAU_MIN, TAU_MAX)
        m[k] = m_new
        v[k] = v_new

    # -------------------------------------------------------------- forward
    def forward(self, image_features, text_features, logit_scale=None, keys=None, mix_alpha=None):
        if mix_alpha is not None:
            raise ValueError(f"--mixup-beta works with --loss openclip only: {self.cfg.loss} keeps one estimator per "
                             f"training pair, and a mixed sample is not one pair")
        with _no_autocast(image_features.device):
            return self._forward(image_features, text_features, logit_scale, keys)

    def _forward(self, image_features, text_features, logit_scale, keys):
        if keys is None:
            raise ValueError(f"loss {self.cfg.loss!r} needs the dataset keys of the batch (keys=...)")
        cfg = self.cfg
        dt = _compute_dtype(image_features, text_features, self.u1)
        dev = image_features.device
        e1 = image_features.to(dt)
        e2 = text_features.to(dt)
        b = e1.shape[0]
        K, r = dist_utils.world_size(), dist_utils.rank()
        B = K * b
        if B < 2:
            raise ValueError("GCL needs a global batch of at least 2 pairs")
        off = r * b
        eps = float(cfg.fastclip_eps)
        gamma = float(self.gamma)

        keys = keys.to(device=dev, dtype=torch.long).reshape(-1)
        if keys.numel() != b:
            raise ValueError(f"keys has {keys.numel()} entries for a batch of {b}")
        keys_all = dist_utils.all_gather_no_grad(keys)
        # One host sync for the check: an out-of-range index would be a fatal device-side assert on CUDA.
        if bool(((keys_all < 0) | (keys_all >= self.data_size)).any()):
            raise ValueError(f"keys must lie in [0, {self.data_size}) (--data_size); got range "
                             f"[{int(keys_all.min())}, {int(keys_all.max())}]")
        E1 = dist_utils.all_gather_no_grad(e1.detach())  # (B, d) no grad
        E2 = dist_utils.all_gather_no_grad(e2.detach())
        # The gathered matrices with THIS rank's block replaced by the live local features.
        E1_live = torch.cat([E1[:off], e1, E1[off + b:]], 0)
        E2_live = torch.cat([E2[:off], e2, E2[off + b:]], 0)

        # ---- temperatures
        if self.individual:
            skeys = keys_all.to(self.tau1.device)
            t1_all = self.tau1[skeys].to(dev, dt)  # copies: the values before this step's update
            t2_all = self.tau2[skeys].to(dev, dt)
            t1_loc, t2_loc = t1_all[off:off + b, None], t2_all[off:off + b, None]
            t1_all_c, t2_all_c = t1_all[:, None], t2_all[:, None]
            tau_live = None
            if self.shifted:  # the old bounds of this rank's pairs (every rank holds the whole table)
                b1_old = self.bound1[skeys].to(dev, dt)
                b2_old = self.bound2[skeys].to(dev, dt)
                floor1, floor2 = b1_old[off:off + b, None], b2_old[off:off + b, None]
        else:
            tau_live = self._global_tau(logit_scale, dt, dev)
            t1_loc = t2_loc = tau_live  # live in the local-anchor terms
            if self.official and tau_live.requires_grad:
                # The official surrogate holds the live temperature in both of its halves (local and remote anchors,
                # each of which estimates the whole sum), so its tau-gradient through g is twice the exact one;
                # ours holds it in the local half only: double that half's tau-gradient (values unchanged).
                t1_loc = t2_loc = _scale_grad(tau_live, 2.0)
            t1_all_c = t2_all_c = tau_live.detach()

        # ---- local anchors against all (gathered) candidates: g1_i, g2_i for i in this rank's block
        pos = (e1 * e2).sum(1, keepdim=True)  # <e1_i, e2_i>, live in both features
        # Above block_logits (b x B) the exp matrices are never held whole: g and h come from a no-grad pass in row
        # blocks, and the surrogate's local part is recomputed block by block under checkpointing (below).
        blocked = b * B > self.block_logits and torch.is_grad_enabled()
        s1 = s2 = None  # new bounds of the local rows (shifted estimators only)
        if blocked:
            with torch.no_grad():
                g1, h1, s1 = _exp_row_stats(e1, E2_live, pos, t1_loc, off, self.block_logits, self.individual,
                                            floor1 if self.shifted else None)
                g2, h2, s2 = _exp_row_stats(e2, E1_live, pos, t2_loc, off, self.block_logits, self.individual,
                                            floor2 if self.shifted else None)
        else:
            # D = <e_i, e'_j> - <e_i, e'_i>; X = D / tau; P = exp(X) with the pair's own column zeroed.
            if self.shifted:
                P1, X1, s1 = _exp_rows(e1, E2_live, pos, t1_loc, off, shift_floor=floor1)  # (b, B), live
                P2, X2, s2 = _exp_rows(e2, E1_live, pos, t2_loc, off, shift_floor=floor2)
            else:
                P1, X1 = _exp_rows(e1, E2_live, pos, t1_loc, off)  # (b, B), live
                P2, X2 = _exp_rows(e2, E1_live, pos, t2_loc, off)
            g1, g2 = P1.sum(1), P2.sum(1)
            # tau * d g/d tau = -mean_{j!=i} exp(X_ij) X_ij  (only the per-pair temperatures need it)
            h1 = (P1 * X1).detach().sum(1) if self.individual else None
            h2 = (P2 * X2).detach().sum(1) if self.individual else None
        g1, g2 = g1 / (B - 1), g2 / (B - 1)

        # ---- estimator update with the whole global batch (identical on every rank)
        with torch.no_grad():
            cols = [g1.detach(), g2.detach()]
            if self.individual:
                cols += [h1 / (B - 1), h2 / (B - 1)]
            if self.shifted:
                cols += [s1[:, 0], s2[:, 0]]
            stats_all = dist_utils.all_gather_no_grad(torch.stack(cols, 1))
            skeys = keys_all.to(self.u1.device)
            pick = self._occurrence(skeys)
            r1 = r2 = None
            if self.shifted:  # u moves from the old bound's units to the new one's; the bound tables take the new
                s1_all, s2_all = stats_all[:, 4], stats_all[:, 5]
                r1, r2 = torch.exp(b1_old - s1_all).to(self.u1.device), torch.exp(b2_old - s2_all).to(self.u1.device)
                self.bound1[skeys[pick]] = s1_all.to(self.bound1.device, self.bound1.dtype)[pick]
                self.bound2[skeys[pick]] = s2_all.to(self.bound2.device, self.bound2.dtype)[pick]
            u1_all = self._update_estimator(self.u1, skeys, pick, stats_all[:, 0].to(self.u1.device), gamma, r1)
            u2_all = self._update_estimator(self.u2, skeys, pick, stats_all[:, 1].to(self.u2.device), gamma, r2)
            u1_all = u1_all.to(dev, dt)
            u2_all = u2_all.to(dev, dt)
            self.step += 1

        # ---- surrogate: coefficient c_i multiplies g_i / (u_i + eps)
        # c = tau_i (individual, RGCL; official rules: 1), tau (detached; multiply_tau, RGCL-g), 1 (GCL); all / (2B).
        if self.individual and not self.official:
            c1_all, c2_all = t1_all, t2_all
        elif cfg.multiply_tau:
            c1_all = c2_all = tau_live.detach().expand(B)
        else:
            c1_all = c2_all = torch.ones(B, dtype=dt, device=dev)
        w1_all = c1_all / (u1_all + eps) / (2 * B)  # detached weights
        w2_all = c2_all / (u2_all + eps) / (2 * B)
        w1_loc, w2_loc = w1_all[off:off + b], w2_all[off:off + b]
        if blocked:
            local_part = (_weighted_exp_sum(e1, E2_live, pos, t1_loc, w1_loc / (B - 1), off, self.block_logits, s1)
                          + _weighted_exp_sum(e2, E1_live, pos, t2_loc, w2_loc / (B - 1), off, self.block_logits, s2))
        else:
            local_part = (w1_loc * g1).sum() + (w2_loc * g2).sum()

        # Remote anchors (all ranks' anchors except this rank's, detached, with their u and tau) against this rank's
        # live candidates: the gradient other ranks' anchors send into our features, computed here instead. One
        # process (K = 1) has no remote anchors.
        remote_part = e1.new_zeros(())
        if K > 1:
            rem = torch.cat([torch.arange(off, device=dev), torch.arange(off + b, B, device=dev)])
            posd = (E1[rem] * E2[rem]).sum(1, keepdim=True)  # detached positives of the remote anchors
            t1r = t1_all_c[rem] if self.individual else t1_all_c
            t2r = t2_all_c[rem] if self.individual else t2_all_c
            # shifted estimators: the remote anchors' new bounds (the official forward's remote_bounds)
            sr1 = stats_all[rem, 4:5].to(dt) if self.shifted else None
            sr2 = stats_all[rem, 5:6].to(dt) if self.shifted else None
            # anchor e1_i (i remote) vs live e2_j (j local), and the text-anchor mirror; (B-b, b) each
            remote_part = (_weighted_exp_sum(E1[rem], e2, posd, t1r, w1_all[rem] / (B - 1), None, self.block_logits, sr1)
                           + _weighted_exp_sum(E2[rem], e1, posd, t2r, w2_all[rem] / (B - 1), None, self.block_logits,
                                               sr2))

        surrogate = K * (local_part + remote_part)

        # ---- temperature terms
        # official: log(u) (no eps) in v3's temperature term
        log_eps = 0.0 if self.official else eps
        log_u1_loc = torch.log(u1_all[off:off + b] + log_eps)
        log_u2_loc = torch.log(u2_all[off:off + b] + log_eps)
        if not self.individual and cfg.multiply_tau:
            # d/dtau of tau*F + rho*tau, the part not already in the surrogate: FCCO estimate of F (mean log u) + rho.
            # Per rank: (1/(2b)) sum_{i in rank} (log u1 + log u2) + rho  -> DDP mean = (1/2B) sum_all (...) + rho.
            surrogate = surrogate + tau_live * (0.5 * (log_u1_loc + log_u2_loc).mean() + float(cfg.rho))

        # ---- per-pair temperature update (individual): grad_i = log(u_i+eps) + rho + tau_i g_i'(tau_i)/(u_i+eps)
        if self.individual:
            with torch.no_grad():
                h1_all, h2_all = stats_all[:, 2].to(dt), stats_all[:, 3].to(dt)
                grad_t1 = torch.log(u1_all + eps) + float(cfg.rho) - h1_all / (u1_all + eps)
                grad_t2 = torch.log(u2_all + eps) + float(cfg.rho) - h2_all / (u2_all + eps)
                if self.shifted:  # log of the plain-units estimator: log(u_shifted + eps) + bound
                    grad_t1 = grad_t1 + stats_all[:, 4].to(dt)
                    grad_t2 = grad_t2 + stats_all[:, 5].to(dt)
                if self.official:  # clamped before the Adam step
                    grad_t1 = grad_t1.clamp(-TAU_GRAD_CLAMP, TAU_GRAD_CLAMP)
                    grad_t2 = grad_t2.clamp(-TAU_GRAD_CLAMP, TAU_GRAD_CLAMP)
                tk = keys_all.to(self.tau1.device)
                tpick = self._occurrence(tk)
                self._adam_tau(tk, tpick, grad_t1.to(self.tau1.device), "tau1")
                self._adam_tau(tk, tpick, grad_t2.to(self.tau2.device), "tau2")
                self.tau_count[tk[tpick]] += 1  # visits (the exact rules' bias correction; kept under both)

        # ---- reported value: this rank's objective estimate (the gradient is the surrogate's)
        with torch.no_grad():
            lg1 = torch.log(g1.detach() + eps)
            lg2 = torch.log(g2.detach() + eps)
            if self.shifted:  # g in plain units
                lg1, lg2 = lg1 + s1[:, 0], lg2 + s2[:, 0]
            if self.individual:
                tl1, tl2 = t1_loc.squeeze(1), t2_loc.squeeze(1)
                value = 0.5 * (tl1 * (lg1 + cfg.rho) + tl2 * (lg2 + cfg.rho)).mean()
                tau_metric = 0.5 * (tl1.mean() + tl2.mean())
            else:
                value = 0.5 * (lg1 + lg2).mean()
                if cfg.multiply_tau:
                    value = tau_live.detach() * value + cfg.rho * tau_live.detach()
                tau_metric = tau_live.detach()
            m = torch.stack([value.to(dt), tau_metric.to(dt), u1_all[off:off + b].mean(), u2_all[off:off + b].mean(),
                             g1.detach().mean(), g2.detach().mean()]).tolist()
        loss = surrogate - surrogate.detach() + value.to(dt)
        metrics = {"loss_value": m[0], "tau": m[1], "gamma": gamma, "u1_mean": m[2], "u2_mean": m[3],
                   "g1_mean": m[4], "g2_mean": m[5]}
        return loss, metrics


class SogCLRLoss(GCLLoss):
    pass


class ISogCLRLoss(GCLLoss):
    pass


class FastCLIPv0Loss(GCLLoss):
    pass


class FastCLIPv1Loss(GCLLoss):
    pass


class FastCLIPv2Loss(GCLLoss):
    pass


class FastCLIPv3Loss(GCLLoss):
    pass


LOSSES: dict[str, type] = {
    "openclip": OpenClipLoss,
    "sogclr": SogCLRLoss,
    "isogclr": ISogCLRLoss,
    "fastclip-v0": FastCLIPv0Loss,
    "fastclip-v1": FastCLIPv1Loss,
    "fastclip-v2": FastCLIPv2Loss,
    "fastclip-v3": FastCLIPv3Loss,
}


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
