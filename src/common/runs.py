"""The run folder's contract, in one place: what ``LOGS/NAME`` holds, how its files are named, written and read.

    LOGS/NAME/
        params.json                every flag of the run (written by training; evaluation and export read
                                   train_data from it, model and image_size only where a checkpoint lacks them)
        summary.json               status, counters, bad-sample and per-source counts, a fatal error
        out.log, train_log.jsonl   the console lines; one JSON record per logged step
        checkpoints/latest.pt      complete (it resumes); latest_prev.pt is the one before, kept as a fallback
        checkpoints/epoch_N.pt     N = epochs completed; complete, or weights-only (``weights_only`` below)
        eval/, onnx/               what scripts/eval.sh and scripts/export_onnx.sh write by default
        open_clip/                 the last epoch as an open_clip model folder (fast_clip/open_clip_dir.py),
                                   written at the end of a finished run; what ``local-dir:`` and clip_benchmark read

Every ``.pt`` file is written atomically and read with ``torch.load(weights_only=True)`` only, so a file carrying
pickled code is refused instead of run. Every problem with a run folder, checkpoint or weights file is a
:class:`CheckpointError` whose message is one line naming the file and the reason.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field

import torch

PARAMS, SUMMARY, OUT_LOG, TRAIN_LOG = "params.json", "summary.json", "out.log", "train_log.jsonl"
CHECKPOINTS, LATEST, LATEST_PREV = "checkpoints", "latest.pt", "latest_prev.pt"
LOCK = ".lock"  # training/runlock.py's flock, held by the run's live writer
# Written in place (appended, or truncated for the lock), not replaced: a symbolic link there is refused.
IN_PLACE = (OUT_LOG, TRAIN_LOG, LOCK)
EVAL_DIR, ONNX_DIR, OPEN_CLIP_DIR = "eval", "onnx", "open_clip"
# An open_clip model folder: open_clip's config file in it, named to open_clip as local-dir:DIR.
OPEN_CLIP_CONFIG, LOCAL_DIR = "open_clip_config.json", "local-dir:"
# What evaluation and export read from a checkpoint; a weights-only epoch file holds just these.
EVAL_KEYS = ("state_dict", "id_head", "model_name", "image_size", "epoch", "step")
# Only the names the trainer writes: epoch_01.pt, epoch_x.pt or a temporary .epoch_3.pt.tmp.PID are not epoch files.
_EPOCH_FILE = re.compile(r"epoch_(0|[1-9][0-9]*)\.pt")


class CheckpointError(RuntimeError):
    """A run folder, checkpoint or weights file that cannot be used; the message names the file and the reason."""


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch}.pt"


def epoch_files(ckpt_dir: str) -> dict[int, str]:
    """{N: path} of the ``epoch_N.pt`` files in ``ckpt_dir``, N ascending; empty when the folder does not exist."""
    found = {}
    if os.path.isdir(ckpt_dir):
        for n in os.listdir(ckpt_dir):
            m = _EPOCH_FILE.fullmatch(n)
            if m and os.path.isfile(os.path.join(ckpt_dir, n)):
                found[int(m.group(1))] = os.path.join(ckpt_dir, n)
    return dict(sorted(found.items()))


# ------------------------------------------------------------------------------------------------------- json files
def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path!r} is not readable JSON: {e}") from e


def write_json(path: str, obj) -> None:
    """Atomically, like a checkpoint: a reader (or a crash) never sees half a params.json or summary.json."""
    _atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def read_params(run_dir: str) -> dict:
    """The run's params.json, which must name the model it was trained with."""
    path = os.path.join(run_dir, PARAMS)
    if not os.path.isfile(path):
        raise CheckpointError(f"run directory {run_dir!r} has no {PARAMS} ({path!r} does not exist)")
    params = read_json(path)
    if not isinstance(params, dict) or not isinstance(params.get("model"), str):
        raise CheckpointError(f"{path!r} has no 'model' entry (the model name the run was trained with)")
    return params


