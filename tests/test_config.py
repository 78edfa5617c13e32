"""The typed config (training/config.py): every trainer option is declared once, on the config field it sets; the
parser is generated from those fields, every flag reaches its field, and the folded flags land where they mean."""
import dataclasses
import inspect
import operator
import typing

import pytest

from common.options import OptionError, options
from fast_clip.losses import LossConfig
from fast_clip.losses.config import FOLDED_LOSS_FLAGS
from training import config as C
from training.config import HELP_SECTIONS, LoaderConfig, TrainConfig
from training.params import FOLDED_FLAGS, build_parser, fold_flags, parse_args

BASE = ["--train-data", "a::b"]
# Where each concern sits in a TrainConfig (the loader inside the data concern).
PATHS = {C.ModelConfig: "model", C.DataConfig: "data", LoaderConfig: "data.loader", C.OptimConfig: "optim",
         C.IdConfig: "id", C.RefConfig: "ref", C.RunConfig: "run", LossConfig: "loss", TrainConfig: ""}
CONCERNS = [cls for sections in HELP_SECTIONS.values() for cls in sections] + [LossConfig]


def _folded() -> set[str]:
    return {n for flags in FOLDED_FLAGS.values() for names, _ in flags for n in names} | set(FOLDED_LOSS_FLAGS)


def test_every_flag_comes_from_exactly_one_declaration():
    """No flag without a config field (or params.py's explicit list of folded flags), no field's flag missing from
    the parser or from --help, and no flag declared twice."""
    declared = {}
    for cls in CONCERNS:
        for f, o in options(cls):
            for flag in o.flags:
                assert flag not in declared, f"{flag} declared by {declared[flag]} and {cls.__name__}.{f.name}"
                declared[flag] = f"{cls.__name__}.{f.name}"
    parser = build_parser()
    seen = set()
    for action in parser._actions:
        names = [n for n in action.option_strings if not n.startswith("--no-") or n in declared]
        if names == ["-h", "--help"]:
            continue
        owners = {declared.get(n, "params.py" if n in _folded() else None) for n in names}
        assert owners != {None} and len(owners) == 1, f"{action.option_strings}: declared by {owners}"
        seen.update(names)
    assert set(declared) | _folded() == seen
    help_text = parser.format_help()
    assert all(flag in help_text for flag in declared)


def test_every_concern_is_in_the_parser():
    """A config class of training/config.py that declares options is listed in HELP_SECTIONS (else its flags would
    never be parsed)."""
    declaring = {cls for _, cls in inspect.getmembers(C, inspect.isclass)
                 if dataclasses.is_dataclass(cls) and options(cls) and cls.__module__ == C.__name__}
    assert declaring <= set(CONCERNS)


def _namespace(argv):
    ns = build_parser().parse_args(BASE + argv)
    fold_flags(ns)
    return ns


# Values that the generic choice below would make invalid in the base run (the field's check is the reason).
SPECIAL = {"lr_min": 1e-5, "pairs_per_id": 4, "report_to": "tensorboard", "stop_epochs": 3,
           "pretrained": __file__, "train_data_weights": "1::3", "val_data": "v",
           "shard_cache_size": "2GB"}
NEEDS = {"ref_model": ["--ref-pretrained", __file__], "distill": ["--ref-model", "X", "--ref-pretrained", __file__],
         "init_from_ref": ["--ref-model", "X", "--ref-pretrained", __file__], "val_frequency": ["--val-data", "v"],
         "shard_cache_size": ["--shard-cache", "C"],
         "multiply_tau": ["--temperature_scheme", "global_learnable"]}  # it scales the one global temperature's loss


