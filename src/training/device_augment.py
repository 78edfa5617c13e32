"""Training augmentation on the accelerator, for uint8 batches (``--augment-device device``).

Why: at 384x128 a loader worker spends ~0.5 ms decoding a JPEG and ~0.9 ms more on flip / pad-crop / float
conversion / normalisation / random erasing, and the float batch it ships is 4x the bytes of the uint8 one. With the
loader doing only decode + resize, a worker delivers about twice the samples per core, the pinned host-to-device copy
is a quarter of the size, and the per-pixel work runs as a few batched kernels on the GPU.

The ops and their order are those of ``transforms.build_transform(train=True)``: horizontal flip (p=0.5), zero pad and
random crop back to (H, W), scale to [0, 1], normalise with the OpenAI mean/std, random erasing (p, area 2-20%,
aspect 0.3-3.3, value 0 after normalisation). Randomness comes from a generator seeded per step, so a resumed run
draws the same; every draw is made for the whole global batch and each rank takes its rows, so the sample at a place of
the global batch gets the same flip, crop and erasing on any number of ranks (the epoch plan's elastic determinism).
"""
from __future__ import annotations

import math

import torch

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from common.transforms import pad_for

ERASE_SCALE = (0.02, 0.2)
ERASE_RATIO = (0.3, 3.3)
ERASE_TRIES = 10  # torchvision retries a rectangle that does not fit up to 10 times; so do we, vectorised


class DeviceAugment:
    def __init__(self, image_size: tuple[int, int], train: bool, pad: int = 10, erase_p: float = 0.5):
        self.h, self.w = int(image_size[0]), int(image_size[1])
        self.train, self.erase_p = train, erase_p
        self.pad = pad_for(self.w, pad)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None, offset: int = 0,
                 total: int | None = None) -> torch.Tensor:
        """uint8 [b, 3, H, W] (on the target device) -> normalised float32 [b, 3, H, W]; the batch is rows
        [offset, offset + b) of a global batch of ``total`` (default b)."""
        self._rows = (offset, total or images.shape[0])
        if images.dtype != torch.uint8:
            raise TypeError(f"DeviceAugment expects a uint8 batch, got {images.dtype} (loader not in uint8 mode?)")
        x = images.float().div_(255.0)
        dev = x.device
        g = generator
        if self.train:
            x = self._flip_pad_crop(x, g)
        mean = torch.tensor(OPENAI_DATASET_MEAN, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_DATASET_STD, device=dev).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.train and self.erase_p > 0:
            x = self._erase(x, g)
        return x

    def _rand(self, n: int, g, device, *rest: int) -> torch.Tensor:
        """Uniform draws for this batch's n rows: drawn for every row of the global batch, then sliced."""
        offset, total = self._rows
        return torch.rand(total, *rest, generator=g, device=device)[offset:offset + n]

    def _flip_pad_crop(self, x: torch.Tensor, g) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        flip = self._rand(b, g, dev) < 0.5
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
        p = self.pad
        xp = torch.nn.functional.pad(x, (p, p, p, p))  # zeros, as T.Pad(fill=0) on the uint8 image
        oy = (self._rand(b, g, dev) * (2 * p + 1)).long().clamp_(max=2 * p)
        ox = (self._rand(b, g, dev) * (2 * p + 1)).long().clamp_(max=2 * p)
        rows = (oy[:, None] + torch.arange(h, device=dev)[None])          # [B, H]
        cols = (ox[:, None] + torch.arange(w, device=dev)[None])          # [B, W]
        bi = torch.arange(b, device=dev)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
        return out.permute(0, 3, 1, 2).contiguous()

    def _erase(self, x: torch.Tensor, g) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        area = float(h * w)
        apply = self._rand(b, g, dev) < self.erase_p
        t = ERASE_TRIES
        scale = ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * self._rand(b, g, dev, t)
        log_r = math.log(ERASE_RATIO[0]) + (math.log(ERASE_RATIO[1]) - math.log(ERASE_RATIO[0])) * \
            self._rand(b, g, dev, t)
        ratio = log_r.exp()
        eh = (scale * area * ratio).sqrt().round().long()
        ew = (scale * area / ratio).sqrt().round().long()
        fits = (eh < h) & (ew < w)
        first = torch.where(fits.any(1), fits.float().argmax(1), torch.zeros(b, dtype=torch.long, device=dev))
        apply = apply & fits.any(1)
        eh = eh.gather(1, first[:, None]).squeeze(1)
        ew = ew.gather(1, first[:, None]).squeeze(1)
        top = (self._rand(b, g, dev) * (h - eh + 1).clamp(min=1)).long()
        left = (self._rand(b, g, dev) * (w - ew + 1).clamp(min=1)).long()
        r = torch.arange(h, device=dev)[None, :, None]
        c = torch.arange(w, device=dev)[None, None, :]
        mask = ((r >= top[:, None, None]) & (r < (top + eh)[:, None, None]) &
                (c >= left[:, None, None]) & (c < (left + ew)[:, None, None]) & apply[:, None, None])
        return x.masked_fill(mask[:, None], 0.0)
