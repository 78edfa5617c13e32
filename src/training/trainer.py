"""A training run as components that own their state: build them from a TrainConfig, resume them, run the epochs,
close. ``main.py`` only parses the flags and calls this.

    Trainer(cfg, denv, RunFolder.claim(cfg.run)) -> .run() -> .close()

Build order matters where one part reads another: the data sets fix the loss state's size and the number of person
ids; the loss may set the model's initial temperature; the optimizer sees the parameters after the tower locks and
the identity head; the checkpointer collects every component (model, optimizer, loss, head, the stream's position,
the counters, the tallies, the RNG) and resumes them all before the model is wrapped for DDP / torch.compile.

The epoch loop is here too (:meth:`Trainer._train_epoch`): per batch, the step's schedules and seeds, one optimizer
step (training/step.py), the counters, then the observers (training/observers.py: logging, key audit, profiler,
checkpoints, validation).
"""
from __future__ import annotations

import sys
import time

import torch

from fast_clip.losses import build_loss
from fast_clip.model import create_model, get_tokenizer, input_size
from fast_clip.open_clip_dir import export_run
from common import remote, shard_cache
from common.seeding import Stream, rng_seed
from common.transforms import build_transform, clean_caption
from training import stop
from training.checkpoint import CheckpointError, Checkpointer
from training.config import TrainConfig
from training.data import (DataError, SampleDecoder, TooSmall, TrainStream, agreed_batches, build_train_loader,
                           load_train_sets)
from training.observers import Checkpoints, KeyAudit, Profile, StepDone, StepLog, Validation
from training.logger import RunLogger
from training.objective import Objective, TrainModule, draw_mix
from training.optim import build_optimizer, lr_at, set_lr
from training.run_dir import RunFolder
from training.state import ProcessRng, Tallies, TrainState, data_counts, not_read, remote_reads
from training.step import NonFiniteError, train_step, unwrap


