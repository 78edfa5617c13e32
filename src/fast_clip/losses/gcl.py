"""The global contrastive losses (SogCLR / iSogCLR / FastCLIP-v0..v3) optimised with FCCO; docs/LOSSES.md derives them."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch

from common import collectives as dist_utils
from common.runs import CheckpointError
from fast_clip.losses.base import ContrastiveLoss
from fast_clip.losses.config import TAU_MAX, TAU_MIN, LossConfig, state_placement
from fast_clip.losses.kernels import BLOCK_LOGITS, exp_row_stats, same_person_counts, weighted_exp_sum
from fast_clip.losses.rules import RULES
from fast_clip.precision import compute_dtype as _compute_dtype
from fast_clip.precision import no_autocast as _no_autocast

# ---------------------------------------------------------------------------------- the per-pair temperatures' math
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


@dataclass
class _Batch:
    """This rank's view of the global batch of B = K*b pairs, whose rows [off, off + b) are this rank's."""
    e1: torch.Tensor  # (b, d) this rank's features, live
    e2: torch.Tensor
    E1: torch.Tensor  # (B, d) the global batch's, detached
    E2: torch.Tensor
    E1_live: torch.Tensor  # E1, E2 with this rank's block replaced by the live local features
    E2_live: torch.Tensor
    keys_all: torch.Tensor  # (B,) dataset keys
    ids: Optional[tuple]  # --id-positives: (this rank's pids, the global batch's)
    denom_all: torch.Tensor  # (B,) n_i, the number of negatives of each pair
    b: int
    K: int
    off: int

    @property
    def B(self) -> int:
        return self.K * self.b

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global-batch tensor."""
        return t[self.off:self.off + self.b]


@dataclass
class _Temperatures:
    """The temperatures of this step, per side (image anchors, text anchors); per-pair ones are the values before
    this step's update."""
    loc: tuple  # of this rank's anchors, as the local-anchor terms hold them: a (b, 1) column or the live scalar
    anchors: tuple  # of every anchor of the global batch, detached: a (B, 1) column or a scalar
    pair: Optional[tuple] = None  # individual: (B,) per-pair temperatures
    live: Optional[torch.Tensor] = None  # global: the live scalar tau
    old_bounds: Optional[tuple] = None  # shifted: (B,) bounds before this step
    floors: Optional[tuple] = None  # shifted: (b, 1) this rank's old bounds


