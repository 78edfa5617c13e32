"""The global contrastive losses (SogCLR / iSogCLR / FastCLIP-v0..v3) optimised with FCCO; docs/LOSSES.md derives them."""
from __future__ import annotations

from typing import Optional

import torch

from common import collectives as dist_utils
from fast_clip.losses.base import ContrastiveLoss
from fast_clip.losses.config import (TAU_GRAD_CLAMP, TAU_MAX, TAU_MIN, U_RESET_BELOW, U_RESET_BELOW_OFFICIAL,
                                     LossConfig, state_placement)
from fast_clip.losses.kernels import (BLOCK_LOGITS, _exp_row_stats, _exp_rows, _scale_grad, _weighted_exp_sum,
                                      same_person_counts)
from fast_clip.precision import compute_dtype as _compute_dtype
from fast_clip.precision import no_autocast as _no_autocast

# ------------------------------------------------------------------------------------------------ pure update rules
def estimator_update(old: torch.Tensor, g: torch.Tensor, gamma: float, official: bool,
                     rescale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """u_new = (1-gamma) u_old + gamma g, entry by entry, with the reset rule of each rule set: official, to g where
    u_old is non-finite or < 1e-35 and only while gamma < 1 (gamma = 1 is g itself), ``rescale`` moving u_old from
    its old bound's units to the new one's first; exact, to g where u_old is non-finite or <= 1e-30."""
    if official:
        if gamma >= 1.0:
            return g.clone()
        bad = ~torch.isfinite(old) | (old < U_RESET_BELOW_OFFICIAL)
        kept = old if rescale is None else old * rescale
        return torch.where(bad, g, (1.0 - gamma) * kept + gamma * g)
    bad = ~torch.isfinite(old) | (old <= U_RESET_BELOW)
    return torch.where(bad, g, (1.0 - gamma) * old + gamma * g)


def per_pair_tau_gradient(u: torch.Tensor, h: torch.Tensor, rho: float, eps: float,
                          shift: Optional[torch.Tensor] = None, clamp: Optional[float] = None) -> torch.Tensor:
    """d/dtau_i of RGCL's tau_i (log g_i + rho), FCCO estimate, without the 1/2n factor (Adam ignores it):
    log(u_i + eps) + rho - h_i / (u_i + eps), with h_i = 1/(B-1) sum_j exp(X_ij) X_ij. ``shift``: u and h are in units
    of exp(-shift) (the official bounds), whose log is added back; ``clamp``: the official +-5."""
    grad = torch.log(u + eps) + rho - h / (u + eps)
    if shift is not None:
        grad = grad + shift
    return grad if clamp is None else grad.clamp(-clamp, clamp)


def tau_adam_step(tau, m, v, grad, lr: float, betas: tuple[float, float], eps: float, step):
    """One Adam step on temperatures (bias correction with ``step``, a number or one per entry), clamped to
    [TAU_MIN, TAU_MAX]; returns (tau, m, v)."""
    beta1, beta2 = betas
    m = beta1 * m + (1.0 - beta1) * grad
    v = beta2 * v + (1.0 - beta2) * grad * grad
    m_hat = m / (1.0 - beta1 ** step)
    v_hat = v / (1.0 - beta2 ** step)
    return (tau - lr * m_hat / (v_hat.sqrt() + eps)).clamp(TAU_MIN, TAU_MAX), m, v


class GCLLoss(ContrastiveLoss):
    """Global contrastive losses optimised with FCCO (SogCLR / iSogCLR / FastCLIP-v0..v3).

    State (registered buffers, one entry per training pair, indexed by the dataset key):
      u1, u2             moving-average estimators of g1 (image anchors) and g2 (text anchors)
      tau1, tau2         individual temperatures (individual_learnable only)
      tau1_m, tau1_v, tau2_m, tau2_v, tau_count   their Adam moments and per-pair step counters
      bound1, bound2     official rules: the running maximum of each pair's exponents (the official "bounds");
                         u1, u2 are then stored in units of exp(-bound) so that no exponential overflows
    plus the epoch / gamma / step scalars. Every rank applies the updates of the whole global batch, so all ranks hold
    identical tables.

    ``block_logits``: above this many b x B entries the exp matrices are built in row blocks (memory O(block x B)
    instead of O(b x B), for very large per-rank batches such as DGA at 16k on one GPU), at the cost of computing
    them three times (statistics, surrogate forward, its recompute in the backward) instead of once.
    """

    block_logits = BLOCK_LOGITS

    def __init__(self, cfg: LossConfig, data_size: int, device=None, dtype: torch.dtype = torch.float32):
        super().__init__(cfg)
        n = int(cfg.data_size if cfg.data_size is not None else data_size)
        if n <= 0:
            raise ValueError(f"--data_size must be a positive integer, got {n}")
        self.data_size = n
        self.scheme = cfg.temperature_scheme
        self.individual = self.scheme == "individual_learnable"
        self.learns_model_temperature = self.scheme == "global_learnable"
        self.state_device, self.state_pinned = state_placement(n * self._bytes_per_pair(self.individual, dtype),
                                                               device, cfg.state_device)

        def table(fill, dt=dtype):
            t = torch.full((n,), fill, dtype=dt, device=self.state_device)
            # Pinned: the B-entry gathers/scatters of each step copy to and from the accelerator without staging.
            return t.pin_memory() if self.state_pinned else t

        self.register_buffer("u1", table(0.0))
        self.register_buffer("u2", table(0.0))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # host scalar: no device sync to count
        if self.individual:
            for name in ("tau1", "tau2"):
                self.register_buffer(name, table(float(cfg.temperature)))
            for name in ("tau1_m", "tau1_v", "tau2_m", "tau2_v", "bound1", "bound2"):
                self.register_buffer(name, table(0.0))
            self.register_buffer("tau_count", table(0, torch.int32))
        # the running-max shift of the official per-pair temperature code (exact rules: exp without a shift)
        self.shifted = self.individual and self.official

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the bound tables existed: all-zero bounds, i.e. unshifted estimators, which is
        # what those tables held.
        if self.individual:
            for name in ("bound1", "bound2"):
                if prefix + "tau1" in state_dict and prefix + name not in state_dict:
                    state_dict[prefix + name] = torch.zeros_like(getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _bytes_per_pair(individual: bool, dtype: torch.dtype) -> int:
        """u1, u2; plus tau1, tau2, their four Adam moments and two bounds in ``dtype`` and an int32 counter
        (individual)."""
        item = torch.empty((), dtype=dtype).element_size()
        return 10 * item + 4 if individual else 2 * item

    def state_bytes_per_pair(self) -> int:
        return self._bytes_per_pair(self.individual, self.u1.dtype)

    def state_bytes(self) -> int:
        return self.data_size * self.state_bytes_per_pair()

    def state_summary(self) -> str:
        """One line for the run log: size and place of the per-pair tables."""
        n = self.state_bytes()
        size = f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.2f} MiB"
        where = "pinned host memory" if self.state_pinned else str(self.state_device)
        return (f"loss state: {self.data_size} pairs x {self.state_bytes_per_pair()} B = {size} on {where} "
                f"(every rank holds the whole table)")

    # -------------------------------------------------------------- helpers
    def _occurrence(self, keys: torch.Tensor) -> torch.Tensor:
        """Positions of the occurrence of each distinct key whose update is written when a global batch repeats a key:
        the last one under the official rules (its scatter keeps the last write), the first one under exact rules."""
        uniq, inv = torch.unique(keys, return_inverse=True)
        pos = torch.arange(keys.numel(), device=keys.device)
        if self.official:
            last = torch.full((uniq.numel(),), -1, dtype=pos.dtype, device=keys.device)
            return last.scatter_reduce(0, inv, pos, reduce="amax")
        first = torch.full((uniq.numel(),), keys.numel(), dtype=pos.dtype, device=keys.device)
        return first.scatter_reduce(0, inv, pos, reduce="amin")

    def _update_estimator(self, table: torch.Tensor, keys: torch.Tensor, pick: torch.Tensor, g: torch.Tensor,
                          gamma: float, rescale: Optional[torch.Tensor] = None) -> torch.Tensor:
        """u[key] <- (1-gamma) u[key] + gamma g for the B entries of the global batch; returns the u each entry uses.

        official: reset to g where the old u is non-finite or < 1e-35, and only while gamma < 1 (gamma = 1 is g
        itself); every entry uses its own new u, and the table keeps the last occurrence's.
        exact: reset where u is non-finite or <= 1e-30, whatever gamma; the table keeps the first occurrence's, which
        every occurrence of the key then uses. ``rescale`` (shifted estimators) multiplies the old u first: it moves
        it from the old bound's units to the new one's."""
        new = estimator_update(table[keys], g.to(table.dtype), gamma, self.official,
                               None if rescale is None else rescale.to(table.dtype))
        table[keys[pick]] = new[pick]
        return new if self.official else table[keys]

    def _adam_tau(self, keys, pick, grad, which: str) -> None:
        """One Adam step on the per-pair temperatures of the picked occurrences (see _occurrence).

        official: betas (0, 0) in epoch 0, the configured ones from epoch 1 on, bias correction with (epoch + 1).
        exact: the configured betas throughout, bias correction with the pair's own visit count."""
        cfg = self.cfg
        tau, m, v = getattr(self, which), getattr(self, which + "_m"), getattr(self, which + "_v")
        k = keys[pick]
        if self.official:
            epoch = int(self.epoch)
            betas, step = ((0.0, 0.0) if epoch == 0 else (cfg.tau_beta1, cfg.tau_beta2)), epoch + 1
        else:
            betas, step = (cfg.tau_beta1, cfg.tau_beta2), (self.tau_count[k] + 1).to(tau.dtype)
        tau[k], m[k], v[k] = tau_adam_step(tau[k], m[k], v[k], grad[pick].to(tau.dtype), float(cfg.lr_tau), betas,
                                           cfg.tau_adam_eps, step)

    # -------------------------------------------------------------- forward
    def forward(self, image_features, text_features, logit_scale=None, keys=None, mix_alpha=None, pids=None):
        if mix_alpha is not None:
            raise ValueError(f"--mixup-beta {self.cfg.mixup_refusal()}")
        with _no_autocast(image_features.device):
            return self._forward(image_features, text_features, logit_scale, keys, pids)

    def _forward(self, image_features, text_features, logit_scale, keys, pids=None):
        if keys is None:
            raise ValueError(f"loss {self.cfg.loss!r} needs the dataset keys of the batch (keys=...)")
        cfg = self.cfg
        dt = _compute_dtype(image_features, text_features, self.u1)
        dev = image_features.device
        e1 = image_features.to(dt)
        e2 = text_features.to(dt)
        b = e1.shape[0]
        K, r = dist_utils.world_size(), dist_utils.rank()
        B = K * b
        if B < 2:
            raise ValueError("GCL needs a global batch of at least 2 pairs")
        off = r * b
        eps = float(cfg.fastclip_eps)
        gamma = float(self.gamma)

        keys = keys.to(device=dev, dtype=torch.long).reshape(-1)
        if keys.numel() != b:
            raise ValueError(f"keys has {keys.numel()} entries for a batch of {b}")
        keys_all = dist_utils.all_gather_no_grad(keys)
        # One host sync for the check: an out-of-range index would be a fatal device-side assert on CUDA.
        if bool(((keys_all < 0) | (keys_all >= self.data_size)).any()):
            raise ValueError(f"keys must lie in [0, {self.data_size}) (--data_size); got range "
                             f"[{int(keys_all.min())}, {int(keys_all.max())}]")
        # Identity-aware negatives (--id-positives): N_i = the pairs of the global batch showing another person than
        # pair i; g_i is the mean over N_i, so each row has its own count n_i (B - 1 without ids, or for pid -1),
        # at least 1 so that a global batch of one person gives g = 0 rather than 0/0.
        ids_loc = None
        if cfg.id_positives:
            pids, pids_all = self._gather_pids(pids, b, dev)
            denom_all = (B - same_person_counts(pids_all)).clamp_min(1).to(dt)
            ids_loc = (pids, pids_all)
        else:
            denom_all = torch.full((B,), float(B - 1), dtype=dt, device=dev)
        denom_loc = denom_all[off:off + b]
        E1 = dist_utils.all_gather_no_grad(e1.detach())  # (B, d) no grad
        E2 = dist_utils.all_gather_no_grad(e2.detach())
        # The gathered matrices with THIS rank's block replaced by the live local features.
        E1_live = torch.cat([E1[:off], e1, E1[off + b:]], 0)
        E2_live = torch.cat([E2[:off], e2, E2[off + b:]], 0)

        # ---- temperatures
        if self.individual:
            skeys = keys_all.to(self.tau1.device)
            t1_all = self.tau1[skeys].to(dev, dt)  # copies: the values before this step's update
            t2_all = self.tau2[skeys].to(dev, dt)
            t1_loc, t2_loc = t1_all[off:off + b, None], t2_all[off:off + b, None]
            t1_all_c, t2_all_c = t1_all[:, None], t2_all[:, None]
            tau_live = None
            if self.shifted:  # the old bounds of this rank's pairs (every rank holds the whole table)
                b1_old = self.bound1[skeys].to(dev, dt)
                b2_old = self.bound2[skeys].to(dev, dt)
                floor1, floor2 = b1_old[off:off + b, None], b2_old[off:off + b, None]
        else:
            tau_live = self._global_tau(logit_scale, dt, dev)
            t1_loc = t2_loc = tau_live  # live in the local-anchor terms
            if self.official and tau_live.requires_grad:
                # The official surrogate holds the live temperature in both of its halves (local and remote anchors,
                # each of which estimates the whole sum), so its tau-gradient through g is twice the exact one;
                # ours holds it in the local half only: double that half's tau-gradient (values unchanged).
                t1_loc = t2_loc = _scale_grad(tau_live, 2.0)
            t1_all_c = t2_all_c = tau_live.detach()

        # ---- local anchors against all (gathered) candidates: g1_i, g2_i for i in this rank's block
        pos = (e1 * e2).sum(1, keepdim=True)  # <e1_i, e2_i>, live in both features
        # Above block_logits (b x B) the exp matrices are never held whole: g and h come from a no-grad pass in row
        # blocks, and the surrogate's local part is recomputed block by block under checkpointing (below).
        blocked = b * B > self.block_logits and torch.is_grad_enabled()
        s1 = s2 = None  # new bounds of the local rows (shifted estimators only)
        if blocked:
            with torch.no_grad():
                g1, h1, s1 = _exp_row_stats(e1, E2_live, pos, t1_loc, off, self.block_logits, self.individual,
                                            floor1 if self.shifted else None, ids_loc)
                g2, h2, s2 = _exp_row_stats(e2, E1_live, pos, t2_loc, off, self.block_logits, self.individual,
                                            floor2 if self.shifted else None, ids_loc)
        else:
            # D = <e_i, e'_j> - <e_i, e'_i>; X = D / tau; P = exp(X) with the pair's own column zeroed.
            if self.shifted:
                P1, X1, s1 = _exp_rows(e1, E2_live, pos, t1_loc, off, shift_floor=floor1, ids=ids_loc)  # (b, B)
                P2, X2, s2 = _exp_rows(e2, E1_live, pos, t2_loc, off, shift_floor=floor2, ids=ids_loc)
            else:
                P1, X1 = _exp_rows(e1, E2_live, pos, t1_loc, off, ids=ids_loc)  # (b, B), live
                P2, X2 = _exp_rows(e2, E1_live, pos, t2_loc, off, ids=ids_loc)
            g1, g2 = P1.sum(1), P2.sum(1)
            # tau * d g/d tau = -mean_{j!=i} exp(X_ij) X_ij  (only the per-pair temperatures need it)
            h1 = (P1 * X1).detach().sum(1) if self.individual else None
            h2 = (P2 * X2).detach().sum(1) if self.individual else None
        g1, g2 = g1 / denom_loc, g2 / denom_loc

        # ---- estimator update with the whole global batch (identical on every rank)
        with torch.no_grad():
            cols = [g1.detach(), g2.detach()]
            if self.individual:
                cols += [h1 / denom_loc, h2 / denom_loc]
            if self.shifted:
                cols += [s1[:, 0], s2[:, 0]]
            stats_all = dist_utils.all_gather_no_grad(torch.stack(cols, 1))
            skeys = keys_all.to(self.u1.device)
            pick = self._occurrence(skeys)
            r1 = r2 = None
            if self.shifted:  # u moves from the old bound's units to the new one's; the bound tables take the new
                s1_all, s2_all = stats_all[:, 4], stats_all[:, 5]
                r1, r2 = torch.exp(b1_old - s1_all).to(self.u1.device), torch.exp(b2_old - s2_all).to(self.u1.device)
                self.bound1[skeys[pick]] = s1_all.to(self.bound1.device, self.bound1.dtype)[pick]
                self.bound2[skeys[pick]] = s2_all.to(self.bound2.device, self.bound2.dtype)[pick]
            u1_all = self._update_estimator(self.u1, skeys, pick, stats_all[:, 0].to(self.u1.device), gamma, r1)
            u2_all = self._update_estimator(self.u2, skeys, pick, stats_all[:, 1].to(self.u2.device), gamma, r2)
            u1_all = u1_all.to(dev, dt)
            u2_all = u2_all.to(dev, dt)
            self.step += 1

        # ---- surrogate: coefficient c_i multiplies g_i / (u_i + eps)
        # c = tau_i (individual, RGCL; official rules: 1), tau (detached; multiply_tau, RGCL-g), 1 (GCL); all / (2B).
        if self.individual and not self.official:
            c1_all, c2_all = t1_all, t2_all
        elif cfg.multiply_tau:
            c1_all = c2_all = tau_live.detach().expand(B)
        else:
            c1_all = c2_all = torch.ones(B, dtype=dt, device=dev)
        w1_all = c1_all / (u1_all + eps) / (2 * B)  # detached weights
        w2_all = c2_all / (u2_all + eps) / (2 * B)
        w1_loc, w2_loc = w1_all[off:off + b], w2_all[off:off + b]
        if blocked:
            local_part = (_weighted_exp_sum(e1, E2_live, pos, t1_loc, w1_loc / denom_loc, off, self.block_logits, s1,
                                            ids_loc)
                          + _weighted_exp_sum(e2, E1_live, pos, t2_loc, w2_loc / denom_loc, off, self.block_logits, s2,
                                              ids_loc))
        else:
            local_part = (w1_loc * g1).sum() + (w2_loc * g2).sum()

        # Remote anchors (all ranks' anchors except this rank's, detached, with their u and tau) against this rank's
        # live candidates: the gradient other ranks' anchors send into our features, computed here instead. One
        # process (K = 1) has no remote anchors.
        remote_part = e1.new_zeros(())
        if K > 1:
            rem = torch.cat([torch.arange(off, device=dev), torch.arange(off + b, B, device=dev)])
            posd = (E1[rem] * E2[rem]).sum(1, keepdim=True)  # detached positives of the remote anchors
            t1r = t1_all_c[rem] if self.individual else t1_all_c
            t2r = t2_all_c[rem] if self.individual else t2_all_c
            # shifted estimators: the remote anchors' new bounds (the official forward's remote_bounds)
            sr1 = stats_all[rem, 4:5].to(dt) if self.shifted else None
            sr2 = stats_all[rem, 5:6].to(dt) if self.shifted else None
            # anchor e1_i (i remote) vs live e2_j (j local), and the text-anchor mirror; (B-b, b) each
            ids_rem = None if ids_loc is None else (pids_all[rem], pids)
            remote_part = (_weighted_exp_sum(E1[rem], e2, posd, t1r, w1_all[rem] / denom_all[rem], None,
                                             self.block_logits, sr1, ids_rem)
                           + _weighted_exp_sum(E2[rem], e1, posd, t2r, w2_all[rem] / denom_all[rem], None,
                                               self.block_logits, sr2, ids_rem))

        surrogate = K * (local_part + remote_part)

        # ---- temperature terms
        # official: log(u) (no eps) in v3's temperature term
        log_eps = 0.0 if self.official else eps
        log_u1_loc = torch.log(u1_all[off:off + b] + log_eps)
        log_u2_loc = torch.log(u2_all[off:off + b] + log_eps)
        if not self.individual and cfg.multiply_tau:
            # d/dtau of tau*F + rho*tau, the part not already in the surrogate: FCCO estimate of F (mean log u) + rho.
            # Per rank: (1/(2b)) sum_{i in rank} (log u1 + log u2) + rho  -> DDP mean = (1/2B) sum_all (...) + rho.
            surrogate = surrogate + tau_live * (0.5 * (log_u1_loc + log_u2_loc).mean() + float(cfg.rho))

        # ---- per-pair temperature update (individual): grad_i = log(u_i+eps) + rho + tau_i g_i'(tau_i)/(u_i+eps)
        if self.individual:
            with torch.no_grad():
                clamp = TAU_GRAD_CLAMP if self.official else None  # official: clamped before the Adam step
                grad_t1, grad_t2 = (
                    per_pair_tau_gradient(u, stats_all[:, col].to(dt), float(cfg.rho), eps,
                                          stats_all[:, col + 2].to(dt) if self.shifted else None, clamp)
                    for u, col in ((u1_all, 2), (u2_all, 3)))
                tk = keys_all.to(self.tau1.device)
                tpick = self._occurrence(tk)
                self._adam_tau(tk, tpick, grad_t1.to(self.tau1.device), "tau1")
                self._adam_tau(tk, tpick, grad_t2.to(self.tau2.device), "tau2")
                self.tau_count[tk[tpick]] += 1  # visits (the exact rules' bias correction; kept under both)

        # ---- reported value: this rank's objective estimate (the gradient is the surrogate's)
        with torch.no_grad():
            lg1 = torch.log(g1.detach() + eps)
            lg2 = torch.log(g2.detach() + eps)
            if self.shifted:  # g in plain units
                lg1, lg2 = lg1 + s1[:, 0], lg2 + s2[:, 0]
            if self.individual:
                tl1, tl2 = t1_loc.squeeze(1), t2_loc.squeeze(1)
                value = 0.5 * (tl1 * (lg1 + cfg.rho) + tl2 * (lg2 + cfg.rho)).mean()
                tau_metric = 0.5 * (tl1.mean() + tl2.mean())
            else:
                value = 0.5 * (lg1 + lg2).mean()
                if cfg.multiply_tau:
                    value = tau_live.detach() * value + cfg.rho * tau_live.detach()
                tau_metric = tau_live.detach()
            m = torch.stack([value.to(dt), tau_metric.to(dt), u1_all[off:off + b].mean(), u2_all[off:off + b].mean(),
                             g1.detach().mean(), g2.detach().mean()]).tolist()
        loss = surrogate - surrogate.detach() + value.to(dt)
        metrics = {"loss_value": m[0], "tau": m[1], "gamma": gamma, "u1_mean": m[2], "u2_mean": m[3],
                   "g1_mean": m[4], "g2_mean": m[5]}
        if ids_loc is not None:  # the mean number of positives per anchor (B - n_i; 1 = no other pair of the person)
            metrics["positives"] = float(B - denom_loc.mean())
        return loss, metrics
