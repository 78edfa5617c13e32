"""Entry point: parse -> build -> train -> close.

    torchrun --nproc_per_node N src/training/main.py --train-data 'shards/synth/train' --model PersonTiny ...
    python src/training/main.py ...            (one process, same code)
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

from training import checkpoint as ckpt_lib
from training import distributed as dist_utils
from training import runlock, stop
from training.data import DataError, LoaderConfig, SampleDecoder, TrainStream, build_train_loader, load_train_sets
from training.logger import RunLogger
from training.objective import IdLossConfig, Objective, TrainModule
from training.optim import build_optimizer
from training.params import parse_args
from training.seeding import Stream, rng_seed
from training.train import NonFiniteError, TrainState, train_one_epoch, unwrap
from fast_clip.transforms import build_transform, clean_caption


class RunConfig:
    """The few derived numbers the epoch loop needs (kept apart from the argparse namespace on purpose)."""

    def __init__(self, args, batches_per_epoch: int):
        self.batches_per_epoch = batches_per_epoch
        # --max-steps stops early (a simulated pre-emption) without changing the schedule of the full run.
        self.total_steps = batches_per_epoch * args.epochs
        self.lr, self.warmup, self.lr_scheduler, self.lr_min = args.lr, args.warmup, args.lr_scheduler, args.lr_min
        self.seed, self.precision, self.grad_clip_norm = args.seed, args.precision, args.grad_clip_norm
        self.log_every, self.save_every, self.max_steps = args.log_every_n_steps, args.save_every_n_steps, args.max_steps
        self.max_nonfinite_steps = args.max_nonfinite_steps
        self.accum_chunks, self.mixup_beta = args.accum_chunks, args.mixup_beta
        self.device_augment = None  # set by _train when --augment-device resolves to 'device'


def _settings(args) -> dict:
    d = {k: v for k, v in vars(args).items() if k != "loss_config"}
    from dataclasses import asdict
    d["loss_config"] = asdict(args.loss_config)
    return d


def _holds_a_run(run_dir: str) -> str | None:
    """What makes ``run_dir`` a run of its own (a checkpoint or logged steps); a failed start leaves neither."""
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if os.path.isdir(ckpt_dir) and any(n.endswith(".pt") for n in os.listdir(ckpt_dir)):
        return "checkpoints"
    log = os.path.join(run_dir, "train_log.jsonl")
    if os.path.isfile(log) and os.path.getsize(log) > 0:
        return "logged training steps"
    return None


def _prepare_run_dir(args) -> str:
    if args.name is None:
        args.name = time.strftime("run-%Y%m%d-%H%M%S")
        args.name = dist_utils.broadcast_object(args.name)
    run_dir = os.path.join(args.logs, args.name)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    problem = None
    if dist_utils.is_main():
        held = _holds_a_run(run_dir) if os.path.isdir(run_dir) else None
        if held and args.resume is None:
            # open_clip's rule: an experiment name is not reused by accident (a second run would overwrite the
            # first one's checkpoints and mix its logs)
            problem = (f"--name {args.name}: {run_dir} already holds a run ({held}); continue it with --resume "
                       f"latest, or choose another --name")
        else:
            try:
                os.makedirs(ckpt_dir, exist_ok=True)
                probe = os.path.join(ckpt_dir, f".write_probe.{os.getpid()}")
                with open(probe, "wb") as f:
                    f.write(b"x")
                    f.flush()
                    os.fsync(f.fileno())
                os.remove(probe)
                problem = runlock.acquire(run_dir)
            except OSError as e:
                problem = (f"the log folder {ckpt_dir!r} is not writable ({e.strerror}); choose another --logs or "
                           f"free space before training")
    problem = dist_utils.broadcast_object(problem)  # every rank stops, none waits in a barrier for rank 0
    if problem is not None:
        raise SystemExit(f"error: {problem}")
    args.run_dir = run_dir
    return run_dir


def _report_fatal(args, message: str) -> None:
    """Where a fatal error goes: the run's own folder (rank 0) and the launcher (every rank)."""
    _record_fatal(args, message)
    _tell_launcher(message)


def _tell_launcher(message: str) -> None:
    """scripts/train.sh prints the lowest rank's line of this file last, below torchrun's own failure report."""
    path = os.environ.get("FASTCLIP_ERROR_FILE")
    lines = message.rstrip().splitlines()
    if not path or not lines:
        return
    try:
        with open(f"{path}.rank{os.environ.get('RANK', '0')}", "w", encoding="utf-8") as f:
            f.write(lines[-1] + "\n")
    except OSError:
        pass


