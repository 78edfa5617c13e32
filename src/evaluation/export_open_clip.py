"""``fastclip-export``: a run's checkpoint, or any checkpoint, as an open_clip model folder (fast_clip/open_clip_dir.py)
that plain open_clip and clip_benchmark load as ``local-dir:DIR``.

    python -m evaluation.export_open_clip RUN_DIR [--epoch N] [--output DIR]     (default DIR: RUN_DIR/open_clip)
    python -m evaluation.export_open_clip CHECKPOINT --output DIR [--model NAME --image-size H W]

The model card carries the run's scores when RUN_DIR/eval/epoch_N.json exists (scripts/eval.sh writes it).
"""
from __future__ import annotations

import argparse
import os
import sys

from common import runs
from evaluation.evaluate import EvalError, check_image_size, cli
from fast_clip import open_clip_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastclip-export", description="Write an open_clip model folder (config, "
                                "safetensors weights, model card) from a training run or a checkpoint.")
    p.add_argument("source", help="training run directory (its last epoch_N.pt) or a checkpoint / weights file")
    p.add_argument("--output", metavar="DIR", help="the folder to write (default for a run: RUN_DIR/open_clip)")
    p.add_argument("--epoch", type=int, help="export RUN_DIR's checkpoints/epoch_N.pt (default: the highest N)")
    p.add_argument("--model", help="open_clip model name of a weights file that is not one of our checkpoints")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                   help="the size the weights were trained at, for a weights file that does not store it")
    return p


def _run(args) -> int:
    check_image_size(args)
    is_run = os.path.isdir(args.source)
    if not is_run and not args.output:
        raise EvalError("a checkpoint needs --output DIR (the open_clip folder to write)")
    w = runs.resolve(args.source if is_run else None, None if is_run else args.source, epoch=args.epoch,
                     model=args.model, image_size=args.image_size)
    out = args.output or os.path.join(w.run_dir, runs.OPEN_CLIP_DIR)
    if os.path.exists(out) and not os.path.isdir(out):
        raise EvalError(f"--output {out!r} is a file")
    folder = open_clip_dir.export(w, out, open_clip_dir.run_metrics(w))
    print(f"wrote open_clip model folder {folder} (open_clip.create_model_and_transforms('local-dir:{folder}'))")
    return 0


main = cli(_run, build_parser)


if __name__ == "__main__":
    sys.exit(main())