# ---------------------------------------------------------------------------------------------------------- loading
def load_file(path: str):
    """What a checkpoint or weights file holds (a .pt file or .safetensors), read with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r} does not exist" if not os.path.exists(path) else f"{path!r} is not a file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path!r} is empty (0 bytes)")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file as load_safetensors
        try:
            return load_safetensors(path, device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read {path!r}: {_first_line(e)}") from e
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch.save's zip nor a pickle
        raise CheckpointError(f"cannot read {path!r}: not a PyTorch file (it starts with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path!r}: weights_only=True rejected it ({_refusal(e)}); a checkpoint "
                              f"or weights file must hold only tensors and plain containers") from e
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read {path!r}: {_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    """torch's read errors run to a paragraph; the first sentence says what failed."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split(". ")[0]


def _refusal(e: BaseException) -> str:
    """The line of torch's weights_only paragraph that names what was refused, e.g. 'GLOBAL posix.system'."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    reasons = [ln for ln in lines[1:] if not ln.startswith(("Please file an issue", "Check the documentation"))]
    return (reasons or lines or [type(e).__name__])[0]


def load(path: str) -> dict:
    """A training checkpoint (latest.pt, latest_prev.pt, epoch_N.pt): a dict with the model's 'state_dict'."""
    ckpt = load_file(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path!r} is not a training checkpoint (no 'state_dict')")
    return ckpt


def model_state(obj, path: str) -> dict[str, torch.Tensor]:
    """The model's state dict in what ``load_file`` returned: our checkpoints and open_clip's keep it under
    'state_dict' (open_clip's from DDP training with every key prefixed 'module.'); a weights file is the state dict."""
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path!r} holds no state dict of tensors (found {type(obj).__name__})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def trained_model(obj) -> tuple[str, list] | None:
    """(model name, image size) that one of our checkpoints stores; None for any other file's content."""
    if isinstance(obj, dict) and isinstance(obj.get("model_name"), str) and obj.get("image_size") is not None:
        return obj["model_name"], obj["image_size"]
    return None


# ----------------------------------------------------------------------------------------------------------- saving
def open_run_file(path: str, mode: str = "a"):
    """A run-folder file opened for writing in place (out.log, train_log.jsonl, .lock; "a" or "a+"), never through a
    symbolic link: a link planted in a run folder would otherwise append to, or truncate, whatever it points at."""
    flags = os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path!r} is a symbolic link; a run folder's files are written in place, never "
                                  f"through a link: remove it") from e
        raise
    return os.fdopen(fd, mode, encoding="utf-8")


def _atomic_write(path: str, write) -> None:
    """``write(f)`` to a temporary file in the same folder, flushed and fsync'ed, renamed over ``path``, then the
    folder fsync'ed: a crash at any moment leaves either the old file or the new one, never a torn file. The rename
    replaces a link at ``path`` itself, and the temporary file is created anew (O_EXCL, O_NOFOLLOW): no write
    follows a symbolic link. A full disk is a :class:`CheckpointError` that says so."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        if os.path.lexists(tmp):  # left by a crashed process of the same pid, or planted: unlinked, not followed
            os.remove(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.lexists(tmp):
            os.remove(tmp)
        if _disk_full(e):
            raise CheckpointError(f"no space left on device while writing {os.path.basename(path)}") from e
        raise
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(e: BaseException | None) -> bool:
    """torch.save turns the file's OSError(ENOSPC) into 'unexpected pos A vs B'; the OSError is in its context."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def atomic_save(obj, path: str) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def save_latest(obj: dict, ckpt_dir: str) -> str:
    """latest.pt, keeping the previous one as latest_prev.pt so a corrupt newest file still leaves a fallback."""
    path = os.path.join(ckpt_dir, LATEST)
    if os.path.exists(path):
        os.replace(path, os.path.join(ckpt_dir, LATEST_PREV))
    try:
        atomic_save(obj, path)
    except CheckpointError as e:
        kept = f"; {LATEST_PREV} is intact" if os.path.isfile(os.path.join(ckpt_dir, LATEST_PREV)) else ""
        raise CheckpointError(f"{e}{kept}; free space and --resume latest") from e
    return path