def _record_fatal(args, message: str) -> None:
    """A run that ends in an error says so in its own folder: the message (or traceback) at the end of out.log and
    in summary.json. Only once the folder is this run's (not for a refused name or a held lock)."""
    run_dir = getattr(args, "run_dir", None)
    if run_dir is None or not dist_utils.is_main():
        return
    try:
        with open(os.path.join(run_dir, "out.log"), "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} | FATAL {message.rstrip()}\n")
        path = os.path.join(run_dir, "summary.json")
        summary = json.load(open(path)) if os.path.isfile(path) else {}
        summary.setdefault("status", "failed")
        summary["error"] = message.rstrip().splitlines()[-1]
        with open(path, "w") as f:
            json.dump(summary, f, indent=2)
    except (OSError, ValueError):
        pass  # the folder itself may be the problem; the error still reaches the terminal


class Hooks:
    """What the epoch loop calls back into: logging, checkpointing, key audit."""

    def __init__(self, args, run_dir, logger: RunLogger, model, optimizer, loss_fn, stream, id_head=None):
        self.args, self.run_dir, self.logger = args, run_dir, logger
        self.id_head = id_head
        self.model, self.optimizer, self.loss_fn, self.stream = model, optimizer, loss_fn, stream
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")
        self._keys_file = None
        if args.log_keys:
            self._keys_file = open(os.path.join(run_dir, f"keys_rank{dist_utils.rank()}.jsonl"), "a")
        self.profiler = _profiler(args, run_dir, logger) if args.profile and dist_utils.is_main() else None

    def step_done(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def warn(self, msg: str) -> None:
        self.logger.warning(msg)

    def log(self, state: TrainState, values: dict) -> None:
        self.logger.scalars(state.global_step, values)
        if state.source_counts and len(self.stream.sets) > 1:
            counts = {f"source_{k}": v for k, v in sorted(state.source_counts.items())}
            self.logger.scalars(state.global_step, counts, prefix="data")
        if state.bad_samples:
            self.logger.scalars(state.global_step, {f"skipped_{k}": v for k, v in state.bad_samples.items()},
                                prefix="data")
        scalars = " ".join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, float))
        self.logger.info(f"epoch {state.epoch} step {state.global_step} "
                         f"({state.batch_in_epoch}/{self.stream.n}) {scalars}")

    def log_keys(self, state: TrainState, keys: torch.Tensor) -> None:
        if self._keys_file is not None:
            self._keys_file.write(json.dumps({"epoch": state.epoch, "batch": state.batch_in_epoch,
                                              "step": state.global_step, "keys": keys.tolist()}) + "\n")
            self._keys_file.flush()

    def components(self) -> dict:
        """The stateful parts a checkpoint collects, by the key they are stored under (the checkpoint format)."""
        return {"state_dict": unwrap(self.model), "optimizer": self.optimizer, "loss": self.loss_fn,
                # beside (not inside) state_dict so that open_clip still loads the checkpoint as a plain model
                "id_head": self.id_head}

    def checkpoint(self, state: TrainState) -> dict:
        return {
            **{k: c.state_dict() if c is not None else None for k, c in self.components().items()},
            "scaler": None,  # bf16 autocast needs no loss scaler; the slot keeps the format stable
            "train_state": state.to_dict(),
            "data": {"epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, **self.stream.plan_signature()},
            "rng": ckpt_lib.rng_state(),
            "model_name": self.args.model,
            "image_size": list(self.args.image_size),
            "epoch": state.epoch,
            "step": state.global_step,
        }

    def save(self, state: TrainState, epoch_file: int | None = None) -> None:
        # Estimators of the global contrastive loss are identical on every rank, so rank 0's copy is the state.
        per_rank = dist_utils.all_gather_object({"bad": dict(state.bad_samples),
                                                 "sources": {str(k): v for k, v in state.source_counts.items()}})
        if dist_utils.is_main():
            obj = self.checkpoint(state)
            obj["per_rank_counts"] = per_rank
            ckpt_lib.save_latest(obj, self.ckpt_dir)
            if epoch_file is not None:
                if self.args.epoch_weights_only:
                    obj = ckpt_lib.weights_only(obj)
                ckpt_lib.atomic_save(obj, os.path.join(self.ckpt_dir, f"epoch_{epoch_file}.pt"))
                if self.args.keep_last_k:
                    ckpt_lib.keep_last_epochs(self.ckpt_dir, self.args.keep_last_k)
        dist_utils.barrier()

    def stop_requested(self) -> bool:
        """True on every rank at the same step once any rank got SIGTERM/SIGINT (one all-reduce per step)."""
        return stop.agreed()

    def close(self) -> None:
        if self._keys_file is not None:
            self._keys_file.close()
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None


def _profiler(args, run_dir: str, logger):
    """--profile: torch.profiler over steps WAIT+1 .. WAIT+WARMUP+ACTIVE of rank 0 (the official FastCLIP code's
    schedule by default), a trace for TensorBoard / Perfetto in RUN/traces and the top operators in out.log."""
    wait, warmup, active = args.profile_steps
    trace_dir = os.path.join(run_dir, "traces")
    to_tensorboard = torch.profiler.tensorboard_trace_handler(trace_dir, worker_name="rank0")

    def on_ready(prof):
        to_tensorboard(prof)
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        logger.info(f"profile of {active} steps (trace in {trace_dir}):\n"
                    + prof.key_averages().table(sort_by=sort, row_limit=15))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities, profile_memory=True, record_shapes=False,
                                  schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
                                  on_trace_ready=on_ready)
    prof.start()
    return prof