class Trainer:
    """``validate``: None, or a callable (model, tokenizer, image_size) -> {name: metrics} that main.py builds from
    the evaluator for --val-data (training never imports evaluation)."""

    def __init__(self, cfg: TrainConfig, denv, folder: RunFolder, validate=None):
        self.denv, self.folder, self.validate = denv, folder, validate
        self.observers = []
        self.logger = RunLogger(folder.path, enabled=denv.is_main, tensorboard=cfg.run.report_to == "tensorboard")
        try:
            self._build(cfg)
        except BaseException:
            self.close()  # nobody else holds this half-built trainer
            raise

    def _build(self, cfg: TrainConfig) -> None:
        try:
            cfg = cfg.replace(model={"image_size": input_size(cfg.model.name, cfg.model.image_size)})
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        self.cfg = cfg
        self.ref_report = None
        self.logger.info(f"run {self.folder.path} | world {self.denv.world_size} | device {self.denv.device} | model "
                         f"{cfg.model.name} {cfg.model.image_size[0]}x{cfg.model.image_size[1]} | loss {cfg.loss.loss}")
        self.sets = self._data_sets()
        self.model = self._model()
        self.loss_fn = self._loss()
        self.teacher = self._reference_model()
        self.model.logit_scale.requires_grad_(self.loss_fn.learns_model_temperature and not cfg.model.lock_logit_scale)
        self.id_head = self._id_head()
        module = TrainModule(self.model, self.id_head)
        # Parameter order is the open_clip model's, then the head's: optimizer states of runs without a head still load.
        o = cfg.optim
        self.optimizer = build_optimizer(module, o.lr, o.wd, o.betas, o.eps,
                                         head_lr_mult=cfg.id.head_lr_mult if self.id_head is not None else 1.0)
        self.objective = Objective(self.loss_fn, cfg.id if self.id_head is not None else None,
                                   teacher=self.teacher, distill_weight=cfg.ref.distill_weight)
        self.tokenizer = get_tokenizer(cfg.model.name)
        self.stream = self._stream()
        self.total_steps = self.stream.n * o.epochs  # the schedules' length: --max-steps stops early, not shorter
        self.state, self.tallies = TrainState(), Tallies()
        self.checkpointer = self._checkpointer()
        self._resume()
        self.train_model = self._wrap(module)
        self.device_augment = self._device_augment()
        self.observers = self._observers()

    def _resume(self) -> None:
        """Every component from the checkpoint --resume names, then the run starts writing its folder: a refused
        resume (another loss, image size, data...) leaves params.json, summary.json and the checkpoints as they were,
        so that evaluation keeps reading the settings the checkpoints were written with."""
        cfg = self.cfg
        try:
            path = self.checkpointer.resume(cfg.run.resume, warn=self.logger.warning)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}")
        if path is not None:
            self.logger.info(f"resumed from {path}: epoch {self.stream.epoch}, batch {self.stream.batch_in_epoch}, "
                             f"step {self.state.global_step}")
        elif cfg.run.resume == "latest" and self.denv.is_main:  # the run folder is rank 0's (one node)
            self.logger.info(self.folder.fresh_start_note())
        self.folder.start({**cfg.flags, "name": self.folder.name, "run_dir": self.folder.path,
                           "image_size": cfg.model.image_size})
        if self.ref_report is not None:
            self.folder.write_json("init_from_ref.json", self.ref_report)

    # ---------------------------------------------------------------------------------------------------- build

    def _data_sets(self):
        cfg, log = self.cfg, self.logger.info
        self._remote_reads()
        try:
            sets = load_train_sets(cfg.data.train_data, logger=log, allow_partial=cfg.data.allow_partial_data)
        except DataError as e:
            raise SystemExit(f"error: {e}")
        total = self.total_pairs = sum(s.num_pairs for s in sets)
        if (cfg.loss.data_size or total) < total:
            raise SystemExit(f"error: --data_size {cfg.loss.data_size} is smaller than the {total} pairs of "
                             f"--train-data (one loss-state entry per pair); leave it out to use {total}")
        for s in sets:
            log(f"data set {s.index}: {s.spec} | {len(s.urls)} shards | {s.num_pairs} pairs | "
                f"keys {s.pair_index_offset}..{s.pair_index_offset + s.num_pairs - 1}"
                + ("" if s.is_make_shards_split else " | not a make_shards split: no person ids, json optional"))
            for what in s.partial:
                self.logger.warning(f"data set {s.index}: partial (--allow-partial-data): {what}")
        if cfg.loss.id_positives or cfg.data.loader.pairs_per_id:
            for s in sets:
                if not s.is_make_shards_split:  # said once here, not per step: such pairs simply have no other positive
                    log(f"--train-data set {s.spec!r} has no manifest.json: person ids come from each sample's "
                        f"json 'pid'; a pair without one is its own person only")
        return sets

    def _model(self):
        m = self.cfg.model
        try:
            model = create_model(m.name, pretrained=m.pretrained, image_size=m.image_size, device=self.denv.device)
        except (CheckpointError, ValueError) as e:  # the name and size are checked: this is the weights file
            raise SystemExit(f"error: --pretrained: {e}")
        if m.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if m.lock_image:  # open_clip's own tower locks (after --pretrained, before the optimizer sees the params)
            model.lock_image_tower(unlocked_groups=m.lock_image_unlocked_groups,
                                   freeze_bn_stats=m.lock_image_freeze_bn_stats)
        if m.lock_text:
            model.lock_text_tower(unlocked_layers=m.lock_text_unlocked_layers)  # CLIP's LayerNorms lock with it
        return model

    def _loss(self):
        data_size = self.cfg.loss.data_size or self.total_pairs
        loss_fn = build_loss(self.cfg.loss, data_size=data_size, device=self.denv.device)
        if hasattr(loss_fn, "state_summary"):  # the GCL family's per-pair tables
            self.logger.info(loss_fn.state_summary())
        init_scale = loss_fn.initial_logit_scale()
        if init_scale is not None:
            with torch.no_grad():
                self.model.logit_scale.fill_(init_scale)
        return loss_fn

    def _reference_model(self):
        """The frozen teacher of --distill, and --init-from-ref's copy of matching tensors into the student."""
        ref, cfg = self.cfg.ref, self.cfg
        if not ref.model:
            return None
        from fast_clip.distill import init_from_ref
        try:
            teacher = create_model(ref.model, pretrained=ref.pretrained, image_size=cfg.model.image_size,
                                   device=self.denv.device)
        except (CheckpointError, ValueError) as e:
            raise SystemExit(f"error: --ref-model {ref.model} / --ref-pretrained {ref.pretrained}: {e}")
        if ref.distill == "feature":
            # The teacher reads the student's token ids, so both must share the tokenizer.
            t_tok, s_tok = get_tokenizer(ref.model), get_tokenizer(cfg.model.name)
            if getattr(t_tok, "context_length", None) != getattr(s_tok, "context_length", None) or \
                    getattr(t_tok, "vocab_size", None) != getattr(s_tok, "vocab_size", None):
                raise SystemExit(f"error: --distill feature needs the same tokenizer for --ref-model {ref.model} "
                                 f"and --model {cfg.model.name}")
        teacher.eval().requires_grad_(False)
        self.logger.info(f"reference model {ref.model} from {ref.pretrained} (frozen)")
        if ref.init_from_ref:
            report = init_from_ref(self.model, teacher)
            self.logger.info(f"--init-from-ref: copied {len(report['copied'])} tensors; not copied: "
                             f"{len(report['shape_mismatch'])} with another shape, "
                             f"{len(report['missing_in_teacher'])} absent from the reference "
                             f"(list in {self.folder.path}/init_from_ref.json)")
            self.ref_report = report  # written with params.json, once the run starts
        return teacher if ref.distill == "feature" else None

    def _id_head(self):
        idc = self.cfg.id
        if not idc.enabled:
            return None
        from fast_clip.id_head import ArcFaceHead, LinearIdHead
        foreign = [s.spec for s in self.sets if not s.is_make_shards_split]
        if foreign:
            raise SystemExit(f"error: --id-loss needs person ids, and {foreign} is not a make_shards split (no "
                             f"manifest.json with pids beside it); pack it with data_prep/make_shards.py or drop "
                             f"--id-loss")
        num_ids = known = None if any(s.split_ids is None for s in self.sets) else sum(s.split_ids for s in self.sets)
        if idc.num_ids is not None:
            if known is not None and idc.num_ids < known:  # a head too small fails at the first batch's labels
                raise SystemExit(f"error: --num-ids {idc.num_ids} is below the {known} person ids of --train-data "
                                 f"(manifest.json); leave it out to use {known}")
            num_ids = idc.num_ids
        if num_ids is None:
            raise SystemExit("error: --id-loss needs the number of person ids: no manifest.json beside "
                             f"{[s.spec for s in self.sets if s.split_ids is None]}; give --num-ids")
        dim = self.model.visual.output_dim
        lr = f", head lr x{idc.head_lr_mult:g}"
        if idc.kind == "linear":
            self.logger.info(f"identity loss: linear classifier over {num_ids} ids, dim {dim}, weight "
                             f"{idc.weight}{lr}")
            return LinearIdHead(num_ids, dim).to(self.denv.device)
        self.logger.info(f"identity loss: ArcFace over {num_ids} ids, dim {dim}, s {idc.arcface_scale}, "
                         f"m {idc.arcface_margin}, {idc.arcface_subcenters} sub-center(s), weight {idc.weight}{lr}")
        return ArcFaceHead(num_ids, dim, subcenters=idc.arcface_subcenters).to(self.denv.device)

    @property
    def _augment_on_device(self) -> bool:
        where = self.cfg.data.augment_device
        return where == "device" or (where == "auto" and self.denv.device.type == "cuda")

    def _remote_reads(self) -> None:
        """--read-retries / --read-backoff / --shard-cache, for every remote read of this process and of the loader
        workers it forks (common.remote, common.shard_cache)."""
        d = self.cfg.data
        remote.policy = remote.RetryPolicy(d.read_retries, d.read_backoff)
        try:
            shard_cache.cache = shard_cache.ShardCache(d.shard_cache, d.shard_cache_size) if d.shard_cache else None
        except OSError as e:
            raise SystemExit(f"error: --shard-cache {d.shard_cache}: {e.strerror or e}")
        if d.shard_cache:
            limit = "no size limit" if d.shard_cache_size is None else f"at most {d.shard_cache_size} bytes"
            self.logger.info(f"shard cache {d.shard_cache} ({limit}) for remote shards")

    def _stream(self) -> TrainStream:
        d = self.cfg.data
        decoder = SampleDecoder(transform=build_transform(self.cfg.model.image_size, train=d.augment,
                                                          uint8=self._augment_on_device),
                                clean=clean_caption, caption_key=d.caption_key)
        try:
            return TrainStream(self.sets, d.loader, decoder, self.tokenizer, self.denv.rank, self.denv.world_size,
                               warn=self.logger.warning)
        except TooSmall as e:
            micro, k = self.cfg.flags.get("batch_size"), self.cfg.flags.get("accum_freq", 1)
            how = (f"--batch-size {micro} x --accum-freq {k}: lower --accum-freq or --batch-size" if k > 1
                   else f"--batch-size {micro}: lower it")
            raise SystemExit(f"error: {e} ({how}, or run on fewer ranks)")
        except DataError as e:
            raise SystemExit(f"error: {e}")

    def _checkpointer(self) -> Checkpointer:
        cfg = self.cfg
        components = {
            # The loss (with the record of its settings) first: it names a changed loss setting, where the
            # optimizer's groups would only show a consequence of it.
            "loss": self.loss_fn.checkpoint_component(), "state_dict": self.model, "optimizer": self.optimizer,
            "id_head": self.id_head,  # beside (not inside) state_dict so that open_clip still loads a plain model
            "scaler": None,  # bf16 autocast needs no loss scaler; the slot keeps the format stable
            "train_state": self.state, "data": self.stream, "per_rank_counts": self.tallies,
            "rng": ProcessRng(),  # last: restored after every other component has loaded
        }

        def meta() -> dict:  # what evaluation reads at the top level
            return {"model_name": cfg.model.name, "image_size": list(cfg.model.image_size),
                    "epoch": self.stream.epoch, "step": self.state.global_step}
        return Checkpointer(self.folder.ckpt_dir, components, meta,
                            absent={"id_head": "it was written without --id-loss"},
                            epoch_weights_only=cfg.run.epoch_weights_only, keep_last_k=cfg.run.keep_last_k)

    def _wrap(self, module):
        if self.denv.distributed:
            module = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[self.denv.device.index] if self.denv.device.type == "cuda" else None)
        if self.cfg.model.torchcompile:
            module = torch.compile(module, backend=self.cfg.model.torchcompile_backend)
        return module

    def _device_augment(self):
        """A DeviceAugment when batches are augmented on the accelerator; logs where augmentation runs and the
        epoch's shape."""
        cfg, o, n = self.cfg, self.cfg.optim, self.stream.n
        device_augment = None
        if self._augment_on_device:
            from training.device_augment import DeviceAugment
            device_augment = DeviceAugment(cfg.model.image_size, train=cfg.data.augment)
        batch = cfg.data.loader.step_batch_size
        where = f"batched on {self.denv.device}" if device_augment else "per sample in the loader"
        self.logger.info(f"augmentation: {where}{'' if cfg.data.augment else ' (flip, pad-crop, erasing off)'}")
        self.logger.info(f"{n} batches of {batch} per rank per epoch (global batch {batch * self.denv.world_size}"
                         f"{f', DGA in {o.accum_chunks} chunks' if o.accum_chunks > 1 else ''}"
                         f"{', debiased sampling' if cfg.data.loader.debiased else ''}); {self.total_steps} steps "
                         f"in all")
        self.logger.info(self.stream.describe())
        return device_augment

    def _observers(self) -> list:
        """In the order they are told: the profiler, the key audit and the step log see a step before a checkpoint
        holds it; an epoch's checkpoint is written before its validation runs."""
        run, logger, out = self.cfg.run, self.logger, []
        if run.profile and self.denv.is_main:
            self._warn_short_profile(run.profile_steps)
            out.append(Profile(run.profile_steps, self.folder.path, logger))
        if run.log_keys:
            out.append(KeyAudit(self.folder.path))
        out.append(StepLog(logger, run.log_every, self.state, self.tallies, len(self.sets) > 1, self.denv.device))
        out.append(Checkpoints(self.checkpointer, run.save_every, run.save_frequency, self.cfg.optim.epochs,
                               logger.info))
        if self.validate is not None and self.cfg.data.val_frequency:
            out.append(Validation(lambda: self.validate(unwrap(self.model), self.tokenizer, self.cfg.model.image_size),
                                  self.cfg.data.val_frequency, logger))
        return out

    def _warn_short_profile(self, steps: tuple[int, int, int]) -> None:
        """The profiler writes its trace only once its schedule has run to the end: say so at start when this run
        (with --max-steps / --stop_epochs, from a resumed step) stops earlier."""
        o = self.cfg.optim
        end = min(self.total_steps, self.stream.n * (o.stop_epochs or o.epochs), o.max_steps or self.total_steps)
        left = end - self.state.global_step
        if sum(steps) > left:
            wait, warmup, active = steps
            self.logger.warning(f"--profile: the schedule needs {sum(steps)} steps (--profile-steps {wait} {warmup} "
                                f"{active}: wait + warmup + active) but this run takes {left}; no trace will be "
                                f"written: lower --profile-steps")

    # ------------------------------------------------------------------------------------------------------ run

    def run(self) -> int:
        """The epochs from the resumed position; 0 when finished or stopped on purpose, 3 after too many non-finite
        steps. A data error ends the run with one error line (SystemExit)."""
        o, log = self.cfg.optim, self.logger.info
        status, code, error = None, 0, None
        try:
            while self.stream.epoch < o.epochs:
                if not self._epoch():
                    self.checkpointer.save()
                    status = f"stopped by {stop.requested}" if stop.requested else "stopped at --max-steps"
                    if stop.requested:
                        log(f"{stop.requested}: stopped after step {self.state.global_step}, latest.pt written; "
                            f"continue with --resume latest")
                    break
                if o.stop_epochs and o.stop_epochs <= self.stream.epoch < o.epochs:
                    status = f"stopped at --stop_epochs {o.stop_epochs}"
                    break
            status = status or "finished"
        except NonFiniteError as e:
            self.logger.warning(str(e))
            status, code = "stopped: non-finite", 3
        except DataError as e:
            self.checkpointer.save()  # as at any stop: --resume latest continues once the data is repaired
            # raised in a loader worker, the message carries the worker's traceback: the last line is ours
            error = str(e).strip().splitlines()[-1].split("DataError: ", 1)[-1] if "Original Traceback" in str(e) \
                else str(e)
            self.logger.warning(error)
            status = "stopped: data error"  # the message, not the exception: its traceback holds the loader
            # iterator, whose workers must be shut down when the except block ends
        finally:
            # The summary is a collective (counts summed over ranks), so it is written only when every rank knows
            # how the run ended; after an unexpected exception a rank may be gone.
            if status is not None:
                self._write_summary(status, self.tallies.state_dict())
        if error is not None:
            raise SystemExit(f"error: {error}")
        if status == "finished" and self.denv.is_main:  # the last epoch as an open_clip model folder
            log(f"open_clip model folder: {export_run(self.folder.path)}")
        return code

    def _write_summary(self, status: str, per_rank: list[dict]) -> None:
        """summary.json: how the run ended, its counters, and per epoch the pairs of the plan read, lost and refilled;
        a finished run that lost pairs or trained on a partial split says so in its status."""
        epochs = data_counts(per_rank)
        partial = [what for s in self.sets for what in s.partial]
        lost = not_read(list(epochs.values()))
        notes = ([lost] if lost else []) + ([f"partial --train-data ({'; '.join(partial)})"] if partial else [])
        if status == "finished" and notes:
            status = f"finished: {'; '.join(notes)}"
        progress = {"epoch": self.stream.epoch, "batch_in_epoch": self.stream.batch_in_epoch,
                    **self.state.state_dict(), "data": epochs,
                    "drop_last_pairs_per_epoch": self.stream.dropped_per_epoch,
                    **({"partial_data": partial} if partial else {})}
        self.folder.write_summary(status, progress, per_rank)

    def _log_epoch_data(self, epoch: int) -> None:
        """The epoch's data counts, summed over ranks (a collective: every rank ends the epoch here)."""
        counts = data_counts(self.tallies.state_dict()).get(str(epoch))
        if counts is None:  # resumed after the epoch's last batch: nothing of it was counted here
            return
        lost, dropped = not_read([counts]), self.stream.dropped_per_epoch
        self.logger.info(f"epoch {epoch} data: {counts['read']} pairs of the plan read"
                         + (f"; {lost}; {counts['refilled']} pairs read twice to fill the batches" if lost else "")
                         + remote_reads(counts)
                         + (f"; {dropped} pairs of the sets left out by drop-last (fewer than one global batch of "
                            f"{self.stream.global_batch})" if dropped else ""))

    def _epoch(self) -> bool:
        """The rest of the stream's epoch and what the observers do at its end; False: stop now."""
        stream = self.stream
        self.loss_fn.set_epoch(stream.epoch)
        loader = build_train_loader(stream, pin_memory=self.denv.device.type == "cuda")
        if self.denv.is_main and sys.stderr.isatty():  # a bar for people at a terminal; logs stay line-based
            from tqdm import tqdm
            loader = tqdm(loader, total=stream.n - stream.batch_in_epoch, desc=f"epoch {stream.epoch}",
                          unit="batch", leave=False, dynamic_ncols=True)
        try:
            if not self._train_epoch(loader):
                return False
        except stop.Interrupted:  # a stop signal while the loader had no batch for this rank
            stop.kill_workers()
            if self.denv.distributed:  # the other ranks may be inside a step that needs this rank's batch
                raise SystemExit(f"error: stopped by {stop.requested} on rank {self.denv.rank} after waiting "
                                 f"{stop.GRACE_S:g} s more for its next batch; no checkpoint written: latest.pt is "
                                 f"the last one (continue with --resume latest)") from None
            return False
        self._log_epoch_data(stream.epoch)
        stream.set_epoch(stream.epoch + 1)
        for obs in self.observers:
            obs.epoch_done(stream.epoch, self.state.global_step)
        return True

    def _train_epoch(self, loader) -> bool:
        """One optimizer step per batch until the stream's epoch ends; False when training must stop (--max-steps,
        or a stop signal, agreed by every rank at the same step)."""
        o, state, stream = self.cfg.optim, self.state, self.stream
        self.train_model.train()
        t_data = time.perf_counter()
        # a stop signal does not wait for a batch that may never come; a data error stops every rank together
        for batch in agreed_batches(stop.batches(loader), self.denv.device):
            if stream.batch_in_epoch >= stream.n:
                break
            data_time, t0 = time.perf_counter() - t_data, time.perf_counter()
            skipped, metrics = self._step(batch)
            done = StepDone(stream.epoch, stream.batch_in_epoch, state.global_step, stream.n, batch["keys"], metrics,
                            data_time, time.perf_counter() - t0, batch["images"].shape[0] * self.denv.world_size)
            self.tallies.count(batch, stream.epoch)
            state.global_step += 1
            stream.advance()
            self._count_nonfinite(skipped, metrics)
            for obs in self.observers:
                obs.step_done(done)
            if state.nonfinite_in_a_row >= o.max_nonfinite_steps:
                self.checkpointer.save()
                raise NonFiniteError(
                    f"{state.nonfinite_in_a_row} consecutive non-finite steps (last loss {metrics['loss']}); "
                    f"stopping. The last good state is in the checkpoint folder; lower --lr or use --grad-clip-norm.")
            if o.max_steps is not None and state.global_step >= o.max_steps:
                return False
            if stop.agreed():  # SIGTERM/SIGINT on any rank: finish the step, then run() writes latest.pt
                return False
            t_data = time.perf_counter()
        return True

    def _step(self, batch: dict) -> tuple[bool, dict]:
        """This step's learning rates, seeds and mixup draw, then the optimizer step: (skipped, scalars)."""
        o, seed, step, rank, device = self.cfg.optim, self.cfg.seed, self.state.global_step, self.denv.rank, \
            self.denv.device
        lr = lr_at(step, o.lr, o.warmup, self.total_steps, o.lr_scheduler, o.lr_min)
        tau_now = 1.0 / float(unwrap(self.train_model).logit_scale.detach().exp())
        set_lr(self.optimizer, lr, self.loss_fn.temperature_lr(lr, tau_now, step=step, base_lr=o.lr, warmup=o.warmup,
                                                               total_steps=self.total_steps, lr_min=o.lr_min))
        # Per-step seeding keeps dropout and any other main-process randomness identical after a resume.
        torch.manual_seed(rng_seed(Stream.STEP, seed, step, rank))
        if self.device_augment is not None:
            # seeded per step and drawn for the global batch (each rank its rows): a resumed run and a run on another
            # number of ranks augment every sample identically
            g = torch.Generator(device=device)
            g.manual_seed(rng_seed(Stream.DEVICE_AUGMENT, seed, step))
            b = batch["images"].shape[0]
            batch = dict(batch, images=self.device_augment(batch["images"].to(device, non_blocking=True), g,
                                                           offset=rank * b, total=b * self.denv.world_size))
        out = train_step(self.train_model, self.objective, self.optimizer, batch, device, o.precision,
                         o.grad_clip_norm, o.accum_chunks, draw_mix(o.mixup_beta, seed, step))
        return out.pop("skipped"), {**out, "lr": lr}

    def _count_nonfinite(self, skipped: bool, metrics: dict) -> None:
        state = self.state
        if not skipped:
            state.nonfinite_in_a_row = 0
            return
        state.nonfinite_in_a_row += 1
        state.nonfinite_total += 1
        self.logger.warning(f"step {state.global_step}: non-finite loss ({metrics['loss']}) or gradient norm "
                            f"({metrics['grad_norm']}); step skipped ({state.nonfinite_in_a_row} in a row)")

    def close(self) -> None:
        for obs in self.observers:
            obs.close()
        self.observers = []
        self.logger.close()
