"""Model creation through open_clip, offline only.

Everything goes through open_clip's factory so users get every open_clip architecture, but weights come only from a
local file the user names (``--pretrained PATH``): nothing is downloaded. Person crops are tall (384x128 for ViT-B-16),
so square model configs are re-sized, and position embeddings of a loaded checkpoint are interpolated to the new grid,
also from non-square grids (open_clip's own helper assumes the old grid is square).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import open_clip

from common import runs
from common.runs import CheckpointError

_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_REGISTERED = False

# Person crops are about 3:1; 384x128 is the resolution the text-based person retrieval literature uses for ViT-B-16.
PERSON_IMAGE_SIZE = (384, 128)


def register_model_configs() -> None:
    """Make the configs shipped in ``fast_clip/model_configs`` (e.g. ``PersonTiny``) visible to open_clip."""
    global _REGISTERED
    if not _REGISTERED:
        open_clip.add_model_config(_CONFIG_DIR)
        _REGISTERED = True


def list_models() -> list[str]:
    register_model_configs()
    return open_clip.list_models()


def model_config(name: str) -> dict:
    """open_clip's config of a model name, or of an open_clip model folder named ``local-dir:DIR``."""
    if name.startswith(runs.LOCAL_DIR):
        return runs.open_clip_folder(name[len(runs.LOCAL_DIR):])[0]["model_cfg"]
    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        import difflib
        known = list_models()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        raise ValueError(f"--model {name!r} is not a known open_clip model"
                         + (f"; did you mean {', '.join(close)}?" if close else "")
                         + f" ({len(known)} known: python -c 'import open_clip; print(open_clip.list_models())')")
    return cfg


def default_image_size(name: str) -> tuple[int, int]:
    """(height, width): a config's own non-square size (a model folder's size as it is), else the person-crop
    default 384x128."""
    size = model_config(name)["vision_cfg"].get("image_size", 224)
    if name.startswith(runs.LOCAL_DIR):  # a model folder's config holds the size its weights were trained at
        size = size if isinstance(size, (list, tuple)) else (size, size)
    if isinstance(size, (list, tuple)) and (size[0] != size[1] or name.startswith(runs.LOCAL_DIR)):
        return int(size[0]), int(size[1])
    return PERSON_IMAGE_SIZE


def input_size(name: str, image_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (H, W) model ``name`` is built at: ``image_size``, else :func:`default_image_size`. A ValueError names the
    flag: an unknown --model, or an --image-size that is not a whole number of the model's patches (a ViT) or of its
    stride 32 (a ResNet tower), at least one, as pixels beyond the last whole patch would be dropped silently. timm
    towers are not checked here."""
    size = tuple(image_size) if image_size else default_image_size(name)
    vision = model_config(name)["vision_cfg"]
    stride, what = vision.get("patch_size"), "patch size"
    if stride is None and isinstance(vision.get("layers"), (list, tuple)):
        stride, what = 32, "ResNet stride"
    if stride is not None and not all(s >= stride and s % stride == 0 for s in size):
        raise ValueError(f"--image-size {size[0]} {size[1]} does not fit --model {name}: each side must be a multiple "
                         f"of its {what} {stride} (at least {stride})")
    return size


def get_tokenizer(name: str):
    register_model_configs()
    return open_clip.get_tokenizer(name)


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A model state dict from an open_clip checkpoint, one of our training checkpoints, an OpenAI-format state dict
    or TorchScript archive, or a .safetensors file. Nothing in the file is run: TorchScript is read by a restricted
    reader, everything else by the run folder's one loader (``weights_only=True``)."""
    path = str(path)
    from fast_clip.torchscript import TorchScriptError, is_torchscript, read_state_dict
    if is_torchscript(path):  # OpenAI's ViT-B-16.pt: tensors read without running the archive
        try:
            sd = dict(read_state_dict(path))
        except TorchScriptError as e:  # every malformed or hostile archive
            raise CheckpointError(f"refusing to load {path!r}: {e}") from None
    else:
        sd = runs.model_state(runs.load_file(path), path)
    return _drop_openai_scalars(sd)


def _drop_openai_scalars(obj: dict) -> dict:
    # OpenAI-format state dicts carry these scalars, which are not parameters of open_clip's CLIP.
    for k in ("input_resolution", "context_length", "vocab_size"):
        obj.pop(k, None)
    return obj


def _resize_visual_pos_embed(state_dict: dict, model) -> None:
    """Interpolate ``visual.positional_embedding`` (class token + HxW grid) to the model's grid, any aspect ratio."""
    key = "visual.positional_embedding"
    old = state_dict.get(key)
    if old is None or not hasattr(model.visual, "grid_size"):
        return
    gh, gw = model.visual.grid_size if isinstance(model.visual.grid_size, (tuple, list)) else (model.visual.grid_size,) * 2
    if old.shape[0] == gh * gw + 1:
        return
    n_old = old.shape[0] - 1
    # A state dict does not store its grid's shape. Public CLIP weights are square; for our own non-square checkpoints
    # take the factorisation whose aspect ratio is closest to the new grid's.
    root = math.isqrt(n_old)
    if root * root == n_old:
        old_hw = (root, root)
    else:
        pairs = [(h, n_old // h) for h in range(1, n_old + 1) if n_old % h == 0]
        old_hw = min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1]) - math.log(gh / gw)))
    tok, grid = old[:1], old[1:]
    grid = grid.reshape(1, old_hw[0], old_hw[1], -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1).to(old.dtype)
    logging.info("interpolated position embedding from %sx%s to %sx%s", *old_hw, gh, gw)
    state_dict[key] = torch.cat([tok, grid], dim=0)


