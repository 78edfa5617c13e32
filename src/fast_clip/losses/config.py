"""Loss configuration: the variants' presets (one registry keyed by --loss), the flags, their validation, the gamma
schedule and where the per-pair tables live; nothing here computes a loss."""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch

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
    id_positives: bool = False

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
        if self.loss in INFONCE_FAMILY:
            if self.temperature_scheme == "individual_learnable":
                bad("temperature_scheme", f"'global_constant' or 'global_learnable' with --loss {self.loss}",
                    self.temperature_scheme)
            if self.multiply_tau:
                bad("multiply_tau", f"off with --loss {self.loss}", self.multiply_tau)
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
    g.add_argument("--id-positives", "--id_positives", dest="id_positives", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="Identity-aware positives: pairs of the same person id in the global batch are positives, not "
                        "negatives (InfoNCE: targets spread over them; sdm: its label distribution; the GCL family: "
                        "left out of the negative sums). Pairs without an id (foreign shards) keep their own pair "
                        "as the only positive. docs/LOSSES.md, section 12.")
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
