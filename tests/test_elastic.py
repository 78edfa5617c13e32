"""Elastic determinism (training/plan.py): the sequence of global batches of an epoch depends on the data, the seed,
the global batch B, --data-readers and --pairs-per-id, never on the number of ranks, loader workers or --accum-freq;
a position (epoch, batch) continues on any shape."""
import numpy as np
import pytest
import torch

from common.transforms import build_transform, clean_caption
from fast_clip.model import get_tokenizer
from shard_fixtures import rank_batches, write_shards
from training import data as D
from training import plan as P
from training.config import LoaderConfig

TOK = get_tokenizer("PersonTiny")


# ---------------------------------------------------------------------------------------------------------------
# Pure plan functions


@pytest.mark.parametrize("B,K,W,expected", [(8, 0, 1, 8), (256, 0, 1, 64), (384, 0, 1, 48), (96, 0, 1, 48),
                                            (97, 0, 1, 1), (64, 4, 1, 16), (24, 4, 2, 6), (1024, 8, 8, 64),
                                            (256 * 3, 0, 3, 48), (128 * 128, 0, 128, 128)])
def test_default_readers_is_the_most_flexible_divisor_up_to_64_that_the_world_divides(B, K, W, expected):
    L = P.default_readers(B, K, W)
    assert L == expected and B % L == 0 and (B // L) % max(1, K) == 0 and L % W == 0


def test_shape_problem_names_what_does_not_fit():
    assert P.shape_problem(64, 16, 4) is None and P.shape_problem(64, 16, 16) is None
    assert "ranks that can run it: 1, 2, 4, 8, 16" in P.shape_problem(64, 16, 3)
    assert "does not divide the global batch 64" in P.shape_problem(64, 24, 1)
    assert "--pairs-per-id 4" in P.shape_problem(64, 32, 1, pairs_per_id=4)  # chunks of 2 pairs
    assert P.allowed_worlds(12) == [1, 2, 3, 4, 6, 12]


@pytest.mark.parametrize("readers,world", [(16, 4), (12, 3), (8, 1)])
def test_ranks_and_workers_share_the_readers_out_in_order(readers, world):
    for workers in (1, 2, 3, 5):
        order = []
        for r in range(world):
            mine = P.rank_readers(readers, world, r)
            w = min(workers, len(mine))
            shares = [P.worker_readers(mine, w, k) for k in range(w)]
            assert all(len(s) >= 1 for s in shares) and max(map(len, shares)) - min(map(len, shares)) <= 1
            order += [x for s in shares for x in s]
        assert order == list(range(readers))  # disjoint, complete, in reader order


def test_reader_ranges_cover_the_epoch_once():
    G, c, L = 7, 3, 5
    covered = [p for r in range(L) for p in range(*(lambda s, n: (s, s + n))(*P.reader_range(G, c, r)))]
    assert covered == list(range(G * c * L))


def test_shard_sequence_finds_the_overlapping_shards_by_bisection():
    order = [("s", f"u{i}", c, 0) for i, c in enumerate([5, 0, 3, 7, 1])]  # positions 0-5, -, 5-8, 8-15, 15-16
    seq = P.ShardSequence(order)
    got = [(u, lo, hi) for _, u, _, _, lo, hi in seq.overlapping(4, 9)]
    # an empty shard inside the range is still visited: read_shard refuses it when it holds samples after all
    assert got == [("u0", 4, 5), ("u1", 0, 0), ("u2", 0, 3), ("u3", 0, 1)]
    assert [(u, lo, hi) for _, u, _, _, lo, hi in seq.overlapping(15, 16)] == [("u4", 0, 1)]
    assert list(seq.overlapping(16, 20)) == []


def test_debiased_plan_is_a_seeded_permutation_of_the_multiset():
    plan = P.debiased_plan([3, 0, 5], seed=1, epoch=2)
    assert sorted(plan.tolist()) == [0, 0, 0, 2, 2, 2, 2, 2] and plan.dtype == np.uint8
    assert np.array_equal(plan, P.debiased_plan([3, 0, 5], seed=1, epoch=2))
    assert not all(np.array_equal(plan, P.debiased_plan([3, 0, 5], seed=1, epoch=e)) for e in range(3, 8))


# ---------------------------------------------------------------------------------------------------------------
# The stream on every shape


def _stream(sets, rank, world, per_rank, workers=0, **kw):
    cfg = LoaderConfig(step_batch_size=per_rank, workers=workers, seed=kw.pop("seed", 5), shuffle_buffer=8, **kw)
    dec = D.SampleDecoder(transform=build_transform((64, 32), train=True), clean=clean_caption)
    return D.TrainStream(sets, cfg, dec, TOK, rank, world)


def global_batches(sets, B, world, workers, epoch=0, start=0, **kw):
    """The epoch's global batches (the ranks' batches joined in rank order) on ``world`` ranks x ``workers``."""
    per_rank = []
    for r in range(world):
        st = _stream(sets, r, world, B // world, workers, **kw)
        st.set_epoch(epoch, start)
        per_rank.append(rank_batches(st))
    return [{k: torch.cat([b[k] for b in step]) for k in ("images", "keys", "pids", "sources", "texts")}
            for step in zip(*per_rank)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    a = write_shards(str(root / "a"), num_ids=20, shard_size=13)         # 80 pairs in 7 uneven shards
    b = write_shards(str(root / "b"), num_ids=12, shard_size=10, seed=1)  # 48 pairs
    return a["dir"], b["dir"]


MODES = {
    "concat": dict(),
    "two-sets": dict(two=True),
    "weighted": dict(two=True, weights=[1.0, 3.0], num_samples=96),
    "debiased": dict(two=True, debiased=True),
    "pairs-per-id": dict(pairs_per_id=2),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_shape_reads_the_same_global_batches_and_resumes_on_another(two_sets, mode):
    kw = dict(MODES[mode])
    sets = D.load_train_sets("::".join(two_sets) if kw.pop("two", False) else two_sets[0])
    B = 16  # 16 readers of one pair (8 of two with --pairs-per-id 2)
    ref = global_batches(sets, B, 1, 1, **kw)
    for world, workers in ((1, 3), (2, 2), (4, 3)):
        _same(ref, global_batches(sets, B, world, workers, **kw))
    # a position written on one shape continues on any other: the rest of the epoch is the uninterrupted one's
    _same(ref[3:], global_batches(sets, B, 4, 2, start=3, **kw))
    if not kw.get("weights"):  # without replacement: every pair of the epoch once
        keys = torch.cat([b["keys"] for b in ref]).tolist()
        assert len(keys) == len(set(keys)) == len(ref) * B


def test_batches_mix_readers_and_the_plan_changes_with_what_it_depends_on(two_sets):
    sets = D.load_train_sets(two_sets[0])
    ref = global_batches(sets, 16, 1, 1)
    assert len(ref) == 80 // 16
    assert global_batches(sets, 16, 1, 1, epoch=1)[0]["keys"].tolist() != ref[0]["keys"].tolist()
    assert global_batches(sets, 16, 1, 1, seed=6)[0]["keys"].tolist() != ref[0]["keys"].tolist()
    # another B is another plan (8 global batches of 8 instead of 5 of 16)
    assert len(global_batches(sets, 8, 1, 1)) == 10


def test_the_position_resumes_on_another_shape_and_another_plan_restarts_the_epoch(two_sets):
    sets = D.load_train_sets(two_sets[0])
    warnings = []
    a = _stream(sets, 0, 2, 8, workers=2)
    a.set_epoch(1, 3)
    b = _stream(sets, 0, 4, 4, workers=1)  # 4 ranks x 4: the same global batch of 16
    b.warn = warnings.append
    b.load_state_dict(a.state_dict())
    assert (b.epoch, b.batch_in_epoch, warnings) == (1, 3, [])
    c = _stream(sets, 0, 1, 8)  # global batch 8: another plan
    c.warn = warnings.append
    c.load_state_dict(a.state_dict())
    assert (c.epoch, c.batch_in_epoch) == (1, 0)
    assert "another data plan" in warnings[0] and "global_batch" in warnings[0]
    old = {"epoch": 1, "batch_in_epoch": 3, "seed": 5, "world_size": 2, "workers": 2, "batch_size": 8,
           "train_data": two_sets[0]}  # a checkpoint of the per-rank plan (before plan 2)
    b.load_state_dict(old)
    assert b.batch_in_epoch == 0


def test_a_position_at_an_epoch_end_goes_on_only_on_the_same_data(two_sets):
    sets = D.load_train_sets(two_sets[0])  # 80 pairs: 5 global batches of 16
    warnings = []
    a = _stream(sets, 0, 1, 16)
    a.set_epoch(0, 5)                      # the end of epoch 0
    b = _stream(sets, 0, 2, 8, seed=9)     # another shape and seed: still nothing of epoch 0 is left
    b.warn = warnings.append
    b.load_state_dict(a.state_dict())
    assert (b.epoch, b.batch_in_epoch, warnings) == (0, 5, [])
    both = D.load_train_sets("::".join(two_sets))  # 128 pairs: 8 global batches, so 3 were not trained
    other = _stream(both, 0, 1, 16)
    other.warn = warnings.append
    other.load_state_dict(a.state_dict())
    assert (other.epoch, other.batch_in_epoch) == (0, 0) and "another data plan" in warnings[0]
    smaller = _stream(sets, 0, 1, 16, num_samples=48)  # 3 global batches: position 5 is past its end, on other data
    smaller.warn = warnings.append
    smaller.load_state_dict(a.state_dict())
    assert smaller.batch_in_epoch == 0 and len(warnings) == 2


def test_refused_shapes_are_one_error_naming_the_flag(two_sets):
    sets = D.load_train_sets(two_sets[0])
    with pytest.raises(D.ShapeError, match=r"ranks that can run it: 1, 2, 4, 8, 16\): choose --data-readers"):
        _stream(sets, 0, 3, 16, readers=16)  # B = 48 over 3 ranks, but 16 readers do not divide over 3
    with pytest.raises(D.ShapeError, match="--data-readers 5 does not divide the global batch 16"):
        _stream(sets, 0, 1, 16, readers=5)


def test_a_resume_keeps_its_checkpoint_readers_or_refuses_a_shape_that_cannot_run_them(two_sets):
    from common.runs import CheckpointError
    sets = D.load_train_sets(two_sets[0])        # 80 pairs: 5 global batches of 16
    first = _stream(sets, 0, 4, 4, workers=2)    # B = 16 on 4 ranks: default L = 16 (c = 1)
    assert first.readers == 16
    first.set_epoch(0, 1)
    saved = first.state_dict()
    on_two = _stream(sets, 0, 2, 8)
    on_two._use_readers(8)                       # as if its own default had been another L
    on_two.load_state_dict(saved)
    assert (on_two.readers, on_two.batch_in_epoch, list(on_two.my_readers)) == (16, 1, list(range(8)))
    explicit = _stream(sets, 0, 1, 16, readers=8)  # --data-readers given: the user's choice, a new plan
    warnings = []
    explicit.warn = warnings.append
    explicit.load_state_dict(saved)
    assert (explicit.readers, explicit.batch_in_epoch) == (8, 0) and "data_readers" in warnings[0]
    saved16 = _stream(sets, 0, 2, 24, readers=16)  # B = 48 read by 16 readers
    saved16.set_epoch(0, 1)
    with pytest.raises(CheckpointError, match="cannot run on 3 rank.*--data-readers 48"):
        _stream(sets, 0, 3, 16).load_state_dict(saved16.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# Whole runs on several shapes (slow: processes)


def _global_keys(run_dir) -> dict:
    """step -> the global batch's keys (the ranks' keys in rank order; a resumed run's lines replace the earlier)."""
    import json
    by_rank = {}
    for f in sorted(run_dir.glob("keys_rank*.jsonl")):
        rank = int(f.stem.split("rank")[1])
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            by_rank.setdefault(rec["step"], {})[rank] = rec["keys"]
    return {s: [k for r in sorted(ranks) for k in ranks[r]] for s, ranks in by_rank.items()}


# A float32 run on another shape sums the same terms in another order (the gradient all-reduce, the features gathered
# per rank, DGA's chunks): each step differs by rounding (~1e-7 relative), which AdamW turns into parameter changes of
# up to lr x (rounding / (sqrt(v) + eps)) on entries whose gradient is near eps; over 16 steps at lr 5e-4 the
# parameters measured differ by ~1e-6. A wrong batch (one pair swapped) moves them by ~1e-3: atol 2e-5 tells them apart.
ATOL = 2e-5


@pytest.mark.slow
def test_runs_on_other_shapes_train_on_the_same_global_batches_and_resume_across_shapes(tmp_path):
    from test_training import run_main, torchrun, MAIN
    shards = write_shards(str(tmp_path / "shards"), num_ids=16, shard_size=12)  # 64 pairs, 6 uneven shards
    common = ["--train-data", shards["dir"], "--model", "PersonTiny", "--epochs", 2, "--logs-dir", tmp_path,
              "--warmup", 2, "--log-keys", "--loss", "fastclip-v3", "--seed", 3, "--save-every-n-steps", 1]
    run_main(*common, "--name", "one", "--batch-size", 8, "--workers", 2)                       # 1 rank x 8
    # 2 ranks x 4, stopped mid-epoch 0, resumed on 1 rank x 8 with another worker count
    torchrun(2, MAIN, *common, "--name", "two", "--batch-size", 4, "--workers", 1, "--max-steps", 5)
    run_main(*common, "--name", "two", "--batch-size", 8, "--workers", 3, "--resume", "latest")
    # 1 rank x 4 x --accum-freq 2, stopped mid-epoch 1, resumed on 2 ranks x 4
    run_main(*common, "--name", "accum", "--batch-size", 4, "--accum-freq", 2, "--workers", 1, "--max-steps", 11)
    torchrun(2, MAIN, *common, "--name", "accum", "--batch-size", 4, "--workers", 2, "--resume", "latest")
    one = _global_keys(tmp_path / "one")
    assert len(one) == 16 and all(len(k) == 8 for k in one.values())
    for epoch in (0, 1):  # every pair once per epoch
        assert sorted(k for s in range(8 * epoch, 8 * epoch + 8) for k in one[s]) == list(range(64))
    for name in ("two", "accum"):
        assert _global_keys(tmp_path / name) == one, name  # step by step, the same global batches
        a = torch.load(tmp_path / "one" / "checkpoints" / "epoch_2.pt", weights_only=True)
        b = torch.load(tmp_path / name / "checkpoints" / "epoch_2.pt", weights_only=True)
        for k, v in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][k], v, atol=ATOL, rtol=0, msg=f"{name}: parameter {k}")
        for k, v in a["loss"].items():
            if torch.is_tensor(v) and v.is_floating_point():
                torch.testing.assert_close(b["loss"][k], v, atol=ATOL, rtol=1e-4, msg=f"{name}: loss state {k}")