def _resume(args, hooks: Hooks, logger) -> TrainState:
    """Every component of hooks.components() from the checkpoint, the RNG, the counters and the stream position."""
    if args.resume is None:
        return TrainState()
    if args.resume == "latest":
        found = ckpt_lib.load_latest(hooks.ckpt_dir, warn=logger.warning)
        if found is None:
            logger.info(f"--resume latest: no checkpoint in {hooks.ckpt_dir} yet, starting fresh")
            return TrainState()
        ckpt, path = found
    else:
        if not os.path.isfile(args.resume):
            raise ckpt_lib.CheckpointError(f"--resume {args.resume!r} is not a file (use 'latest' or a checkpoint path)")
        ckpt, path = ckpt_lib.load(args.resume), args.resume
    for key, component in hooks.components().items():
        if component is None:
            continue
        if ckpt.get(key) is None:
            raise ckpt_lib.CheckpointError(f"{path} has no identity head; it was written without --id-loss"
                                           if key == "id_head" else f"{path} has no {key!r}: not a training checkpoint")
        try:
            component.load_state_dict(ckpt[key])
        except (RuntimeError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()
            detail = "; ".join(x.strip() for x in first[1:3]) or first[0]
            raise ckpt_lib.CheckpointError(
                f"{path}: its {key!r} does not fit this run ({detail}); were --model, --loss, --train-data or "
                f"--data_size changed since it was written? Resume with the same settings, or start a new --name") \
                from e
    ckpt_lib.set_rng_state(ckpt["rng"])
    state = TrainState.from_dict(ckpt["train_state"])
    per_rank = ckpt.get("per_rank_counts") or []
    if len(per_rank) == dist_utils.world_size():
        from collections import Counter
        mine = per_rank[dist_utils.rank()]
        state.bad_samples = Counter(mine["bad"])
        state.source_counts = Counter({int(k): v for k, v in mine["sources"].items()})
    data = ckpt["data"]
    if not hooks.stream.same_plan(data) and state.batch_in_epoch:
        logger.warning(f"{path} was written with another data plan ({data}); the order of the rest of epoch "
                       f"{state.epoch} cannot be reproduced, so it restarts at its first batch")
        state.batch_in_epoch = 0
    logger.info(f"resumed from {path}: epoch {state.epoch}, batch {state.batch_in_epoch}, step {state.global_step}")
    return state


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check_args:
        from fast_clip.model import model_config
        try:
            model_config(args.model)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        print("flags OK")
        return 0
    denv = dist_utils.init_distributed(args.device)
    torch.manual_seed(rng_seed(Stream.MODEL_INIT, args.seed))  # a model built from scratch draws from here
    stop.install()
    try:
        return _train(args, denv)
    except SystemExit as e:
        if isinstance(e.code, str):
            _report_fatal(args, e.code)
        raise
    except Exception:
        import traceback
        _report_fatal(args, traceback.format_exc())
        raise
    finally:
        stop.uninstall()
        runlock.release()
        dist_utils.destroy_distributed()


def _train(args, denv) -> int:
    from fast_clip.losses import build_loss
    from fast_clip.model import create_model, default_image_size, get_tokenizer

    run_dir = _prepare_run_dir(args)
    logger = RunLogger(run_dir, enabled=denv.is_main, tensorboard=args.report_to == "tensorboard")
    args.image_size = tuple(args.image_size) if args.image_size else default_image_size(args.model)
    if denv.is_main:
        with open(os.path.join(run_dir, "params.json"), "w") as f:
            json.dump(_settings(args), f, indent=2, default=str)
    logger.info(f"run {run_dir} | world {denv.world_size} | device {denv.device} | model {args.model} "
                f"{args.image_size[0]}x{args.image_size[1]} | loss {args.loss_config.loss}")

    try:
        sets = load_train_sets(args.train_data, logger=logger.info)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    total = sum(s.num_pairs for s in sets)
    data_size = args.loss_config.data_size or total
    if data_size < total:
        raise SystemExit(f"error: --data_size {data_size} is smaller than the {total} pairs of --train-data (one "
                         f"loss-state entry per pair); leave it out to use {total}")
    for s in sets:
        logger.info(f"data set {s.index}: {s.spec} | {len(s.urls)} shards | {s.num_pairs} pairs | "
                    f"keys {s.key_offset}..{s.key_offset + s.num_pairs - 1}"
                    + ("" if s.ours else " | not a make_shards split: no person ids, json optional"))
    if args.val_data:  # a typo must not cost an epoch
        from evaluation.evaluate import EvalError, resolve_shards
        try:
            resolve_shards(args.val_data)
        except EvalError as e:
            raise SystemExit(f"error: --val-data: {e}")

    from fast_clip.model import WeightsFileError
    try:
        model = create_model(args.model, pretrained=args.pretrained, image_size=args.image_size, device=denv.device)
    except (WeightsFileError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.lock_image:  # open_clip's own tower locks (after --pretrained, before the optimizer sees the params)
        model.lock_image_tower(unlocked_groups=args.lock_image_unlocked_groups,
                               freeze_bn_stats=args.lock_image_freeze_bn_stats)
    if args.lock_text:
        model.lock_text_tower(unlocked_layers=args.lock_text_unlocked_layers)  # CLIP's LayerNorms lock with it
    loss_fn = build_loss(args.loss_config, data_size=data_size, device=denv.device)
    if hasattr(loss_fn, "state_summary"):  # the GCL family's per-pair tables
        logger.info(loss_fn.state_summary())
    init_scale = loss_fn.initial_logit_scale()
    if init_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(init_scale)
    teacher = _reference_model(args, model, run_dir, logger, denv)
    model.logit_scale.requires_grad_(loss_fn.learns_model_temperature and not args.lock_logit_scale)
    id_head = _id_head(args, model, sets, logger, denv)
    module = TrainModule(model, id_head)
    # Parameter order is the open_clip model's, then the head's: optimizer states of runs without a head still load.
    optimizer = build_optimizer(module, args.lr, args.wd, (args.beta1, args.beta2), args.eps,
                                head_lr_mult=args.id_head_lr_mult if id_head is not None else 1.0)
    objective = Objective(loss_fn,
                          IdLossConfig(args.id_loss_weight, args.arcface_scale, args.arcface_margin, args.id_loss)
                          if id_head is not None else None,
                          teacher=teacher if args.distill == "feature" else None, distill_weight=args.distill_weight)

    if args.loss_config.id_positives or args.pairs_per_id:
        for s in sets:
            if not s.ours:  # said once here, not per step: such pairs simply have no other positive
                logger.info(f"--train-data set {s.spec!r} has no manifest.json: person ids come from each sample's "
                            f"json 'pid'; a pair without one is its own person only")
    tokenizer = get_tokenizer(args.model)
    on_device = args.augment_device == "device" or (args.augment_device == "auto" and denv.device.type == "cuda")
    decoder = SampleDecoder(transform=build_transform(args.image_size, train=not args.no_augment, uint8=on_device),
                            clean=clean_caption, caption_key=args.caption_key)
    weights = [float(x) for x in args.train_data_weights.split("::")] if args.train_data_weights else None
    stream = TrainStream(sets, LoaderConfig(batch_size=args.step_batch_size, workers=args.workers, seed=args.seed,
                                            shuffle_buffer=args.shuffle_buffer,
                                            shard_shuffle=not args.no_shard_shuffle, weights=weights,
                                            num_samples=args.train_num_samples,
                                            max_bad_frac=args.max_bad_samples_frac,
                                            debiased=args.debiased_sampling, pairs_per_id=args.pairs_per_id),
                         decoder, tokenizer, denv.rank, denv.world_size)
    hooks = Hooks(args, run_dir, logger, model, optimizer, loss_fn, stream, id_head)
    try:
        state = _resume(args, hooks, logger)
    except ckpt_lib.CheckpointError as e:
        raise SystemExit(f"error: {e}")

    train_model = module
    if denv.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[denv.device.index] if denv.device.type == "cuda" else None)
    if args.torchcompile:
        train_model = torch.compile(train_model)
    cfg = RunConfig(args, stream.n)
    if on_device:
        from training.device_augment import DeviceAugment
        cfg.device_augment = DeviceAugment(args.image_size, train=not args.no_augment)
    logger.info(f"augmentation: {'batched on ' + str(denv.device) if on_device else 'per sample in the loader'}"
                f"{' (flip, pad-crop, erasing off)' if args.no_augment else ''}")
    logger.info(f"{stream.n} batches of {args.step_batch_size} per rank per epoch "
                f"(global batch {args.step_batch_size * denv.world_size}"
                f"{f', DGA in {args.accum_chunks} chunks' if args.accum_chunks > 1 else ''}"
                f"{', debiased sampling' if args.debiased_sampling else ''}); {cfg.total_steps} steps in all")

    hooks.model = model
    status, code, error = None, 0, None
    try:
        while state.epoch < args.epochs:
            loss_fn.set_epoch(state.epoch)
            stream.set_epoch(state.epoch, state.batch_in_epoch)
            loader = build_train_loader(stream, pin_memory=denv.device.type == "cuda")
            if denv.is_main and sys.stderr.isatty():  # a bar for people at a terminal; logs stay line-based
                from tqdm import tqdm
                loader = tqdm(loader, total=stream.n - state.batch_in_epoch, desc=f"epoch {state.epoch}",
                              unit="batch", leave=False, dynamic_ncols=True)
            go_on = train_one_epoch(train_model, objective, optimizer, loader, state, cfg, hooks)
            if not go_on:
                hooks.save(state)
                status = f"stopped by {stop.requested}" if stop.requested else "stopped at --max-steps"
                if stop.requested:
                    logger.info(f"{stop.requested}: stopped after step {state.global_step}, latest.pt written; "
                                f"continue with --resume latest")
                break
            state.epoch += 1
            state.batch_in_epoch = 0
            # epoch_N.pt every --save-frequency epochs and at the last one (eval.sh scores the final epoch);
            # latest.pt (the resume point) at every epoch end
            keep = args.save_frequency > 0 and (state.epoch % args.save_frequency == 0 or state.epoch == args.epochs)
            hooks.save(state, epoch_file=state.epoch if keep else None)
            logger.info(f"epoch {state.epoch} done; checkpoint {f'epoch_{state.epoch}.pt' if keep else 'latest.pt'}")
            if args.val_frequency and state.epoch % args.val_frequency == 0:
                _validate(args, model, tokenizer, state, logger)
            if args.stop_epochs and args.stop_epochs <= state.epoch < args.epochs:
                status = f"stopped at --stop_epochs {args.stop_epochs}"
                break
        status = status or "finished"
    except NonFiniteError as e:
        logger.warning(str(e))
        status, code = "stopped: non-finite", 3
    except DataError as e:
        # raised in a loader worker, the message carries the worker's traceback: the last line is ours
        error = str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1] if "Original Traceback" in str(e) \
            else str(e)
        logger.warning(error)
        status = "stopped: data error"  # the message, not the exception: its traceback holds the
        # loader iterator, whose workers must be shut down when the except block ends
    finally:
        # One close path. The summary is a collective (counts summed over ranks), so it is written only when every
        # rank knows how the run ended; after an unexpected exception a rank may be gone.
        if status is not None:
            _write_summary(run_dir, state, status, denv)
        hooks.close()
        logger.close()
    if error is not None:
        raise SystemExit(f"error: {error}")
    return code


