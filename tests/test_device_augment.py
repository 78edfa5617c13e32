"""Batched augmentation on the device (uint8 loader output): same preprocessing as the per-sample loader path."""
import pytest
import torch
from PIL import Image

from training.device_augment import DeviceAugment
from common.transforms import pad_for
from common.transforms import build_transform


def _images(n=6, h=64, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (h + 7, w + 3, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


def test_without_augmentation_equals_the_loader_path():
    ims = _images()
    cpu = torch.stack([build_transform((64, 32), train=False)(im) for im in ims])
    u8 = torch.stack([build_transform((64, 32), train=False, uint8=True)(im) for im in ims])
    assert u8.dtype == torch.uint8 and u8.shape == (6, 3, 64, 32)
    dev = DeviceAugment((64, 32), train=False)(u8)
    torch.testing.assert_close(dev, cpu, rtol=0, atol=1e-6)


def test_flip_and_pad_crop_give_a_crop_of_the_padded_possibly_flipped_image():
    u8 = torch.stack([build_transform((64, 32), train=False, uint8=True)(im) for im in _images(8)])
    aug = DeviceAugment((64, 32), train=True, erase_p=0.0)
    out = aug(u8, torch.Generator().manual_seed(3))
    plain = DeviceAugment((64, 32), train=False)(u8)
    p = pad_for(32)
    zero = DeviceAugment((64, 32), train=False)(torch.zeros(1, 3, 1, 1, dtype=torch.uint8))[0, :, 0, 0]
    flips = 0
    for i in range(8):
        found = None
        for flip in (False, True):
            src = plain[i].flip(-1) if flip else plain[i]
            padded = zero.view(3, 1, 1).expand(3, 64 + 2 * p, 32 + 2 * p).clone()
            padded[:, p:p + 64, p:p + 32] = src
            for oy in range(2 * p + 1):
                for ox in range(2 * p + 1):
                    if torch.allclose(padded[:, oy:oy + 64, ox:ox + 32], out[i], atol=1e-5):
                        found = flip
        assert found is not None, f"sample {i} is no flip/crop of its input"
        flips += found
    assert 0 < flips < 8
    # seeded: the same generator seed gives the same batch, another seed another one
    torch.testing.assert_close(aug(u8, torch.Generator().manual_seed(3)), out)
    assert not torch.equal(aug(u8, torch.Generator().manual_seed(4)), out)


def test_random_erasing_zeroes_one_rectangle_of_2_to_20_percent_in_about_half_the_samples():
    n = 400
    u8 = torch.full((n, 3, 64, 32), 200, dtype=torch.uint8)  # no normalised pixel is 0 before erasing
    aug = DeviceAugment((64, 32), train=True, erase_p=0.5)
    aug._flip_pad_crop = lambda x, g: x  # isolate the erasing
    out = aug(u8, torch.Generator().manual_seed(0))
    erased = 0
    for i in range(n):
        zero = (out[i] == 0).all(0)
        if not zero.any():
            continue
        erased += 1
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        rect = zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert rect.all(), "the erased pixels form one rectangle"
        frac = rect.numel() / (64 * 32)
        assert 0.015 <= frac <= 0.21, frac
    assert 0.4 < erased / n < 0.6


def test_non_uint8_input_is_refused():
    with pytest.raises(TypeError, match="uint8"):
        DeviceAugment((64, 32), train=True)(torch.zeros(1, 3, 64, 32))


def test_each_rank_augments_its_rows_as_one_process_augments_the_global_batch():
    u8 = torch.stack([build_transform((64, 32), train=False, uint8=True)(im) for im in _images(8)])
    aug = DeviceAugment((64, 32), train=True, erase_p=0.5)
    whole = aug(u8, torch.Generator().manual_seed(11))
    for ranks in (2, 4):
        b = 8 // ranks
        parts = [aug(u8[r * b:(r + 1) * b], torch.Generator().manual_seed(11), offset=r * b, total=8)
                 for r in range(ranks)]
        assert torch.equal(torch.cat(parts), whole)
    # the draws do depend on the place in the global batch: the second half alone, as if it were rows 0-3, differs
    assert not torch.equal(aug(u8[4:], torch.Generator().manual_seed(11)), whole[4:])
