"""The FastCLIP family under the official update rules (--fastclip_rules official, the default).

The expected values come from `Official`, the update rules of the official FastCLIP code (Optimization-AI/fast_clip:
FastCLIPLoss / FastCLIPLossIndividual in src/fast_clip/loss.py, the all-gather / set_params sequence of
src/training/train.py, adjust_gamma, and the lr schedulers of src/training/scheduler.py) written out here
independently of src/fast_clip/losses/, with K ranks simulated in one process: per-rank local() with the
running-max shift (bounds) of the individual temperatures, the all-gather and the tables' writes in rank order (a key
repeated in one global batch keeps the last write), then per-rank forward() and DDP's mean over ranks.
"""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fast_clip.losses import LossConfig, build_loss

DT = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def make(variant, data_size=16, **over):
    return build_loss(LossConfig.from_name(variant, **over), data_size, torch.device("cpu"), dtype=DT)


# ------------------------------------------------------------------------------------- the official rules
def official_gamma(epoch, gamma, schedule, decay_epochs):
    if epoch == 0:
        return 1.0
    if epoch >= decay_epochs:
        return gamma
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / decay_epochs)) * (1 - gamma) + gamma
    return gamma


def official_lr_tau(scheduler, step, lr_tau, warmup, total, tau, lr_min=0.0):
    """scheduler.py: const_lr(warm-up 0), cosine_lr(warm-up --warmup, to --lr_min), step_lr_thresh([0.03], [1/3])."""
    if scheduler == "const":
        return lr_tau
    if scheduler == "cosine":
        if step < warmup:
            return lr_tau * (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) * (lr_tau - lr_min) + lr_min
    return lr_tau / 3 if tau <= 0.03 else lr_tau