def _reference_model(args, student, run_dir, logger, denv):
    """The frozen teacher of --distill, and --init-from-ref's copy of matching tensors into the student."""
    if not args.ref_model:
        return None
    from fast_clip.distill import init_from_ref
    from fast_clip.model import WeightsFileError, create_model, get_tokenizer
    try:
        teacher = create_model(args.ref_model, pretrained=args.ref_pretrained, image_size=args.image_size,
                               device=denv.device)
    except (WeightsFileError, ValueError) as e:
        raise SystemExit(f"error: --ref-model {args.ref_model} / --ref-pretrained {args.ref_pretrained}: {e}")
    if args.distill == "feature":
        # The teacher reads the student's token ids, so both must share the tokenizer.
        t_tok, s_tok = get_tokenizer(args.ref_model), get_tokenizer(args.model)
        if getattr(t_tok, "context_length", None) != getattr(s_tok, "context_length", None) or \
                getattr(t_tok, "vocab_size", None) != getattr(s_tok, "vocab_size", None):
            raise SystemExit(f"error: --distill feature needs the same tokenizer for --ref-model {args.ref_model} "
                             f"and --model {args.model}")
    teacher.eval().requires_grad_(False)
    logger.info(f"reference model {args.ref_model} from {args.ref_pretrained} (frozen)")
    if args.init_from_ref:
        report = init_from_ref(student, teacher)
        logger.info(f"--init-from-ref: copied {len(report['copied'])} tensors; not copied: "
                    f"{len(report['shape_mismatch'])} with another shape, {len(report['missing_in_teacher'])} "
                    f"absent from the reference (list in {run_dir}/init_from_ref.json)")
        if denv.is_main:
            with open(os.path.join(run_dir, "init_from_ref.json"), "w") as f:
                json.dump(report, f, indent=1, default=str)
    if args.distill != "feature":
        del teacher
        return None
    return teacher


