"""Identity-balanced batches (--pairs-per-id K): the grouping of a stream into K-pair groups of one person, and the
epoch plan built on it: P persons x K pairs per batch, every pair once per epoch, ranks in lock-step, resume."""
import json
import random
from collections import Counter

import pytest

from fast_clip.model import get_tokenizer
from common.transforms import build_transform, clean_caption
from shard_fixtures import rank_batches, write_shards
from test_training import run_main
from common.options import OptionError
from training import data as D
from training.config import LoaderConfig
from training import plan as P


def _stream_of(counts: dict, sorted_order=True, seed=0):
    """(item, pid) for ``counts[pid]`` items of each pid; pid -1 items have no id."""
    items = [(f"{pid}:{i}", pid) for pid, n in counts.items() for i in range(n)]
    if not sorted_order:
        random.Random(seed).shuffle(items)
    return items


@pytest.mark.parametrize("sorted_order,max_pending", [(True, 64), (False, 64), (False, 5)])
def test_identity_groups_cover_every_item_once_in_groups_of_k(sorted_order, max_pending):
    counts = {0: 8, 1: 6, 2: 3, 3: 8, 4: 1, -1: 3, 5: 4, 6: 9}
    items = _stream_of(counts, sorted_order)
    groups = list(P.identity_groups(iter(items), 4, random.Random(1), max_pending, lambda it: it[1]))
    flat = [it for g in groups for it in g]
    assert sorted(flat) == sorted(items)                            # every item exactly once
    assert all(len(g) == 4 for g in groups[:-1]) and 1 <= len(groups[-1]) <= 4
    pure = Counter(g[0][1] for g in groups if len({it[1] for it in g}) == 1 and g[0][1] >= 0)
    if sorted_order:  # a sorted stream: each person gives floor(n / 4) groups of its own
        assert pure == {0: 2, 1: 1, 3: 2, 5: 1, 6: 2}
    elif max_pending == 64:  # a buffer that holds the whole stream groups unsorted persons as well as sorted ones
        assert pure == {0: 2, 1: 1, 3: 2, 5: 1, 6: 2}
    # seeded: the same rng gives the same groups
    again = list(P.identity_groups(iter(items), 4, random.Random(1), max_pending, lambda it: it[1]))
    assert again == groups


def _make_stream(sets, rank, world, workers, batch, k, seed=3):
    cfg = LoaderConfig(step_batch_size=batch, workers=workers, seed=seed, shuffle_buffer=32, pairs_per_id=k)
    dec = D.SampleDecoder(transform=build_transform((64, 32), train=False), clean=clean_caption)
    return D.TrainStream(sets, cfg, dec, get_tokenizer("PersonTiny"), rank, world)