class Official:
    def __init__(self, cfg: LossConfig, n: int):
        self.cfg = cfg
        self.individual = cfg.temperature_scheme == "individual_learnable"
        z = lambda: torch.zeros(n, 1, dtype=DT)  # noqa: E731
        self.u_im, self.u_tt = z(), z()
        if self.individual:
            self.tau_im = torch.full((n, 1), cfg.temperature, dtype=DT)
            self.tau_tt = torch.full((n, 1), cfg.temperature, dtype=DT)
            self.bound_im, self.bound_tt = z(), z()
            self.m_im, self.m_tt, self.v_im, self.v_tt = z(), z(), z(), z()

    @staticmethod
    def pairwise(f1, f2, scale_im, scale_tt, offset, sim=None, bounds=None, update=True):
        i1, t1 = f1
        i2, t2 = f2
        b1, b2 = i1.shape[0], i2.shape[0]
        s_im, s_tt = (i1 @ t2.T, t1 @ i2.T) if sim is None else sim
        diag = (i1 * t1).sum(-1, keepdim=True)
        d_im, d_tt = (s_im - diag) * scale_im, (s_tt - diag) * scale_tt
        bi = bt = None
        if bounds is not None:
            bi, bt = bounds
            if update:
                bi = torch.maximum(bi, d_im.max(-1, keepdim=True).values.detach())
                bt = torch.maximum(bt, d_tt.max(-1, keepdim=True).values.detach())
            d_im, d_tt = d_im - bi, d_tt - bt
        mask = torch.ones(b1, b2, dtype=DT)
        if b1 <= b2:
            mask[torch.arange(b1), offset + torch.arange(b1)] = 0
            w = b2 - 1
        else:
            mask[offset + torch.arange(b2), torch.arange(b2)] = 0
            w = b2 * (b1 - 1) / b1
        e_im, e_tt = d_im.exp() * mask, d_tt.exp() * mask
        return dict(l_im=e_im.sum(-1, keepdim=True) / w, l_tt=e_tt.sum(-1, keepdim=True) / w, s_im=s_im,
                    s_tt=s_tt, e_im=e_im, e_tt=e_tt, d_im=d_im, d_tt=d_tt, bi=bi, bt=bt)

    def step(self, feats, keys, p, epoch):
        """One training step over K ranks (feats: per rank (image, text) features, live). Returns DDP's objective:
        the mean over ranks of the per-rank losses, whose gradient is the averaged one."""
        cfg = self.cfg
        K, b = len(feats), feats[0][0].shape[0]
        B = K * b
        eps = cfg.fastclip_eps
        gamma = official_gamma(epoch, cfg.gamma, cfg.gamma_schedule, cfg.gamma_decay_epochs)
        remote = (torch.cat([f[0] for f in feats]).detach(), torch.cat([f[1] for f in feats]).detach())
        s = p.exp() if cfg.temperature_scheme == "global_learnable" else torch.tensor(1 / cfg.temperature, dtype=DT)
        locs = []
        for r in range(K):
            idx = keys[r]
            u_im, u_tt = self.u_im[idx].clone(), self.u_tt[idx].clone()
            if self.individual:
                tau_im, tau_tt = self.tau_im[idx].clone(), self.tau_tt[idx].clone()
                old_b = (self.bound_im[idx].clone(), self.bound_tt[idx].clone())
                res = self.pairwise(feats[r], remote, 1 / tau_im, 1 / tau_tt, r * b, bounds=old_b)
                bi, bt = res["bi"], res["bt"]
                shift = (torch.exp(old_b[0] - bi), torch.exp(old_b[1] - bt))
            else:
                res = self.pairwise(feats[r], remote, s, s, r * b)
                shift = (1.0, 1.0)
            g_im, g_tt = res["l_im"].detach(), res["l_tt"].detach()
            bad_im = (u_im < 1e-35) | u_im.isinf() | u_im.isnan()
            bad_tt = (u_tt < 1e-35) | u_tt.isinf() | u_tt.isnan()
            u_im = (1 - gamma) * u_im * shift[0] + gamma * g_im
            u_tt = (1 - gamma) * u_tt * shift[1] + gamma * g_tt
            if gamma < 1:
                u_im[bad_im], u_tt[bad_tt] = g_im[bad_im], g_tt[bad_tt]
            gather = [u_im, u_tt]
            if self.individual:
                beta1, beta2 = (0.0, 0.0) if epoch == 0 else (cfg.tau_beta1, cfg.tau_beta2)
                new = []
                for e, d, bnd, u, tau, m, v in ((res["e_im"], res["d_im"], bi, u_im, tau_im, self.m_im[idx], self.v_im[idx]),
                                                (res["e_tt"], res["d_tt"], bt, u_tt, tau_tt, self.m_tt[idx], self.v_tt[idx])):
                    grad = (-(e * (d + bnd)).sum(-1, keepdim=True) / (u + eps) / (B - 1) + torch.log(u + eps) + bnd
                            + cfg.rho).clamp(-5.0, 5.0)
                    m = beta1 * m + (1 - beta1) * grad
                    v = beta2 * v + (1 - beta2) * grad ** 2
                    mh, vh = m / (1 - beta1 ** (epoch + 1)), v / (1 - beta2 ** (epoch + 1))
                    new.append(((tau - cfg.lr_tau * mh / (vh.sqrt() + cfg.tau_adam_eps)).clamp(0.01, 1.0), m, v))
                (t_im, m_im, v_im), (t_tt, m_tt, v_tt) = new
                gather += [t_im, t_tt, bi, bt, tau_im, tau_tt, m_im, m_tt, v_im, v_tt]
            locs.append((res, gather))
        # all_gather, then set_params: one write per position in rank order (the last write of a key stays)
        all_idx = torch.cat(keys)
        G = [torch.cat([loc[1][j] for loc in locs]).detach() for j in range(len(locs[0][1]))]
        tables = [self.u_im, self.u_tt]
        if self.individual:
            tables += [self.tau_im, self.tau_tt, self.bound_im, self.bound_tt, None, None,
                       self.m_im, self.m_tt, self.v_im, self.v_tt]
        for table, values in zip(tables, G):
            if table is not None:
                for pos in range(all_idx.numel()):
                    table[all_idx[pos]] = values[pos]
        total = 0.0
        for r, (res, gather) in enumerate(locs):
            sim = (res["s_tt"].T, res["s_im"].T)
            if self.individual:
                res2 = self.pairwise(remote, feats[r], 1 / G[6], 1 / G[7], r * b, sim=sim, bounds=(G[4], G[5]),
                                     update=False)
            else:
                res2 = self.pairwise(remote, feats[r], s, s, r * b, sim=sim)
            u_im, u_tt = gather[0], gather[1]
            loss = ((res["l_im"] / (u_im + eps) + res["l_tt"] / (u_tt + eps)).mean()
                    + (res2["l_im"] / (G[0] + eps) + res2["l_tt"] / (G[1] + eps)).mean()) / 2
            if cfg.multiply_tau:
                loss = loss / s.detach() + cfg.rho / s + (torch.log(u_im) + torch.log(u_tt)).mean() / 2 / s
            total = total + loss / K
        return total

    def u_true(self):
        """The estimators in plain units (the individual tables are stored shifted by exp(-bound))."""
        if self.individual:
            return (self.u_im * self.bound_im.exp())[:, 0], (self.u_tt * self.bound_tt.exp())[:, 0]
        return self.u_im[:, 0], self.u_tt[:, 0]


