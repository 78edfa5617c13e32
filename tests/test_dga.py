"""ZeroVL techniques: decoupled gradient accumulation (DGA) equals the single-pass gradient, coin-flip mixup targets,
and debiased (single-source) batches."""
import copy
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn as nn

from fast_clip.losses import LossConfig, build_loss, mixup_targets
from fast_clip.model import create_model, get_tokenizer
from shard_fixtures import rank_batches, write_shards
from test_training import assert_same_training, run_main
from training import data as D
from training import plan as P
from training.dga import forward_backward
from training.objective import Mix, Objective, TrainModule, draw_mix, mix_inputs

COLOURS = ["red", "blue", "green", "black", "white", "pink", "grey", "yellow"]


def _batch(n=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    tok = get_tokenizer("PersonTiny")
    texts = tok([f"a person in a {COLOURS[i % 8]} coat with {COLOURS[(3 * i + 1) % 8]} shoes" for i in range(n)])
    return {"images": torch.randn(n, 3, 64, 32, generator=g, dtype=dtype), "texts": texts,
            "keys": torch.randperm(32, generator=g)[:n], "pids": torch.arange(n) % 4}


def _loss(name, epoch=1):
    """``name+ids``: the loss with identity-aware positives (the batch's pids hold two pairs of each person)."""
    name, _, ids = name.partition("+")
    fn = build_loss(LossConfig.from_name(name, epochs=4, id_positives=ids == "ids"), data_size=32,
                    dtype=torch.float64)
    fn.set_epoch(epoch)  # gamma < 1: the estimators' moving average is in play
    return fn


def _grads(module, objective, batch, chunks, mix=None):
    module.zero_grad(set_to_none=True)
    loss, _ = forward_backward(module, objective, batch, torch.device("cpu"), "fp32", chunks, mix)
    return float(loss.detach()), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _tiny_clip(learn_scale=True):
    torch.manual_seed(0)
    model = create_model("PersonTiny").double()
    model.logit_scale.requires_grad_(learn_scale)
    return model


# ------------------------------------------------------------------------------------------------------------------
# DGA == one pass


@pytest.mark.parametrize("loss_name", ["openclip", "fastclip-v3", "fastclip-v1", "openclip+ids", "sdm+ids",
                                       "fastclip-v3+ids", "fastclip-v2+ids"])
@pytest.mark.parametrize("chunks", [2, 3])
def test_dga_gradient_equals_single_pass(loss_name, chunks):
    model = _tiny_clip()
    base = _loss(loss_name)
    learn = base.learns_model_temperature
    model.logit_scale.requires_grad_(learn)
    module = TrainModule(model)
    batch = _batch()
    loss_fn_1, loss_fn_k = base, copy.deepcopy(base)
    l1, g1 = _grads(module, Objective(loss_fn_1), batch, 1)
    lk, gk = _grads(module, Objective(loss_fn_k), batch, chunks)
    assert math.isclose(l1, lk, rel_tol=1e-12)
    assert set(g1) == set(gk)
    assert ("clip.logit_scale" in gk) == learn  # the temperature's gradient is part of the comparison
    for n in g1:
        torch.testing.assert_close(gk[n], g1[n], rtol=1e-9, atol=1e-12, msg=n)
    # the loss state (estimators) is updated once per step, as in one pass
    for k, v in loss_fn_1.state_dict().items():
        torch.testing.assert_close(loss_fn_k.state_dict()[k], v)


class _DropoutTower(nn.Module):
    """A TrainModule-shaped toy with dropout: DGA must replay each chunk's random mask in its re-forward."""

    def __init__(self):
        super().__init__()
        self.img = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 32, 16), nn.Dropout(0.5), nn.Linear(16, 8))
        self.txt = nn.Sequential(nn.Embedding(49408, 8), nn.Dropout(0.5))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, images, texts, text_mix=None):
        i = nn.functional.normalize(self.img(images), dim=-1)
        t = nn.functional.normalize(self.txt(texts).mean(1), dim=-1)
        return {"image_features": i, "text_features": t, "logit_scale": self.logit_scale.exp()}


def test_dga_replays_dropout_masks():
    torch.manual_seed(0)
    module = _DropoutTower().double()
    batch = _batch()
    objective = Objective(_loss("openclip"))
    # A one-pass reference with the same masks: the chunk masks are drawn from the generator in chunk order, so a
    # forward over the chunks in sequence (with autograd) is the exact full-batch objective of these masks.
    torch.manual_seed(5)
    module.zero_grad()
    outs = [module(batch["images"][a:b], batch["texts"][a:b]) for a, b in ((0, 4), (4, 8))]
    cat = {k: (torch.cat([o[k] for o in outs]) if k != "logit_scale" else outs[0][k]) for k in outs[0]}
    ref_loss, _ = objective(cat, batch)
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in module.named_parameters()}
    torch.manual_seed(5)
    loss, g = _grads(module, objective, batch, 2)
    assert math.isclose(loss, float(ref_loss.detach()), rel_tol=1e-12)
    for n in ref:
        torch.testing.assert_close(g[n], ref[n], rtol=1e-9, atol=1e-12, msg=n)


def test_dga_with_text_mixup_equals_single_pass():
    model = _tiny_clip()
    module = TrainModule(model)
    batch = _batch()
    for mix in (Mix(alpha=0.7, target="text"), Mix(alpha=0.3, target="image")):
        _, g1 = _grads(module, Objective(_loss("openclip")), batch, 1, mix)
        _, g4 = _grads(module, Objective(_loss("openclip")), batch, 4, mix)
        for n in g1:
            torch.testing.assert_close(g4[n], g1[n], rtol=1e-9, atol=1e-12, msg=f"{mix.target}: {n}")


@pytest.mark.slow
def test_dga_two_processes_equal_one_pass_with_one_allreduce_per_step(dist_worker):
    ref, two = dist_worker(1, "fastclip-v3", "--float64"), dist_worker(2, "fastclip-v3", "--float64")
    dga = dist_worker(2, "fastclip-v3", "--float64", "--accum-freq", "2")
    assert_same_training(ref, dga)
    # inner chunks run under no_sync: as many all-reduce calls per step as without accumulation
    assert dga["reduce_calls"] == two["reduce_calls"] and min(two["reduce_calls"]) >= 1


def test_accum_freq_flags():
    from training.params import parse_args
    def step(*argv):
        cfg = parse_args(["--train-data", "x", *argv])
        return cfg.data.loader.step_batch_size, cfg.optim.accum_chunks
    assert step("--batch-size", "10", "--dga-chunk-size", "4") == (10, 3)
    assert step("--batch-size", "8", "--accum-freq", "2") == (16, 2)  # open_clip's meaning
    assert step("--batch-size", "8", "--dga-chunks", "4") == (8, 4)
    with pytest.raises(SystemExit):
        parse_args(["--train-data", "x", "--batch-size", "4", "--dga-chunks", "5"])
    with pytest.raises(SystemExit):
        parse_args(["--train-data", "x", "--accum-freq", "2", "--dga-chunks", "2"])
    with pytest.raises(SystemExit):
        parse_args(["--train-data", "x", "--mixup-beta", "1", "--loss", "fastclip-v3"])


# ------------------------------------------------------------------------------------------------------------------
# Coin-flip mixup


def test_mixup_targets_by_hand():
    t = mixup_targets(3, rank=1, world=2, alpha=0.75)
    expected = torch.tensor([[0, 0, 0, 0.75, 0, 0.25],
                             [0, 0, 0, 0, 1.0, 0],        # the middle sample of an odd batch is its own partner
                             [0, 0, 0, 0.25, 0, 0.75]])
    torch.testing.assert_close(t, expected)
    assert torch.allclose(t.sum(1), torch.ones(3))


def test_mixup_alpha_one_is_the_plain_loss_and_soft_targets_match_a_hand_computation():
    torch.manual_seed(0)
    e1 = nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    e2 = nn.functional.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    fn = _loss("openclip")
    plain, _ = fn(e1, e2, scale)
    same, _ = fn(e1, e2, scale, mix_alpha=1.0)
    torch.testing.assert_close(same, plain)
    a = 0.6
    soft, _ = fn(e1, e2, scale, mix_alpha=a)
    li, lt = (10 * e1 @ e2.t()).log_softmax(1), (10 * e2 @ e1.t()).log_softmax(1)
    by_hand = 0.0
    for i in range(4):
        p = 3 - i
        by_hand += -0.5 * (a * li[i, i] + (1 - a) * li[i, p] + a * lt[i, i] + (1 - a) * lt[i, p]) / 4
    torch.testing.assert_close(soft, by_hand)


def test_mixup_draws_are_seeded_and_mix_the_right_side():
    draws = [draw_mix(1.0, seed=3, step=s) for s in range(200)]
    assert draws == [draw_mix(1.0, seed=3, step=s) for s in range(200)]   # same on every rank and after a resume
    assert draw_mix(0.0, 3, 0) is None
    sides = Counter(d.target for d in draws)
    assert 70 < sides["image"] < 130 and sides["image"] + sides["text"] == 200
    assert all(0.0 <= d.alpha <= 1.0 for d in draws)
    x, t = torch.arange(4.0).view(4, 1, 1, 1), torch.arange(4).view(4, 1)
    mixed, tm = mix_inputs(x, t, Mix(0.25, "image"))
    assert tm is None and mixed.flatten().tolist() == [0.25 * i + 0.75 * (3 - i) for i in range(4)]
    same, tm = mix_inputs(x, t, Mix(0.25, "text"))
    assert same is x and tm[0] == 0.25 and tm[1].flatten().tolist() == [3, 2, 1, 0]


def test_text_mixup_mixes_token_embeddings_only():
    module = TrainModule(_tiny_clip())
    b = _batch(4)
    with torch.no_grad():
        plain = module(b["images"], b["texts"])
        one = module(b["images"], b["texts"], (1.0, b["texts"].flip(0)))
        half = module(b["images"], b["texts"], (0.5, b["texts"].flip(0)))
    torch.testing.assert_close(one["text_features"], plain["text_features"])
    torch.testing.assert_close(half["image_features"], plain["image_features"])
    assert not torch.allclose(half["text_features"], plain["text_features"])
    # the hook is removed after the forward
    with torch.no_grad():
        again = module(b["images"], b["texts"])
    torch.testing.assert_close(again["text_features"], plain["text_features"])


# ------------------------------------------------------------------------------------------------------------------
# Debiased sampling


def _stream(sets, rank, world, workers, batch):
    from common.transforms import build_transform, clean_caption
    from training.config import LoaderConfig
    cfg = LoaderConfig(step_batch_size=batch, workers=workers, seed=1, shuffle_buffer=8, debiased=True)
    dec = D.SampleDecoder(transform=build_transform((64, 32), train=False), clean=clean_caption)
    return D.TrainStream(sets, cfg, dec, get_tokenizer("PersonTiny"), rank, world)


def test_debiased_batches_are_single_source_same_on_all_ranks_and_read_each_pair_once(tmp_path):
    a = write_shards(str(tmp_path / "a"), num_ids=12, shard_size=10)           # 48 pairs
    b = write_shards(str(tmp_path / "b"), num_ids=32, shard_size=20, seed=1)   # 128 pairs
    sets = D.load_train_sets(f"{a['dir']}::{b['dir']}")
    world, workers, bs = 2, 2, 4
    seen = Counter()
    per_rank_sources = []
    for rank in range(world):
        st = _stream(sets, rank, world, workers, bs)
        st.set_epoch(1)
        assert st.n == 48 // 8 + 128 // 8
        srcs = []
        for j, batch in enumerate(rank_batches(st)):
            batch_sources = set(batch["sources"].tolist())
            assert len(batch_sources) == 1, f"rank {rank} batch {j} mixes sources {batch_sources}"
            srcs.append(batch_sources.pop())
            seen.update(batch["keys"].tolist())
        per_rank_sources.append(srcs)
    assert per_rank_sources[0] == per_rank_sources[1]            # every rank draws the same source each step
    assert Counter(per_rank_sources[0]) == {0: 6, 1: 16}          # proportional to size, all of each set
    assert max(seen.values()) == 1 and len(seen) == 48 + 128      # each pair exactly once in the epoch
    # resuming mid-epoch continues the same plan
    st = _stream(sets, 0, world, 1, bs)
    st.set_epoch(1, start_batch=5)
    assert st.per_source == [6, 16]
    assert [int(x["sources"][0]) for x in st] == P.debiased_plan([6, 16], 1, 1)[5:].tolist()


@pytest.mark.slow
def test_debiased_sampling_trains_and_counts_sources(tmp_path):
    a = write_shards(str(tmp_path / "a"), num_ids=8, shard_size=16)            # 32 pairs
    b = write_shards(str(tmp_path / "b"), num_ids=16, shard_size=16, seed=1)   # 64 pairs
    run_main("--train-data", f"{a['dir']}::{b['dir']}", "--debiased-sampling", "--model", "PersonTiny",
             "--batch-size", 8, "--workers", 2, "--epochs", 1, "--logs-dir", tmp_path, "--name", "deb",
             "--log-keys", "--loss", "openclip", "--warmup", 1, "--mixup-beta", "1.0", "--dga-chunks", 2)
    rows = [json.loads(l) for l in open(tmp_path / "deb" / "keys_rank0.jsonl")]
    assert len(rows) == 12
    for r in rows:  # set b's keys are offset by set a's 32 pairs
        assert len({k >= 32 for k in r["keys"]}) == 1
    summary = json.load(open(tmp_path / "deb" / "summary.json"))
    assert summary["source_counts"] == {"0": 32, "1": 64}


@pytest.mark.parametrize("soft", [False, True])
def test_blocked_cross_entropy_equals_the_one_matrix_form(soft):
    from fast_clip.losses import blocked_cross_entropy
    torch.manual_seed(0)
    a = nn.functional.normalize(torch.randn(37, 8, dtype=torch.float64), dim=-1).requires_grad_()
    o = nn.functional.normalize(torch.randn(37, 8, dtype=torch.float64), dim=-1).requires_grad_()
    s = torch.tensor(14.0, dtype=torch.float64, requires_grad=True)
    t = mixup_targets(37, 0, 1, 0.7, dtype=torch.float64) if soft else torch.arange(37)
    full = nn.functional.cross_entropy(s * a @ o.t(), t)
    g_full = torch.autograd.grad(full, [a, o, s])
    blocked = blocked_cross_entropy(a, o, s, t, max_logits=37 * 5)   # blocks of 5 rows, the last one of 2
    g_blocked = torch.autograd.grad(blocked, [a, o, s])
    torch.testing.assert_close(blocked, full, rtol=1e-12, atol=0)
    for x, y in zip(g_blocked, g_full):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)


def test_accum_freq_trains_k_micro_batches_per_step(tmp_path):
    """--accum-freq 2 --batch-size 8: every optimizer step takes 16 pairs per rank (open_clip's meaning)."""
    from training.main import main
    shards = write_shards(str(tmp_path / "d"), num_ids=16, shard_size=16)   # 64 pairs
    assert main(["--train-data", shards["dir"], "--model", "PersonTiny", "--batch-size", "8", "--accum-freq", "2",
                 "--workers", "0", "--epochs", "1", "--logs-dir", str(tmp_path), "--name", "acc", "--log-keys",
                 "--loss", "fastclip-v3", "--warmup", "1"]) == 0
    rows = [json.loads(l) for l in open(tmp_path / "acc" / "keys_rank0.jsonl")]
    assert [len(r["keys"]) for r in rows] == [16] * 4
    assert sorted(k for r in rows for k in r["keys"]) == list(range(64))