def _other_flag_value(cls, field, o, base):
    """A flag value that gives the field another value than ``base`` (the field's value in the base run)."""
    if o.dest in SPECIAL or o.dest.endswith("pretrained"):
        return SPECIAL.get(o.dest, __file__)
    if o.negate:
        return True
    if o.argparse.get("choices"):
        return next(c for c in o.argparse["choices"] if c != base)
    if isinstance(base, bool):
        return not base
    if o.argparse.get("nargs"):
        return [7] * o.argparse["nargs"]
    if base is None:  # an optional number or string
        kinds = typing.get_args(typing.get_type_hints(cls)[field.name])
        return 3 if int in kinds else 0.5 if float in kinds else "other"
    if isinstance(base, (int, float)):
        return base + 1 if isinstance(base, int) else base / 2 + 0.125
    return "other"


@pytest.mark.parametrize("cls,field,o", [pytest.param(cls, f, o, id=f"{PATHS[cls] or 'train'}.{f.name}")
                                          for cls in CONCERNS for f, o in options(cls)])
def test_every_flag_reaches_its_field(cls, field, o):
    # the loss flags over a preset whose every setting may change (fastclip-v2), the trainer's over the defaults
    argv = ["--loss", "fastclip-v2"] if cls is LossConfig and field.name != "loss" else []
    argv += NEEDS.get(o.dest, [])
    path = ".".join(p for p in (PATHS[cls], field.name) if p)
    base = operator.attrgetter(path)(TrainConfig.from_flags(_namespace(argv)))
    ns = _namespace(argv)
    setattr(ns, o.dest, _other_flag_value(cls, field, o, base))
    new = operator.attrgetter(path)(TrainConfig.from_flags(ns))
    assert new != base, f"{o.flags[0]} does not reach {path}"


def test_folded_flags_land_where_they_mean():
    cfg = parse_args(BASE + ["--batch-size", "8", "--accum-freq", "2"])
    assert (cfg.data.loader.step_batch_size, cfg.optim.accum_chunks) == (16, 2)  # open_clip's meaning: 2 x 8
    cfg = parse_args(BASE + ["--batch-size", "8", "--dga-chunk-size", "3"])
    assert (cfg.data.loader.step_batch_size, cfg.optim.accum_chunks) == (8, 3)
    cfg = parse_args(BASE + ["--force-image-size", "64"])
    assert cfg.model.image_size == (64, 64)
    cfg = parse_args(BASE + ["--precision", "amp_bfloat16", "--fastclip", "--temperature_scheme", "global_constant"])
    assert (cfg.optim.precision, cfg.loss.loss) == ("amp_bf16", "fastclip-v1")
    cfg = parse_args(BASE + ["--train-data-weights", "1::3", "--no-augment", "--no-shard-shuffle", "--beta1", "0.8",
                             "--beta2", "0.9"])
    assert cfg.data.loader.weights == [1.0, 3.0] and not cfg.data.augment and not cfg.data.loader.shard_shuffle
    assert cfg.optim.betas == (0.8, 0.9)
    # params.json: the flat flags as given (after folding), and the loss config
    assert cfg.flags["train_data_weights"] == "1::3" and cfg.flags["no_augment"] is True
    assert isinstance(cfg.flags["loss_config"], dict) and cfg.flags["step_batch_size"] == 64


def test_checks_run_where_the_config_is_built_and_name_the_flag():
    """A library user who builds a config without argparse gets the same checks as the command line."""
    with pytest.raises(OptionError, match="--pairs-per-id"):
        LoaderConfig(step_batch_size=8, seed=0, pairs_per_id=3)
    with pytest.raises(OptionError, match="--debiased-sampling"):
        LoaderConfig(step_batch_size=8, seed=0, debiased=True, num_samples=10)
    with pytest.raises(OptionError, match=r"--lr: must be a finite number > 0, got nan"):
        C.OptimConfig(lr=float("nan"))
    with pytest.raises(OptionError, match=r"--lr_min: must be in \[0, --lr="):
        C.OptimConfig(lr=1e-4, lr_min=1e-3)
    with pytest.raises(OptionError, match="--device: must be one of 'auto', 'cpu', 'cuda', got 'gpu'"):
        dataclasses.replace(parse_args(BASE), device="gpu")
    C.IdConfig(arcface_scale=-1.0)  # the head's settings are inert (unchecked) without --id-loss
    with pytest.raises(OptionError, match="--arcface-scale"):
        C.IdConfig(kind="arcface", arcface_scale=-1.0)


