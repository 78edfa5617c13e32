"""A training run as components that own their state: build them from a TrainConfig, resume them, run the epochs,
close. ``main.py`` only parses the flags and calls this.

    Trainer(cfg, denv, RunFolder.claim(cfg.run)) -> .run() -> .close()

Build order matters where one part reads another: the data sets fix the loss state's size and the number of person
ids; the loss may set the model's initial temperature; the optimizer sees the parameters after the tower locks and
the identity head; the checkpointer collects model, optimizer, loss, head and stream, and resumes them all before
the model is wrapped for DDP / torch.compile.
"""
from __future__ import annotations

import os
import sys

import torch

from fast_clip.losses import build_loss
from fast_clip.model import WeightsFileError, create_model, default_image_size, get_tokenizer
from common.transforms import build_transform, clean_caption
from training import distributed as dist_utils
from training import stop
from training.checkpoint import CheckpointError, Checkpointer
from training.config import TrainConfig
from training.data import DataError, SampleDecoder, TrainStream, build_train_loader, load_train_sets
from training.hooks import Hooks
from training.logger import RunLogger
from training.objective import Objective, TrainModule
from training.optim import build_optimizer
from training.run_dir import RunFolder
from training.train import LoopConfig, NonFiniteError, TrainState, train_one_epoch, unwrap