# ------------------------------------------------------------------------------------- the smallest cases
def _two_pairs():
    e1 = torch.eye(2, dtype=DT, requires_grad=True)
    e2 = torch.tensor([[0.8, 0.6], [0.6, 0.8]], dtype=DT, requires_grad=True)
    return e1, e2


@pytest.mark.parametrize("rules, expected", [("official", -0.655), ("exact", -0.455)])
def test_v3_logit_scale_gradient_smallest_case(rules, expected):
    """B = 2, tau = 0.07, rho = 6.5, gamma = 1: d loss / d logit-scale parameter (official -0.655, exact -0.455)."""
    loss = make("fastclip-v3", data_size=2, rho=6.5, gamma=1.0, gamma_schedule="constant", fastclip_rules=rules)
    loss.set_epoch(1)
    e1, e2 = _two_pairs()
    p = torch.tensor(math.log(1 / 0.07), dtype=DT, requires_grad=True)
    out, _ = loss(e1, e2, p.exp(), keys=torch.tensor([0, 1]))
    out.backward()
    assert p.grad.item() == pytest.approx(expected, abs=5e-4)
    if rules == "official":  # and the independent official rules agree to the last digit
        ref = Official(loss.cfg, 2)
        e1r, e2r = _two_pairs()
        pr = torch.tensor(math.log(1 / 0.07), dtype=DT, requires_grad=True)
        ref.step([(e1r, e2r)], [torch.tensor([0, 1])], pr, epoch=1).backward()
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rules, expected", [("official", [[-35 / 6, 0.0], [5.0, 5 / 6]]),
                                              ("exact", [[-0.1, 0.1], [0.1, -0.1]])])
