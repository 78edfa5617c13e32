"""The typed config (training/config.py): every trainer flag reaches it, and the folded flags land where they mean."""
import argparse

import pytest

from fast_clip.losses import LossConfig, add_loss_args
from training.config import TrainConfig
from training.params import build_parser, parse_args

BASE = ["--train-data", "a::b"]

# Trainer flags that are not fields of the typed config, and why: parse_args folds them into other flags (checked
# below) or refuses them, or main() acts on them before a run is built.
NOT_IN_CONFIG = {
    "check_args": "main() validates and returns before any run",
    "force_image_size": "folded into image_size",
    "batch_size": "folded into step_batch_size",
    "accum_freq": "folded into step_batch_size / accum_chunks",
    "dga_chunks": "folded into accum_chunks",
    "dga_chunk_size": "folded into accum_chunks",
    "local_loss": "accepted for ported commands, always on",
    "gather_with_grad": "accepted for ported commands, always on",
    "keep_epoch_checkpoints": "accepted for old commands, no effect",
    "dataset_resampled": "refused by parse_args",
    "train_data_upsampling_factors": "refused by parse_args",
    "step_batch_size": "set by parse_args, not a flag",
    "accum_chunks": "set by parse_args, not a flag",
}


def _trainer_actions():
    loss_only = argparse.ArgumentParser()
    add_loss_args(loss_only)
    loss_dests = {a.dest for a in loss_only._actions}
    return [a for a in build_parser()._actions if a.dest not in loss_dests and a.dest != "help"]


def _other_value(action, value):
    if action.dest == "train_data_weights":
        return "1::3"
    if action.choices:
        return next(c for c in action.choices if c != value)
    if action.nargs == 0:  # store_true
        return not value
    if isinstance(value, (tuple, list)):
        return tuple(v + 1 for v in value)
    if action.nargs in (2, 3):
        return (7,) * action.nargs
    if action.type is int or isinstance(value, int):
        return 3 if value is None else value + 1
    if action.type is float or isinstance(value, float):
        return 0.5 if value is None else value / 2 + 0.125
    return "other" if value != "other" else "another"


@pytest.mark.parametrize("action", [a for a in _trainer_actions() if a.dest not in NOT_IN_CONFIG],
                         ids=lambda a: a.dest)
def test_every_trainer_flag_reaches_the_typed_config(action):
    args = parse_args(BASE)
    base = TrainConfig.from_args(args)
    setattr(args, action.dest, _other_value(action, getattr(args, action.dest)))
    args.loss_config = LossConfig.from_args(args)  # as parse_args derives it (--local-loss, the tau Adam's betas)
    assert TrainConfig.from_args(args) != base, f"--{action.dest} does not reach the typed config"


def test_not_in_config_lists_only_real_flags():
    dests = {a.dest for a in _trainer_actions()} | {"step_batch_size", "accum_chunks"}
    assert set(NOT_IN_CONFIG) <= dests


def test_folded_flags_land_where_they_mean():
    cfg = TrainConfig.from_args(parse_args(BASE + ["--batch-size", "8", "--accum-freq", "2"]))
    assert (cfg.data.loader.batch_size, cfg.optim.accum_chunks) == (16, 2)  # open_clip's meaning: 2 x 8 per step
    cfg = TrainConfig.from_args(parse_args(BASE + ["--batch-size", "8", "--dga-chunk-size", "3"]))
    assert (cfg.data.loader.batch_size, cfg.optim.accum_chunks) == (8, 3)
    cfg = TrainConfig.from_args(parse_args(BASE + ["--force-image-size", "64"]))
    assert cfg.model.image_size == (64, 64)
    cfg = TrainConfig.from_args(parse_args(BASE + ["--train-data-weights", "1::3", "--no-augment",
                                                   "--no-shard-shuffle", "--beta1", "0.8", "--beta2", "0.9"]))
    assert cfg.data.loader.weights == [1.0, 3.0] and not cfg.data.augment and not cfg.data.loader.shard_shuffle
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.flags["train_data_weights"] == "1::3" and isinstance(cfg.flags["loss_config"], dict)


def test_replace_changes_one_concern_and_keeps_the_rest():
    cfg = TrainConfig.from_args(parse_args(BASE))
    new = cfg.replace(run={"name": "x"}, model={"image_size": (32, 16)})
    assert (new.run.name, new.model.image_size) == ("x", (32, 16))
    assert (new.data, new.optim, new.loss, new.run.logs) == (cfg.data, cfg.optim, cfg.loss, cfg.run.logs)
    assert cfg.run.name is None  # frozen: the original is untouched