def weights_only(ckpt: dict) -> dict:
    """What evaluation and export read, without optimizer, loss state, RNG and counters."""
    return {**{k: ckpt[k] for k in EVAL_KEYS if k in ckpt}, "weights_only": True}


def keep_last_epochs(ckpt_dir: str, k: int) -> list[str]:
    """Delete all but the k newest epoch_N.pt files; returns the names deleted."""
    paths = list(epoch_files(ckpt_dir).values())
    gone = paths[:-k] if k > 0 else []
    for p in gone:
        os.remove(p)
    return [os.path.basename(p) for p in gone]


def candidates(ckpt_dir: str) -> list[str]:
    """Resume candidates, newest first: latest.pt, then the previous latest, then epoch files by number."""
    out = [os.path.join(ckpt_dir, n) for n in (LATEST, LATEST_PREV)]
    out += reversed(epoch_files(ckpt_dir).values())
    return [p for p in out if os.path.isfile(p)]


def load_latest(ckpt_dir: str, warn=print) -> tuple[dict, str] | None:
    """The newest readable checkpoint that can resume; a corrupt one is reported and the previous one used. None
    when the folder holds no checkpoint at all; a :class:`CheckpointError` naming them when it holds only ones that
    cannot resume (a fresh start would silently drop the run, and keep-last-k then delete its epoch files)."""
    unusable = []
    for path in candidates(ckpt_dir):
        try:
            ckpt = load(path)
        except CheckpointError as e:
            warn(f"WARNING: {e}; trying an older checkpoint")
            unusable.append(f"{os.path.basename(path)} (unreadable)")
            continue
        if not ckpt.get("weights_only"):  # weights-only epoch files cannot resume
            return ckpt, path
        unusable.append(f"{os.path.basename(path)} (weights only)")
    if unusable:
        raise CheckpointError(
            f"--resume latest: {ckpt_dir} holds no checkpoint that can resume, only {', '.join(unusable)}; nothing "
            f"was started or deleted. Start a new --name (--pretrained PATH takes a weights-only file's weights), or "
            f"move these files away to start this run afresh")
    return None


# ------------------------------------------------------------------------------------------------------- resolution
@dataclass(frozen=True)
class Weights:
    """What evaluation and export load: a checkpoint or weights file and what is known of the model it holds
    (``image_size`` None: the model's default)."""
    path: str
    model: str
    image_size: tuple[int, int] | None = None
    epoch: int | None = None
    run_dir: str | None = None
    params: dict = field(default_factory=dict)


def epoch_checkpoint(run_dir: str, epoch: int | None = None) -> tuple[str, int]:
    """``RUN_DIR/checkpoints/epoch_N.pt`` for ``epoch`` or, by default, the highest N."""
    ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"run directory {run_dir!r} has no {CHECKPOINTS}/ folder ({ckpt_dir!r} does not exist)")
    found = epoch_files(ckpt_dir)
    if not found:
        raise CheckpointError(f"{ckpt_dir!r} holds no epoch_N.pt checkpoint")
    if epoch is None:
        epoch = max(found)
    elif epoch not in found:
        raise CheckpointError(f"{ckpt_dir!r} has no {epoch_name(epoch)} (available epochs: "
                              f"{', '.join(map(str, found))})")
    return found[epoch], epoch