def load_pretrained(model, path: str | os.PathLike) -> None:
    _fit_weights(model, load_weights_file(path), str(path))


def _fit_weights(model, sd: dict[str, torch.Tensor], path: str) -> None:
    """Load the state dict ``sd`` (read from ``path``) into ``model``, position embeddings resized to its grid."""
    try:
        _resize_visual_pos_embed(sd, model)
        if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:
            sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
        from open_clip.model import resize_text_pos_embed
        resize_text_pos_embed(sd, model)
    except (IndexError, AssertionError, RuntimeError, ValueError) as e:
        # open_clip's resizers fail with IndexError / AssertionError on another architecture's tensors
        raise CheckpointError(f"weights file {path!r} does not fit model {type(model).__name__} "
                              f"(position embeddings: {type(e).__name__}: {e}); is --model the architecture this "
                              f"file was trained with?") from e
    # buffers the model rebuilds itself (open_clip's attn_mask) are in a TorchScript archive's tensors, not its state
    for name in {n for n, _ in model.named_buffers()} - set(model.state_dict()):
        sd.pop(name, None)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"weights file {path!r} does not match the model: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). "
            f"Is --model the architecture this file was trained with?")


def create_model(name: str, pretrained: str | None = None, image_size: tuple[int, int] | None = None,
                 device: str | torch.device = "cpu"):
    """Build an open_clip model at ``image_size`` (default: :func:`default_image_size`), from random init or from a
    local weights file. Returns the model in fp32 on ``device`` (mixed precision comes from autocast)."""
    register_model_configs()
    model_config(name)  # validates the name with a clear message
    if pretrained is not None and not os.path.isfile(pretrained):
        raise CheckpointError(
            f"--pretrained {pretrained!r} is not a file. Nothing is downloaded: pass the path of a local weights file.")
    size = tuple(image_size) if image_size else default_image_size(name)
    # open_clip warns "initialized randomly" when no hub weights are named; ours come from load_pretrained below.
    root_logger, level = logging.getLogger(), logging.getLogger().level
    root_logger.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(name, pretrained=None, force_image_size=size, device="cpu")
    finally:
        root_logger.setLevel(level)
    if pretrained:
        load_pretrained(model, pretrained)
    return model.to(device)


def load_checkpoint_model(path: str | os.PathLike, name: str | None = None, image_size=None):
    """(model, model name, image size, checkpoint) of a weights file: one of our checkpoints builds the model and
    size it stores, any other weights file needs ``name`` (``image_size`` None: the model's default). The checkpoint
    is {} for a file that is not ours."""
    from fast_clip.torchscript import is_torchscript

    path = str(path)
    obj = {} if is_torchscript(path) else runs.load_file(path)  # OpenAI's archive: read by load_weights_file
    stored = runs.trained_model(obj)
    if stored is not None:
        name, image_size = stored
    if name is None:
        raise CheckpointError(f"{path!r} is not a checkpoint of this trainer (no model_name / image_size); "
                              f"for other weights use create_model(name, pretrained=path, image_size=(H, W))")
    size = (int(image_size[0]), int(image_size[1])) if image_size else default_image_size(name)
    model = create_model(name, image_size=size)
    _fit_weights(model, _drop_openai_scalars(runs.model_state(obj, path)) if obj else load_weights_file(path), path)
    return model, name, size, (obj if stored is not None else {})


def load_for_open_clip(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, preprocess, tokenizer) for one of our checkpoints, what open_clip users expect from
    ``open_clip.create_model_and_transforms``: an open_clip ``CLIP`` built at the image size the run trained at (a
    square config such as ViT-B-16 trained at 384x128 fails to load into open_clip's default 224x224 model), its
    weights, and the preprocessing it was trained and evaluated with (resize to HxW, CLIP normalisation). open_clip's
    own transform keeps the aspect ratio and centre-crops, which moves image embeddings (cosine 0.92-0.99 on our
    crops), so use this ``preprocess`` with these weights; or export the checkpoint as an open_clip model folder
    (fast_clip/open_clip_dir.py), which plain open_clip loads with this preprocessing."""
    from common.transforms import build_transform

    model, name, size, _ = load_checkpoint_model(path)
    return model.to(device).eval(), build_transform(size, train=False), get_tokenizer(name)