def _id_head(args, model, sets, logger, denv):
    if args.id_loss == "none":
        return None
    from fast_clip.id_head import ArcFaceHead, LinearIdHead
    num_ids = args.num_ids
    foreign = [s.spec for s in sets if not s.ours]
    if foreign:
        raise SystemExit(f"error: --id-loss needs person ids, and {foreign} is not a make_shards split (no "
                         f"manifest.json with pids beside it); pack it with data_prep/make_shards.py or drop --id-loss")
    if num_ids is None:
        if any(s.split_ids is None for s in sets):
            raise SystemExit("error: --id-loss needs the number of person ids: no manifest.json beside "
                             f"{[s.spec for s in sets if s.split_ids is None]}; give --num-ids")
        num_ids = sum(s.split_ids for s in sets)
    dim = model.visual.output_dim
    lr = f", head lr x{args.id_head_lr_mult:g}"
    if args.id_loss == "linear":
        logger.info(f"identity loss: linear classifier over {num_ids} ids, dim {dim}, weight {args.id_loss_weight}{lr}")
        return LinearIdHead(num_ids, dim).to(denv.device)
    logger.info(f"identity loss: ArcFace over {num_ids} ids, dim {dim}, s {args.arcface_scale}, "
                f"m {args.arcface_margin}, {args.arcface_subcenters} sub-center(s), weight {args.id_loss_weight}{lr}")
    return ArcFaceHead(num_ids, dim, subcenters=args.arcface_subcenters).to(denv.device)


