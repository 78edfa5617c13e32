"""An open_clip model folder from our weights: what ``open_clip.push_to_hf_hub`` writes and what open_clip's
``local-dir:`` / ``hf-hub:`` names read, so that plain open_clip (and clip_benchmark) load a trained model as it is:

    DIR/open_clip_config.json         model_cfg (the image size it trained at, the tokenizer's context length) and
                                      preprocess_cfg (our evaluation transform in open_clip's terms)
    DIR/open_clip_model.safetensors   the weights
    DIR/README.md                     model card: data, loss, steps, the run's metrics when it was evaluated

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")
    tokenizer = open_clip.get_tokenizer("local-dir:DIR")

The trainer writes RUN_DIR/open_clip at the end of a finished run; ``fastclip-export`` (evaluation/export_open_clip.py)
writes one for any run or checkpoint.
"""
from __future__ import annotations

import copy
import json
import os
import shutil

from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.push_to_hf_hub import generate_readme, save_for_hf
from open_clip.transform import PreprocessCfg

from common import runs
from fast_clip.model import get_tokenizer, load_checkpoint_model, model_config

__all__ = ["preprocess_cfg", "folder_model_cfg", "write_folder", "export", "export_run"]

CARD = "README.md"


def preprocess_cfg(image_size) -> dict:
    """common/transforms.py ``build_transform(size, train=False)`` in open_clip's PreprocessCfg: resize to exactly
    (H, W) without keeping the aspect ratio ('squash'), bicubic, CLIP mean/std. Ours resizes a uint8 tensor with
    antialiasing, open_clip a PIL image: both bicubic with antialiasing, a pixel may differ by one level
    (docs/EVAL.md)."""
    h, w = int(image_size[0]), int(image_size[1])
    cfg = dict(size=[h, w], mode="RGB", mean=list(OPENAI_DATASET_MEAN), std=list(OPENAI_DATASET_STD),
               interpolation="bicubic", resize_mode="squash", fill_color=0)
    PreprocessCfg(**cfg)  # open_clip's own check that every key is one it understands
    return cfg


def folder_model_cfg(name: str, image_size, context_length: int) -> dict:
    """The model's open_clip config at the size it trained at: a square config trained at 384x128 (ViT-B-16) then
    builds the same 24x8 grid of position embeddings without ``force_image_size``."""
    cfg = copy.deepcopy(model_config(name))
    cfg["vision_cfg"]["image_size"] = [int(image_size[0]), int(image_size[1])]
    cfg["text_cfg"]["context_length"] = int(context_length)
    return cfg


class _BuiltinTokenizer:
    """``save_for_hf`` saves the tokenizer's files. open_clip's CLIP BPE tokenizer ships with open_clip and
    ``get_tokenizer('local-dir:DIR')`` builds it from model_cfg's text_cfg, so there is nothing to write."""

    def save_pretrained(self, directory) -> None:
        pass


def write_folder(model, name: str, image_size, out_dir: str, card: dict) -> str:
    """``out_dir`` as an open_clip model folder of ``model`` (an open_clip CLIP of config ``name`` built at
    ``image_size``), written whole beside it and then moved into place: a crash leaves the old folder or none,
    never half a folder. ``card``: open_clip's model card dict (``generate_readme``)."""
    from open_clip.model import set_model_preprocess_cfg

    tokenizer = get_tokenizer(name)
    pre = preprocess_cfg(image_size)
    set_model_preprocess_cfg(model, pre)
    out_dir = os.path.abspath(out_dir)
    tmp = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_for_hf(model, tokenizer if hasattr(tokenizer, "save_pretrained") else _BuiltinTokenizer(),
                folder_model_cfg(name, image_size, tokenizer.context_length), tmp, safe_serialization=True)
    config_path = os.path.join(tmp, HF_CONFIG_NAME)
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["preprocess_cfg"] = pre  # save_for_hf keeps mean/std/interpolation/resize_mode; the rest for readers
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(tmp, CARD), "w", encoding="utf-8") as f:
        f.write(generate_readme(dict(card), name))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(os.path.join(tmp, HF_SAFE_WEIGHTS_NAME), 0o666 & ~umask)  # safetensors writes 0600; share like the rest
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def _metrics_table(metrics: dict) -> str:
    rows = ["| dataset | R@1 | R@5 | R@10 | mAP | mINP |", "|---|---|---|---|---|---|"]
    for n, m in metrics.items():
        rows.append(f"| {n} | " + " | ".join("n/a" if m.get(k) is None else f"{m[k]:.2f}"
                                             for k in ("R1", "R5", "R10", "mAP", "mINP")) + " |")
    return "\n".join(rows)


def model_card(name: str, image_size, ckpt: dict, params: dict, metrics: dict | None, source: str) -> dict:
    """open_clip's model card dict: what the model was trained on, with which loss, for how long, and its scores."""
    details = {"Architecture": f"open_clip {name} at {image_size[0]}x{image_size[1]} (H x W)",
               "Training data": params.get("train_data", "not recorded"),
               "Loss": (params.get("loss_config") or {}).get("loss") or params.get("loss") or "not recorded",
               "Steps": ckpt.get("step", "not recorded"), "Epochs": ckpt.get("epoch", "not recorded"),
               "Exported from": source}
    if params.get("loss_config"):
        details["Loss settings"] = params["loss_config"]
    usage = ("```python\nimport open_clip\nmodel, _, preprocess = open_clip.create_model_and_transforms("
             "'local-dir:DIR')\ntokenizer = open_clip.get_tokenizer('local-dir:DIR')\n```\n"
             "`preprocess` resizes to exactly HxW (person crops are not centre-cropped).\n")
    card = {"tags": ("clip", "open_clip", "person-retrieval"), "pipeline_tag": "feature-extraction",
            "license": "other", "details": details, "usage": usage,
            "description": "A CLIP model for text-based person retrieval, trained with FastCLIP losses."}
    if metrics:
        card["comparison"] = ("Text-to-image retrieval on the test splits (percent; docs/EVAL.md):\n\n"
                              + _metrics_table(metrics) + "\n")
    return card


def export(w: runs.Weights, out_dir: str, metrics: dict | None = None) -> str:
    """The open_clip folder of the weights ``w`` names (one of our checkpoints, or a weights file with its model)."""
    model, name, size, ckpt = load_checkpoint_model(w.path, w.model, w.image_size)
    card = model_card(name, size, ckpt, w.params, metrics, os.path.abspath(w.path))
    return write_folder(model.eval(), name, size, out_dir, card)


def run_metrics(w: runs.Weights) -> dict | None:
    """The scores of the run's evaluation of this epoch (RUN_DIR/eval/epoch_N.json), when there is one."""
    if w.run_dir is None:
        return None
    path = os.path.join(w.run_dir, runs.EVAL_DIR, f"epoch_{w.epoch}.json")
    return runs.read_json(path) if os.path.isfile(path) else None


def export_run(run_dir: str) -> str:
    """RUN_DIR/open_clip from the run's last epoch_N.pt, or from latest.pt for a run that keeps no epoch files
    (--save-frequency 0): at the end of a finished run both hold the last epoch's weights."""
    ckpt_dir = os.path.join(run_dir, runs.CHECKPOINTS)
    latest = os.path.join(ckpt_dir, runs.LATEST)
    if runs.epoch_files(ckpt_dir) or not os.path.isfile(latest):
        w = runs.resolve(run_dir, None)
    else:
        params = runs.read_params(run_dir)
        w = runs.Weights(latest, params["model"], None, None, run_dir, params)
    return export(w, os.path.join(run_dir, runs.OPEN_CLIP_DIR), run_metrics(w))
