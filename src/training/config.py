"""The typed configuration of a training run, and the one declaration of every trainer flag.

One frozen dataclass per concern. A field that is a flag says so where it is declared (``opt``, common/options.py):
its flag name(s), default, help, choices and check; the concern's ``__post_init__`` runs those checks, then the
checks across its fields, and ``TrainConfig`` checks across concerns. Every error names the flag. params.py
generates the parser from these fields (one --help section per concern, ``HELP_SECTIONS``) and folds the few flags
that set no field alone (--batch-size x --accum-freq, --force-image-size, open_clip's spellings).

The trainer and its components read these, never the argparse namespace: a component's inputs are visible in its
config's fields, and a library user can build a run without argparse. The flat flag dictionary is kept only for the
run's params.json (a file users and the evaluator read; its format is unchanged).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass

from common.options import OptionError, at_least, check_options, namespace_values, opt, rule
from common.shard_cache import parse_size
from fast_clip.losses import LossConfig

finite = rule(math.isfinite, "must be a finite number")
positive = rule(lambda v: v > 0, "must be > 0")
fraction = rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")


def _positive_int(v: str) -> int:
    n = int(v)
    if n <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return n


def _weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split("::")]
    except ValueError:
        raise ValueError(f"expected numbers joined with '::', got {text!r}") from None


def _weights_file(v: str):
    return None if os.path.isfile(v) else f"{v!r} is not a file (nothing is downloaded; pass a local weights file)"


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt("--model", default="ViT-B-16", help="Any open_clip model name, or PersonTiny for CPU runs.")
    pretrained: str | None = opt("--pretrained", default=None, check=_weights_file,
                                 help="Local weights file (open_clip or OpenAI format). Nothing is downloaded.")
    # None: the model config's own size, resolved when the model is built
    image_size: tuple[int, int] | None = opt(
        "--image-size", type=_positive_int, nargs=2, default=None, metavar=("H", "W"), convert=tuple,
        help="Input size; default 384 128 for square configs, else the config's own size.")
    grad_checkpointing: bool = opt("--grad-checkpointing", default=False)
    torchcompile: bool = opt("--torchcompile", default=False)
    torchcompile_backend: str = opt(
        "--torchcompile-backend", default="inductor", choices=("inductor", "aot_eager", "eager"),
        help="torch.compile's backend with --torchcompile. aot_eager traces and splits the graphs as inductor would, "
             "without generating kernels: a quick check that a model compiles.")
    lock_image: bool = opt("--lock-image", default=False, help="Freeze the image tower (open_clip's flag).")
    lock_image_unlocked_groups: int = opt("--lock-image-unlocked-groups", default=0, check=at_least(0),
                                          help="With --lock-image: leave the last N layer groups trainable.")
    lock_image_freeze_bn_stats: bool = opt("--lock-image-freeze-bn-stats", default=False,
                                           help="With --lock-image: freeze BatchNorm running stats (ResNet towers).")
    lock_text: bool = opt("--lock-text", default=False, help="Freeze the text tower (open_clip's flag).")
    lock_text_unlocked_layers: int = opt("--lock-text-unlocked-layers", default=0, check=at_least(0),
                                         help="With --lock-text: leave the last N layers trainable.")
    lock_logit_scale: bool = opt("--lock-logit-scale", default=False, help="Freeze the temperature (logit scale).")

    def __post_init__(self):
        check_options(self)


@dataclass(frozen=True)
class LoaderConfig:
    """The training stream's settings (training/data.py): the data concern's loader part."""
    # Per-rank samples per optimizer step: --batch-size (the micro-batch) x --accum-freq, folded by params.py
    step_batch_size: int
    seed: int                       # --seed of the run
    workers: int = opt("--workers", default=2, check=at_least(0), help="Data loader processes per rank.")
    shuffle_buffer: int = opt("--shuffle-buffer", default=256, check=at_least(1),
                              help="Samples in the shuffle buffer of each of the --data-readers readers (1: off); a "
                                   "rank holds (readers / ranks) buffers.")
    readers: int | None = opt(
        "--data-readers", default=None, check=at_least(1), metavar="L",
        help="Logical readers of the epoch plan: each reads a fixed range of the epoch and gives B/L pairs to every "
             "global batch of B; ranks and loader workers only share the readers out, so any number of ranks that "
             "divides L (any --workers, any --accum-freq) trains on the same global batches and resumes the others' "
             "checkpoints mid-epoch. Default: the largest divisor of B (of B / --pairs-per-id) up to 64. At most "
             "L / ranks loader workers per rank are used.")
    shard_shuffle: bool = opt("--no-shard-shuffle", negate=True, help="Read shards in order (debugging).")
    weights: list[float] | None = opt(
        "--train-data-weights", type=str, default=None, convert=_weights,
        check=rule(lambda w: min(w) >= 0 and sum(w) > 0, "weights must be >= 0 with a positive sum"),
        help="Sampling weights per '::' set, e.g. '1::3'. Given: sets are mixed by weighted sampling (with "
             "replacement, per-source counts logged). Not given: sets are concatenated and every pair is seen once "
             "per epoch.")
    num_samples: int | None = opt(  # per epoch, all ranks together
        "--train-num-samples", default=None,
        help="Samples per epoch; default: the number of pairs read from sizes.json / manifest.json.")
    max_bad_frac: float = opt(
        "--max-bad-samples-frac", default=0.2, check=fraction,
        help="Stop with an error when more than this share of the samples read in an epoch is unusable.")
    debiased: bool = opt(  # every batch from one source (the same source on all ranks)
        "--debiased-sampling", default=False,
        help="ZeroVL debiased sampling: every global batch comes from one '::' set, drawn with probability "
             "proportional to its size (identically on all ranks); each set is read once per epoch.")
    pairs_per_id: int = opt(  # K > 0: batches of P persons x K pairs (plan.identity_groups)
        "--pairs-per-id", default=0, metavar="K",
        help="Identity-balanced batches: every batch holds P persons x K pairs (P = batch / K), every pair still "
             "once per epoch; a person's pairs beyond a multiple of K fill mixed groups. 0: off.")

    def __post_init__(self):
        check_options(self)
        k, b = self.pairs_per_id, self.step_batch_size
        if k and (k < 2 or b % k or b // k < 2):
            raise OptionError("--pairs-per-id", f"must be 0 or a K >= 2 that divides the per-rank step batch {b} "
                                                f"(--batch-size x --accum-freq) into at least 2 persons")
        if self.debiased and (self.weights is not None or self.num_samples is not None):
            raise OptionError("--debiased-sampling", "reads each set once per epoch by size; drop "
                                                     "--train-data-weights / --train-num-samples")


@dataclass(frozen=True)
class DataConfig:
    train_data: str = opt(  # '::'-joined shard specs
        "--train-data",
        help="Shard set(s), several joined with '::': a directory of .tar files, a brace pattern, a glob, a text file "
             "listing shards; local, file://, http(s)://, any fsspec URL, or pipe:COMMAND. make_shards splits or any "
             "webdataset shards (image + caption; sample counts from sizes.json, img2dataset's *_stats.json, or "
             "counted once).")
    loader: LoaderConfig            # per-rank step batch, workers and the epoch plan's settings
    caption_key: str = opt("--caption-key", default="txt",
                           help="Caption of a sample: this member (e.g. txt) or, failing that, this field of its json.")
    augment: bool = opt("--no-augment", negate=True, help="Disable flip / pad-crop / random erasing.")
    augment_device: str = opt(
        "--augment-device", choices=("auto", "loader", "device"), default="auto",
        help="Where flip / pad-crop / normalisation / erasing run: 'loader' (per sample in the data workers) or "
             "'device' (workers only decode + resize and ship uint8; the batch is augmented on the accelerator). "
             "auto: device on CUDA, loader on CPU.")
    allow_partial_data: bool = opt(
        "--allow-partial-data", default=False,
        help="Train on a make_shards split that lacks shards of its manifest (or whose sizes.json disagrees with it); "
             "the log and summary.json then say partial, with the counts. Without it such a split is refused.")
    val_data: str | None = opt("--val-data", default=None,
                               help="Shards evaluated every --val-frequency epochs (retrieval R@k).")
    timeout: float = opt(
        "--data-timeout", default=60.0, check=rule(lambda v: math.isfinite(v) and v > 0, "must be a number > 0"),
        help="Seconds an http(s) connect or read of --train-data / --val-data may wait for the server before it "
             "fails (a stop signal does not wait for it).")
    read_retries: int = opt(
        "--read-retries", default=5, check=at_least(0), metavar="N",
        help="A remote shard read that fails transiently (connection reset, cut body, HTTP 5xx/429, a stall past "
             "--data-timeout) is retried up to N times in a row, resuming at the byte where it broke (docs/DATA.md); "
             "then the run stops with an error naming the shard.")
    read_backoff: float = opt(
        "--read-backoff", default=1.0, check=rule(lambda v: math.isfinite(v) and v >= 0, "must be a number >= 0"),
        metavar="S", help="Seconds before the first retry of a remote read; doubled for each further one (at most 60).")
    shard_cache: str | None = opt(
        "--shard-cache", default=None, metavar="DIR",
        help="Keep remote shards in DIR, a node-local disk: each is downloaded once and shared by the node's ranks "
             "and loader workers (docs/DATA.md). Local and file:// shards are read where they are.")
    shard_cache_size: int | None = opt(
        "--shard-cache-size", type=str, default=None, metavar="SIZE", convert=parse_size,
        help="Most bytes --shard-cache keeps (e.g. 200GB, 500MiB), least recently used shards evicted first; "
             "default: no limit (the cache grows to the remote sets' size).")
    val_frequency: int = opt("--val-frequency", default=0, check=at_least(0), help="Evaluate on --val-data every N epochs (0: never).")

    def __post_init__(self):
        check_options(self)
        if self.val_frequency and not self.val_data:
            raise OptionError("--val-frequency", "needs --val-data")
        if self.shard_cache_size is not None and self.shard_cache is None:
            raise OptionError("--shard-cache-size", "needs --shard-cache DIR")
        weights, sets = self.loader.weights, self.train_data.split("::")
        if weights is not None and len(weights) != len(sets):
            raise OptionError("--train-data-weights",
                              f"{len(weights)} weights for {len(sets)} '::'-separated --train-data sets")


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer, the schedules and the loop's step rules."""
    epochs: int = opt("--epochs", default=10, check=at_least(1))
    lr: float = opt("--lr", default=5e-4,
                    check=rule(lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0"))
    wd: float = opt("--wd", default=0.2, check=rule(lambda v: math.isfinite(v) and v >= 0,
                                                    "must be a finite number >= 0"))
    beta1: float = opt("--beta1", default=0.9, check=finite)
    beta2: float = opt("--beta2", default=0.98, check=finite)
    eps: float = opt("--eps", default=1e-6, check=finite)
    warmup: int = opt("--warmup", default=100, check=at_least(0), help="Warm-up steps.")
    lr_scheduler: str = opt("--lr-scheduler", choices=("cosine", "const"), default="cosine")
    lr_min: float = opt(
        "--lr_min", "--lr-min", default=0.0, check=finite,
        help="The cosine schedules (model, and the temperature's with --lr_tau_scheduler cosine) end here.")
    stop_epochs: int | None = opt(
        "--stop_epochs", "--stop-epochs", default=None,
        help="Stop after this many epochs while every schedule still spans --epochs (FastCLIP's flag).")
    max_steps: int | None = opt(
        "--max-steps", default=None,
        help="Stop after this many optimizer steps; the lr schedule still spans --epochs (simulates a pre-emption).")
    # params.py adds open_clip's spellings to the flag's choices: amp_bfloat16 (read as amp_bf16) and amp (refused)
    precision: str = opt(
        "--precision", choices=("amp_bf16", "fp32"), default="amp_bf16",
        help="amp_bf16 autocasts on CUDA; on CPU it falls back to fp32 (CPU bf16 autocast is slow).")
    grad_clip_norm: float | None = opt("--grad-clip-norm", default=None, check=finite)
    accum_chunks: int = 1           # DGA chunks per per-rank step batch: folded by params.py from --accum-freq etc.
    mixup_beta: float = opt(
        "--mixup-beta", default=0.0, check=at_least(0),
        help="Coin-flip mixup (ZeroVL): alpha ~ Beta(b, b); a fair coin mixes either the images or the text token "
             "embeddings with the reversed batch; soft targets. 0: off. --loss openclip only.")
    max_nonfinite_steps: int = opt(
        "--max-nonfinite-steps", default=5, check=at_least(1),
        help="Consecutive non-finite losses/gradients tolerated (each step skipped) before stopping.")

    @property
    def betas(self) -> tuple[float, float]:
        return self.beta1, self.beta2

    def __post_init__(self):
        check_options(self)
        if not 0 <= self.lr_min <= self.lr:
            raise OptionError("--lr_min", f"must be in [0, --lr={self.lr}], got {self.lr_min}")
        if self.stop_epochs is not None and not 1 <= self.stop_epochs <= self.epochs:
            raise OptionError("--stop_epochs", f"must be in [1, --epochs={self.epochs}], got {self.stop_epochs}")


@dataclass(frozen=True)
class IdConfig:
    """--id-loss: an identity head over the training split's persons."""
    kind: str = opt(
        "--id-loss", choices=("none", "arcface", "linear"), default="none",
        help="Add an identity classification loss on image and text embeddings, one head over the training split's "
             "person ids shared by both modalities: 'arcface' (cosine classifier with an angular margin) or 'linear' "
             "(IRRA's linear classifier, plain cross-entropy).")
    weight: float = opt("--id-loss-weight", default=1.0, check=at_least(0))
    head_lr_mult: float = opt("--id-head-lr-mult", default=1.0, check=positive,
                              help="The identity head's lr as a multiple of --lr (IRRA trains its new modules at 5x).")
    arcface_scale: float = opt("--arcface-scale", default=30.0, check=positive, help="s: logits are s * cos.")
    arcface_margin: float = opt("--arcface-margin", default=0.2, help="m: additive angular margin (radians).",
                                check=rule(lambda v: 0 <= v < math.pi, "must be in [0, pi) radians"))
    arcface_subcenters: int = opt("--arcface-subcenters", default=1, check=at_least(1),
                                  help="K sub-centers per id (max over them).")
    num_ids: int | None = opt("--num-ids", default=None, check=at_least(1),  # None: from manifest.json
                              help="Person ids of the training data (default: from manifest.json).")

    def __post_init__(self):
        # the head's settings are checked only when there is a head: they are inert otherwise
        check_options(self, only=None if self.enabled else ("num_ids",))

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


@dataclass(frozen=True)
class RefConfig:
    """A frozen reference model: --distill feature and/or --init-from-ref."""
    model: str | None = opt("--ref-model", default=None, help="Reference (teacher) model name, e.g. ViT-B-32.")
    pretrained: str | None = opt("--ref-pretrained", default=None, help="Local weights file of the reference model.",
                                 check=lambda v: None if os.path.isfile(v) else f"{v!r} is not a file")
    distill: str = opt("--distill", choices=("none", "feature"), default="none",
                       help="feature: (1-w)*loss + w*(|f_T,img - f_S,img|^2 + |f_T,txt - f_S,txt|^2).")
    distill_weight: float = opt("--distill-weight", default=0.5, help="w of --distill.",
                                check=fraction)
    init_from_ref: bool = opt(
        "--init-from-ref", default=False,
        help="Copy every reference parameter whose name and shape match into the student (logged).")

    def __post_init__(self):
        if (self.distill != "none" or self.init_from_ref) and not self.model:
            raise OptionError("--ref-model", "needed by --distill / --init-from-ref")
        if self.model and not self.pretrained:
            raise OptionError("--ref-pretrained", "a reference model needs its local weights file (nothing is "
                                                  "downloaded)")
        check_options(self)


@dataclass(frozen=True)
class RunConfig:
    """Where the run lives and what it writes."""
    # --logs (open_clip's name) is an ambiguous abbreviation of torchrun's own --logs-specs, and torchrun rejects it
    # before the script sees it; --logs-dir works under both python and torchrun.
    logs: str = opt("--logs-dir", "--logs", dest="logs", default="./logs",
                    help="Root folder of runs (use --logs-dir under torchrun).")
    name: str | None = opt(  # None: a timestamped name, chosen by rank 0
        "--name", default=None, help="Run name (folder under --logs); default: a timestamped name.")
    resume: str | None = opt("--resume", default=None, help="'latest' or a checkpoint path.")
    report_to: str = opt("--report-to", default="", help="'tensorboard' to write event files.",
                         check=lambda v: None if v in ("", "tensorboard", "none") else
                         f"accepted values: tensorboard, none; got {v!r}")
    log_every: int = opt("--log-every-n-steps", default=10, check=at_least(1))
    save_every: int = opt("--save-every-n-steps", default=0, check=at_least(0),
                          help="Also save latest.pt every N steps (0: epoch ends only).")
    save_frequency: int = opt(
        "--save-frequency", default=1, check=at_least(0),
        help="Write epoch_N.pt every N epochs and at the last epoch (0: none; latest.pt is always written).")
    keep_last_k: int = opt("--keep-last-k", default=0, check=at_least(0),
                           help="Keep only the K newest epoch_N.pt files (0: keep all). latest.pt is always kept.")
    epoch_weights_only: bool = opt(
        "--epoch-weights-only", default=False,
        help="epoch_N.pt holds the weights and what evaluation needs, not the optimizer and loss state (about a third "
             "of a full checkpoint with AdamW); latest.pt stays complete for --resume.")
    profile: bool = opt(
        "--profile", default=False,
        help="torch.profiler on rank 0 over the steps of --profile-steps: a trace in RUN/traces (TensorBoard / "
             "Perfetto) and the top operators in out.log (the official FastCLIP flag).")
    profile_steps: tuple[int, int, int] = opt(
        "--profile-steps", type=int, nargs=3, default=(10, 2, 10), metavar=("WAIT", "WARMUP", "ACTIVE"),
        convert=tuple, help="Profiler schedule: skip WAIT steps, warm up WARMUP, record ACTIVE.")
    log_keys: bool = opt("--log-keys", default=False,
                         help="Write the pair keys of every batch to logs/NAME/keys_rankR.jsonl (audits sample order).")

    def __post_init__(self):
        check_options(self)
        s = self.profile_steps
        if self.profile and (min(s) < 0 or s[2] < 1):
            raise OptionError("--profile-steps", f"WAIT WARMUP ACTIVE must be >= 0 with ACTIVE >= 1, got {list(s)}")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    loss: LossConfig
    id: IdConfig
    ref: RefConfig
    run: RunConfig
    seed: int = opt("--seed", default=0, section="optimisation")
    device: str = opt("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto, cpu or cuda.")
    check_args: bool = opt(  # main() stops after the checks
        "--check-args", default=False,
        help="Validate the flags (and the model name) and exit: scripts/train.sh runs this once before it starts "
             "torchrun, so a typo is one error line, not N processes' reports.")
    flags: dict = dataclasses.field(default_factory=dict, compare=False)  # for params.json only

    def __post_init__(self):
        check_options(self)
        if self.optim.mixup_beta:
            if self.id.enabled or self.ref.distill != "none":
                raise OptionError("--mixup-beta", "mixed samples have no single identity or teacher feature; not "
                                                  "with --id-loss / --distill")
            refusal = self.loss.mixup_refusal()
            if refusal:
                raise OptionError("--mixup-beta", refusal)

    @classmethod
    def from_flags(cls, ns: argparse.Namespace) -> "TrainConfig":
        """Every concern built with keywords from the parsed flags, once params.py has folded those that set no field
        alone (``ns.step_batch_size``, ``ns.accum_chunks``, ``ns.image_size``, ``ns.precision``)."""
        loader = LoaderConfig(step_batch_size=ns.step_batch_size, seed=ns.seed, **namespace_values(LoaderConfig, ns))
        concerns = dict(model=ModelConfig(**namespace_values(ModelConfig, ns)),
                        data=DataConfig(loader=loader, **namespace_values(DataConfig, ns)),
                        optim=OptimConfig(accum_chunks=ns.accum_chunks, **namespace_values(OptimConfig, ns)),
                        id=IdConfig(**namespace_values(IdConfig, ns)),
                        ref=RefConfig(**namespace_values(RefConfig, ns)),
                        run=RunConfig(**namespace_values(RunConfig, ns)))
        loss = LossConfig.from_args(ns)  # after the optimizer's flags: it may take their betas and eps
        return cls(**concerns, loss=loss, flags={**vars(ns), "loss_config": dataclasses.asdict(loss)},
                   **namespace_values(cls, ns))

    def replace(self, **changes) -> "TrainConfig":
        """A copy with some concerns' fields changed: ``cfg.replace(run={"name": "x"}, model={"image_size": s})``."""
        return dataclasses.replace(self, **{k: dataclasses.replace(getattr(self, k), **v) for k, v in changes.items()})


# The --help sections, in order, and the concerns whose flags each lists (a field may name another section); the
# loss flags follow in their own section (fast_clip.losses.add_loss_args).
HELP_SECTIONS = {
    "data": (DataConfig, LoaderConfig),
    "model": (ModelConfig,),
    "optimisation": (OptimConfig,),
    "identity loss and reference model": (IdConfig, RefConfig),
    "checkpoints and logs": (RunConfig, TrainConfig),
}