@dataclass
class _Rows:
    """Row statistics of this rank's anchors, per side: g_i (the mean over N_i, live unless blocked), h_i (individual;
    the sum, not yet the mean) and the new bounds s_i ((b, 1), shifted)."""
    pos: torch.Tensor  # (b, 1) <e1_i, e2_i>, live
    blocked: bool  # the exp matrices are built in row blocks
    g: tuple
    h: tuple
    s: tuple


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
        self.rules = RULES[cfg.fastclip_rules]
        # per-pair temperatures under the official rules: exponents shifted by the bound tables
        self.shifted = self.individual and self.rules.shifts_exponents

    def recorded_settings(self) -> dict:
        """Besides the loss (base): the temperature scheme (which tables exist; the tau u was estimated at), the rule
        set (official: u in units of exp(-bound), read by the exact rules as plain u; the tau Adam schedule and
        lr_tau latch differ), the table length (one entry per pair key), --id-positives (which columns u sums
        over) and, for a constant tau, that tau (u estimates g at it). Not recorded, because they change how the
        state moves from here on, not what the saved values mean: gamma and its schedule (recomputed from the epoch),
        rho, the temperature lr and Adam settings; nor where the tables live or their dtype (loading casts the
        values)."""
        cfg = self.cfg
        out = {**super().recorded_settings(), "--temperature_scheme": self.scheme,
               "--fastclip_rules": cfg.fastclip_rules, "--data_size": self.data_size,
               "--id-positives": bool(cfg.id_positives)}
        if self.scheme == "global_constant":
            out["--temperature"] = float(cfg.temperature)
        return out

    def check_unrecorded(self) -> None:
        # Only the official rules shift (non-zero bounds): such a state read by the exact rules is misread.
        if self.individual and not self.shifted and bool((self.bound1 != 0).any() or (self.bound2 != 0).any()):
            raise CheckpointError("--fastclip_rules: the loss state was written with --fastclip_rules official (u in "
                                  "units of exp(-bound)), this run has --fastclip_rules exact; resume with "
                                  "--fastclip_rules official, or start a new --name")

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

    # -------------------------------------------------------------- forward
    def forward(self, image_features, text_features, logit_scale=None, keys=None, mix_alpha=None, pids=None):
        if mix_alpha is not None:
            raise ValueError(f"--mixup-beta {self.cfg.mixup_refusal()}")
        if keys is None:
            raise ValueError(f"loss {self.cfg.loss!r} needs the dataset keys of the batch (keys=...)")
        with _no_autocast(image_features.device):
            return self._forward(image_features, text_features, logit_scale, keys, pids)

    def _forward(self, image_features, text_features, logit_scale, keys, pids):
        """One FCCO step on the global batch: statistics, table updates, and the surrogate whose gradient is the
        step's (docs/LOSSES.md §3-4); the value returned is the objective estimate (see _report)."""
        batch = self._gather(image_features, text_features, keys, pids)
        temps = self._temperatures(batch, logit_scale)
        rows = self._row_statistics(batch, temps)
        u, stats_all = self._update_estimators(batch, temps, rows)
        w = self._weights(batch, temps, u)
        surrogate = batch.K * (self._local_part(batch, temps, rows, w) + self._remote_part(batch, temps, w, stats_all))
        if not self.individual and self.cfg.multiply_tau:
            surrogate = surrogate + self._temperature_term(batch, temps, u)
        if self.individual:
            self._update_pair_temperatures(batch, u, stats_all)
        return self._report(batch, temps, rows, u, surrogate)

    # -------------------------------------------------------------- the pieces of a step, in order
    def _gather(self, image_features, text_features, keys, pids) -> _Batch:
        """This rank's features in the compute dtype, the global batch's features, keys and person ids, and the
        number of negatives of each pair."""
        dt = _compute_dtype(image_features, text_features, self.u1)
        dev = image_features.device
        e1 = image_features.to(dt)
        e2 = text_features.to(dt)
        b, K = e1.shape[0], dist_utils.world_size()
        B, off = K * b, dist_utils.rank() * b
        if B < 2:
            raise ValueError("GCL needs a global batch of at least 2 pairs")
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
        ids = None
        if self.cfg.id_positives:
            ids = self._gather_pids(pids, b, dev)
            denom_all = (B - same_person_counts(ids[1])).clamp_min(1).to(dt)
        else:
            denom_all = torch.full((B,), float(B - 1), dtype=dt, device=dev)
        E1 = dist_utils.all_gather_no_grad(e1.detach())
        E2 = dist_utils.all_gather_no_grad(e2.detach())
        return _Batch(e1, e2, E1, E2, torch.cat([E1[:off], e1, E1[off + b:]], 0),
                      torch.cat([E2[:off], e2, E2[off + b:]], 0), keys_all, ids, denom_all, b, K, off)

    def _temperatures(self, batch: _Batch, logit_scale) -> _Temperatures:
        """The per-pair temperatures of the batch's pairs and their old bounds (individual), or the global one."""
        e1 = batch.e1
        if self.individual:
            skeys = batch.keys_all.to(self.tau1.device)
            pair = tuple(t[skeys].to(e1.device, e1.dtype) for t in (self.tau1, self.tau2))  # copies
            temps = _Temperatures(loc=tuple(batch.local(t)[:, None] for t in pair),
                                  anchors=tuple(t[:, None] for t in pair), pair=pair)
            if self.shifted:  # the old bounds of the batch's pairs (every rank holds the whole table)
                temps.old_bounds = tuple(t[skeys].to(e1.device, e1.dtype) for t in (self.bound1, self.bound2))
                temps.floors = tuple(batch.local(t)[:, None] for t in temps.old_bounds)
            return temps
        tau = self._global_tau(logit_scale, e1.dtype, e1.device)
        loc = self.rules.local_tau(tau)  # live in the local-anchor terms
        return _Temperatures(loc=(loc, loc), anchors=(tau.detach(), tau.detach()), live=tau)

    def _row_statistics(self, batch: _Batch, temps: _Temperatures) -> _Rows:
        """g_i, h_i and the new bounds s_i of this rank's anchors against all (gathered) candidates: X = D / tau with
        D = <e_i, e'_j> - <e_i, e'_i>, P = exp(X) with the pair's own column zeroed, g = mean_j P, h = sum_j P X.

        Above block_logits (b x B) the exp matrices are never held whole: g and h come from a no-grad pass in row
        blocks, and the surrogate's local part is recomputed block by block under checkpointing (_local_part)."""
        pos = (batch.e1 * batch.e2).sum(1, keepdim=True)  # <e1_i, e2_i>, live in both features
        blocked = batch.b * batch.B > self.block_logits and torch.is_grad_enabled()
        max_logits = self.block_logits if blocked else batch.b * batch.B  # unblocked: one block, the whole matrix
        sides = zip((batch.e1, batch.e2), (batch.E2_live, batch.E1_live), temps.loc, temps.floors or (None, None))
        with torch.no_grad() if blocked else nullcontext():
            (g1, h1, s1), (g2, h2, s2) = (exp_row_stats(anchors, cands, pos, tau, batch.off, max_logits,
                                                        self.individual, floor, batch.ids)
                                          for anchors, cands, tau, floor in sides)
        denom = batch.local(batch.denom_all)
        return _Rows(pos, blocked, (g1 / denom, g2 / denom), (h1, h2), (s1, s2))

    @torch.no_grad()
    def _update_estimators(self, batch: _Batch, temps: _Temperatures, rows: _Rows):
        """u <- (1-gamma) u + gamma g for the whole global batch (identical on every rank), and the bound tables
        (shifted). Returns the u each pair of the global batch uses, (B,) per side, and the gathered statistics
        (B, 2-6): g1, g2, then h1, h2 (individual; means over N_i), then s1, s2 (shifted)."""
        cols = [rows.g[0].detach(), rows.g[1].detach()]
        if self.individual:
            cols += [h / batch.local(batch.denom_all) for h in rows.h]
        if self.shifted:
            cols += [s[:, 0] for s in rows.s]
        stats_all = dist_utils.all_gather_no_grad(torch.stack(cols, 1))
        skeys = batch.keys_all.to(self.u1.device)
        pick = self.rules.occurrence(skeys)
        rescale = (None, None)
        if self.shifted:  # u moves from the old bound's units to the new one's; the bound tables take the new
            rescale = tuple(torch.exp(old - stats_all[:, col]).to(self.u1.device)
                            for old, col in zip(temps.old_bounds, (4, 5)))
            for table, col in ((self.bound1, 4), (self.bound2, 5)):
                table[skeys[pick]] = stats_all[:, col].to(table.device, table.dtype)[pick]
        gamma = float(self.gamma)
        u = [self._update_estimator(table, skeys, pick, stats_all[:, col].to(table.device), gamma, r)
             for table, col, r in ((self.u1, 0, rescale[0]), (self.u2, 1, rescale[1]))]
        self.step += 1
        return tuple(x.to(batch.e1.device, batch.e1.dtype) for x in u), stats_all

    def _update_estimator(self, table, keys, pick, g, gamma: float, rescale) -> torch.Tensor:
        """Writes the picked occurrences' new u into ``table``; returns the u each entry uses."""
        new = self.rules.update_estimator(table[keys], g.to(table.dtype), gamma,
                                          None if rescale is None else rescale.to(table.dtype))
        table[keys[pick]] = new[pick]
        return self.rules.estimator_in_use(new, table, keys)

    def _weights(self, batch: _Batch, temps: _Temperatures, u) -> tuple:
        """w_i = c_i / (u_i + eps) / 2B per side, (B,), detached: the surrogate sum_i w_i g_i has the FCCO gradient.
        c_i = tau_i (individual, RGCL, where the rules weight by it), tau (detached; multiply_tau, RGCL-g), else 1."""
        B, e1 = batch.B, batch.e1
        if self.individual and self.rules.weights_by_pair_tau:
            c = temps.pair
        elif self.cfg.multiply_tau and not self.individual:
            c = (temps.live.detach().expand(B),) * 2
        else:
            c = (torch.ones(B, dtype=e1.dtype, device=e1.device),) * 2
        eps = float(self.cfg.fastclip_eps)
        return tuple(ci / (ui + eps) / (2 * B) for ci, ui in zip(c, u))

    def _local_part(self, batch: _Batch, temps: _Temperatures, rows: _Rows, w) -> torch.Tensor:
        """The surrogate's local anchors against all (gathered, live) candidates."""
        w1, w2 = (batch.local(x) for x in w)
        if not rows.blocked:
            return (w1 * rows.g[0]).sum() + (w2 * rows.g[1]).sum()
        denom = batch.local(batch.denom_all)
        return (weighted_exp_sum(batch.e1, batch.E2_live, rows.pos, temps.loc[0], w1 / denom, batch.off,
                                 self.block_logits, rows.s[0], batch.ids)
                + weighted_exp_sum(batch.e2, batch.E1_live, rows.pos, temps.loc[1], w2 / denom, batch.off,
                                   self.block_logits, rows.s[1], batch.ids))

    def _remote_part(self, batch: _Batch, temps: _Temperatures, w, stats_all) -> torch.Tensor:
        """Remote anchors (all ranks' anchors except this rank's, detached, with their u and tau) against this rank's
        live candidates: the gradient other ranks' anchors send into our features, computed here instead. One
        process (K = 1) has no remote anchors."""
        if batch.K == 1:
            return batch.e1.new_zeros(())
        b, off, dev = batch.b, batch.off, batch.e1.device
        rem = torch.cat([torch.arange(off, device=dev), torch.arange(off + b, batch.B, device=dev)])
        E1, E2 = batch.E1[rem], batch.E2[rem]
        posd = (E1 * E2).sum(1, keepdim=True)  # detached positives of the remote anchors
        t1, t2 = (t[rem] for t in temps.anchors) if self.individual else temps.anchors
        # shifted estimators: the remote anchors' new bounds (the official forward's remote_bounds)
        s1, s2 = (stats_all[rem, c:c + 1].to(posd.dtype) for c in (4, 5)) if self.shifted else (None, None)
        w1, w2 = (x[rem] / batch.denom_all[rem] for x in w)
        ids = None if batch.ids is None else (batch.ids[1][rem], batch.ids[0])
        # anchor e1_i (i remote) vs live e2_j (j local), and the text-anchor mirror; (B-b, b) each
        return (weighted_exp_sum(E1, batch.e2, posd, t1, w1, None, self.block_logits, s1, ids)
                + weighted_exp_sum(E2, batch.e1, posd, t2, w2, None, self.block_logits, s2, ids))

    def _temperature_term(self, batch: _Batch, temps: _Temperatures, u) -> torch.Tensor:
        """multiply_tau (RGCL-g): d/dtau of tau*F + rho*tau, the part not already in the surrogate: the FCCO estimate
        of F (mean log u) + rho. Per rank: (1/(2b)) sum_{i in rank} (log u1 + log u2) + rho -> DDP mean =
        (1/2B) sum_all (...) + rho."""
        eps = float(self.cfg.fastclip_eps)
        log_u1, log_u2 = (self.rules.log_u(batch.local(x), eps) for x in u)
        return temps.live * (0.5 * (log_u1 + log_u2).mean() + float(self.cfg.rho))

    @torch.no_grad()
    def _update_pair_temperatures(self, batch: _Batch, u, stats_all) -> None:
        """One Adam step per pair of the global batch on tau1, tau2 (individual), with the gradient
        log(u_i+eps) + rho + tau_i g_i'(tau_i)/(u_i+eps) (per_pair_tau_gradient), computed with the updated u."""
        cfg, dt = self.cfg, batch.e1.dtype
        grads = [per_pair_tau_gradient(ui, stats_all[:, col].to(dt), float(cfg.rho), float(cfg.fastclip_eps),
                                       stats_all[:, col + 2].to(dt) if self.shifted else None,
                                       self.rules.tau_grad_clamp)
                 for ui, col in zip(u, (2, 3))]
        keys = batch.keys_all.to(self.tau1.device)
        pick = self.rules.occurrence(keys)
        for grad, which in zip(grads, ("tau1", "tau2")):
            self._adam_tau(keys, pick, grad.to(self.tau1.device), which)
        self.tau_count[keys[pick]] += 1  # visits (the exact rules' bias correction; kept under both)

    def _adam_tau(self, keys, pick, grad, which: str) -> None:
        """One Adam step on the per-pair temperatures ``which`` of the picked occurrences (Rules.occurrence), with
        the rules' betas and bias correction."""
        cfg = self.cfg
        tau, m, v = getattr(self, which), getattr(self, which + "_m"), getattr(self, which + "_v")
        k = keys[pick]
        betas, step = self.rules.tau_adam_schedule(cfg, int(self.epoch), self.tau_count[k], tau.dtype)
        tau[k], m[k], v[k] = tau_adam_step(tau[k], m[k], v[k], grad[pick].to(tau.dtype), float(cfg.lr_tau), betas,
                                           cfg.tau_adam_eps, step)

    def _report(self, batch: _Batch, temps: _Temperatures, rows: _Rows, u, surrogate):
        """The loss: the surrogate's gradient with this rank's objective estimate as its value; and the metrics."""
        with torch.no_grad():
            value, tau = self._objective_estimate(temps, rows)
            dt = batch.e1.dtype
            m = torch.stack([value.to(dt), tau.to(dt), batch.local(u[0]).mean(), batch.local(u[1]).mean(),
                             rows.g[0].detach().mean(), rows.g[1].detach().mean()]).tolist()
        loss = surrogate - surrogate.detach() + value.to(dt)
        metrics = {"loss_value": m[0], "tau": m[1], "gamma": float(self.gamma), "u1_mean": m[2], "u2_mean": m[3],
                   "g1_mean": m[4], "g2_mean": m[5]}
        if batch.ids is not None:  # the mean number of positives per anchor (B - n_i; 1 = no other pair of the person)
            metrics["positives"] = float(batch.B - batch.local(batch.denom_all).mean())
        return loss, metrics

    def _objective_estimate(self, temps: _Temperatures, rows: _Rows):
        """This rank's estimate of the objective from the batch's g (not the estimators), and the mean tau."""
        cfg, eps = self.cfg, float(self.cfg.fastclip_eps)
        lg1, lg2 = (torch.log(g.detach() + eps) for g in rows.g)
        if self.shifted:  # g in plain units
            lg1, lg2 = lg1 + rows.s[0][:, 0], lg2 + rows.s[1][:, 0]
        if self.individual:
            tl1, tl2 = (t.squeeze(1) for t in temps.loc)
            value = 0.5 * (tl1 * (lg1 + cfg.rho) + tl2 * (lg2 + cfg.rho)).mean()
            return value, 0.5 * (tl1.mean() + tl2.mean())
        value = 0.5 * (lg1 + lg2).mean()
        tau = temps.live.detach()
        if cfg.multiply_tau:
            value = tau * value + cfg.rho * tau
        return value, tau
