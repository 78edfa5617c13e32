"""Identity-aware positives (--id-positives) and SDM: each loss against a hand computation written from its
definition with Python loops, the row-blocked forms against the one-matrix forms, and the "no ids = today's loss"
rule. The GCL family's closed-form gradients with identity masks are in test_losses.py (ids=id-aware), two
processes == one in test_losses_dist.py and DGA == one pass in test_dga.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from fast_clip.losses import LossConfig, add_loss_args, blocked_identity_loss, build_loss, same_identity
from test_losses import ID_BATCH, feats

DT = torch.float64
TAU = 0.1


def make(name, **over):
    over.setdefault("temperature", TAU)
    return build_loss(LossConfig.from_name(name, **over), 32, torch.device("cpu"), dtype=DT)


def positives(pids, i):
    """Columns that count as positives of anchor i: its own pair and, for a known id, every pair of that id."""
    return [j for j in range(len(pids)) if j == i or (pids[i] >= 0 and pids[j] == pids[i])]


def hand_infonce(a1, a2, tau, pids):
    """1/2 mean_i [-1/|P_i| sum_{j in P_i} log softmax_j(<a_i, b_.>/tau)] over both directions."""
    B = a1.shape[0]
    total = 0
    for x, y in ((a1, a2), (a2, a1)):
        for i in range(B):
            logits = torch.stack([x[i] @ y[j] / tau for j in range(B)])
            lse = torch.logsumexp(logits, 0)
            P = positives(pids, i)
            total = total - sum(logits[j] - lse for j in P) / len(P)
    return total / (2 * B)


def hand_sdm(a1, a2, tau, pids, eps=1e-8):
    """IRRA's SDM, averaged over the two directions: mean_i sum_j p_ij (log p_ij - log(q_ij + eps))."""
    B = a1.shape[0]
    total = 0
    for x, y in ((a1, a2), (a2, a1)):
        for i in range(B):
            logits = torch.stack([x[i] @ y[j] / tau for j in range(B)])
            logp = logits - torch.logsumexp(logits, 0)
            P = positives(pids, i)
            for j in range(B):
                q = 1.0 / len(P) if j in P else 0.0
                total = total + logp[j].exp() * (logp[j] - math.log(q + eps))
    return total / (2 * B)


def _run(loss, e1, e2, p, pids):
    out, metrics = loss(e1, e2, p.exp(), keys=torch.arange(e1.shape[0]), pids=pids)
    out.backward()
    return out, metrics