def resolve(run_dir: str | None, pretrained: str | None, *, epoch: int | None = None, model: str | None = None,
            image_size=None) -> Weights:
    """The weights a command line names: a run folder (its epoch_N.pt, ``epoch`` or the highest; model and image
    size from params.json), or a file given as ``--pretrained``: one of our checkpoints (model and image size stored
    in it) or any weights file (``model`` needed), or an open_clip model folder (its config names both).
    ``model`` / ``image_size`` given override what is found."""
    if run_dir and pretrained:
        raise CheckpointError("give either RUN_DIR or --pretrained FILE, not both")
    if not run_dir and not pretrained:
        raise CheckpointError("nothing to do: give RUN_DIR or --pretrained FILE --model NAME")
    if pretrained:
        if epoch is not None:
            raise CheckpointError("--epoch picks a checkpoint of RUN_DIR; it does not apply to --pretrained FILE")
        return _weights_file(pretrained, model, image_size)
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run directory {run_dir!r} " + ("is a file; give a checkpoint or weights file as "
                              "--pretrained FILE" if os.path.exists(run_dir) else "does not exist"))
    params = read_params(run_dir)
    path, epoch = epoch_checkpoint(run_dir, epoch)
    size = _image_size(image_size or params.get("image_size"), f"(from {os.path.join(run_dir, PARAMS)})")
    return Weights(path, model or params["model"], size, epoch, run_dir, params)


def open_clip_folder(path: str) -> tuple[dict, str]:
    """(open_clip_config.json, weights file) of an open_clip model folder: ours (open_clip/ of a run, fastclip-export)
    or any that open_clip's ``local-dir:`` loads; the weights file is the one open_clip itself picks."""
    from open_clip.factory import _find_checkpoint_in_dir
    from pathlib import Path

    config_path = os.path.join(path, OPEN_CLIP_CONFIG)
    config = read_json(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("model_cfg"), dict):
        raise CheckpointError(f"{config_path!r} has no 'model_cfg' (not an open_clip model folder)")
    weights = _find_checkpoint_in_dir(Path(path))
    if weights is None:
        raise CheckpointError(f"open_clip model folder {path!r} holds no weights file (*.safetensors, *.bin, *.pth)")
    return config, weights


def _model_folder(path: str, model: str | None, image_size) -> Weights:
    """An open_clip model folder as --pretrained: its weights, its model as local-dir:PATH, its image size."""
    config, weights = open_clip_folder(path)
    size = config["model_cfg"].get("vision_cfg", {}).get("image_size", 224)
    size = size if isinstance(size, (list, tuple)) else (size, size)
    where = f"(model_cfg of {os.path.join(path, OPEN_CLIP_CONFIG)!r})"
    return Weights(weights, model or LOCAL_DIR + os.path.abspath(path), _image_size(image_size or size, where))


def _weights_file(path: str, model: str | None, image_size) -> Weights:
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, OPEN_CLIP_CONFIG)):
        return _model_folder(path, model, image_size)
    if not os.path.isfile(path):
        raise CheckpointError(f"--pretrained {path!r} " + ("is not a file" if os.path.exists(path) else
                                                           "does not exist"))
    if model is not None:  # a weights file of a named architecture: not read twice
        return Weights(path, model, _image_size(image_size, "(--image-size)"))
    try:
        obj = load_file(path)
        why = "no model_name / image_size" if trained_model(obj) is None else None
    except CheckpointError as e:  # an OpenAI TorchScript file, say: readable once the architecture is named
        why = str(e)
    if why is not None:
        raise CheckpointError(f"--pretrained {path!r} is not a checkpoint of this trainer ({why}): give --model NAME, "
                              f"the architecture of the weights file")
    name, size = trained_model(obj)
    return Weights(path, name, _image_size(image_size or size, f"(stored in {path!r})"), obj.get("epoch"))


def _image_size(size, source: str) -> tuple[int, int] | None:
    if size is None:
        return None
    if len(size) != 2:
        raise CheckpointError(f"image size {list(size)!r} {source} is not [H, W]")
    return int(size[0]), int(size[1])