def _validate(args, model, tokenizer, state, logger) -> None:
    if not dist_utils.is_main():
        dist_utils.barrier()
        return
    from evaluation.evaluate import evaluate_model
    results = evaluate_model(unwrap(model), tokenizer, build_transform(args.image_size, train=False),
                             {"val": args.val_data}, dist_utils.env().device)
    for name, metrics in results.items():
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        logger.scalars(state.global_step, scalars, prefix=f"val_{name}")
        logger.info(f"val {name} epoch {state.epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
    dist_utils.barrier()


def _write_summary(run_dir, state: TrainState, status: str, denv) -> None:
    """Bad-sample and per-source counts summed over ranks, in summary.json beside the logs."""
    per_rank = dist_utils.all_gather_object({"bad": dict(state.bad_samples), "sources": dict(state.source_counts)})
    if not denv.is_main:
        return
    bad, sources = {}, {}
    for r in per_rank:
        for k, v in r["bad"].items():
            bad[k] = bad.get(k, 0) + v
        for k, v in r["sources"].items():
            sources[str(k)] = sources.get(str(k), 0) + v
    summary = {"status": status, **state.to_dict(), "bad_samples": bad, "source_counts": sources}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({"status": status, "steps": state.global_step, "skipped_samples": bad,
                      "nonfinite_steps": state.nonfinite_total}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
