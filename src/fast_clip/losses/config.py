"""Loss configuration: the variants' presets (one registry keyed by --loss), the flags, their validation, the gamma
schedule and where the per-pair tables live; nothing here computes a loss."""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch

from common.options import OptionError, add_options, check_options, namespace_values, opt, rule

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
    tau_adam_eps=None, fastclip_rules="official", id_positives=False,
)
# The losses of the InfoNCE family (one mini-batch softmax per anchor; no per-pair state).
INFONCE_FAMILY = ("openclip", "sdm")
VARIANT_PRESETS: dict[str, dict] = {
    # InfoNCE with open_clip's learnable logit scale (main lr schedule, trainer clamps it to ln 100).
    "openclip": dict(_COMMON, temperature_scheme="global_learnable", gamma=1.0, gamma_schedule="constant"),
    # SDM (IRRA, Jiang & Ye, CVPR 2023): KL(softmax of the similarities || the normalised positive distribution), the
    # InfoNCE family's other way to use several positives; with --id-positives the positives are the same person's.
    "sdm": dict(_COMMON, temperature_scheme="global_learnable", gamma=1.0, gamma_schedule="constant"),
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


def _bad(flag: str, accepted: str, value) -> OptionError:
    return OptionError(flag, f"must be {accepted}, got {value!r}", sep=" ")


def _infer_fastclip_variant(scheme: Optional[str], multiply_tau: Optional[bool]) -> str:
    """Map FastCLIP's own flags (--fastclip --temperature_scheme ... [--multiply_tau]) to a variant name."""
    scheme = scheme or "global_learnable"  # FastCLIP's default scheme
    if scheme == "global_constant":
        return "fastclip-v1"
    if scheme == "individual_learnable":
        return "fastclip-v2"
    if scheme == "global_learnable":
        return "fastclip-v3" if multiply_tau else "fastclip-v0"
    raise _bad("--temperature_scheme", "one of " + _fmt_choices(TEMPERATURE_SCHEMES), scheme)


_non_negative = rule(lambda v: v >= 0, "must be a non-negative number")


@dataclass
class LossConfig:
    """A loss variant's settings. Each field that is a flag declares it (common/options.py); on the command line the
    loss flags default to None, "not given": the variant's preset (VARIANT_PRESETS) fills what was not given.
    Errors read "--flag must be ..." (ValueError)."""
    loss: str = opt("--loss", default="openclip", choices=tuple(sorted(VARIANT_PRESETS)),
                    help="Loss variant (default: openclip, or inferred from --fastclip/--temperature_scheme/"
                         "--multiply_tau).")
    temperature_scheme: str = opt("--temperature_scheme", "--temperature-scheme", default="global_learnable",
                                  choices=TEMPERATURE_SCHEMES)
    temperature: float = opt("--temperature", default=0.07, help="(Initial) temperature tau0.",
                             check=rule(lambda v: v > 0 and math.isfinite(v), "must be a positive number"))
    gamma: float = opt("--gamma", default=1.0, help="Inner lr of the u estimators (cosine: final value).",
                       check=rule(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    gamma_schedule: str = opt("--gamma_schedule", "--gamma-schedule", default="constant", choices=GAMMA_SCHEDULES)
    gamma_decay_epochs: int = opt("--gamma_decay_epochs", "--gamma-decay-epochs", default=DEFAULT_GAMMA_DECAY_EPOCHS,
                                  help="Cosine decay length (default: half of --epochs).",
                                  check=rule(lambda v: v >= 1, "must be a positive integer"))
    lr_tau: Optional[float] = opt("--lr_tau", "--lr-tau", default=None, check=_non_negative,
                                  help="Temperature learning rate (None: the main lr).")
    lr_tau_scheduler: str = opt("--lr_tau_scheduler", "--lr-tau-scheduler", default="const",
                                choices=LR_TAU_SCHEDULERS)
    rho: float = opt("--rho", default=0.0, check=_non_negative, help="rho of the robust losses (RGCL / RGCL-g).")
    multiply_tau: bool = opt("--multiply_tau", "--multiply-tau", default=False,
                             action=argparse.BooleanOptionalAction,
                             help="Global learnable tau: optimise tau*GCL + rho*tau (RGCL-g, FastCLIP-v3).")
    fastclip_eps: float = opt("--fastclip_eps", "--fastclip-eps", default=1e-14, check=_non_negative,
                              help="epsilon in 1/(u+eps).")
    data_size: Optional[int] = opt("--data_size", "--data-size", default=None,
                                   check=rule(lambda v: v > 0, "must be a positive integer"),
                                   help="Number of training pairs (size of the estimator tables).")
    tau_beta1: float = opt("--tau_beta1", "--tau-beta1", default=0.9,
                           check=rule(lambda v: 0 <= v < 1, "must be in [0, 1)"),
                           help="Adam beta1 of the individual temperatures.")
    tau_beta2: float = opt("--tau_beta2", "--tau-beta2", default=0.999,
                           check=rule(lambda v: 0 <= v < 1, "must be in [0, 1)"),
                           help="Adam beta2 of the individual temperatures (official rules: --beta2 of the model "
                                "optimizer).")
    tau_adam_eps: float = opt("--tau_adam_eps", "--tau-adam-eps", default=1e-8,
                              check=rule(lambda v: v > 0, "must be a positive number"),
                              help="Adam eps of the individual temperatures (official rules: --eps of the model "
                                   "optimizer).")
    state_device: str = opt(
        "--loss_state_device", "--loss-state-device", dest="state_device", default="auto", choices=STATE_DEVICES,
        help="Where the per-pair estimator / temperature tables live: on the accelerator, in pinned host memory, or "
             "auto (accelerator while they take at most 1/8 of its memory).")
    fastclip_rules: str = opt(
        "--fastclip_rules", "--fastclip-rules", default="official", choices=FASTCLIP_RULES,
        help="Temperature and estimator update rules of the FastCLIP family: 'official' (default; those of the "
             "official FastCLIP code, for which its published hyper-parameters were tuned) or 'exact' (the exact "
             "gradients of the objectives as written in the papers). docs/LOSSES.md lists the differences.")
    id_positives: bool = opt(
        "--id-positives", "--id_positives", default=False, action=argparse.BooleanOptionalAction,
        help="Identity-aware positives: pairs of the same person id in the global batch are positives, not negatives "
             "(InfoNCE: targets spread over them; sdm: its label distribution; the GCL family: left out of the "
             "negative sums). Pairs without an id (foreign shards) keep their own pair as the only positive. "
             "docs/LOSSES.md, section 12.")

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_name(cls, loss: str, epochs: Optional[int] = None, **overrides) -> "LossConfig":
        """Preset of ``loss`` with ``overrides`` (None values are ignored) applied, validated."""
        if loss not in VARIANT_PRESETS:
            raise _bad("--loss", "one of " + _fmt_choices(sorted(VARIANT_PRESETS)), loss)
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
        return cls(loss=loss, **{k: v for k, v in values.items() if k != "loss"})

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
        overrides = {k: v for k, v in namespace_values(cls, args).items() if k != "loss"}
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
        """Each flag's choices and check, then the rules across them (OptionError, a ValueError)."""
        check_options(self, sep=" ")
        if self.loss in INFONCE_FAMILY:
            if self.temperature_scheme == "individual_learnable":
                raise _bad("--temperature_scheme", f"'global_constant' or 'global_learnable' with --loss {self.loss}",
                           self.temperature_scheme)
            if self.multiply_tau:
                raise _bad("--multiply_tau", f"off with --loss {self.loss}", self.multiply_tau)
        if self.temperature_scheme == "individual_learnable":
            if self.multiply_tau:  # tau * GCL is the global temperature's objective (RGCL-g); per-pair taus have none
                raise _bad("--multiply_tau", "off with --temperature_scheme individual_learnable (it multiplies the "
                           "loss by the one global temperature)", self.multiply_tau)
            if not TAU_MIN <= self.temperature <= TAU_MAX:
                raise _bad("--temperature", f"in [{TAU_MIN}, {TAU_MAX}] for individual_learnable", self.temperature)
            if self.lr_tau is None:
                raise _bad("--lr_tau", "set (a non-negative number) for individual_learnable", self.lr_tau)

    def mixup_refusal(self) -> Optional[str]:
        """Why coin-flip mixup (--mixup-beta) cannot train this loss; None when it can."""
        if self.loss not in INFONCE_FAMILY:
            return (f"works with --loss openclip only (got {self.loss}: the FastCLIP losses keep one estimator per "
                    f"training pair, and a mixed sample is not one pair)")
        if self.id_positives or self.loss == "sdm":
            return "does not combine with --id-positives or --loss sdm: a mixed sample shows two people"
        return None


# Selects the variant when --loss is not given; sets no field alone (from_args folds it into --loss).
FOLDED_LOSS_FLAGS = {
    "--fastclip": dict(action="store_true", default=False,
                       help="FastCLIP-style selection when --loss is not given: global_constant->v1, "
                            "individual_learnable->v2, global_learnable->v0 (v3 with --multiply_tau)."),
}


def add_loss_args(parser: argparse.ArgumentParser) -> None:
    """The loss flags, in a 'loss' section (snake_case as in FastCLIP, dashed aliases too). They default to None:
    the variant's preset fills whatever was not given (see VARIANT_PRESETS / docs/LOSSES.md)."""
    group = parser.add_argument_group("loss")
    add_options({"loss": group}, LossConfig, "loss", defaults_none=True)
    for flag, kw in FOLDED_LOSS_FLAGS.items():
        group.add_argument(flag, **kw)


def state_placement(table_bytes: int, device, choice: str = "auto",
                    accelerator_bytes: Optional[int] = None) -> tuple[torch.device, bool]:
    """(device, pinned) for the per-pair tables of a loss computed on ``device``.

    On a CPU run everything is host memory anyway. ``accelerator_bytes`` is the accelerator's total memory (queried
    for CUDA when None; other accelerators keep the tables on the device under auto)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if choice not in STATE_DEVICES:
        raise _bad("--loss_state_device", "one of " + _fmt_choices(STATE_DEVICES), choice)
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
    raise _bad("--gamma_schedule", "one of " + _fmt_choices(GAMMA_SCHEDULES), schedule)
