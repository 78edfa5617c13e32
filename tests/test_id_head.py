"""Tests of src/fast_clip/id_head.py (sub-center ArcFace ID loss), on hand-made tensors, CPU.

Expected values are written from math.cos of explicit angles, independently of the implementation's expansion
c*cos(m) - sqrt(1-c^2)*sin(m).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fast_clip.id_head import ArcFaceHead, arcface_logits, arcface_loss, check_labels, count_ids, id_loss

DT = torch.float64
S, M = 10.0, 0.5

# 2 samples x 3 ids, given as angles theta (cos = cos(theta)); labels 0 and 1.
ANGLES = [[0.3, 1.2, 2.0],
          [1.0, 0.8, 2.9]]
LABELS = [0, 1]


def cos_from_angles(angles):
    return torch.tensor([[math.cos(a) for a in row] for row in angles], dtype=DT)


def expected_logits(angles, labels, s, m):
    """s*cos(theta), with the target replaced by s*cos(theta_y + m) (or the fallback when theta_y + m > pi)."""
    out = []
    for row, y in zip(angles, labels):
        r = [s * math.cos(a) for a in row]
        t = row[y]
        r[y] = s * (math.cos(t + m) if t + m <= math.pi else math.cos(t) - m * math.sin(m))
        out.append(r)
    return out


def ce(rows, labels):
    return sum(math.log(sum(math.exp(v) for v in r)) - r[y] for r, y in zip(rows, labels)) / len(rows)


# ---------------------------------------------------------------------------------------------- logits & loss
def test_logits_match_hand_values():
    cos = cos_from_angles(ANGLES)
    got = arcface_logits(cos, torch.tensor(LABELS), S, M)
    # Written out: row 0 target 10*cos(0.8), row 1 target 10*cos(1.3).
    exp = [[10 * math.cos(0.8), 10 * math.cos(1.2), 10 * math.cos(2.0)],
           [10 * math.cos(1.0), 10 * math.cos(1.3), 10 * math.cos(2.9)]]
    for row, ref in zip(exp, expected_logits(ANGLES, LABELS, S, M)):
        assert row == pytest.approx(ref, abs=1e-12)
    torch.testing.assert_close(got, torch.tensor(exp, dtype=DT), rtol=0, atol=1e-12)


def test_loss_matches_hand_cross_entropy():
    cos = cos_from_angles(ANGLES)
    got = arcface_loss(cos, torch.tensor(LABELS), S, M)
    assert got.item() == pytest.approx(ce(expected_logits(ANGLES, LABELS, S, M), LABELS), abs=1e-12)


def test_fallback_when_theta_plus_margin_exceeds_pi():
    # theta_y = 2.9: 2.9 + 0.5 > pi, so the target is cos(2.9) - 0.5*sin(0.5) (InsightFace), not cos(3.4).
    angles, labels = [[1.0, 0.8, 2.9]], [2]
    got = arcface_logits(cos_from_angles(angles), torch.tensor(labels), S, M)
    target = got[0, 2].item()
    assert target == pytest.approx(S * (math.cos(2.9) - M * math.sin(M)), abs=1e-12)
    assert target != pytest.approx(S * math.cos(3.4), abs=1e-3)
    # The fallback is monotonic: a larger angle (smaller cos) gives a smaller target logit, unlike cos(theta + m).
    t2 = arcface_logits(cos_from_angles([[1.0, 0.8, 3.0]]), torch.tensor(labels), S, M)[0, 2].item()
    assert t2 < target
    # Just inside the threshold (theta + m = pi - 0.01) the exact formula is still used.
    a = math.pi - M - 0.01
    t3 = arcface_logits(cos_from_angles([[a, 0.1]]), torch.tensor([0]), S, M)[0, 0].item()
    assert t3 == pytest.approx(S * math.cos(a + M), abs=1e-12)


def test_margin_zero_is_exactly_scaled_cosine():
    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, DT):
        cos = (torch.rand(5, 4, generator=g, dtype=DT) * 2 - 1).to(dt)
        cos[0, 1], cos[1, 2], cos[2, 0] = 1.0, -1.0, 0.0  # the clamp boundaries must not leak into the value
        labels = torch.tensor([1, 2, 0, 3, 3])
        assert torch.equal(arcface_logits(cos, labels, S, 0.0), S * cos)


def test_target_gradient_matches_analytic_derivative():
    cos = cos_from_angles(ANGLES).requires_grad_(True)
    arcface_loss(cos, torch.tensor(LABELS), S, M).backward()
    rows = expected_logits(ANGLES, LABELS, S, M)
    n = len(rows)
    for i, (r, y) in enumerate(zip(rows, LABELS)):
        z = sum(math.exp(v) for v in r)
        p = [math.exp(v) / z for v in r]
        c = math.cos(ANGLES[i][y])
        # d/dc s*cos(acos(c)+m) = s*(cos m + sin m * c/sqrt(1-c^2)); dCE/dlogit_y = p_y - 1; mean over n rows.
        dlogit_dc = S * (math.cos(M) + math.sin(M) * c / math.sqrt(1 - c * c))
        assert cos.grad[i, y].item() == pytest.approx((p[y] - 1) * dlogit_dc / n, rel=1e-10)
        for j in range(3):
            if j != y:
                assert cos.grad[i, j].item() == pytest.approx(p[j] * S / n, rel=1e-10)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    # Keep the target cosines away from the fallback switch at cos(pi - m) = -0.878 (a jump, by design).
    cos = (torch.rand(4, 5, generator=g, dtype=DT) * 1.6 - 0.7).requires_grad_(True)
    labels = torch.tensor([0, 4, 2, 2])
    assert torch.autograd.gradcheck(lambda c: arcface_loss(c, labels, S, M), (cos,))
    assert torch.autograd.gradcheck(lambda c: arcface_logits(c, labels, S, M), (cos,))


def test_gradient_finite_at_cos_one():
    cos = torch.tensor([[1.0, 0.2], [-1.0, 0.3]], dtype=DT, requires_grad=True)
    arcface_loss(cos, torch.tensor([0, 0]), S, M).backward()
    assert torch.isfinite(cos.grad).all()


# ----------------------------------------------------------------------------------------------------- head
def test_head_shapes_and_init():
    head = ArcFaceHead(num_ids=7, dim=5, subcenters=3)
    assert head.weight.shape == (21, 5)
    assert head(torch.randn(4, 5)).shape == (4, 7)
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        head(torch.randn(4, 6))


def test_head_cosine_k1():
    head = ArcFaceHead(num_ids=2, dim=2).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    cos = head(torch.tensor([[3.0, 4.0]], dtype=DT))  # unnormalised on both sides on purpose
    torch.testing.assert_close(cos, torch.tensor([[0.6, 1.4 / math.sqrt(2)]], dtype=DT))


def test_subcenter_forward_is_max_over_subcenters():
    head = ArcFaceHead(num_ids=2, dim=2, subcenters=2).double()
    with torch.no_grad():
        # id-major rows: id 0 -> rows 0, 1; id 1 -> rows 2, 3.
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [1.0, 1.0]]))
    feats = torch.tensor([[3.0, 4.0], [0.0, -1.0]], dtype=DT)
    # f0 = (0.6, 0.8): sub-center cosines id0 (0.6, 0.8), id1 (-0.6, 1.4/sqrt2); f1 = (0, -1): id0 (0, -1), id1 (0, -1/sqrt2).
    exp = torch.tensor([[max(0.6, 0.8), max(-0.6, 1.4 / math.sqrt(2))],
                        [max(0.0, -1.0), max(0.0, -1 / math.sqrt(2))]], dtype=DT)
    torch.testing.assert_close(head(feats), exp)


def test_head_gradcheck_float64():
    torch.manual_seed(2)
    head = ArcFaceHead(num_ids=3, dim=4, subcenters=2).double()
    feats = torch.randn(5, 4, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda f, w: torch.func.functional_call(head, {"weight": w}, (f,)),
        (feats, head.weight.detach().clone().requires_grad_(True)))


def test_head_under_autocast_returns_float32():
    head = ArcFaceHead(num_ids=3, dim=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cos = head(torch.randn(2, 4).bfloat16())
        loss = arcface_loss(cos, torch.tensor([0, 1]), S, M)
    assert cos.dtype == torch.float32 and loss.dtype == torch.float32


def test_training_head_decreases_loss():
    g = torch.Generator().manual_seed(3)
    num_ids, dim, n = 5, 16, 40
    centers = F.normalize(torch.randn(num_ids, dim, generator=g), dim=-1)
    labels = torch.arange(n) % num_ids
    feats = F.normalize(centers[labels] + 0.1 * torch.randn(n, dim, generator=g), dim=-1)
    torch.manual_seed(3)
    head = ArcFaceHead(num_ids, dim, subcenters=2)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = None
    for _ in range(50):
        loss = arcface_loss(head(feats), labels, S, M)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = arcface_loss(head(feats), labels, S, M).item()
    assert final < 0.5 * first
    assert (head(feats).argmax(1) == labels).all()


# -------------------------------------------------------------------------------------------------- id_loss
def test_id_loss_shared_head_and_metrics():
    head = ArcFaceHead(num_ids=3, dim=3).double()
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, dtype=DT))
    labels = torch.tensor([0, 1, 2])
    img = torch.eye(3, dtype=DT) + 0.1                      # argmax = label for every row
    txt = torch.tensor([[1.0, 0.2, 0.0], [0.0, 1.0, 0.3], [0.9, 0.0, 0.1]], dtype=DT)  # last row wrong
    loss, metrics = id_loss(head, img, txt, labels, S, M)
    exp = 0.5 * (arcface_loss(head(img), labels, S, M) + arcface_loss(head(txt), labels, S, M))
    torch.testing.assert_close(loss, exp)
    assert metrics["id_acc_img"] == 1.0
    assert metrics["id_acc_txt"] == pytest.approx(2 / 3)
    assert metrics["id_loss_img"] + metrics["id_loss_txt"] == pytest.approx(2 * loss.item())
    # One head serves both modalities: the gradient of its weight is the sum of both paths.
    loss.backward()
    g_both = head.weight.grad.clone()
    head.weight.grad = None
    (0.5 * arcface_loss(head(img), labels, S, M)).backward()
    g_img = head.weight.grad.clone()
    head.weight.grad = None
    (0.5 * arcface_loss(head(txt), labels, S, M)).backward()
    torch.testing.assert_close(g_both, g_img + head.weight.grad)


def test_id_loss_batch_mismatch():
    head = ArcFaceHead(3, 4)
    with pytest.raises(ValueError, match="batch sizes differ"):
        id_loss(head, torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), S, M)


# --------------------------------------------------------------------------------------------------- labels
def test_out_of_range_labels_raise():
    cos = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"label 3 is out of range \[0, 3\)"):
        arcface_loss(cos, torch.tensor([0, 3]), S, M)
    with pytest.raises(ValueError, match=r"label -1 is out of range"):
        arcface_logits(cos, torch.tensor([-1, 0]), S, M)
    with pytest.raises(ValueError, match="integer"):
        check_labels(torch.tensor([0.0, 1.0]), 3)
    head = ArcFaceHead(3, 4)
    with pytest.raises(ValueError, match="out of range"):
        id_loss(head, torch.randn(2, 4), torch.randn(2, 4), torch.tensor([1, 5]), S, M)
    check_labels(torch.tensor([0, 2]), 3)  # in range: no error


def test_count_ids():
    assert count_ids(torch.tensor([3, 0, 7, 7])) == 8
    with pytest.raises(ValueError, match=">= 0"):
        count_ids(torch.tensor([0, -2]))
    with pytest.raises(ValueError, match="empty"):
        count_ids(torch.tensor([], dtype=torch.long))


def test_bad_scale_and_margin():
    cos, labels = torch.zeros(1, 2), torch.tensor([0])
    with pytest.raises(ValueError, match="margin"):
        arcface_logits(cos, labels, S, -0.1)
    with pytest.raises(ValueError, match="scale"):
        arcface_logits(cos, labels, 0.0, M)


# ------------------------------------------------------------------------------------------------------ linear head
def test_linear_id_loss_is_the_mean_of_two_cross_entropies_by_hand():
    from fast_clip.id_head import LinearIdHead, linear_id_loss
    torch.manual_seed(0)
    head = LinearIdHead(num_ids=3, dim=4).double()
    with torch.no_grad():
        head.fc.weight.copy_(torch.randn(3, 4, dtype=torch.float64))
        head.fc.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    fi, ft = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    labels = torch.tensor([2, 0])
    loss, m = linear_id_loss(head(fi), head(ft), labels)
    hand = 0.0
    for f in (fi, ft):
        for x, y in zip(f, labels.tolist()):
            z = [float(head.fc.weight[c].detach() @ x + head.fc.bias[c].detach()) for c in range(3)]
            hand += -(z[y] - math.log(sum(math.exp(v) for v in z))) / 2
    assert float(loss.detach()) == pytest.approx(hand / 2, rel=1e-12)
    assert set(m) == {"id_loss_img", "id_loss_txt", "id_acc_img", "id_acc_txt"}
    with pytest.raises(ValueError, match="out of range"):
        linear_id_loss(head(fi), head(ft), torch.tensor([3, 0]))


def test_head_lr_multiplier_is_its_own_param_group():
    from training.objective import TrainModule
    from training.optim import build_optimizer, set_lr
    from fast_clip.id_head import LinearIdHead
    clip = torch.nn.Module()
    clip.proj = torch.nn.Linear(4, 4)
    clip.logit_scale = torch.nn.Parameter(torch.tensor(1.0))
    module = TrainModule(clip, LinearIdHead(5, 4))
    opt = build_optimizer(module, lr=1e-3, wd=0.1, head_lr_mult=5)
    set_lr(opt, 2e-3)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["id_head"]["lr"] == pytest.approx(1e-2) and by_name["decay"]["lr"] == pytest.approx(2e-3)
    assert {id(p) for p in by_name["id_head"]["params"]} == {id(p) for p in module.id_head.parameters()}
    # multiplier 1: no extra group, so optimizer states of earlier runs with a head still load
    assert "id_head" not in {g["name"] for g in build_optimizer(module, lr=1e-3, wd=0.1).param_groups}
