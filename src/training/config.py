"""The typed configuration of a training run: one frozen dataclass per concern, built once from the flags that
``params.parse_args`` has already validated (every error there names its flag).

The trainer and its components read these, never the argparse namespace: a component's inputs are visible in its
config's fields, and a library user can build a run without argparse. The flat flag dictionary is kept only for the
run's params.json (a file users and the evaluator read; its format is unchanged).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fast_clip.losses import LossConfig
from training.data import LoaderConfig


@dataclass(frozen=True)
class ModelConfig:
    name: str
    pretrained: str | None
    image_size: tuple[int, int] | None  # None: the model config's own size, resolved when the model is built
    grad_checkpointing: bool = False
    torchcompile: bool = False
    torchcompile_backend: str = "inductor"
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_logit_scale: bool = False


@dataclass(frozen=True)
class DataConfig:
    train_data: str                 # '::'-joined shard specs
    loader: LoaderConfig            # per-rank step batch, workers and the epoch plan's settings
    caption_key: str = "txt"
    augment: bool = True
    augment_device: str = "auto"    # auto | loader | device
    val_data: str | None = None
    val_frequency: int = 0


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer, the schedules and the loop's step rules."""
    lr: float
    wd: float
    betas: tuple[float, float]
    eps: float
    epochs: int
    warmup: int = 0
    lr_scheduler: str = "cosine"
    lr_min: float = 0.0
    stop_epochs: int | None = None
    max_steps: int | None = None
    precision: str = "fp32"
    grad_clip_norm: float | None = None
    accum_chunks: int = 1           # DGA chunks per per-rank step batch
    mixup_beta: float = 0.0
    max_nonfinite_steps: int = 5


@dataclass(frozen=True)
class IdConfig:
    """--id-loss: an identity head over the training split's persons."""
    kind: str = "none"              # none | arcface | linear
    weight: float = 1.0
    head_lr_mult: float = 1.0
    arcface_scale: float = 30.0
    arcface_margin: float = 0.2
    arcface_subcenters: int = 1
    num_ids: int | None = None      # None: from manifest.json

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


@dataclass(frozen=True)
class RefConfig:
    """A frozen reference model: --distill feature and/or --init-from-ref."""
    model: str | None = None
    pretrained: str | None = None
    distill: str = "none"           # none | feature
    distill_weight: float = 0.5
    init_from_ref: bool = False


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives and what it writes."""
    logs: str
    name: str | None                # None: a timestamped name, chosen by rank 0
    resume: str | None = None       # 'latest' or a checkpoint path
    report_to: str = ""
    log_every: int = 10
    save_every: int = 0             # latest.pt every N steps too (0: epoch ends only)
    save_frequency: int = 1         # epoch_N.pt every N epochs and at the last
    keep_last_k: int = 0
    epoch_weights_only: bool = False
    profile: bool = False
    profile_steps: tuple[int, int, int] = (10, 2, 10)
    log_keys: bool = False


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    loss: LossConfig
    id: IdConfig
    ref: RefConfig
    run: RunConfig
    seed: int = 0
    device: str = "auto"
    flags: dict = dataclasses.field(default_factory=dict, compare=False)  # for params.json only

    @classmethod
    def from_args(cls, a) -> "TrainConfig":
        weights = [float(x) for x in a.train_data_weights.split("::")] if a.train_data_weights else None
        loader = LoaderConfig(batch_size=a.step_batch_size, workers=a.workers, seed=a.seed,
                              shuffle_buffer=a.shuffle_buffer, shard_shuffle=not a.no_shard_shuffle, weights=weights,
                              num_samples=a.train_num_samples, max_bad_frac=a.max_bad_samples_frac,
                              debiased=a.debiased_sampling, pairs_per_id=a.pairs_per_id)
        flags = {k: v for k, v in vars(a).items() if k != "loss_config"}
        flags["loss_config"] = dataclasses.asdict(a.loss_config)
        return cls(
            model=ModelConfig(a.model, a.pretrained, tuple(a.image_size) if a.image_size else None,
                              a.grad_checkpointing, a.torchcompile, a.torchcompile_backend, a.lock_image, a.lock_image_unlocked_groups,
                              a.lock_image_freeze_bn_stats, a.lock_text, a.lock_text_unlocked_layers,
                              a.lock_logit_scale),
            data=DataConfig(a.train_data, loader, a.caption_key, not a.no_augment, a.augment_device, a.val_data,
                            a.val_frequency),
            optim=OptimConfig(a.lr, a.wd, (a.beta1, a.beta2), a.eps, a.epochs, a.warmup, a.lr_scheduler, a.lr_min,
                              a.stop_epochs, a.max_steps, a.precision, a.grad_clip_norm, a.accum_chunks,
                              a.mixup_beta, a.max_nonfinite_steps),
            loss=a.loss_config,
            id=IdConfig(a.id_loss, a.id_loss_weight, a.id_head_lr_mult, a.arcface_scale, a.arcface_margin,
                        a.arcface_subcenters, a.num_ids),
            ref=RefConfig(a.ref_model, a.ref_pretrained, a.distill, a.distill_weight, a.init_from_ref),
            run=RunConfig(a.logs, a.name, a.resume, a.report_to, a.log_every_n_steps, a.save_every_n_steps,
                          a.save_frequency, a.keep_last_k, a.epoch_weights_only, a.profile, tuple(a.profile_steps),
                          a.log_keys),
            seed=a.seed, device=a.device, flags=flags)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some concerns' fields changed: ``cfg.replace(run={"name": "x"}, model={"image_size": s})``."""
        return dataclasses.replace(self, **{k: dataclasses.replace(getattr(self, k), **v) for k, v in changes.items()})
