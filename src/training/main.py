"""Entry point: parse -> build -> run -> close.

    torchrun --nproc_per_node N src/training/main.py --train-data 'shards/synth/train' --model PersonTiny ...
    python src/training/main.py ...            (one process, same code)

Everything a run is made of is built by training/trainer.py from the typed config of training/config.py; this file
only sets up the process (distributed group, model-init seed, signal handling), builds the --val-data validation
from the evaluator (the one place where training meets evaluation) and reports a fatal error where the user will
look: the run's own folder and, under scripts/train.sh, the launcher's last line.
"""
from __future__ import annotations

import gc
import os
import sys
import traceback

import torch

from training import distributed as dist_utils
from training import runlock, slurm, stop
from training.params import flag_values, parse_args
from training.run_dir import RunFolder, tell_launcher
from common import fsio
from common.seeding import Stream, rng_seed


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.check_args:
        return _check_model(cfg.model.name, cfg.model.image_size)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device cuda: no CUDA GPU is usable here (torch {torch.__version__}, CUDA build "
                         f"{torch.version.cuda}); use --device cpu or auto")
    fsio.read_timeout_s = cfg.data.timeout
    threads = dist_utils.srun_threads(os.environ)
    if threads:  # before the first parallel op: what torchrun's OMP_NUM_THREADS would have set
        torch.set_num_threads(threads)
    folder = trainer = None
    try:
        denv = dist_utils.init_distributed(cfg.device)
        dist_utils.require_same(flag_values(cfg))  # before the run folder is touched
        torch.manual_seed(rng_seed(Stream.MODEL_INIT, cfg.seed))  # a model built from scratch draws from here
        stop.install()
        folder = RunFolder.claim(cfg.run)
        try:
            with stop.interruptible():  # nothing to finish yet: a stop signal ends the build at once
                validate = _validator(cfg.data.val_data, denv.device) if cfg.data.val_data else None
                from training.trainer import Trainer  # the model stack is imported only when a run starts
                trainer = Trainer(cfg, denv, folder, validate)
        except stop.Interrupted as e:
            raise SystemExit(f"error: stopped by {e} while the run was being built, before its first step; nothing "
                             f"new was trained (run it again, with --resume latest to continue a checkpoint)")
        code = trainer.run()
        stopped = stop.requested not in (None, "SIGINT") and trainer.stream.epoch < cfg.optim.epochs
        if stopped and denv.is_main:  # by SIGTERM, latest.pt written: a time limit's warning requeues the job
            slurm.requeue_after_stop(trainer.logger.info)
        return code
    except SystemExit as e:
        if isinstance(e.code, str):
            _report_fatal(folder, e.code)
        raise
    except Exception:
        _report_fatal(folder, traceback.format_exc())
        raise
    finally:
        if trainer is not None:
            trainer.close()
        # The trainer's components refer to each other (the checkpointer reads the stream's position through the
        # trainer), so only the cycle collector frees them, the DDP module with its process group among them. Left to
        # the interpreter's teardown, gloo's worker threads then end mid-finalisation and the rank aborts
        # ("terminate called without an active exception", exit -6) after a run that finished: collect them here,
        # while the interpreter is whole, before the process group goes.
        trainer = None
        gc.collect()
        stop.uninstall()
        runlock.release()
        dist_utils.destroy_distributed()


def _validator(val_data: str, device):
    from fast_clip.retrieval.protocol import EvalError, validator
    try:
        return validator(val_data, device)
    except EvalError as e:  # a typo must not cost an epoch
        raise SystemExit(f"error: --val-data: {e}")


def _check_model(name: str, image_size) -> int:
    """--check-args: the flags parsed; the model name and the image size that fits it are what argparse cannot
    check."""
    from fast_clip.model import input_size
    try:
        input_size(name, image_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    print("flags OK")
    return 0


def _report_fatal(folder: RunFolder | None, message: str) -> None:
    """A fatal error goes to the run's own folder (once it is this run's: not for a refused name or a held lock) and
    to the launcher (every rank)."""
    if folder is not None:
        folder.record_fatal(message)
    tell_launcher(message)


if __name__ == "__main__":
    sys.exit(main())
