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
from training import distributed as dist_utils

__all__ = [
    "LOSSES",
    "VARIANT_PRESETS",
    "TEMPERATURE_SCHEMES",
    "GAMMA_SCHEDULES",
    "LR_TAU_SCHEDULERS",
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
LR_TAU_SCHEDULERS = ("const", "step_thresh")
STATE_DEVICES = ("auto", "accelerator", "host")
# --loss_state_device auto keeps the per-pair tables on the accelerator while they take at most this share of its
# total memory (H100 80 GB: 10 GB, i.e. 400M pairs of a global-temperature variant at 8 B/pair), else in pinned host
# memory. The rest of the accelerator is for the model, its optimizer state and the activations.
STATE_AUTO_SHARE = 1 / 8

# Per-pair temperatures are clamped to this range; step_thresh divides lr_tau by 3 once tau <= TAU_THRESH.
TAU_MIN, TAU_MAX = 0.01, 1.0
TAU_THRESH = 0.03
STEP_THRESH_FACTOR = 3.0
# An estimator entry at or below this value (never initialised, or underflowed) is reset to the fresh batch value.
U_RESET_BELOW = 1e-30

# Per-variant defaults; any explicit flag overrides them. FastCLIP's CC3M recipes (the smallest data scale of the
# paper, the closest to person-retrieval datasets of 10^4-10^5 pairs) are used where the paper gives a value.
_COMMON = dict(
    gamma=0.2, gamma_schedule="cosine", gamma_decay_epochs=None, temperature=0.07, lr_tau=None,
    lr_tau_scheduler="const", rho=0.0, multiply_tau=False, fastclip_eps=1e-14, tau_beta1=0.9, tau_beta2=0.999,
    tau_adam_eps=1e-8,
)
VARIANT_PRESETS: dict[str, dict] = {
    # InfoNCE with open_clip's learnable logit scale (main lr schedule, trainer clamps it to ln 100).
    "openclip": dict(_COMMON, temperature_scheme="global_learnable", gamma=1.0, gamma_schedule="constant"),
    # SogCLR: GCL, constant tau, constant gamma.
    "sogclr": dict(_COMMON, temperature_scheme="global_constant", gamma=0.8, gamma_schedule="constant"),
    # iSogCLR: RGCL with individual temperatures, constant gamma.
    "isogclr": dict(_COMMON, temperature_scheme="individual_learnable", gamma=0.8, gamma_schedule="constant",
                    temperature=0.03, lr_tau=0.0133, rho=7.0),
    # FastCLIP-v0: GCL, the model's logit scale learnt through the GCL gradient (main lr schedule), cosine gamma.
    "fastclip-v0": dict(_COMMON, temperature_scheme="global_learnable"),
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

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_name(cls, loss: str, epochs: Optional[int] = None, **overrides) -> "LossConfig":
        """Preset of ``loss`` with ``overrides`` (None values are ignored) applied, validated."""
        if loss not in VARIANT_PRESETS:
            raise ValueError(f"--loss must be one of {_fmt_choices(sorted(VARIANT_PRESETS))}, got {loss!r}")
        values = dict(VARIANT_PRESETS[loss])
        values.update({k: v for k, v in overrides.items() if v is not None})
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
    add("tau_beta2", type=float, default=None, help="Adam beta2 of the individual temperatures.")
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

    def temperature_lr(self, base_lr: float, tau: float) -> Optional[float]:
        """Lr of the param group holding model.logit_scale for this step (None = follow the main schedule).

        Only meaningful when ``learns_model_temperature``. ``const``: lr_tau (None -> None, i.e. the main schedule).
        ``step_thresh``: lr_tau (or base_lr when lr_tau is None), divided by 3 from the first call with tau <= 0.03.
        """
        if not self.learns_model_temperature:
            return None
        cfg = self.cfg
        if cfg.lr_tau_scheduler == "const":
            return None if cfg.lr_tau is None else float(cfg.lr_tau)
        if float(tau) <= TAU_THRESH:
            self.tau_lr_dropped.fill_(True)
        lr = float(base_lr if cfg.lr_tau is None else cfg.lr_tau)
        return lr / STEP_THRESH_FACTOR if bool(self.tau_lr_dropped) else lr

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
def _exp_rows(anchors, cands, pos, tau, diag_start: Optional[int]):
    """P = exp((anchors @ cands^T - pos) / tau) and X = its exponent; when ``diag_start`` is given, anchor row i's
    own pair sits in column diag_start + i and its P entry is zeroed (g sums over j != i only)."""
    X = (anchors @ cands.t() - pos) / tau
    P = torch.exp(X)
    if diag_start is not None:
        rows = torch.arange(anchors.shape[0], device=P.device)
        P = P.index_put((rows, diag_start + rows), P.new_zeros(()))  # out of place: X and P stay valid for autograd
    return P, X


def _per_row(t, sl: slice):
    """A temperature is a scalar (global) or a column of per-row values (individual): slice only the latter."""
    return t[sl] if t.dim() > 0 else t


def _exp_row_stats(anchors, cands, pos, tau, diag_start, max_logits, with_h: bool):
    """Row sums of P and (``with_h``) of P*X (see _exp_rows), in row blocks of at most ``max_logits`` entries."""
    g, h = [], []
    for a, z in _row_blocks(anchors.shape[0], cands.shape[0], max_logits):
        sl = slice(a, z)
        P, X = _exp_rows(anchors[sl], cands, pos[sl], _per_row(tau, sl), None if diag_start is None else diag_start + a)
        g.append(P.sum(1))
        if with_h:
            h.append((P * X).sum(1))
    return torch.cat(g), (torch.cat(h) if with_h else None)


def _weighted_rows(anchors, cands, pos, tau, weights, diag_start):
    return (weights * _exp_rows(anchors, cands, pos, tau, diag_start)[0].sum(1)).sum()


def _weighted_exp_sum(anchors, cands, pos, tau, weights, diag_start: Optional[int], max_logits: int):
    """sum_i weights_i * sum_j P_ij (P of _exp_rows), differentiable in anchors, cands, pos and a live tau; in row
    blocks under activation checkpointing once the matrix exceeds ``max_logits`` entries, so that the forward keeps
    one block at a time and the backward recomputes it (same value and gradient up to summation order)."""
    n, m = anchors.shape[0], cands.shape[0]
    if n * m <= max_logits or not torch.is_grad_enabled():
        return _weighted_rows(anchors, cands, pos, tau, weights, diag_start)
    from torch.utils.checkpoint import checkpoint
    total = anchors.new_zeros(())
    for a, z in _row_blocks(n, m, max_logits):
        sl = slice(a, z)
        total = total + checkpoint(_weighted_rows, anchors[sl], cands, pos[sl], _per_row(tau, sl), weights[sl],
                                   None if diag_start is None else diag_start + a, use_reentrant=False)
    return total


class GCLLoss(ContrastiveLoss):
    """Global contrastive losses optimised with FCCO (SogCLR / iSogCLR / FastCLIP-v0..v3).

    State (registered buffers, one entry per training pair, indexed by the dataset key):
      u1, u2             moving-average estimators of g1 (image anchors) and g2 (text anchors)
      tau1, tau2         individual temperatures (individual_learnable only)
      tau1_m, tau1_v, tau2_m, tau2_v, tau_count   their Adam moments and per-pair step counters
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
            for name in ("tau1_m", "tau1_v", "tau2_m", "tau2_v"):
                self.register_buffer(name, table(0.0))
            self.register_buffer("tau_count", table(0, torch.int32))

    @staticmethod
    def _bytes_per_pair(individual: bool, dtype: torch.dtype) -> int:
        """u1, u2; plus tau1, tau2 and their four Adam moments in ``dtype`` and an int32 counter (individual)."""
        item = torch.empty((), dtype=dtype).element_size()
        return 8 * item + 4 if individual else 2 * item

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
    @staticmethod
    def _first_occurrence(keys: torch.Tensor) -> torch.Tensor:
        """Positions of the first occurrence of each distinct key (deterministic writes when a batch repeats a key)."""
        uniq, inv = torch.unique(keys, return_inverse=True)
        pos = torch.arange(keys.numel(), device=keys.device)
        first = torch.full((uniq.numel(),), keys.numel(), dtype=pos.dtype, device=keys.device)
        return first.scatter_reduce(0, inv, pos, reduce="amin")

    def _update_estimator(self, table: torch.Tensor, keys: torch.Tensor, first: torch.Tensor, g: torch.Tensor,
                          gamma: float) -> torch.Tensor:
        """u[key] <- (1-gamma) u[key] + gamma g (reset to g where u is non-finite or <= 1e-30). Returns u[keys]."""
        g = g.to(table.dtype)
        old = table[keys]
        bad = ~torch.isfinite(old) | (old <= U_RESET_BELOW)
        new = torch.where(bad, g, (1.0 - gamma) * old + gamma * g)
        table[keys[first]] = new[first]
        return table[keys]

    def _adam_tau(self, keys, first, grad, which: str) -> None:
        cfg = self.cfg
        tau, m, v = getattr(self, which), getattr(self, which + "_m"), getattr(self, which + "_v")
        k = keys[first]
        grad = grad[first].to(tau.dtype)
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
        else:
            tau_live = self._global_tau(logit_scale, dt, dev)
            t1_loc = t2_loc = tau_live  # live in the local-anchor terms
            t1_all_c = t2_all_c = tau_live.detach()

        # ---- local anchors against all (gathered) candidates: g1_i, g2_i for i in this rank's block
        pos = (e1 * e2).sum(1, keepdim=True)  # <e1_i, e2_i>, live in both features
        # Above block_logits (b x B) the exp matrices are never held whole: g and h come from a no-grad pass in row
        # blocks, and the surrogate's local part is recomputed block by block under checkpointing (below).
        blocked = b * B > self.block_logits and torch.is_grad_enabled()
        if blocked:
            with torch.no_grad():
                g1, h1 = _exp_row_stats(e1, E2_live, pos, t1_loc, off, self.block_logits, self.individual)
                g2, h2 = _exp_row_stats(e2, E1_live, pos, t2_loc, off, self.block_logits, self.individual)
        else:
            # D = <e_i, e'_j> - <e_i, e'_i>; X = D / tau; P = exp(X) with the pair's own column zeroed.
            P1, X1 = _exp_rows(e1, E2_live, pos, t1_loc, off)  # (b, B), live
            P2, X2 = _exp_rows(e2, E1_live, pos, t2_loc, off)
            g1, g2 = P1.sum(1), P2.sum(1)
            # tau * d g/d tau = -mean_{j!=i} exp(X_ij) X_ij  (only the per-pair temperatures need it)
            h1 = (P1 * X1).detach().sum(1) if self.individual else None
            h2 = (P2 * X2).detach().sum(1) if self.individual else None
        g1, g2 = g1 / (B - 1), g2 / (B - 1)

        # ---- estimator update with the whole global batch (identical on every rank)
        with torch.no_grad():
            if self.individual:
                stats = torch.stack([g1.detach(), g2.detach(), h1 / (B - 1), h2 / (B - 1)], 1)
            else:
                stats = torch.stack([g1.detach(), g2.detach()], 1)
            stats_all = dist_utils.all_gather_no_grad(stats)
            skeys = keys_all.to(self.u1.device)
            first = self._first_occurrence(skeys)
            u1_all = self._update_estimator(self.u1, skeys, first, stats_all[:, 0].to(self.u1.device), gamma)
            u2_all = self._update_estimator(self.u2, skeys, first, stats_all[:, 1].to(self.u2.device), gamma)
            u1_all = u1_all.to(dev, dt)
            u2_all = u2_all.to(dev, dt)
            self.step += 1

        # ---- surrogate: coefficient c_i multiplies g_i / (u_i + eps)
        # c = tau_i (individual, RGCL), tau (detached; multiply_tau, RGCL-g), 1 (GCL); all times 1/(2B).
        if self.individual:
            c1_all, c2_all = t1_all, t2_all
        elif cfg.multiply_tau:
            c1_all = c2_all = tau_live.detach().expand(B)
        else:
            c1_all = c2_all = torch.ones(B, dtype=dt, device=dev)
        w1_all = c1_all / (u1_all + eps) / (2 * B)  # detached weights
        w2_all = c2_all / (u2_all + eps) / (2 * B)
        w1_loc, w2_loc = w1_all[off:off + b], w2_all[off:off + b]
        if blocked:
            local_part = (_weighted_exp_sum(e1, E2_live, pos, t1_loc, w1_loc / (B - 1), off, self.block_logits)
                          + _weighted_exp_sum(e2, E1_live, pos, t2_loc, w2_loc / (B - 1), off, self.block_logits))
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
            # anchor e1_i (i remote) vs live e2_j (j local), and the text-anchor mirror; (B-b, b) each
            remote_part = (_weighted_exp_sum(E1[rem], e2, posd, t1r, w1_all[rem] / (B - 1), None, self.block_logits)
                           + _weighted_exp_sum(E2[rem], e1, posd, t2r, w2_all[rem] / (B - 1), None, self.block_logits))

        surrogate = K * (local_part + remote_part)

        # ---- temperature terms
        log_u1_loc = torch.log(u1_all[off:off + b] + eps)
        log_u2_loc = torch.log(u2_all[off:off + b] + eps)
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
                tk = keys_all.to(self.tau1.device)
                tfirst = self._first_occurrence(tk)
                self._adam_tau(tk, tfirst, grad_t1.to(self.tau1.device), "tau1")
                self._adam_tau(tk, tfirst, grad_t2.to(self.tau2.device), "tau2")
                self.tau_count[tk[tfirst]] += 1

        # ---- reported value: this rank's objective estimate (the gradient is the surrogate's)
        with torch.no_grad():
            lg1 = torch.log(g1.detach() + eps)
            lg2 = torch.log(g2.detach() + eps)
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