def test_v2_feature_gradient_smallest_case(rules, expected):
    """Same pairs, per-pair tau = [0.03, 0.06]: the official surrogate weights anchor i by 1/(u_i+eps) only."""
    loss = make("fastclip-v2", data_size=2, gamma=1.0, gamma_schedule="constant", fastclip_rules=rules)
    loss.set_epoch(1)
    for t in (loss.tau1, loss.tau2):
        t[:] = torch.tensor([0.03, 0.06], dtype=DT)
    e1, e2 = _two_pairs()
    out, _ = loss(e1, e2, None, keys=torch.tensor([0, 1]))
    out.backward()
    torch.testing.assert_close(e1.grad, torch.tensor(expected, dtype=DT), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- multi-step, official rules
STEPS = [  # (epoch, keys of the global batch, logit-scale parameter); keys overlap across steps, one repeats in a batch
    (0, [3, 7, 1, 12, 5, 9], math.log(1 / 0.1)),
    (0, [2, 7, 11, 3, 14, 0], math.log(1 / 0.11)),
    (1, [7, 1, 9, 3, 5, 12], math.log(1 / 0.09)),
    (1, [4, 7, 3, 3, 8, 1], math.log(1 / 0.12)),
    (2, [1, 3, 7, 9, 12, 5], math.log(1 / 0.1)),
]


def _step_feats(step, B=6, d=4):
    g = torch.Generator().manual_seed(100 + step)
    e1 = F.normalize(torch.randn(B, d, generator=g, dtype=DT), dim=-1)
    e2 = F.normalize(e1 + 0.8 * torch.randn(B, d, generator=g, dtype=DT), dim=-1)
    return e1, e2


def _over(variant):
    over = dict(gamma=0.4, gamma_schedule="cosine", gamma_decay_epochs=3, temperature=0.1, rho=0.7)
    if variant in ("isogclr", "fastclip-v2"):
        over.update(lr_tau=0.05)
    return over


@pytest.mark.parametrize("K", [1, 2], ids=["1-rank", "2-ranks"])
@pytest.mark.parametrize("variant", ["sogclr", "fastclip-v0", "fastclip-v1", "fastclip-v2", "fastclip-v3", "isogclr"])
def test_official_rules_multi_step(variant, K):
    """Five steps over three epochs (gamma = 1, then cosine), overlapping keys, a key twice in one global batch: our
    single process on the global batch gives the official rules' DDP-averaged gradients (features and logit scale)
    and tables (estimators; per-pair temperatures and their Adam moments) for K = 1 and K = 2 simulated ranks."""
    loss = make(variant, **_over(variant))
    ref = Official(loss.cfg, 16)
    b = 6 // K
    for step, (epoch, keys, p0) in enumerate(STEPS):
        loss.set_epoch(epoch)
        keys = torch.tensor(keys)
        e1, e2 = (t.clone().requires_grad_(True) for t in _step_feats(step))
        p = torch.tensor(p0, dtype=DT, requires_grad=True)
        out, _ = loss(e1, e2, p.exp(), keys=keys)
        out.backward()

        r1, r2 = (t.clone().requires_grad_(True) for t in _step_feats(step))
        pr = torch.tensor(p0, dtype=DT, requires_grad=True)
        feats = [(r1[r * b:(r + 1) * b], r2[r * b:(r + 1) * b]) for r in range(K)]
        ref.step(feats, [keys[r * b:(r + 1) * b] for r in range(K)], pr, epoch).backward()

        msg = f"{variant} K={K} step {step}"
        torch.testing.assert_close(e1.grad, r1.grad, rtol=1e-10, atol=1e-12, msg=msg + " d/d image features")
        torch.testing.assert_close(e2.grad, r2.grad, rtol=1e-10, atol=1e-12, msg=msg + " d/d text features")
        if loss.learns_model_temperature:
            torch.testing.assert_close(p.grad, pr.grad, rtol=1e-10, atol=1e-12, msg=msg + " d/d logit scale")
        # the estimators as stored (per-pair temperatures: in units of exp(-bound), like the official tables)
        torch.testing.assert_close(loss.u1, ref.u_im[:, 0], rtol=1e-10, atol=1e-13, msg=msg + " u1")
        torch.testing.assert_close(loss.u2, ref.u_tt[:, 0], rtol=1e-10, atol=1e-13, msg=msg + " u2")
        if ref.individual:
            for ours, theirs in (("tau1", ref.tau_im), ("tau2", ref.tau_tt), ("tau1_m", ref.m_im),
                                 ("tau2_m", ref.m_tt), ("tau1_v", ref.v_im), ("tau2_v", ref.v_tt),
                                 ("bound1", ref.bound_im), ("bound2", ref.bound_tt)):
                torch.testing.assert_close(getattr(loss, ours), theirs[:, 0], rtol=1e-10, atol=1e-13,
                                           msg=f"{msg} {ours}")
    if ref.individual:  # the temperatures moved, and the running-max shift was used
        assert (loss.tau1[[1, 3, 7]] != 0.1).all() and (loss.bound1 > 1).any()


def test_official_tau_adam_uses_the_model_optimizer_betas_and_eps():
    from training.params import parse_args
    a = parse_args(["--train-data", "x", "--loss", "fastclip-v2", "--beta2", "0.95", "--eps", "1e-7"])
    assert (a.loss.tau_beta1, a.loss.tau_beta2, a.loss.tau_adam_eps) == (0.9, 0.95, 1e-7)
    a = parse_args(["--train-data", "x", "--loss", "fastclip-v2", "--fastclip_rules", "exact"])
    assert (a.loss.tau_beta2, a.loss.tau_adam_eps) == (0.999, 1e-8)
    a = parse_args(["--train-data", "x", "--loss", "fastclip-v2", "--tau_beta2", "0.9"])
    assert a.loss.tau_beta2 == 0.9  # explicit wins


# ------------------------------------------------------------------------------------- schedules per step
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_gamma_per_epoch_matches_official(schedule):
    loss = make("fastclip-v1", gamma=0.2, gamma_schedule=schedule, gamma_decay_epochs=5)
    for epoch in range(9):
        loss.set_epoch(epoch)
        assert loss.current_gamma() == pytest.approx(official_gamma(epoch, 0.2, schedule, 5), abs=1e-12)


@pytest.mark.parametrize("scheduler", ["const", "cosine", "step_thresh"])
def test_lr_tau_per_step_matches_official(scheduler):
    loss = make("fastclip-v3", lr_tau=2e-4, lr_tau_scheduler=scheduler)
    taus = [0.07, 0.05, 0.03, 0.02, 0.025, 0.031, 0.05, 0.029, 0.04, 0.06, 0.02, 0.07]
    warmup, total = 4, len(taus)
    for step, tau in enumerate(taus):
        got = loss.temperature_lr(1e-3, tau, step=step, base_lr=1e-3, warmup=warmup, total_steps=total, lr_min=1e-5)
        assert got == pytest.approx(official_lr_tau(scheduler, step, 2e-4, warmup, total, tau, lr_min=1e-5),
                                    rel=1e-12), (scheduler, step)
    # no --lr_tau: the official lr_tau is the base --lr (not the main schedule's current value)
    v0 = make("fastclip-v0", lr_tau_scheduler="const")
    assert v0.temperature_lr(3e-4, 0.05, step=7, base_lr=1e-3) == pytest.approx(1e-3)


def test_step_thresh_exact_rules_latch_official_rules_do_not():
    official, exact = (make("fastclip-v3", lr_tau=3e-4, fastclip_rules=r) for r in ("official", "exact"))
    seq = [(0.05, 3e-4), (0.03, 1e-4), (0.05, 3e-4)]  # goes back up when tau rises again
    for tau, lr in seq:
        assert official.temperature_lr(1e-3, tau) == pytest.approx(lr)
    assert [exact.temperature_lr(1e-3, t) for t, _ in seq] == pytest.approx([3e-4, 1e-4, 1e-4])


def test_estimator_reset_rule_official():
    """official: reset (to the fresh g) below 1e-35 and only while gamma < 1; exact: at or below 1e-30, always."""
    e1, e2 = (t.detach() for t in _step_feats(0))
    keys = torch.arange(6)
    for rules, tiny, gamma, reset in (("official", 1e-32, 0.5, False), ("official", 1e-36, 0.5, True),
                                      ("exact", 1e-32, 0.5, True)):
        loss = make("fastclip-v1", fastclip_rules=rules, gamma=gamma, gamma_schedule="constant")
        loss.set_epoch(1)
        loss.u1[keys] = 1.0
        loss.u1[0] = tiny
        g0 = make("fastclip-v1", fastclip_rules=rules)
        g0.set_epoch(0)  # gamma = 1: u = g
        g0(e1, e2, None, keys=keys)
        loss(e1, e2, None, keys=keys)
        expected = g0.u1[0] if reset else (1 - gamma) * tiny + gamma * g0.u1[0]
        torch.testing.assert_close(loss.u1[0], expected, rtol=1e-12, atol=0, msg=f"{rules} {tiny}")


# ------------------------------------------------------------------------------------- flag parity
@pytest.mark.slow
def test_official_readme_launch_command_runs(tmp_path):
    """The official README's FastCLIP-v3 launch command, with only paths and sizes changed, trains here."""
    from shard_fixtures import write_shards
    info = write_shards(str(tmp_path / "shards"), num_ids=8, shard_size=16)
    n = 32  # pairs in the fixture's train split
    cmd = [sys.executable, str(ROOT / "src" / "training" / "main.py"),
           "--save-frequency", "1", "--train-data", info["dir"], "--train-num-samples", str(n), "--data_size", str(n),
           "--warmup", "2", "--batch-size", "8", "--epochs", "2", "--workers", "1", "--model", "PersonTiny",
           "--name", "readme_v3", "--seed", "2024", "--wd", "0.1", "--local-loss",
           "--fastclip", "--multiply_tau", "--temperature_scheme", "global_learnable",
           "--lr", "1e-3", "--lr_tau", "2e-4", "--lr_tau_scheduler", "step_thresh", "--rho", "6.5",
           "--gamma", "0.2", "--gamma_schedule", "cosine", "--gamma_decay_epochs", "1",
           "--report-to", "tensorboard", "--logs-dir", str(tmp_path / "logs")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    import json
    run = tmp_path / "logs" / "readme_v3"
    cfg = json.loads((run / "params.json").read_text())["loss_config"]
    assert (cfg["loss"], cfg["multiply_tau"], cfg["temperature_scheme"], cfg["lr_tau"], cfg["lr_tau_scheduler"],
            cfg["rho"], cfg["gamma"], cfg["gamma_schedule"], cfg["gamma_decay_epochs"], cfg["data_size"],
            cfg["fastclip_rules"]) == ("fastclip-v3", True, "global_learnable", 2e-4, "step_thresh", 6.5, 0.2,
                                       "cosine", 1, n, "official")
    assert (run / "checkpoints" / "epoch_1.pt").is_file() and (run / "checkpoints" / "epoch_2.pt").is_file()
    assert list(run.rglob("events.out.tfevents*")), "no tensorboard events"
