"""One home for every random stream of the trainer.

Each stream draws from ``rng_seed(STREAM, run seed, *coordinates)``: the stream's name is the first part, so two
streams never share a seed whatever their coordinates, and every coordinate is a separate part of the seed sequence
(nothing is added or multiplied together, which is how the old per-step seeds collided: rank r+17's dropout seed was
rank r's augmentation seed at the same step). Seeds depend only on what identifies a draw (epoch, rank, worker,
batch, step), so a resumed run redraws exactly what an uninterrupted one would have.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """The trainer's random streams. Values are part of every seed: never reuse or renumber one."""
    MODEL_INIT = 1       # parameters of a model built from scratch (torch's global generator, before training)
    SHARD_ORDER = 2      # order of the shards in an epoch (identical on every rank and worker)
    DEBIASED_PLAN = 3    # which set each global batch comes from (--debiased-sampling)
    SOURCE_MIX = 4       # the weighted choice of source per sample (--train-data-weights)
    SHUFFLE_BUFFER = 5   # a worker's sample shuffle buffer
    LOADER_AUGMENT = 6   # flips / crops / erasing of one batch in a loader worker
    STEP = 7             # everything the main process draws in one optimizer step (dropout, ...)
    DEVICE_AUGMENT = 8   # the batched augmentation on the accelerator
    MIXUP = 9            # the coin and alpha of coin-flip mixup (the same on every rank)


def rng_seed(stream: Stream, seed: int, *parts: int) -> int:
    """A 63-bit seed for ``stream`` of the run seeded ``seed`` at ``parts``; stable across processes, platforms and
    Python versions (numpy's SeedSequence, no hash())."""
    # The count of parts is part of the entropy: SeedSequence pads short entropy with zeros, so without it (1, 2) and
    # (1, 2, 0) would give the same seed.
    entropy = [int(stream), len(parts), int(seed) & 0xFFFFFFFF, *(int(p) & 0xFFFFFFFF for p in parts)]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)[0] & 0x7FFFFFFFFFFFFFFF)


_MASK64 = (1 << 64) - 1


def derive(seed: int, part: int) -> int:
    """A 63-bit seed for ``part`` of a stream already seeded ``seed`` (one rng_seed per reader and epoch, then one
    of these per batch): SplitMix64's finaliser over seed and part, ~1 µs where rng_seed's SeedSequence costs ~45 µs,
    which adds up for a seed per reader per batch. Stable everywhere (integer arithmetic only)."""
    z = (seed + (part + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF
