"""Retrieval metrics against hand-computed values, a brute-force reference, and chunked == full."""
import math

import numpy as np
import pytest
import torch

from fast_clip.retrieval.metrics import (match_ranks, recall_at_1_from_features, retrieval_metrics,
                                retrieval_metrics_from_features, topk_indices)

# Gallery: 5 images. Person ids: image 0 -> 1, image 1 -> 2, image 2 -> 1, image 3 -> 3, image 4 -> 2
# (persons 1 and 2 have two images each).
GALLERY_IDS = [1, 2, 1, 3, 2]
# Queries: 6 captions. q0 and q1 are two captions of image 0 (person 1), q2 and q5 two captions of image 1 (person 2),
# q3 a caption of image 3 (person 3), q4 a caption of a person (9) with no image in the gallery.
QUERY_IDS = [1, 1, 2, 3, 9, 2]
SIM = [
    # g0    g1    g2    g3    g4
    [0.9, 0.8, 0.3, 0.1, 0.2],    # q0: order g0,g1,g2,g4,g3 -> matches g0,g2 at ranks 1,3
    [0.5, 0.5, 0.5, 0.9, 0.1],    # q1: g3, then the tie g0,g1,g2 by index, g4 -> matches g0,g2 at ranks 2,4
    [0.7, 0.7, 0.0, 0.0, 0.7],    # q2: tie g0,g1,g4, then tie g2,g3 -> matches g1,g4 at ranks 2,3
    [0.2, 0.1, 0.4, 0.3, 0.6],    # q3: g4,g2,g3,g0,g1 -> match g3 at rank 3
    [0.1, 0.2, 0.3, 0.4, 0.5],    # q4: no match in the gallery -> left out of every average
    [0.1, 0.95, 0.2, 0.3, 0.4],   # q5: g1,g4,g3,g2,g0 -> matches g1,g4 at ranks 1,2
]
# Per query (q0, q1, q2, q3, q5):
#   first-match rank: 1, 2, 2, 3, 1
#   AP  = mean_i i/r_i: (1/1+2/3)/2 = 5/6, (1/2+2/4)/2 = 1/2, (1/2+2/3)/2 = 7/12, (1/3)/1 = 1/3, (1/1+2/2)/2 = 1
#   INP = m / r_last:   2/3, 2/4 = 1/2, 2/3, 1/3, 2/2 = 1
# R@1 = 2/5 = 40 %, R@2 = 4/5 = 80 %, R@3 = 5/5 = 100 %
# mAP  = (10/12 + 6/12 + 7/12 + 4/12 + 12/12) / 5 = (39/12) / 5 = 39/60 = 65 %
# mINP = (4/6 + 3/6 + 4/6 + 2/6 + 6/6) / 5 = (19/6) / 5 = 19/30 = 63.333... %
EXPECTED = {"R1": 40.0, "R2": 80.0, "R3": 100.0, "mAP": 65.0, "mINP": 100.0 * 19 / 30}


@pytest.mark.parametrize("as_numpy", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 2, 4])
def test_hand_computed(as_numpy, chunk_size):
    sim = np.array(SIM, dtype=np.float32) if as_numpy else torch.tensor(SIM)
    m = retrieval_metrics(sim, QUERY_IDS, GALLERY_IDS, ks=(1, 2, 3), max_rank=5, chunk_size=chunk_size)
    for k, v in EXPECTED.items():
        assert m[k] == pytest.approx(v, abs=1e-9), k
    assert m["cmc"] == pytest.approx([40.0, 80.0, 100.0, 100.0, 100.0])
    assert m["num_queries"] == 6
    assert m["num_gallery"] == 5
    assert m["num_queries_without_match"] == 1


def test_match_ranks_and_topk_tie_break():
    assert match_ranks(SIM[0], 1, GALLERY_IDS) == [1, 3]
    assert match_ranks(SIM[1], 1, GALLERY_IDS) == [2, 4]
    assert match_ranks(SIM[2], 2, GALLERY_IDS) == [2, 3]
    assert match_ranks(SIM[4], 9, GALLERY_IDS) == []
    # q1: 0.9 first, then the three-way tie in index order.
    assert topk_indices(torch.tensor(SIM[1]), 5).tolist() == [[3, 0, 1, 2, 4]]
    assert topk_indices(torch.tensor(SIM[2]), 5).tolist() == [[0, 1, 4, 2, 3]]


def test_recall_at_1_first_maximum_wins():
    # 2-d features: query i scores gallery j by the dot product.
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])        # gallery ids 5, 6, 7; g0 and g1 tie for any query
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    # q0 (id 5): tie g0/g1 -> g0 (id 5) hit; q1 (id 6): tie -> g0 (id 5) miss; q2 (id 7): g2 hit; q3 (id 8): no match.
    r1 = recall_at_1_from_features(q, g, [5, 6, 7, 8], [5, 6, 7])
    assert r1 == pytest.approx(100.0 * 2 / 3)


def test_no_query_has_a_match():
    m = retrieval_metrics(torch.zeros(2, 3), [1, 2], [3, 4, 5])
    assert math.isnan(m["R1"]) and math.isnan(m["mAP"])
    assert m["num_queries_without_match"] == 2


def test_nan_similarity_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0]]), [1], [1, 2])


def _brute_force(sim, qids, gids, ks, max_rank):
    """Full ranking per query with Python's sort on (-similarity, gallery index)."""
    firsts, aps, inps = [], [], []
    for i in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda j: (-float(sim[i, j]), j))
        pos = [r + 1 for r, j in enumerate(order) if gids[j] == qids[i]]
        if not pos:
            continue
        firsts.append(pos[0])
        aps.append(np.mean([(n + 1) / p for n, p in enumerate(pos)]))
        inps.append(len(pos) / pos[-1])
    firsts = np.array(firsts)
    out = {f"R{k}": 100 * np.mean(firsts <= k) for k in ks}
    out.update(mAP=100 * np.mean(aps), mINP=100 * np.mean(inps),
               cmc=[100 * np.mean(firsts <= k) for k in range(1, max_rank + 1)])
    return out


@pytest.mark.parametrize("quantise", [False, True])
def test_matches_brute_force(quantise):
    rng = np.random.default_rng(1)
    sim = rng.standard_normal((80, 60)).astype(np.float32)
    if quantise:  # many exact ties, including between matches
        sim = np.round(sim * 2) / 2
    qids = rng.integers(0, 25, 80)
    gids = rng.integers(0, 20, 60)
    ref = _brute_force(sim, qids, gids, (1, 5, 10), 20)
    got = retrieval_metrics(sim, qids, gids, ks=(1, 5, 10), max_rank=20, chunk_size=13)
    for k in ("R1", "R5", "R10", "mAP", "mINP"):
        assert got[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-12), k
    assert got["cmc"] == pytest.approx(ref["cmc"])


@pytest.mark.parametrize("quantise", [False, True])
def test_chunked_equals_full(quantise):
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(700, 32), dim=1)
    g = torch.nn.functional.normalize(torch.randn(500, 32), dim=1)
    if quantise:
        q, g = torch.round(q * 4) / 4, torch.round(g * 4) / 4
    qids = torch.randint(0, 120, (700,))
    gids = torch.randint(0, 100, (500,))   # ids 100..119 have no gallery image
    sim = q @ g.T
    full = retrieval_metrics(sim, qids, gids, chunk_size=700)
    assert full["num_queries_without_match"] > 0
    for cs in (1, 37, 256, None):
        got_all = [retrieval_metrics(sim, qids, gids, chunk_size=cs)]
        if quantise:  # quarter-step features: every dot product is exact, whatever the matmul's blocking
            got_all.append(retrieval_metrics_from_features(q, g, qids, gids, chunk_size=cs))
        for got in got_all:
            for k, v in full.items():
                assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), (cs, k)


@pytest.mark.cuda
def test_cuda_path_equals_cpu():
    torch.manual_seed(0)
    q = torch.round(torch.randn(300, 16) * 4) / 4
    g = torch.round(torch.randn(200, 16) * 4) / 4
    qids, gids = torch.randint(0, 60, (300,)), torch.randint(0, 50, (200,))
    cpu = retrieval_metrics_from_features(q, g, qids, gids, chunk_size=64)
    gpu = retrieval_metrics_from_features(q.cuda(), g.cuda(), qids.cuda(), gids.cuda(), chunk_size=64)
    for k, v in cpu.items():
        assert gpu[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k


def test_nan_features_are_an_error_not_numbers():
    import torch
    from fast_clip.retrieval.protocol import EvalError, evaluate_features
    from fast_clip.retrieval.testset import TestSet

    ts = TestSet(name="t", shards=[], captions=["a", "b"], query_pids=np.array([0, 1]),
                 query_gallery_index=np.array([0, 1]), gallery_pids=np.array([0, 1]), gallery_images=[b"", b""])
    img = torch.eye(2)
    txt = torch.tensor([[1.0, 0.0], [float("nan"), 0.0]])
    with pytest.raises(EvalError, match="1 of 2 text features are NaN"):
        evaluate_features(img, txt, ts)
    assert evaluate_features(img, torch.eye(2), ts)["R1"] == 100.0
