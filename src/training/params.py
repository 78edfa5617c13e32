"""Command-line flags of the trainer.

Names follow open_clip's trainer (``--train-data``, ``--batch-size``, ``--lr``, ``--local-loss`` ...) and FastCLIP's loss
flags (``--gamma``, ``--temperature_scheme`` ... added by ``fast_clip.losses.add_loss_args``) so users' commands carry
over. Everything is validated in :func:`parse_args` before any work starts; an error names the flag.
"""
from __future__ import annotations

import argparse
import math
import os


def _image_size(v: str) -> int:
    n = int(v)
    if n <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="src/training/main.py",
        description="Streaming CLIP / FastCLIP trainer for text-based person retrieval (run with python or torchrun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--train-data", required=True,
                   help="Shard set(s), several joined with '::': a directory of .tar files, a brace pattern, a glob, "
                        "a text file listing shards; local, file://, http(s)://, any fsspec URL, or pipe:COMMAND. "
                        "make_shards splits or any webdataset shards (image + caption; sample counts from sizes.json, "
                        "img2dataset's *_stats.json, or counted once).")
    d.add_argument("--caption-key", default="txt",
                   help="Caption of a sample: this member (e.g. txt) or, failing that, this field of its json.")
    d.add_argument("--train-data-weights", default=None,
                   help="Sampling weights per '::' set, e.g. '1::3'. Given: sets are mixed by weighted sampling "
                        "(with replacement, per-source counts logged). Not given: sets are concatenated and every "
                        "pair is seen once per epoch.")
    d.add_argument("--train-num-samples", type=int, default=None,
                   help="Samples per epoch; default: the number of pairs read from sizes.json / manifest.json.")
    d.add_argument("--val-data", default=None, help="Shards evaluated every --val-frequency epochs (retrieval R@k).")
    d.add_argument("--val-frequency", type=int, default=0, help="Evaluate on --val-data every N epochs (0: never).")
    d.add_argument("--workers", type=int, default=2, help="Data loader processes per rank.")
    d.add_argument("--shuffle-buffer", type=int, default=2000, help="Sample shuffle buffer per worker (1: off).")
    d.add_argument("--no-shard-shuffle", action="store_true", help="Read shards in order (debugging).")
    d.add_argument("--no-augment", action="store_true", help="Disable flip / pad-crop / random erasing.")
    d.add_argument("--augment-device", choices=["auto", "loader", "device"], default="auto",
                   help="Where flip / pad-crop / normalisation / erasing run: 'loader' (per sample in the data "
                        "workers) or 'device' (workers only decode + resize and ship uint8; the batch is augmented on "
                        "the accelerator). auto: device on CUDA, loader on CPU.")
    d.add_argument("--debiased-sampling", action="store_true",
                   help="ZeroVL debiased sampling: every global batch comes from one '::' set, drawn with probability "
                        "proportional to its size (identically on all ranks); each set is read once per epoch.")
    d.add_argument("--pairs-per-id", type=int, default=0, metavar="K",
                   help="Identity-balanced batches: every batch holds P persons x K pairs (P = batch / K), every pair "
                        "still once per epoch; a person's pairs beyond a multiple of K fill mixed groups. 0: off.")
    d.add_argument("--max-bad-samples-frac", type=float, default=0.2,
                   help="Stop with an error when more than this share of the samples read in an epoch is unusable.")

    m = p.add_argument_group("model")
    m.add_argument("--model", default="ViT-B-16", help="Any open_clip model name, or PersonTiny for CPU runs.")
    m.add_argument("--pretrained", default=None, help="Local weights file (open_clip or OpenAI format). Nothing is downloaded.")
    m.add_argument("--image-size", type=_image_size, nargs=2, default=None, metavar=("H", "W"),
                   help="Input size; default 384 128 for square configs, else the config's own size.")
    m.add_argument("--force-image-size", type=int, nargs="+", default=None, metavar="SIZE",
                   help="open_clip's name for --image-size: one value (square) or H W.")
    m.add_argument("--grad-checkpointing", action="store_true")
    m.add_argument("--torchcompile", action="store_true")
    m.add_argument("--torchcompile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile's backend with --torchcompile. aot_eager traces and splits the graphs as "
                        "inductor would, without generating kernels: a quick check that a model compiles.")
    m.add_argument("--lock-image", action="store_true", help="Freeze the image tower (open_clip's flag).")
    m.add_argument("--lock-image-unlocked-groups", type=int, default=0,
                   help="With --lock-image: leave the last N layer groups trainable.")
    m.add_argument("--lock-image-freeze-bn-stats", action="store_true",
                   help="With --lock-image: freeze BatchNorm running stats (ResNet towers).")
    m.add_argument("--lock-text", action="store_true", help="Freeze the text tower (open_clip's flag).")
    m.add_argument("--lock-text-unlocked-layers", type=int, default=0,
                   help="With --lock-text: leave the last N layers trainable.")

    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=64, help="Per-rank batch size.")
    o.add_argument("--epochs", type=int, default=10)
    o.add_argument("--lr", type=float, default=5e-4)
    o.add_argument("--wd", type=float, default=0.2)
    o.add_argument("--beta1", type=float, default=0.9)
    o.add_argument("--beta2", type=float, default=0.98)
    o.add_argument("--eps", type=float, default=1e-6)
    o.add_argument("--warmup", type=int, default=100, help="Warm-up steps.")
    o.add_argument("--lr-scheduler", choices=["cosine", "const"], default="cosine")
    o.add_argument("--lr_min", "--lr-min", dest="lr_min", type=float, default=0.0,
                   help="The cosine schedules (model, and the temperature's with --lr_tau_scheduler cosine) end here.")
    o.add_argument("--stop_epochs", "--stop-epochs", dest="stop_epochs", type=int, default=None,
                   help="Stop after this many epochs while every schedule still spans --epochs (FastCLIP's flag).")
    o.add_argument("--grad-clip-norm", type=float, default=None)
    o.add_argument("--precision", choices=["amp_bf16", "fp32", "amp", "amp_bfloat16"], default="amp_bf16",
                   help="amp_bf16 autocasts on CUDA; on CPU it falls back to fp32 (CPU bf16 autocast is slow).")
    o.add_argument("--accum-freq", type=int, default=1,
                   help="open_clip's meaning: each optimizer step takes K micro-batches of --batch-size per rank "
                        "(a contrastive batch of K x --batch-size). Done by decoupled gradient accumulation (DGA): "
                        "forward the chunks without gradients, take the loss on the whole batch, re-forward chunk by "
                        "chunk; the exact gradient of one pass, the memory of one micro-batch.")
    o.add_argument("--dga-chunks", type=int, default=None,
                   help="DGA inside --batch-size: split each per-rank batch into K chunks (same batch and gradient, "
                        "memory of one chunk). What --accum-freq meant here before it took open_clip's meaning.")
    o.add_argument("--dga-chunk-size", type=int, default=None,
                   help="Like --dga-chunks, by chunk size in samples (K = ceil(batch / size)).")
    o.add_argument("--mixup-beta", type=float, default=0.0,
                   help="Coin-flip mixup (ZeroVL): alpha ~ Beta(b, b); a fair coin mixes either the images or the "
                        "text token embeddings with the reversed batch; soft targets. 0: off. --loss openclip only.")
    o.add_argument("--local-loss", action="store_true",
                   help="open_clip's flag; always on here: each rank scores its own pairs against all gathered "
                        "features, gradient through the gather (accepted for ported commands).")
    o.add_argument("--gather-with-grad", action="store_true",
                   help="open_clip's flag; always on here: with --local-loss the gather carries the gradient, which is "
                        "what makes the distributed gradient exact (accepted for ported commands).")
    o.add_argument("--dataset-resampled", action="store_true", help=argparse.SUPPRESS)
    o.add_argument("--train-data-upsampling-factors", default=None, help=argparse.SUPPRESS)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--max-steps", type=int, default=None, help="Stop after this many optimizer steps; the lr schedule still spans --epochs (simulates a pre-emption).")
    o.add_argument("--max-nonfinite-steps", type=int, default=5,
                   help="Consecutive non-finite losses/gradients tolerated (each step skipped) before stopping.")

    i = p.add_argument_group("identity loss and reference model")
    i.add_argument("--id-loss", choices=["none", "arcface", "linear"], default="none",
                   help="Add an identity classification loss on image and text embeddings, one head over the "
                        "training split's person ids shared by both modalities: 'arcface' (cosine classifier with an "
                        "angular margin) or 'linear' (IRRA's linear classifier, plain cross-entropy).")
    i.add_argument("--id-loss-weight", type=float, default=1.0)
    i.add_argument("--id-head-lr-mult", type=float, default=1.0,
                   help="The identity head's lr as a multiple of --lr (IRRA trains its new modules at 5x).")
    i.add_argument("--arcface-scale", type=float, default=30.0, help="s: logits are s * cos.")
    i.add_argument("--arcface-margin", type=float, default=0.2, help="m: additive angular margin (radians).")
    i.add_argument("--arcface-subcenters", type=int, default=1, help="K sub-centers per id (max over them).")
    i.add_argument("--num-ids", type=int, default=None,
                   help="Person ids of the training data (default: from manifest.json).")
    i.add_argument("--ref-model", default=None, help="Reference (teacher) model name, e.g. ViT-B-32.")
    i.add_argument("--ref-pretrained", default=None, help="Local weights file of the reference model.")
    i.add_argument("--distill", choices=["none", "feature"], default="none",
                   help="feature: (1-w)*loss + w*(|f_T,img - f_S,img|^2 + |f_T,txt - f_S,txt|^2).")
    i.add_argument("--distill-weight", type=float, default=0.5, help="w of --distill.")
    i.add_argument("--init-from-ref", action="store_true",
                   help="Copy every reference parameter whose name and shape match into the student (logged).")
    i.add_argument("--lock-logit-scale", action="store_true", help="Freeze the temperature (logit scale).")

    c = p.add_argument_group("checkpoints and logs")
    # --logs (open_clip's name) is an ambiguous abbreviation of torchrun's own --logs-specs, and torchrun rejects it
    # before the script sees it; --logs-dir works under both python and torchrun.
    c.add_argument("--logs-dir", "--logs", dest="logs", default="./logs",
                   help="Root folder of runs (use --logs-dir under torchrun).")
    c.add_argument("--name", default=None, help="Run name (folder under --logs); default: a timestamped name.")
    c.add_argument("--resume", default=None, help="'latest' or a checkpoint path.")
    c.add_argument("--save-every-n-steps", type=int, default=0, help="Also save latest.pt every N steps (0: epoch ends only).")
    c.add_argument("--keep-epoch-checkpoints", action="store_true", help=argparse.SUPPRESS)  # no effect; old commands
    c.add_argument("--keep-last-k", type=int, default=0,
                   help="Keep only the K newest epoch_N.pt files (0: keep all). latest.pt is always kept.")
    c.add_argument("--epoch-weights-only", action="store_true",
                   help="epoch_N.pt holds the weights and what evaluation needs, not the optimizer and loss state "
                        "(about a third of a full checkpoint with AdamW); latest.pt stays complete for --resume.")
    c.add_argument("--save-frequency", type=int, default=1,
                   help="Write epoch_N.pt every N epochs and at the last epoch (0: none; latest.pt is always written).")
    c.add_argument("--report-to", default="", help="'tensorboard' to write event files.")
    c.add_argument("--log-every-n-steps", type=int, default=10)
    c.add_argument("--profile", action="store_true",
                   help="torch.profiler on rank 0 over the steps of --profile-steps: a trace in RUN/traces "
                        "(TensorBoard / Perfetto) and the top operators in out.log (the official FastCLIP flag).")
    c.add_argument("--profile-steps", type=int, nargs=3, default=(10, 2, 10), metavar=("WAIT", "WARMUP", "ACTIVE"),
                   help="Profiler schedule: skip WAIT steps, warm up WARMUP, record ACTIVE.")
    c.add_argument("--log-keys", action="store_true",
                   help="Write the pair keys of every batch to logs/NAME/keys_rankR.jsonl (audits sample order).")
    c.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto, cpu or cuda.")
    c.add_argument("--check-args", action="store_true",
                   help="Validate the flags (and the model name) and exit: scripts/train.sh runs this once before "
                        "it starts torchrun, so a typo is one error line, not N processes' reports.")

    from fast_clip.losses import add_loss_args
    add_loss_args(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(flag: str, msg: str):
        parser.error(f"{flag}: {msg}")

    if args.batch_size < 1:
        fail("--batch-size", f"must be >= 1, got {args.batch_size}")
    # open_clip's spellings: what maps is mapped, what does not is one line that says what to use
    if args.precision == "amp_bfloat16":
        args.precision = "amp_bf16"
    if args.precision == "amp":
        fail("--precision", "amp (fp16 autocast with a loss scaler) is not supported: use amp_bf16 (the default; "
                            "bf16 needs no loss scaler) or fp32")
    if args.force_image_size is not None:
        if args.image_size is not None:
            fail("--force-image-size", "give --image-size or --force-image-size, not both")
        if len(args.force_image_size) not in (1, 2) or min(args.force_image_size) < 1:
            fail("--force-image-size", "one size (square) or H W, each >= 1")
        fs = args.force_image_size
        args.image_size = (fs[0], fs[0]) if len(fs) == 1 else tuple(fs)
    if args.dataset_resampled or args.train_data_upsampling_factors is not None:
        fail("--dataset-resampled" if args.dataset_resampled else "--train-data-upsampling-factors",
             "not supported: sampling with replacement is --train-data-weights 'W1::W2' (one weight per '::' set, "
             "with --train-num-samples for the epoch length); without weights every pair is seen once per epoch")
    if args.epochs < 1:
        fail("--epochs", f"must be >= 1, got {args.epochs}")
    if args.workers < 0:
        fail("--workers", "must be >= 0")
    if not math.isfinite(args.lr) or args.lr <= 0:
        fail("--lr", f"must be a finite number > 0, got {args.lr}")
    for flag in ("wd", "lr_min", "beta1", "beta2", "eps", "grad_clip_norm"):
        v = getattr(args, flag, None)
        if isinstance(v, float) and not math.isfinite(v):
            fail(f"--{flag.replace('_', '-') if flag != 'lr_min' else flag}", f"must be a finite number, got {v}")
    if args.warmup < 0:
        fail("--warmup", "must be >= 0")
    if not 0 <= args.lr_min <= args.lr:
        fail("--lr_min", f"must be in [0, --lr={args.lr}], got {args.lr_min}")
    if args.stop_epochs is not None and not 1 <= args.stop_epochs <= args.epochs:
        fail("--stop_epochs", f"must be in [1, --epochs={args.epochs}], got {args.stop_epochs}")
    if args.save_frequency < 0:
        fail("--save-frequency", "must be >= 0")
    if args.keep_last_k < 0:
        fail("--keep-last-k", "must be >= 0")
    if args.profile and (min(args.profile_steps) < 0 or args.profile_steps[2] < 1):
        fail("--profile-steps", f"WAIT WARMUP ACTIVE must be >= 0 with ACTIVE >= 1, got {list(args.profile_steps)}")
    if args.shuffle_buffer < 1:
        fail("--shuffle-buffer", "must be >= 1")
    if args.pairs_per_id and (args.pairs_per_id < 2 or args.batch_size % args.pairs_per_id
                              or args.batch_size // args.pairs_per_id < 2):
        fail("--pairs-per-id", f"must be 0 or a K >= 2 that divides --batch-size {args.batch_size} (per GPU) into at "
                               f"least 2 persons")
    if args.val_frequency and not args.val_data:
        fail("--val-frequency", "needs --val-data")
    if args.train_data_weights is not None:
        sets = args.train_data.split("::")
        try:
            w = [float(x) for x in args.train_data_weights.split("::")]
        except ValueError:
            fail("--train-data-weights", f"expected numbers joined with '::', got {args.train_data_weights!r}")
        if len(w) != len(sets):
            fail("--train-data-weights", f"{len(w)} weights for {len(sets)} '::'-separated --train-data sets")
        if any(x < 0 for x in w) or sum(w) <= 0:
            fail("--train-data-weights", "weights must be >= 0 with a positive sum")
    if args.report_to not in ("", "tensorboard", "none"):
        fail("--report-to", f"accepted values: tensorboard, none; got {args.report_to!r}")
    if args.pretrained is not None and not os.path.isfile(args.pretrained):
        fail("--pretrained", f"{args.pretrained!r} is not a file (nothing is downloaded; pass a local weights file)")
    # per-rank samples per optimizer step, and the DGA chunks they are forwarded in
    given = [f for f, v in (("--accum-freq", args.accum_freq != 1), ("--dga-chunks", args.dga_chunks is not None),
                            ("--dga-chunk-size", args.dga_chunk_size is not None)) if v]
    if len(given) > 1:
        fail(given[1], f"give one of --accum-freq, --dga-chunks, --dga-chunk-size, not {' and '.join(given)}")
    args.step_batch_size, args.accum_chunks = args.batch_size, 1
    if args.accum_freq != 1:
        if args.accum_freq < 1:
            fail("--accum-freq", f"must be >= 1, got {args.accum_freq}")
        args.step_batch_size, args.accum_chunks = args.batch_size * args.accum_freq, args.accum_freq
    elif args.dga_chunks is not None:
        if not 1 <= args.dga_chunks <= args.batch_size:
            fail("--dga-chunks", f"must be in [1, --batch-size={args.batch_size}], got {args.dga_chunks}")
        args.accum_chunks = args.dga_chunks
    elif args.dga_chunk_size is not None:
        if args.dga_chunk_size < 1:
            fail("--dga-chunk-size", "must be >= 1")
        args.accum_chunks = -(-args.batch_size // args.dga_chunk_size)
    if args.debiased_sampling and (args.train_data_weights or args.train_num_samples):
        fail("--debiased-sampling", "reads each set once per epoch by size; drop --train-data-weights / "
                                    "--train-num-samples")
    if args.mixup_beta < 0:
        fail("--mixup-beta", "must be >= 0")
    if args.mixup_beta and (args.id_loss != "none" or args.distill != "none"):
        fail("--mixup-beta", "mixed samples have no single identity or teacher feature; not with --id-loss / --distill")
    if args.id_loss != "none":
        if args.arcface_scale <= 0:
            fail("--arcface-scale", "must be > 0")
        if not 0 <= args.arcface_margin < 3.14159:
            fail("--arcface-margin", "must be in [0, pi) radians")
        if args.arcface_subcenters < 1:
            fail("--arcface-subcenters", "must be >= 1")
        if args.id_loss_weight < 0:
            fail("--id-loss-weight", "must be >= 0")
        if not args.id_head_lr_mult > 0:
            fail("--id-head-lr-mult", "must be > 0")
    if args.num_ids is not None and args.num_ids < 1:
        fail("--num-ids", "must be >= 1")
    if (args.distill != "none" or args.init_from_ref) and not args.ref_model:
        fail("--ref-model", "needed by --distill / --init-from-ref")
    if args.ref_model and not args.ref_pretrained:
        fail("--ref-pretrained", "a reference model needs its local weights file (nothing is downloaded)")
    if args.ref_pretrained is not None and not os.path.isfile(args.ref_pretrained):
        fail("--ref-pretrained", f"{args.ref_pretrained!r} is not a file")
    if not 0 <= args.distill_weight <= 1:
        fail("--distill-weight", "must be in [0, 1]")
    from fast_clip.losses import LOSSES, LossConfig
    try:
        args.loss_config = LossConfig.from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.mixup_beta and not LOSSES[args.loss_config.loss].supports_mixup:
        fail("--mixup-beta", f"works with --loss openclip only (got {args.loss_config.loss}: the FastCLIP losses keep "
                             f"one estimator per training pair, and a mixed sample is not one pair)")
    if args.mixup_beta and (args.loss_config.id_positives or args.loss_config.loss == "sdm"):
        fail("--mixup-beta", "does not combine with --id-positives or --loss sdm: a mixed sample shows two people")
    return args
