"""Image and text preprocessing for person crops.

Person crops are tall and already tightly framed, so CLIP's square centre crop would cut off heads and feet: images are
resized to the model's (H, W) as they are. Training augmentation follows the text-based person retrieval recipes
(IRRA, TBPS-CLIP): horizontal flip, pad-and-random-crop, random erasing.
"""
from __future__ import annotations

import re

import torch
from torchvision.transforms import v2 as T
from torchvision.transforms import InterpolationMode

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD


def pad_for(width: int, pad: int = 10) -> int:
    """Pad of the pad-and-crop augmentation: scales with the crop width, so the tiny debug model (64x32) is not
    shifted by a third of its width (10 px at the usual 128)."""
    return max(1, round(pad * width / 128))


def build_transform(image_size: tuple[int, int], train: bool, pad: int = 10, erase_p: float = 0.5,
                    uint8: bool = False):
    """PIL image -> normalised float tensor [3, H, W]; with ``uint8`` only decode + resize to a uint8 tensor (the
    augmentation and normalisation then run batched on the accelerator: training/device_augment.py)."""
    h, w = int(image_size[0]), int(image_size[1])
    if uint8:
        return T.Compose([T.ToImage(), T.Resize((h, w), interpolation=InterpolationMode.BICUBIC, antialias=True)])
    pad = pad_for(w, pad)
    steps = [T.ToImage(), T.Resize((h, w), interpolation=InterpolationMode.BICUBIC, antialias=True)]
    if train:
        steps += [T.RandomHorizontalFlip(0.5), T.Pad(pad), T.RandomCrop((h, w))]
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)]
    if train and erase_p > 0:
        steps.append(T.RandomErasing(p=erase_p, scale=(0.02, 0.2), value=0))
    return T.Compose(steps)


_MISSING_SPACE = re.compile(r"([.,;!?])(?=[A-Za-z])")
_SPACES = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Normalise annotator text: RSTPReid writes 'shirt.His trousers', which the BPE tokenizer would merge into odd
    tokens; also collapse runs of whitespace and strip."""
    text = _MISSING_SPACE.sub(r"\1 ", text)
    return _SPACES.sub(" ", text).strip()
