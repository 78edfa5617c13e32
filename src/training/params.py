"""The trainer's command line: generated from the config fields that declare the flags (training/config.py and the
loss flags of fast_clip/losses/config.py), plus the few flags that set no field alone, declared and folded here.

Names follow open_clip's trainer (``--train-data``, ``--batch-size``, ``--lr``, ``--local-loss`` ...) and FastCLIP's
loss flags (``--gamma``, ``--temperature_scheme`` ...) so users' commands carry over. :func:`parse_args` returns the
validated ``TrainConfig`` before any work starts; an error is one argparse line that names the flag.
"""
from __future__ import annotations

import argparse

from common.options import OptionError, add_options
from fast_clip.losses import add_loss_args
from training.config import HELP_SECTIONS, TrainConfig

_NOT_SUPPORTED = ("not supported: sampling with replacement is --train-data-weights 'W1::W2' (one weight per '::' set, "
                  "with --train-num-samples for the epoch length); without weights every pair is seen once per epoch")

# Flags that set no config field alone, by --help section: fold_flags() turns them into fields, or they are
# open_clip's flags, accepted where they mean what happens here anyway and refused with what to use otherwise.
FOLDED_FLAGS = {
    "model": [
        (("--force-image-size",), dict(type=int, nargs="+", default=None, metavar="SIZE",
                                       help="open_clip's name for --image-size: one value (square) or H W.")),
    ],
    "optimisation": [
        (("--batch-size",), dict(type=int, default=64, help="Per-rank batch size.")),
        (("--accum-freq",), dict(
            type=int, default=1,
            help="open_clip's meaning: each optimizer step takes K micro-batches of --batch-size per rank (a "
                 "contrastive batch of K x --batch-size). Done by decoupled gradient accumulation (DGA): forward the "
                 "chunks without gradients, take the loss on the whole batch, re-forward chunk by chunk; the exact "
                 "gradient of one pass, the memory of one micro-batch.")),
        (("--dga-chunks",), dict(
            type=int, default=None,
            help="DGA inside --batch-size: split each per-rank batch into K chunks (same batch and gradient, memory "
                 "of one chunk). What --accum-freq meant here before it took open_clip's meaning.")),
        (("--dga-chunk-size",), dict(type=int, default=None,
                                     help="Like --dga-chunks, by chunk size in samples (K = ceil(batch / size)).")),
        (("--local-loss",), dict(
            action="store_true",
            help="open_clip's flag; always on here: each rank scores its own pairs against all gathered features, "
                 "gradient through the gather (accepted for ported commands).")),
        (("--gather-with-grad",), dict(
            action="store_true",
            help="open_clip's flag; always on here: with --local-loss the gather carries the gradient, which is what "
                 "makes the distributed gradient exact (accepted for ported commands).")),
        (("--dataset-resampled",), dict(action="store_true", help=argparse.SUPPRESS)),
        (("--train-data-upsampling-factors",), dict(default=None, help=argparse.SUPPRESS)),
    ],
    "checkpoints and logs": [
        (("--keep-epoch-checkpoints",), dict(action="store_true", help=argparse.SUPPRESS)),  # no effect; old commands
    ],
}
# open_clip's spellings of --precision, added to the flag's choices: the first is read as amp_bf16, the second refused
OPEN_CLIP_PRECISIONS = ("amp", "amp_bfloat16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="src/training/main.py",
        description="Streaming CLIP / FastCLIP trainer for text-based person retrieval (run with python or torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    groups = {title: p.add_argument_group(title) for title in HELP_SECTIONS}
    for title, concerns in HELP_SECTIONS.items():
        for concern in concerns:
            add_options(groups, concern, title)
        for names, kw in FOLDED_FLAGS.get(title, ()):
            groups[title].add_argument(*names, **kw)
    precision = next(a for a in p._actions if a.dest == "precision")
    precision.choices = (*precision.choices, *OPEN_CLIP_PRECISIONS)
    add_loss_args(p)
    return p


def parse_args(argv=None) -> TrainConfig:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        fold_flags(ns)
        return TrainConfig.from_flags(ns)
    except OptionError as e:
        parser.error(str(e))


def flag_values(cfg: TrainConfig) -> dict:
    """Every flag's parsed value by the flag's name ({'--lr': 1e-05, ...}): what the ranks of one world must agree
    on. The values folded from them (the step batch, the loss's config) follow from these."""
    names = {a.dest: a.option_strings[0] for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    return {names[k]: v for k, v in cfg.flags.items() if k in names}


def fold_flags(ns: argparse.Namespace) -> None:
    """Write into ``ns`` what the flags of FOLDED_FLAGS mean (params.json keeps these values), or refuse them."""
    if ns.dataset_resampled or ns.train_data_upsampling_factors is not None:
        raise OptionError("--dataset-resampled" if ns.dataset_resampled else "--train-data-upsampling-factors",
                          _NOT_SUPPORTED)
    if ns.precision == "amp":
        raise OptionError("--precision", "amp (fp16 autocast with a loss scaler) is not supported: use amp_bf16 (the "
                                         "default; bf16 needs no loss scaler) or fp32")
    if ns.precision == "amp_bfloat16":
        ns.precision = "amp_bf16"
    if ns.force_image_size is not None:
        if ns.image_size is not None:
            raise OptionError("--force-image-size", "give --image-size or --force-image-size, not both")
        fs = ns.force_image_size
        if len(fs) not in (1, 2) or min(fs) < 1:
            raise OptionError("--force-image-size", "one size (square) or H W, each >= 1")
        ns.image_size = (fs[0], fs[0]) if len(fs) == 1 else tuple(fs)
    ns.step_batch_size, ns.accum_chunks = _step_batch(ns)


def _step_batch(ns: argparse.Namespace) -> tuple[int, int]:
    """(per-rank samples per optimizer step, the DGA chunks they are forwarded in) from --batch-size (the micro-batch)
    and one of --accum-freq (open_clip's: K micro-batches per step), --dga-chunks, --dga-chunk-size."""
    b = ns.batch_size
    if b < 1:
        raise OptionError("--batch-size", f"must be >= 1, got {b}")
    given = [f for f, v in (("--accum-freq", ns.accum_freq != 1), ("--dga-chunks", ns.dga_chunks is not None),
                            ("--dga-chunk-size", ns.dga_chunk_size is not None)) if v]
    if len(given) > 1:
        raise OptionError(given[1], f"give one of --accum-freq, --dga-chunks, --dga-chunk-size, not "
                                    f"{' and '.join(given)}")
    if ns.accum_freq != 1:
        if ns.accum_freq < 1:
            raise OptionError("--accum-freq", f"must be >= 1, got {ns.accum_freq}")
        return b * ns.accum_freq, ns.accum_freq
    if ns.dga_chunks is not None:
        if not 1 <= ns.dga_chunks <= b:
            raise OptionError("--dga-chunks", f"must be in [1, --batch-size={b}], got {ns.dga_chunks}")
        return b, ns.dga_chunks
    if ns.dga_chunk_size is not None:
        if ns.dga_chunk_size < 1:
            raise OptionError("--dga-chunk-size", f"must be >= 1, got {ns.dga_chunk_size}")
        return b, -(-b // ns.dga_chunk_size)
    return b, 1