@pytest.mark.parametrize("argv,message", [
    (["--workers", "-1"], "--workers: must be >= 0, got -1"),
    (["--pairs-per-id", "3"], "--pairs-per-id: must be 0 or a K >= 2"),
    (["--train-data-weights", "x::y"], "--train-data-weights: expected numbers joined with '::', got 'x::y'"),
    (["--train-data-weights", "1"], "--train-data-weights: 1 weights for 2 '::'-separated --train-data sets"),
    (["--val-frequency", "1"], "--val-frequency: needs --val-data"),
    (["--precision", "amp"], "--precision: amp (fp16 autocast with a loss scaler) is not supported"),
    (["--accum-freq", "2", "--dga-chunks", "2"], "--dga-chunks: give one of --accum-freq, --dga-chunks"),
    (["--mixup-beta", "1", "--loss", "fastclip-v3"], "--mixup-beta: works with --loss openclip only"),
    (["--mixup-beta", "1", "--id-loss", "linear"], "--mixup-beta: mixed samples have no single identity"),
    (["--gamma", "0"], "--gamma must be in (0, 1], got 0.0"),
    (["--image-size", "0", "3"], "argument --image-size: must be a positive integer"),
    # issue #25's low list: each was accepted
    (["--lock-image-unlocked-groups", "-1"], "--lock-image-unlocked-groups: must be >= 0, got -1"),
    (["--lock-text-unlocked-layers", "-2"], "--lock-text-unlocked-layers: must be >= 0, got -2"),
    (["--wd", "-5"], "--wd: must be a finite number >= 0, got -5.0"),
    (["--log-every-n-steps", "0"], "--log-every-n-steps: must be >= 1, got 0"),
    (["--max-bad-samples-frac", "nan"], "--max-bad-samples-frac: must be in [0, 1], got nan"),
    (["--max-bad-samples-frac", "1.5"], "--max-bad-samples-frac: must be in [0, 1], got 1.5"),
    (["--max-bad-samples-frac", "-0.1"], "--max-bad-samples-frac: must be in [0, 1], got -0.1"),
    (["--save-every-n-steps", "-1"], "--save-every-n-steps: must be >= 0, got -1"),
    (["--val-frequency", "-1"], "--val-frequency: must be >= 0, got -1"),
    (["--max-nonfinite-steps", "0"], "--max-nonfinite-steps: must be >= 1, got 0"),
])
def test_bad_flags_are_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(BASE + argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("src/training/main.py: error: ") and message in last and "Traceback" not in err, err


def test_replace_changes_one_concern_and_keeps_the_rest():
    cfg = parse_args(BASE)
    new = cfg.replace(run={"name": "x"}, model={"image_size": (32, 16)})
    assert (new.run.name, new.model.image_size) == ("x", (32, 16))
    assert (new.data, new.optim, new.loss, new.run.logs) == (cfg.data, cfg.optim, cfg.loss, cfg.run.logs)
    assert cfg.run.name is None  # frozen: the original is untouched


def test_multiply_tau_with_per_pair_temperatures_is_refused(capsys):
    """--multiply_tau scales the loss by the one global temperature; with per-pair temperatures it used to crash
    (official rules) or be ignored (exact rules): now one error line naming it."""
    from training.params import parse_args
    for loss in ("fastclip-v2", "isogclr"):
        with pytest.raises(SystemExit):
            parse_args(["--train-data", "x", "--loss", loss, "--multiply_tau"])
        assert "--multiply_tau" in capsys.readouterr().err