@pytest.mark.parametrize("name,hand", [("openclip", hand_infonce), ("sdm", hand_sdm)])
@pytest.mark.parametrize("ids", [False, True], ids=["blind", "id-aware"])
def test_infonce_family_equals_hand_computation(name, hand, ids):
    e1, e2 = feats(6, seed=2)
    p = torch.tensor(math.log(1 / TAU), dtype=DT, requires_grad=True)
    loss = make(name, id_positives=ids)
    out, metrics = _run(loss, e1, e2, p, ID_BATCH if ids else None)

    a1, a2 = (e.detach().clone().requires_grad_(True) for e in (e1, e2))
    q = p.detach().clone().requires_grad_(True)
    pids = ID_BATCH.tolist() if ids else [-1] * 6
    ref = hand(a1, a2, torch.exp(-q), pids)
    ref.backward()
    torch.testing.assert_close(out.detach(), ref.detach(), rtol=1e-10, atol=1e-12)
    for got, want in ((e1.grad, a1.grad), (e2.grad, a2.grad), (p.grad, q.grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    if ids:  # 5, 9, 5, -, 9, 2: four anchors with 2 positives, two with 1
        assert metrics["positives"] == pytest.approx(10 / 6)


def test_id_aware_changes_the_loss_and_unknown_ids_do_not():
    e1, e2 = feats(6, seed=3)
    for name in ("openclip", "fastclip-v3", "fastclip-v2"):
        vals = {}
        for tag, ids, pids in (("blind", False, None), ("unknown", True, torch.full((6,), -1)),
                               ("aware", True, ID_BATCH)):
            a1, a2 = (e.detach().clone().requires_grad_(True) for e in (e1, e2))
            p = torch.tensor(math.log(1 / TAU), dtype=DT, requires_grad=True)
            loss = make(name, id_positives=ids)
            out, _ = _run(loss, a1, a2, p, pids)
            vals[tag] = (out.detach(), a1.grad, {k: v.clone() for k, v in loss.state_dict().items()})
        # a set without ids: exactly today's loss, estimators and temperatures
        torch.testing.assert_close(vals["unknown"][0], vals["blind"][0], rtol=1e-12, atol=0)
        torch.testing.assert_close(vals["unknown"][1], vals["blind"][1], rtol=1e-12, atol=0)
        for k, v in vals["blind"][2].items():
            torch.testing.assert_close(vals["unknown"][2][k], v, rtol=1e-12, atol=0)
        assert not torch.allclose(vals["aware"][1], vals["blind"][1])


@pytest.mark.parametrize("variant", ["sogclr", "fastclip-v0", "fastclip-v1"])
def test_gcl_gamma_one_is_the_log_of_the_mean_over_other_persons(variant):
    """Epoch 0 (gamma = 1), fresh estimators: the gradient is that of 1/2 mean_i (log g1_i + log g2_i) with
    g_i = mean over the candidates of another person than i."""
    loss = make(variant, fastclip_rules="exact", temperature=0.15, id_positives=True)
    loss.set_epoch(0)
    e1, e2 = feats(6, seed=7)
    p = torch.tensor(math.log(1 / 0.15), dtype=DT, requires_grad=True)
    out, _ = loss(e1, e2, p.exp(), keys=torch.tensor([3, 1, 4, 0, 5, 9]), pids=ID_BATCH)
    out.backward()

    a1, a2 = (e.detach().clone().requires_grad_(True) for e in (e1, e2))
    q = p.detach().clone().requires_grad_(True)
    tau = torch.exp(-q) if loss.learns_model_temperature else torch.tensor(0.15, dtype=DT)
    pids = ID_BATCH.tolist()
    terms = []
    for i in range(6):
        neg = [j for j in range(6) if j not in positives(pids, i)]
        g1 = sum(torch.exp((a1[i] @ a2[j] - a1[i] @ a2[i]) / tau) for j in neg) / len(neg)
        g2 = sum(torch.exp((a2[i] @ a1[j] - a2[i] @ a1[i]) / tau) for j in neg) / len(neg)
        terms.append(torch.log(g1) + torch.log(g2))
    obj = 0.5 * torch.stack(terms).mean()
    obj.backward()
    torch.testing.assert_close(out.detach(), obj.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(e1.grad, a1.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(e2.grad, a2.grad, rtol=1e-9, atol=1e-12)
    if loss.learns_model_temperature:
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sdm", [False, True], ids=["multi-positive", "sdm"])
def test_blocked_identity_loss_equals_one_matrix(sdm):
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(7, 4, generator=g, dtype=DT), dim=-1).requires_grad_(True)
    o = F.normalize(torch.randn(14, 4, generator=g, dtype=DT), dim=-1).requires_grad_(True)
    rows = torch.tensor([0, 1, 2, -1, 1, 3, 0])
    cols = torch.cat([torch.tensor([5, 6, 1, 0, 7, 7, 2]), rows])  # this rank's rows sit at columns 7..13
    results = []
    for max_logits in (10 ** 6, 20):  # one matrix; row blocks of one row
        a.grad = o.grad = None
        val = blocked_identity_loss(a, o, torch.tensor(8.0, dtype=DT), 7, sdm, rows, cols, max_logits=max_logits)
        val.backward()
        results.append((val.detach(), a.grad.clone(), o.grad.clone()))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


def test_same_person_entry_far_above_the_pair_stays_finite():
    """Another caption of the same image can score far above the pair's own: its exp would overflow; it is masked
    before the exp, so the loss and the gradients stay finite."""
    v = torch.eye(4, dtype=DT)
    e1 = torch.stack([v[0], v[0], v[2], v[3]]).requires_grad_(True)
    # pair 0's own similarity is 0.447; pair 1 (same person) has text v0: <e1_0, e2_1> = 1, X = 0.553 / tau
    e2 = torch.stack([F.normalize(v[0] + 2 * v[1], dim=0), v[0], v[2], v[3]]).requires_grad_(True)
    loss = make("fastclip-v1", temperature=5e-4, id_positives=True)  # exp(1106) = inf in float64
    out, _ = loss(e1, e2, None, keys=torch.arange(4), pids=torch.tensor([7, 7, 8, 9]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(e1.grad).all() and torch.isfinite(e2.grad).all()


def test_same_identity_ignores_unknown_ids():
    m = same_identity(torch.tensor([1, -1, 2]), torch.tensor([1, -1, 2, 1]))
    assert m.tolist() == [[True, False, False, True], [False, False, False, False], [False, False, True, False]]


def test_flags_and_errors():
    import argparse
    ap = argparse.ArgumentParser()
    add_loss_args(ap)
    assert LossConfig.from_args(ap.parse_args(["--loss", "fastclip-v3"])).id_positives is False
    cfg = LossConfig.from_args(ap.parse_args(["--loss", "sdm", "--id-positives"]))
    assert cfg.id_positives and cfg.temperature_scheme == "global_learnable"
    with pytest.raises(ValueError, match="--multiply_tau"):
        LossConfig.from_name("sdm", multiply_tau=True)
    e1, e2 = feats(4)
    for name in ("openclip", "fastclip-v3"):
        with pytest.raises(ValueError, match="needs the person ids"):
            make(name, id_positives=True)(e1, e2, torch.tensor(10.0, dtype=DT), keys=torch.arange(4))
    with pytest.raises(ValueError, match="mixup"):
        make("openclip", id_positives=True)(e1, e2, torch.tensor(10.0, dtype=DT), keys=torch.arange(4),
                                            mix_alpha=0.5, pids=torch.arange(4))