@pytest.mark.parametrize("shard_size", [16, 10], ids=["aligned-shards", "persons-split-across-shards"])
def test_balanced_plan_p_by_k_every_pair_once_lock_step(tmp_path, shard_size):
    # 24 persons x 2 images x 2 captions = 96 pairs, written sorted by person (key // 4 is the pid)
    info = write_shards(str(tmp_path), num_ids=24, shard_size=shard_size)
    sets = D.load_train_sets(info["dir"])
    world, workers, bs, k = 2, 2, 8, 4
    seen, balanced, total = Counter(), 0, 0
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            st = _make_stream(sets, rank, world, workers, bs, k)
            st.set_epoch(epoch)
            per_rank.append(rank_batches(st))
        assert len(per_rank[0]) == len(per_rank[1]) == 96 // (world * bs)   # lock-step: the same number of steps
        for step in zip(*per_rank):
            pids = [p for rank_batch in step for p in rank_batch["pids"].tolist()]
            keys = [k for rank_batch in step for k in rank_batch["keys"].tolist()]
            assert all(p == key // 4 for p, key in zip(pids, keys))
            seen.update((epoch, key) for key in keys)
            total += 1
            balanced += sorted(Counter(pids).values()) == [k] * (world * bs // k)   # P persons x K pairs
    assert len(seen) == 2 * 96 and max(seen.values()) == 1                 # every pair once per epoch
    if shard_size == 16:  # a person never spans two shards: every global batch is exactly P x K
        assert balanced == total
    else:  # 9 of the 24 persons are cut by a shard boundary, and the 4 readers' ranges (24 pairs each) cut more;
        # the halves of a cut person mostly fall into different readers' ranges and land in mixed groups: 5 of the
        # 12 global batches stay exactly P x K here (make_shards' 1000-pair shards cut at most one person per
        # boundary, and a reader's range holds thousands of pairs in a real set)
        assert balanced >= total // 3


def test_balanced_plan_resumes_mid_epoch_with_the_same_batches(tmp_path):
    info = write_shards(str(tmp_path), num_ids=24, shard_size=12)
    sets = D.load_train_sets(info["dir"])

    def keys(start):
        st = _make_stream(sets, 0, 1, 2, 8, 4)
        st.set_epoch(1, start_batch=start)
        return [b["keys"].tolist() for b in D.build_train_loader(st, pin_memory=False)]

    full = keys(0)
    assert len(full) == 12
    assert keys(5) == full[5:]
    plain = D.TrainStream(sets, LoaderConfig(step_batch_size=8, workers=2, seed=3, shuffle_buffer=32),
                          _make_stream(sets, 0, 1, 2, 8, 4).decoder, get_tokenizer("PersonTiny"), 0, 1)
    assert plain.plan_signature() != _make_stream(sets, 0, 1, 2, 8, 4).plan_signature()  # no resume across modes


def test_pairs_per_id_must_divide_the_batch(tmp_path):
    info = write_shards(str(tmp_path), num_ids=8, shard_size=16)
    sets = D.load_train_sets(info["dir"])
    for k in (3, 1, 8):
        with pytest.raises(OptionError, match="--pairs-per-id"):
            _make_stream(sets, 0, 1, 0, 8, k)


@pytest.mark.slow
def test_trainer_runs_identity_aware_balanced_batches(tmp_path):
    info = write_shards(str(tmp_path / "d"), num_ids=16, shard_size=16)
    run_main("--train-data", info["dir"], "--model", "PersonTiny", "--batch-size", 8, "--workers", 2, "--epochs", 1,
             "--logs-dir", tmp_path, "--name", "pk", "--warmup", 1, "--log-keys", "--log-every-n-steps", 1,
             "--loss", "fastclip-v3", "--id-positives", "--pairs-per-id", 4, "--no-augment",
             "--profile", "--profile-steps", 1, 1, 2)  # (the profiler rides along: one run fewer in the suite)
    rows = [json.loads(l) for l in open(tmp_path / "pk" / "keys_rank0.jsonl")]
    assert len(rows) == 8
    for r in rows:  # key // 4 is the person: two persons x four pairs per batch
        assert sorted(Counter(k // 4 for k in r["keys"]).values()) == [4, 4]
    logs = [json.loads(l) for l in open(tmp_path / "pk" / "train_log.jsonl")]
    positives = [r["positives"] for r in logs if r.get("kind") == "train" and "positives" in r]
    assert positives and all(p == 4 for p in positives)   # each anchor has its person's 4 pairs as positives
    traces = list((tmp_path / "pk" / "traces").glob("rank0*.pt.trace.json"))
    assert len(traces) == 1 and '"traceEvents"' in traces[0].read_text()[:2000]
    assert "profile of 2 steps" in (tmp_path / "pk" / "out.log").read_text()


def test_identity_flags_are_checked_before_training(capsys):
    """Each bad combination is one argparse error naming the flag, before any process starts."""
    from training.params import parse_args
    for argv, flag in ((["--batch-size", "8", "--pairs-per-id", "3"], "--pairs-per-id"),
                       (["--batch-size", "8", "--pairs-per-id", "8"], "--pairs-per-id"),
                       (["--loss", "openclip", "--id-positives", "--mixup-beta", "1"], "--mixup-beta"),
                       (["--loss", "sdm", "--mixup-beta", "1"], "--mixup-beta"),
                       (["--id-loss", "linear", "--id-head-lr-mult", "0"], "--id-head-lr-mult"),
                       (["--profile", "--profile-steps", "1", "1", "0"], "--profile-steps")):
        with pytest.raises(SystemExit):
            parse_args(["--train-data", "x", *argv])
        err = capsys.readouterr().err
        assert flag in err and "Traceback" not in err, (argv, err)
