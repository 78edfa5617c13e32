"""Single-process tests of src/fast_clip/losses/ (float64, CPU).

The expected FCCO gradients are written here in closed form from the math of docs/LOSSES.md, independently of the
implementation's code paths.
"""
import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from fast_clip.losses import (
    LOSSES,
    VARIANT_PRESETS,
    LossConfig,
    add_loss_args,
    build_loss,
    gamma_at_epoch,
)

DT = torch.float64
GCL_VARIANTS = ["sogclr", "isogclr", "fastclip-v0", "fastclip-v1", "fastclip-v2", "fastclip-v3"]


def feats(B=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    e1 = F.normalize(torch.randn(B, d, generator=g, dtype=DT), dim=-1)
    e2 = F.normalize(torch.randn(B, d, generator=g, dtype=DT), dim=-1)
    return e1.requires_grad_(True), e2.requires_grad_(True)


def make(variant, data_size=16, **over):
    """The tests below check the exact-gradient rules against the papers' closed forms (--fastclip_rules exact);
    tests/test_losses_official.py checks the official rules, the default."""
    over.setdefault("fastclip_rules", "exact")
    cfg = LossConfig.from_name(variant, **over)
    return build_loss(cfg, data_size, torch.device("cpu"), dtype=DT)


# ---------------------------------------------------------------------------------------------- closed forms
def closed_form(E1, E2, tau1, tau2, u1_old, u2_old, gamma, eps, pids=None):
    """Quantities of the math for anchors i and candidates j != i (no autograd); with ``pids``, for candidates j of
    another person than i (identity-aware negatives, g_i the mean over those n_i candidates).

    Returns g1, g2, the updated u1, u2, and for coefficient vectors c1, c2 a function giving
    (dE1, dE2, dtau) of  (1/(2B)) sum_i [c1_i g1_i / (u1_i+eps) + c2_i g2_i / (u2_i+eps)]  with u fixed,
    where dtau is the derivative through the temperature inside g (tau1 = tau2 = tau global).
    """
    E1, E2 = E1.detach(), E2.detach()
    B = E1.shape[0]
    off = ~torch.eye(B, dtype=torch.bool)
    if pids is not None:  # written out from the definition, not with the library's helpers
        for i in range(B):
            for j in range(B):
                if pids[i] >= 0 and pids[i] == pids[j]:
                    off[i, j] = False
    n = off.sum(1, keepdim=True).to(E1.dtype)  # B - 1 without pids
    S = E1 @ E2.T  # S[i, j] = <e1_i, e2_j>
    pos = torch.diag(S)
    X1 = (S - pos[:, None]) / tau1[:, None]  # image anchor i, text candidate j
    X2 = (S.T - pos[:, None]) / tau2[:, None]  # text anchor i, image candidate j
    W1 = torch.exp(X1) * off / n
    W2 = torch.exp(X2) * off / n
    g1, g2 = W1.sum(1), W2.sum(1)

    def upd(u, g):
        bad = ~torch.isfinite(u) | (u <= 1e-30)
        return torch.where(bad, g, (1 - gamma) * u + gamma * g)

    u1, u2 = upd(u1_old, g1), upd(u2_old, g2)

    def grads(c1, c2):
        a1 = c1 / (u1 + eps) / tau1 / (2 * B)
        a2 = c2 / (u2 + eps) / tau2 / (2 * B)
        r1, r2 = W1.sum(1), W2.sum(1)
        # d g1_i / d e1_i = sum_j W1_ij (e2_j - e2_i)/tau ; d g1_i/d e2_j = W1_ij e1_i / tau ; d g1_i/d e2_i = -g1_i e1_i/tau
        dE1 = a1[:, None] * (W1 @ E2 - r1[:, None] * E2) + (W2 * a2[:, None]).T @ E2 - (a2 * r2)[:, None] * E2
        dE2 = a2[:, None] * (W2 @ E1 - r2[:, None] * E1) + (W1 * a1[:, None]).T @ E1 - (a1 * r1)[:, None] * E1
        # d g_i / d tau = -sum_j W_ij X_ij / tau
        dg1 = -(W1 * X1).sum(1) / tau1
        dg2 = -(W2 * X2).sum(1) / tau2
        dtau = ((c1 * dg1 / (u1 + eps)).sum() + (c2 * dg2 / (u2 + eps)).sum()) / (2 * B)
        return dE1, dE2, dtau

    return dict(g1=g1, g2=g2, u1=u1, u2=u2, X1=X1, X2=X2, W1=W1, W2=W2, grads=grads)


def _prime_estimators(loss, keys, seed=3):
    """Put arbitrary positive values in u at the batch keys, with one never-initialised (0) and one NaN entry."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.rand(len(keys), generator=g, dtype=DT) * 3 + 0.2
    u1, u2 = vals.clone(), vals.flip(0).clone()
    u1[0] = 0.0
    u2[1] = float("nan")
    loss.u1[keys] = u1
    loss.u2[keys] = u2
    return u1, u2


# pids of the 6-pair batch: persons 5 and 9 have two pairs each, 2 and 4 one; -1 = unknown (a foreign shard's pair)
ID_BATCH = torch.tensor([5, 9, 5, -1, 9, 2])


@pytest.mark.parametrize("variant", GCL_VARIANTS)
@pytest.mark.parametrize("epoch", [0, 3])
@pytest.mark.parametrize("ids", [False, True], ids=["blind", "id-aware"])
def test_surrogate_gradient_equals_closed_form_fcco(variant, epoch, ids):
    B = 6
    over = dict(gamma_decay_epochs=6, rho=0.7, temperature=0.2, id_positives=ids)
    if variant in ("isogclr", "fastclip-v2"):
        over["lr_tau"] = 0.05
    loss = make(variant, **over)
    cfg = loss.cfg
    keys = torch.tensor([11, 2, 7, 0, 15, 4])
    e1, e2 = feats(B)
    loss.set_epoch(epoch)
    gamma = gamma_at_epoch(epoch, cfg.gamma, cfg.gamma_schedule, cfg.gamma_decay_epochs)
    u1_old, u2_old = _prime_estimators(loss, keys)
    individual = cfg.temperature_scheme == "individual_learnable"
    if individual:  # distinct per-pair temperatures
        loss.tau1[keys] = torch.linspace(0.1, 0.3, B, dtype=DT)
        loss.tau2[keys] = torch.linspace(0.25, 0.05, B, dtype=DT)
    tau1 = loss.tau1[keys].clone() if individual else torch.full((B,), 0.2, dtype=DT)
    tau2 = loss.tau2[keys].clone() if individual else torch.full((B,), 0.2, dtype=DT)
    p = torch.tensor(math.log(1 / 0.2), dtype=DT, requires_grad=True)  # logit_scale param, tau = exp(-p)

    out, metrics = loss(e1, e2, p.exp(), keys=keys, pids=ID_BATCH if ids else None)
    out.backward()

    eps = cfg.fastclip_eps
    ref = closed_form(e1, e2, tau1, tau2, u1_old, u2_old, gamma, eps, ID_BATCH if ids else None)
    # estimator update (resets at the 0 and NaN entries)
    torch.testing.assert_close(loss.u1[keys], ref["u1"])
    torch.testing.assert_close(loss.u2[keys], ref["u2"])
    torch.testing.assert_close(loss.u1[keys][0], ref["g1"][0])  # reset entries take the fresh g
    torch.testing.assert_close(loss.u2[keys][1], ref["g2"][1])

    ones = torch.ones(B, dtype=DT)
    tau = 0.2
    if individual:
        dE1, dE2, _ = ref["grads"](tau1, tau2)
    elif cfg.multiply_tau:
        dE1, dE2, dtau_in = ref["grads"](tau * ones, tau * ones)
    else:
        dE1, dE2, dtau_in = ref["grads"](ones, ones)
    torch.testing.assert_close(e1.grad, dE1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(e2.grad, dE2, rtol=1e-10, atol=1e-12)

    # d/d logit-scale parameter p (tau = exp(-p), dtau/dp = -tau)
    if cfg.temperature_scheme == "global_learnable":
        if cfg.multiply_tau:
            F_hat = 0.5 * (torch.log(ref["u1"] + eps) + torch.log(ref["u2"] + eps)).mean()
            dtau = F_hat + dtau_in + cfg.rho  # dtau_in already carries the factor tau
        else:
            dtau = dtau_in
        torch.testing.assert_close(p.grad, -tau * dtau, rtol=1e-10, atol=1e-12)
    else:
        assert p.grad is None or p.grad.abs().item() == 0.0

    if individual:  # first Adam step on tau_i: grad_i = log(u_i+eps) + rho + tau_i g_i'(tau_i)/(u_i+eps)
        for which, u, X, Wm, t_old in (("tau1", ref["u1"], ref["X1"], ref["W1"], tau1),
                                       ("tau2", ref["u2"], ref["X2"], ref["W2"], tau2)):
            tau_dg = -(Wm * X).sum(1)  # tau * dg/dtau
            grad = torch.log(u + eps) + cfg.rho + tau_dg / (u + eps)
            m = (1 - cfg.tau_beta1) * grad
            v = (1 - cfg.tau_beta2) * grad ** 2
            step = cfg.lr_tau * (m / (1 - cfg.tau_beta1)) / (torch.sqrt(v / (1 - cfg.tau_beta2)) + cfg.tau_adam_eps)
            expected = (t_old - step).clamp(0.01, 1.0)
            torch.testing.assert_close(getattr(loss, which)[keys], expected, rtol=1e-10, atol=1e-12)
            assert not torch.allclose(expected, t_old)
        assert torch.equal(loss.tau_count[keys], torch.ones(B, dtype=torch.int32))
    assert metrics["gamma"] == pytest.approx(gamma)


def test_individual_tau_second_adam_step_and_clamp():
    loss = make("fastclip-v2", lr_tau=0.05, rho=0.3, temperature=0.2)
    keys = torch.tensor([1, 5, 9, 3])
    e1, e2 = feats(4, seed=4)
    loss.set_epoch(2)
    cfg = loss.cfg
    gamma = float(loss.gamma)
    eps = cfg.fastclip_eps
    m1 = torch.zeros(4, dtype=DT)
    v1 = torch.zeros(4, dtype=DT)
    t1 = torch.full((4,), 0.2, dtype=DT)
    u1 = torch.zeros(4, dtype=DT)
    for t in (1, 2):
        ref = closed_form(e1, e2, t1, loss.tau2[keys].clone(), u1, loss.u2[keys].clone(), gamma, eps)
        loss(e1, e2, None, keys=keys)
        grad = torch.log(ref["u1"] + eps) + cfg.rho - (ref["W1"] * ref["X1"]).sum(1) / (ref["u1"] + eps)
        m1 = cfg.tau_beta1 * m1 + (1 - cfg.tau_beta1) * grad
        v1 = cfg.tau_beta2 * v1 + (1 - cfg.tau_beta2) * grad ** 2
        t1 = (t1 - cfg.lr_tau * (m1 / (1 - cfg.tau_beta1 ** t)) /
              ((v1 / (1 - cfg.tau_beta2 ** t)).sqrt() + cfg.tau_adam_eps)).clamp(0.01, 1.0)
        u1 = ref["u1"]
        torch.testing.assert_close(loss.tau1[keys], t1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loss.tau1_m[keys], m1, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loss.tau1_v[keys], v1, rtol=1e-10, atol=1e-12)
    # a huge rho pushes tau down to the clamp
    loss2 = make("fastclip-v2", lr_tau=10.0, rho=50.0)
    loss2(e1, e2, None, keys=keys)
    assert torch.all(loss2.tau1[keys] == 0.01) and torch.all(loss2.tau2[keys] == 0.01)
    # untouched keys keep tau0 and zero moments
    assert torch.all(loss2.tau1[[0, 2]] == loss2.cfg.temperature) and torch.all(loss2.tau1_m[[0, 2]] == 0)


@pytest.mark.parametrize("variant", ["sogclr", "fastclip-v0", "fastclip-v1"])
def test_gamma_one_fresh_estimators_equals_log_gcl(variant):
    """Epoch 0 (gamma = 1), fresh estimators: the gradient is that of 1/2 mean(log g1 + log g2) on the batch."""
    loss = make(variant, temperature=0.15)
    loss.set_epoch(0)
    keys = torch.tensor([3, 1, 4, 0, 5])
    e1, e2 = feats(5, seed=7)
    p = torch.tensor(math.log(1 / 0.15), dtype=DT, requires_grad=True)
    out, _ = loss(e1, e2, p.exp(), keys=keys)
    out.backward()

    a1 = e1.detach().clone().requires_grad_(True)
    a2 = e2.detach().clone().requires_grad_(True)
    q = p.detach().clone().requires_grad_(True)
    tau = torch.exp(-q) if loss.cfg.temperature_scheme == "global_learnable" else torch.tensor(0.15, dtype=DT)
    B = 5
    terms = []
    for i in range(B):
        g1 = sum(torch.exp((a1[i] @ a2[j] - a1[i] @ a2[i]) / tau) for j in range(B) if j != i) / (B - 1)
        g2 = sum(torch.exp((a2[i] @ a1[j] - a2[i] @ a1[i]) / tau) for j in range(B) if j != i) / (B - 1)
        terms.append(torch.log(g1) + torch.log(g2))
    obj = 0.5 * torch.stack(terms).mean()
    obj.backward()
    torch.testing.assert_close(e1.grad, a1.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(e2.grad, a2.grad, rtol=1e-9, atol=1e-12)
    if loss.learns_model_temperature:
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12)
    # the reported value is the objective itself
    torch.testing.assert_close(out.detach(), obj.detach(), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------- openclip
def test_openclip_equals_hand_cross_entropy_and_finite_differences():
    loss = make("openclip")
    assert loss.learns_model_temperature
    assert loss.initial_logit_scale() == pytest.approx(math.log(1 / 0.07))
    e1, e2 = feats(4, 3, seed=2)
    scale = torch.tensor(12.5, dtype=DT)
    out, metrics = loss(e1, e2, scale)
    logits = scale * e1 @ e2.T
    ce_i = -torch.log_softmax(logits, 1).diagonal().mean()
    ce_t = -torch.log_softmax(logits.T, 1).diagonal().mean()
    torch.testing.assert_close(out, 0.5 * (ce_i + ce_t))
    assert metrics["tau"] == pytest.approx(1 / 12.5)

    def f(a, b_, s):
        return loss(a, b_, s)[0]

    inputs = (e1.detach().clone().requires_grad_(True), e2.detach().clone().requires_grad_(True),
              scale.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs)


def test_openclip_global_constant_ignores_logit_scale():
    loss = make("openclip", temperature_scheme="global_constant", temperature=0.1)
    assert not loss.learns_model_temperature
    e1, e2 = feats(4, 3)
    a, _ = loss(e1, e2, torch.tensor(3.0, dtype=DT))
    b_, _ = loss(e1, e2, torch.tensor(30.0, dtype=DT))
    assert torch.equal(a, b_)


# ---------------------------------------------------------------------------------------------- state & schedules
def test_estimator_indexing_reset_and_duplicates():
    loss = make("fastclip-v1", temperature=0.2, gamma_decay_epochs=4)
    loss.set_epoch(5)
    gamma = float(loss.gamma)
    assert gamma == pytest.approx(0.2)
    keys = torch.tensor([9, 3, 12])
    e1, e2 = feats(3, seed=5)
    loss.u1[9] = 2.0
    loss.u1[3] = 1e-31  # underflowed -> reset
    loss.u1[12] = float("inf")  # non-finite -> reset
    loss(e1, e2, None, keys=keys)
    ref = closed_form(e1, e2, torch.full((3,), 0.2, dtype=DT), torch.full((3,), 0.2, dtype=DT),
                      torch.tensor([2.0, 1e-31, float("inf")], dtype=DT), torch.zeros(3, dtype=DT), gamma, 1e-14)
    torch.testing.assert_close(loss.u1[keys], torch.stack([(1 - gamma) * 2.0 + gamma * ref["g1"][0],
                                                           ref["g1"][1], ref["g1"][2]]))
    torch.testing.assert_close(loss.u2[keys], ref["g2"])  # never initialised -> g
    others = torch.ones(16, dtype=torch.bool)
    others[keys] = False
    assert torch.all(loss.u1[others] == 0) and torch.all(loss.u2[others] == 0)
    assert int(loss.step) == 1
    # a key repeated inside a batch: the first occurrence is written, deterministically
    loss2 = make("fastclip-v1", temperature=0.2)
    dup = torch.tensor([4, 4, 6])
    loss2(e1, e2, None, keys=dup)
    torch.testing.assert_close(loss2.u1[[4, 6]], ref["g1"][[0, 2]])
    # keys outside [0, data_size) and missing keys are errors
    with pytest.raises(ValueError, match="data_size"):
        loss2(e1, e2, None, keys=torch.tensor([0, 1, 16]))
    with pytest.raises(ValueError, match=r"got range \[-1, 1\]"):
        loss2(e1, e2, None, keys=torch.tensor([0, 1, -1]))
    with pytest.raises(ValueError, match="keys"):
        loss2(e1, e2, None)


def test_gamma_schedules():
    # constant: 1 in epoch 0, then gamma
    assert [gamma_at_epoch(e, 0.8, "constant", 5) for e in (0, 1, 7)] == [1.0, 0.8, 0.8]
    # cosine from 1 (epoch 0) to gamma at decay_epochs, constant after
    vals = [gamma_at_epoch(e, 0.2, "cosine", 4) for e in range(7)]
    expected = [1.0, 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)), 0.6,
                0.2 + 0.8 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.2, 0.2, 0.2]
    assert vals == pytest.approx(expected)
    loss = make("fastclip-v3", gamma_decay_epochs=4)
    for e, v in enumerate(expected):
        loss.set_epoch(e)
        assert loss.current_gamma() == pytest.approx(v)
    loss = make("sogclr")
    loss.set_epoch(0)
    assert loss.current_gamma() == 1.0
    loss.set_epoch(1)
    assert loss.current_gamma() == pytest.approx(VARIANT_PRESETS["sogclr"]["gamma"])


def test_temperature_lr_schedules():
    v3 = make("fastclip-v3", lr_tau=2e-4)
    assert v3.learns_model_temperature
    assert v3.temperature_lr(1e-3, 0.07) == pytest.approx(2e-4)
    assert v3.temperature_lr(1e-3, 0.031) == pytest.approx(2e-4)
    assert v3.temperature_lr(1e-3, 0.03) == pytest.approx(2e-4 / 3)
    assert v3.temperature_lr(1e-3, 0.05) == pytest.approx(2e-4 / 3)  # latched once reached
    sd = v3.state_dict()
    v3b = make("fastclip-v3", lr_tau=2e-4)
    v3b.load_state_dict(sd)
    assert v3b.temperature_lr(1e-3, 0.05) == pytest.approx(2e-4 / 3)
    v0 = make("fastclip-v0", lr_tau_scheduler="const")
    assert v0.learns_model_temperature and v0.temperature_lr(1e-3, 0.01) is None  # exact, no --lr_tau: main schedule
    assert make("fastclip-v0", lr_tau=5e-4).temperature_lr(1e-3, 0.01) == pytest.approx(5e-4)
    assert make("fastclip-v0", lr_tau_scheduler="step_thresh").temperature_lr(1e-3, 0.02) == pytest.approx(1e-3 / 3)
    for name in ("sogclr", "fastclip-v1", "isogclr", "fastclip-v2"):
        loss = make(name)
        assert not loss.learns_model_temperature and loss.temperature_lr(1e-3, 0.02) is None
    assert make("fastclip-v2").initial_logit_scale() == pytest.approx(math.log(1 / 0.03))


@pytest.mark.parametrize("variant", GCL_VARIANTS)
def test_checkpoint_round_trip(variant):
    loss = make(variant)
    keys = torch.tensor([0, 3, 5, 8])
    e1, e2 = feats(4)
    loss.set_epoch(0)
    loss(e1, e2, torch.tensor(14.0, dtype=DT), keys=keys)
    loss.set_epoch(3)
    loss(e1, e2, torch.tensor(14.0, dtype=DT), keys=keys)
    sd = loss.state_dict()
    expected = {"u1", "u2", "step", "epoch", "gamma", "tau_lr_dropped"}
    if loss.individual:
        expected |= {"tau1", "tau2", "tau1_m", "tau1_v", "tau2_m", "tau2_v", "tau_count", "bound1", "bound2"}
    assert set(sd) == expected
    fresh = make(variant)
    fresh.load_state_dict(sd)
    for k, v in sd.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh.current_gamma() == loss.current_gamma() and int(fresh.epoch) == 3
    # the restored loss continues exactly like the original
    a, _ = loss(e1, e2, torch.tensor(14.0, dtype=DT), keys=keys)
    b_, _ = fresh(e1, e2, torch.tensor(14.0, dtype=DT), keys=keys)
    assert torch.equal(a, b_)
    for k in sd:
        assert torch.equal(fresh.state_dict()[k], loss.state_dict()[k]), k


def test_half_precision_features_are_upcast():
    loss = build_loss(LossConfig.from_name("fastclip-v3"), 10, torch.device("cpu"))
    assert loss.u1.dtype == torch.float32 and loss.state_bytes_per_pair() == 8
    assert build_loss(LossConfig.from_name("fastclip-v2"), 10).state_bytes_per_pair() == 44
    e1, e2 = feats(4)
    out, m = loss(e1.detach().to(torch.bfloat16), e2.detach().to(torch.bfloat16), torch.tensor(1 / 0.07),
                  keys=torch.arange(4))
    assert out.dtype == torch.float32 and math.isfinite(out.item()) and math.isfinite(m["u1_mean"])
    # inside the trainer's autocast the loss still computes in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out2, _ = build_loss(LossConfig.from_name("fastclip-v3"), 10)(e1.detach().float(), e2.detach().float(),
                                                                      torch.tensor(1 / 0.07), keys=torch.arange(4))
    assert out2.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- CLI & registry
def parse(argv, epochs=None):
    parser = argparse.ArgumentParser()
    add_loss_args(parser)
    args = parser.parse_args(argv)
    if epochs is not None:
        args.epochs = epochs
    return LossConfig.from_args(args)


def test_registry_and_presets():
    assert set(LOSSES) == {"openclip", "sdm", "sogclr", "isogclr", "fastclip-v0", "fastclip-v1", "fastclip-v2",
                           "fastclip-v3"}
    for name in LOSSES:
        cfg = LossConfig.from_name(name)
        assert isinstance(build_loss(cfg, 10), LOSSES[name])
    c = parse(["--loss", "fastclip-v3"], epochs=30)
    assert (c.temperature_scheme, c.multiply_tau, c.lr_tau_scheduler, c.gamma_schedule, c.gamma,
            c.gamma_decay_epochs) == ("global_learnable", True, "step_thresh", "cosine", 0.2, 15)
    c = parse(["--loss", "isogclr"])
    assert c.temperature_scheme == "individual_learnable" and c.gamma_schedule == "constant"
    c = parse(["--loss", "fastclip-v1"])
    assert c.temperature_scheme == "global_constant" and c.gamma_decay_epochs == 10


def test_flags_override_presets_and_aliases():
    c = parse(["--loss", "fastclip-v1", "--gamma", "0.5", "--gamma-schedule", "constant", "--temperature-scheme",
               "global_learnable", "--lr-tau", "1e-4", "--rho", "3", "--fastclip-eps", "1e-8", "--data_size", "99"])
    assert (c.gamma, c.gamma_schedule, c.temperature_scheme, c.lr_tau, c.rho, c.fastclip_eps, c.data_size) == (
        0.5, "constant", "global_learnable", 1e-4, 3.0, 1e-8, 99)
    loss = build_loss(c, 5)
    assert loss.u1.numel() == 99  # --data_size overrides the manifest size
    assert parse(["--loss", "fastclip-v3", "--no-multiply_tau"]).multiply_tau is False
    # FastCLIP's own flags select the variant
    assert parse(["--fastclip", "--temperature_scheme", "global_learnable", "--multiply_tau"]).loss == "fastclip-v3"
    assert parse(["--fastclip", "--temperature_scheme", "global_learnable"]).loss == "fastclip-v0"
    assert parse(["--fastclip", "--temperature_scheme", "global_constant"]).loss == "fastclip-v1"
    assert parse(["--fastclip", "--temperature_scheme", "individual_learnable"]).loss == "fastclip-v2"
    assert parse([]).loss == "openclip"


def test_validation_errors_name_the_flag():
    with pytest.raises(ValueError, match="--loss.*fastclip-v3"):
        LossConfig.from_name("fastclip-v9")
    with pytest.raises(ValueError, match="--gamma "):
        LossConfig.from_name("sogclr", gamma=0.0)
    with pytest.raises(ValueError, match="--temperature_scheme.*global_constant"):
        LossConfig.from_name("sogclr", temperature_scheme="individual")
    with pytest.raises(ValueError, match="--gamma_schedule.*cosine"):
        LossConfig.from_name("sogclr", gamma_schedule="linear")
    with pytest.raises(ValueError, match="--lr_tau_scheduler.*step_thresh"):
        LossConfig.from_name("fastclip-v3", lr_tau_scheduler="linear")
    with pytest.raises(ValueError, match="--fastclip_rules.*'official', 'exact'"):
        LossConfig.from_name("fastclip-v3", fastclip_rules="paper")
    with pytest.raises(ValueError, match="--temperature"):
        LossConfig.from_name("fastclip-v1", temperature=-1.0)
    with pytest.raises(ValueError, match="--temperature_scheme"):
        LossConfig.from_name("openclip", temperature_scheme="individual_learnable")
    with pytest.raises(ValueError, match="--data_size"):
        build_loss(LossConfig.from_name("fastclip-v1"), None)
    cfg = LossConfig.from_name("sogclr")
    cfg.loss = "nope"
    with pytest.raises(ValueError, match="valid names: fastclip-v0, fastclip-v1"):
        build_loss(cfg, 10)
    with pytest.raises(SystemExit):  # argparse rejects unknown choices
        parse(["--loss", "clip"])


# ---------------------------------------------------------------------------------------------- row-blocked GCL
@pytest.mark.parametrize("variant", GCL_VARIANTS)
def test_row_blocked_gcl_equals_one_matrix(variant):
    """The large-batch path (statistics in no-grad row blocks, surrogate recomputed per block) gives the same
    gradients, estimators and per-pair temperatures as the one-matrix path, over steps with gamma = 1 and < 1."""
    import dist_loss_worker as W

    ref = W.run_steps(variant)
    for block in (W.SMALL_BLOCK, W.B * 3):  # 1-row blocks; 3-row blocks with a short last one (8 = 3 + 3 + 2)
        got = W.run_steps(variant, block_logits=block)
        for step, (gs, rs) in enumerate(zip(got["grads"], ref["grads"])):
            for name, g, r in zip(("W1", "W2", "logit_scale"), gs, rs):
                torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13, msg=f"block {block} step {step} {name}")
        for k in ref["state"]:
            torch.testing.assert_close(got["state"][k], ref["state"][k], rtol=1e-10, atol=1e-13, msg=k)


def _largest_tensor_during(fn) -> int:
    """The most elements of any tensor an aten op produced while running fn (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    Largest.most = max(Largest.most, t.numel())
            return out

    with Largest():
        fn()
    return Largest.most


@pytest.mark.parametrize("rules", ["exact", "official"])
@pytest.mark.parametrize("variant", ["fastclip-v3", "fastclip-v2"])
def test_row_blocked_gcl_never_builds_the_batch_matrix(variant, rules):
    B, d, block = 96, 3, 480  # whole b x B matrix: 9,216 entries; a block: 5 rows x 96 = 480
    keys = torch.arange(B)

    def step(block_logits):
        loss = make(variant, data_size=B, fastclip_rules=rules)
        loss.block_logits = block_logits
        e1, e2 = feats(B, d, seed=1)
        scale = torch.tensor(1 / 0.07, dtype=DT, requires_grad=True)
        out, _ = loss(e1, e2, scale, keys=keys)
        out.backward()
        return [e1.grad, e2.grad, scale.grad]

    assert _largest_tensor_during(lambda: step(10 ** 9)) >= B * B
    # nothing larger than one block, or than the B x 6 per-pair statistics (g, h and the official bounds, both sides)
    assert _largest_tensor_during(lambda: step(block)) <= max(block, 6 * B)
    for g, r in zip(step(block), step(10 ** 9)):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------------------- state placement
def test_state_placement_rules():
    from fast_clip.losses import state_placement

    cpu, cuda, gib = torch.device("cpu"), torch.device("cuda", 0), 2 ** 30
    assert state_placement(100 * gib, cpu, "auto") == (cpu, False)  # a CPU run: host memory either way
    assert state_placement(100 * gib, cpu, "host") == (cpu, False)  # nothing to pin for
    assert state_placement(100 * gib, cuda, "accelerator", accelerator_bytes=80 * gib) == (cuda, False)
    assert state_placement(1, cuda, "host", accelerator_bytes=80 * gib) == (cpu, True)
    # auto: the accelerator while the tables take at most 1/8 of its memory (400M pairs x 8 B = 3.2 GB fits an
    # 80 GB H100; x 36 B = 14.4 GB of per-pair temperatures does not)
    assert state_placement(400_000_000 * 8, cuda, "auto", accelerator_bytes=80 * gib) == (cuda, False)
    assert state_placement(400_000_000 * 36, cuda, "auto", accelerator_bytes=80 * gib) == (cpu, True)
    assert state_placement(10 * gib, cuda, "auto", accelerator_bytes=80 * gib) == (cuda, False)
    assert state_placement(10 * gib + 1, cuda, "auto", accelerator_bytes=80 * gib) == (cpu, True)
    with pytest.raises(ValueError, match="--loss_state_device must be one of"):
        state_placement(1, cuda, "gpu")


def test_state_device_flag_and_build():
    parser = argparse.ArgumentParser()
    add_loss_args(parser)
    cfg = LossConfig.from_args(parser.parse_args(["--loss", "fastclip-v2", "--loss-state-device", "host"]))
    assert cfg.state_device == "host"
    with pytest.raises(ValueError, match="--loss_state_device must be one of"):
        LossConfig.from_name("fastclip-v3", state_device="disk")
    loss = build_loss(cfg, 10, torch.device("cpu"))
    assert loss.state_device == torch.device("cpu") and not loss.state_pinned
    assert loss.state_bytes() == 10 * 44 and loss.tau_count.dtype == torch.int32
    assert all(b.device.type == "cpu" for b in loss.buffers())  # scalars (epoch, gamma, step) stay on the host


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["fastclip-v3", "fastclip-v2"])
def test_pinned_host_tables_match_device_tables(variant):
    dev = torch.device("cuda")
    outs = []
    for where in ("accelerator", "host"):
        loss = build_loss(LossConfig.from_name(variant, state_device=where, gamma_decay_epochs=2), 16, dev,
                          dtype=DT)
        assert loss.state_pinned == (where == "host") and loss.u1.is_pinned() == (where == "host")
        e1, e2 = (t.detach().to(dev).requires_grad_(True) for t in feats(6))
        scale = torch.tensor(1 / 0.07, dtype=DT, device=dev, requires_grad=True)
        keys = torch.tensor([1, 4, 2, 9, 15, 0], device=dev)
        grads = []
        for epoch in (0, 1, 2):
            loss.set_epoch(epoch)
            out, _ = loss(e1, e2, scale, keys=keys)
            grads += [g.cpu() for g in torch.autograd.grad(out, [e1, e2, scale])]
        outs.append((grads, {k: v.cpu() for k, v in loss.state_dict().items()}))
    (g_dev, s_dev), (g_host, s_host) = outs
    for a, b_ in zip(g_dev, g_host):
        torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-15)
    for k in s_dev:
        torch.testing.assert_close(s_dev[k], s_host[k], rtol=1e-12, atol=1e-15, msg=k)


@pytest.mark.parametrize("name", ["fastclip-v0", "fastclip-v1", "fastclip-v2", "fastclip-v3", "sogclr", "isogclr"])
def test_state_bytes_per_pair_is_what_the_per_pair_buffers_hold(name):
    """docs/LOSSES.md's memory table comes from state_bytes_per_pair(): it must be the per-pair buffers' real size."""
    n = 37
    loss = build_loss(LossConfig.from_name(name), n)
    per_pair = [b for b in loss.buffers() if b.dim() == 1 and b.numel() == n]
    assert sum(b.element_size() for b in per_pair) == loss.state_bytes_per_pair()
    assert all(b.numel() in (1, n) for b in loss.buffers())  # nothing else grows with the data