class Trainer:
    def __init__(self, cfg: TrainConfig, denv, folder: RunFolder):
        self.denv, self.folder = denv, folder
        self.hooks = None
        self.logger = RunLogger(folder.path, enabled=denv.is_main, tensorboard=cfg.run.report_to == "tensorboard")
        try:
            self._build(cfg)
        except BaseException:
            self.close()  # nobody else holds this half-built trainer
            raise

    def _build(self, cfg: TrainConfig) -> None:
        if cfg.model.image_size is None:
            cfg = cfg.replace(model={"image_size": default_image_size(cfg.model.name)})
        self.cfg = cfg
        self.folder.write_params({**cfg.flags, "name": self.folder.name, "run_dir": self.folder.path,
                             "image_size": cfg.model.image_size})
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
        self.objective = Objective(self.loss_fn, cfg.id.loss_config() if self.id_head is not None else None,
                                   teacher=self.teacher, distill_weight=cfg.ref.distill_weight)
        self.tokenizer = get_tokenizer(cfg.model.name)
        self.stream = self._stream()
        self.checkpointer = Checkpointer(
            self.folder.ckpt_dir,
            {"state_dict": self.model, "optimizer": self.optimizer, "loss": self.loss_fn,
             # beside (not inside) state_dict so that open_clip still loads the checkpoint as a plain model
             "id_head": self.id_head},
            self.stream, {"model_name": cfg.model.name, "image_size": list(cfg.model.image_size)},
            epoch_weights_only=cfg.run.epoch_weights_only, keep_last_k=cfg.run.keep_last_k)
        self.hooks = Hooks(cfg.run, self.folder.path, self.logger, self.checkpointer, self.stream)
        try:
            self.state = self.checkpointer.resume(cfg.run.resume, log=self.logger.info, warn=self.logger.warning)
        except CheckpointError as e:
            raise SystemExit(f"error: {e}")
        self.train_model = self._wrap(module)
        self.loop = self._loop_config()

    # ---------------------------------------------------------------------------------------------------- build

    def _data_sets(self):
        cfg, log = self.cfg, self.logger.info
        try:
            sets = load_train_sets(cfg.data.train_data, logger=log)
        except DataError as e:
            raise SystemExit(f"error: {e}")
        total = self.total_pairs = sum(s.num_pairs for s in sets)
        if (cfg.loss.data_size or total) < total:
            raise SystemExit(f"error: --data_size {cfg.loss.data_size} is smaller than the {total} pairs of "
                             f"--train-data (one loss-state entry per pair); leave it out to use {total}")
        for s in sets:
            log(f"data set {s.index}: {s.spec} | {len(s.urls)} shards | {s.num_pairs} pairs | "
                f"keys {s.key_offset}..{s.key_offset + s.num_pairs - 1}"
                + ("" if s.ours else " | not a make_shards split: no person ids, json optional"))
        if cfg.loss.id_positives or cfg.data.loader.pairs_per_id:
            for s in sets:
                if not s.ours:  # said once here, not per step: such pairs simply have no other positive
                    log(f"--train-data set {s.spec!r} has no manifest.json: person ids come from each sample's "
                        f"json 'pid'; a pair without one is its own person only")
        if cfg.data.val_data:  # a typo must not cost an epoch
            from evaluation.evaluate import EvalError, resolve_shards
            try:
                resolve_shards(cfg.data.val_data)
            except EvalError as e:
                raise SystemExit(f"error: --val-data: {e}")
        return sets

    def _model(self):
        m = self.cfg.model
        try:
            model = create_model(m.name, pretrained=m.pretrained, image_size=m.image_size, device=self.denv.device)
        except (WeightsFileError, ValueError) as e:
            raise SystemExit(f"error: {e}")
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
        except (WeightsFileError, ValueError) as e:
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
            if self.denv.is_main:
                import json
                with open(os.path.join(self.folder.path, "init_from_ref.json"), "w") as f:
                    json.dump(report, f, indent=1, default=str)
        return teacher if ref.distill == "feature" else None

    def _id_head(self):
        idc = self.cfg.id
        if not idc.enabled:
            return None
        from fast_clip.id_head import ArcFaceHead, LinearIdHead
        foreign = [s.spec for s in self.sets if not s.ours]
        if foreign:
            raise SystemExit(f"error: --id-loss needs person ids, and {foreign} is not a make_shards split (no "
                             f"manifest.json with pids beside it); pack it with data_prep/make_shards.py or drop "
                             f"--id-loss")
        num_ids = idc.num_ids
        if num_ids is None:
            if any(s.split_ids is None for s in self.sets):
                raise SystemExit("error: --id-loss needs the number of person ids: no manifest.json beside "
                                 f"{[s.spec for s in self.sets if s.split_ids is None]}; give --num-ids")
            num_ids = sum(s.split_ids for s in self.sets)
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

    def _stream(self) -> TrainStream:
        d = self.cfg.data
        decoder = SampleDecoder(transform=build_transform(self.cfg.model.image_size, train=d.augment,
                                                          uint8=self._augment_on_device),
                                clean=clean_caption, caption_key=d.caption_key)
        return TrainStream(self.sets, d.loader, decoder, self.tokenizer, self.denv.rank, self.denv.world_size)

    def _wrap(self, module):
        if self.denv.distributed:
            module = torch.nn.parallel.DistributedDataParallel(
                module, device_ids=[self.denv.device.index] if self.denv.device.type == "cuda" else None)
        if self.cfg.model.torchcompile:
            module = torch.compile(module, backend=self.cfg.model.torchcompile_backend)
        return module

    def _loop_config(self) -> LoopConfig:
        cfg, o, n = self.cfg, self.cfg.optim, self.stream.n
        device_augment = None
        if self._augment_on_device:
            from training.device_augment import DeviceAugment
            device_augment = DeviceAugment(cfg.model.image_size, train=cfg.data.augment)
        loop = LoopConfig(batches_per_epoch=n, total_steps=n * o.epochs, lr=o.lr, warmup=o.warmup,
                          lr_scheduler=o.lr_scheduler, lr_min=o.lr_min, seed=cfg.seed, precision=o.precision,
                          grad_clip_norm=o.grad_clip_norm, log_every=cfg.run.log_every, save_every=cfg.run.save_every,
                          max_steps=o.max_steps, max_nonfinite_steps=o.max_nonfinite_steps,
                          accum_chunks=o.accum_chunks, mixup_beta=o.mixup_beta, device_augment=device_augment)
        batch = cfg.data.loader.step_batch_size
        where = f"batched on {self.denv.device}" if device_augment else "per sample in the loader"
        self.logger.info(f"augmentation: {where}{'' if cfg.data.augment else ' (flip, pad-crop, erasing off)'}")
        self.logger.info(f"{n} batches of {batch} per rank per epoch (global batch {batch * self.denv.world_size}"
                         f"{f', DGA in {o.accum_chunks} chunks' if o.accum_chunks > 1 else ''}"
                         f"{', debiased sampling' if cfg.data.loader.debiased else ''}); {loop.total_steps} steps "
                         f"in all")
        return loop

    # ------------------------------------------------------------------------------------------------------ run

    def run(self) -> int:
        """The epochs from the resumed position; 0 when finished or stopped on purpose, 3 after too many non-finite
        steps. A data error ends the run with one error line (SystemExit)."""
        cfg, state, log = self.cfg, self.state, self.logger.info
        status, code, error = None, 0, None
        try:
            while state.epoch < cfg.optim.epochs:
                if not self._epoch(state):
                    self.hooks.save(state)
                    status = f"stopped by {stop.requested}" if stop.requested else "stopped at --max-steps"
                    if stop.requested:
                        log(f"{stop.requested}: stopped after step {state.global_step}, latest.pt written; "
                            f"continue with --resume latest")
                    break
                if cfg.optim.stop_epochs and cfg.optim.stop_epochs <= state.epoch < cfg.optim.epochs:
                    status = f"stopped at --stop_epochs {cfg.optim.stop_epochs}"
                    break
            status = status or "finished"
        except NonFiniteError as e:
            self.logger.warning(str(e))
            status, code = "stopped: non-finite", 3
        except DataError as e:
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
                self.folder.write_summary(state, status)
        if error is not None:
            raise SystemExit(f"error: {error}")
        return code

    def _epoch(self, state: TrainState) -> bool:
        """The rest of epoch ``state.epoch`` and what follows its end (checkpoint, validation); False: stop now."""
        cfg = self.cfg
        self.loss_fn.set_epoch(state.epoch)
        self.stream.set_epoch(state.epoch, state.batch_in_epoch)
        loader = build_train_loader(self.stream, pin_memory=self.denv.device.type == "cuda")
        if self.denv.is_main and sys.stderr.isatty():  # a bar for people at a terminal; logs stay line-based
            from tqdm import tqdm
            loader = tqdm(loader, total=self.stream.n - state.batch_in_epoch, desc=f"epoch {state.epoch}",
                          unit="batch", leave=False, dynamic_ncols=True)
        if not train_one_epoch(self.train_model, self.objective, self.optimizer, loader, state, self.loop,
                               self.hooks):
            return False
        state.epoch += 1
        state.batch_in_epoch = 0
        # epoch_N.pt every --save-frequency epochs and at the last one (eval.sh scores the final epoch); latest.pt
        # (the resume point) at every epoch end
        every, last = cfg.run.save_frequency, cfg.optim.epochs
        keep = every > 0 and (state.epoch % every == 0 or state.epoch == last)
        self.hooks.save(state, epoch_file=state.epoch if keep else None)
        self.logger.info(f"epoch {state.epoch} done; checkpoint {f'epoch_{state.epoch}.pt' if keep else 'latest.pt'}")
        if cfg.data.val_frequency and state.epoch % cfg.data.val_frequency == 0:
            self._validate(state)
        return True

    def _validate(self, state: TrainState) -> None:
        if not dist_utils.is_main():
            dist_utils.barrier()
            return
        from evaluation.evaluate import evaluate_model
        results = evaluate_model(unwrap(self.model), self.tokenizer,
                                 build_transform(self.cfg.model.image_size, train=False),
                                 {"val": self.cfg.data.val_data}, self.denv.device)
        for name, metrics in results.items():
            scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.logger.scalars(state.global_step, scalars, prefix=f"val_{name}")
            self.logger.info(f"val {name} epoch {state.epoch}: " + " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
        dist_utils.barrier()

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.close()
        self.logger.close()
