"""The one seeding helper: streams never share a seed, whatever their coordinates."""
import itertools

from common.seeding import Stream, rng_seed


def test_streams_and_coordinates_never_collide():
    seeds = {}
    for stream in Stream:
        for parts in itertools.product(range(3), range(20)):  # (step, rank) grids
            seeds.setdefault(rng_seed(stream, 0, *parts), []).append((stream, parts))
    assert all(len(v) == 1 for v in seeds.values()), [v for v in seeds.values() if len(v) > 1][:3]


def test_the_old_collision_is_gone():
    # before: the per-step seed of rank r+17 was the device-augmentation seed of rank r at the same step
    for step in range(50):
        for r in range(8):
            assert rng_seed(Stream.STEP, 3, step, r + 17) != rng_seed(Stream.DEVICE_AUGMENT, 3, step, r)


def test_trailing_zero_parts_and_seed_matter():
    # numpy's SeedSequence pads short entropy with zeros: the helper must still tell these apart
    assert rng_seed(Stream.SHUFFLE_BUFFER, 1, 2) != rng_seed(Stream.SHUFFLE_BUFFER, 1, 2, 0)
    assert rng_seed(Stream.SHUFFLE_BUFFER, 1, 2, 0) != rng_seed(Stream.SHUFFLE_BUFFER, 1, 2, 0, 0)
    assert rng_seed(Stream.STEP, 0, 5) != rng_seed(Stream.STEP, 1, 5)
    assert rng_seed(Stream.STEP, 0, 5) == rng_seed(Stream.STEP, 0, 5)  # deterministic
    assert 0 <= rng_seed(Stream.MIXUP, 2**40, 7) < 2**63


def test_derive_is_splitmix64_and_separates_parts():
    from common.seeding import derive
    # SplitMix64's published first output for state 0 (one increment of the golden gamma, then the finaliser),
    # with the top bit cleared
    assert derive(0, 0) == 0xE220A8397B1DCDAF & 0x7FFFFFFFFFFFFFFF
    seeds = {derive(s, p) for s in range(50) for p in range(50)}
    assert len(seeds) == 2500 and all(0 <= x < 2 ** 63 for x in seeds)
