"""The matrix kernels of the contrastive losses: row blocks under activation checkpointing (so no b x B matrix is whole
above BLOCK_LOGITS entries), the exp matrices of the GCL family and their row statistics."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# Above this many logits (b x world*b) the InfoNCE rows are processed in blocks, each recomputed in the backward, so
# the loss never holds the whole b x B matrix and its softmax: at b = B = 16384 that is 1 GiB per fp32 matrix, more
# than the activations of a DGA chunk. 2^24 logits = 64 MiB in fp32.
BLOCK_LOGITS = 1 << 24


def _row_blocks(n: int, m: int, max_logits: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most max_logits // m rows (one row at least) covering n rows."""
    rows = max(1, max_logits // max(m, 1))
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


def _checkpointed_row_sum(rows_sum, n: int, m: int, max_logits: int, block_args) -> torch.Tensor:
    """sum over the row blocks [a, z) of _row_blocks(n, m, max_logits) of rows_sum(*block_args(a, z)), each block
    under activation checkpointing: the forward keeps one block's matrices at a time and the backward recomputes
    them. The one loop behind every row-blocked kernel of the losses."""
    from torch.utils.checkpoint import checkpoint
    total = None
    for a, z in _row_blocks(n, m, max_logits):
        part = checkpoint(rows_sum, *block_args(a, z), use_reentrant=False)
        total = part if total is None else total + part
    return total


def _ce_rows(anchors, others, scale, targets):
    return F.cross_entropy(scale * anchors @ others.t(), targets, reduction="sum")


def blocked_cross_entropy(anchors: torch.Tensor, others: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor,
                          max_logits: int = BLOCK_LOGITS) -> torch.Tensor:
    """mean_i CE(scale * anchors_i . others^T, targets_i), in row blocks of at most ``max_logits`` logits, each under
    activation checkpointing (same value and gradient as the one-matrix form, up to float summation order)."""
    n, m = anchors.shape[0], others.shape[0]
    if n * m <= max_logits or not torch.is_grad_enabled():
        return F.cross_entropy(scale * anchors @ others.t(), targets)
    return _checkpointed_row_sum(_ce_rows, n, m, max_logits,
                                 lambda a, z: (anchors[a:z], others, scale, targets[a:z])) / n


# IRRA's SDM adds this to the label distribution inside the log, so that log q is finite off the positives.
SDM_EPS = 1e-8


def identity_targets(row_pids: Optional[torch.Tensor], col_pids: Optional[torch.Tensor], n_rows: int, n_cols: int,
                     own_start: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """(rows, cols) target distribution: uniform over the columns showing the same person as the row, the row's own
    pair (column own_start + i) always among them; one-hot on the own pair when no pids are given."""
    rows = torch.arange(n_rows, device=device)
    pos = (torch.zeros(n_rows, n_cols, dtype=torch.bool, device=device) if row_pids is None
           else same_identity(row_pids, col_pids))
    pos = pos.index_put((rows, own_start + rows), torch.ones((), dtype=torch.bool, device=device))
    t = pos.to(dtype)
    return t / t.sum(1, keepdim=True)


def _identity_rows(anchors, others, scale, own_start: int, sdm: bool, row_pids=None, col_pids=None):
    """Summed over these rows: multi-positive cross-entropy -sum_j t_ij log p_ij, or (sdm) the KL
    sum_j p_ij (log p_ij - log(t_ij + SDM_EPS)), with p = softmax(scale * anchors . others^T) and t identity_targets."""
    logp = torch.log_softmax(scale * anchors @ others.t(), dim=1)
    t = identity_targets(row_pids, col_pids, anchors.shape[0], others.shape[0], own_start, logp.dtype, logp.device)
    if sdm:
        return (logp.exp() * (logp - torch.log(t + SDM_EPS))).sum()
    return -(t * logp).sum()


def blocked_identity_loss(anchors: torch.Tensor, others: torch.Tensor, scale: torch.Tensor, own_start: int,
                          sdm: bool = False, row_pids: Optional[torch.Tensor] = None,
                          col_pids: Optional[torch.Tensor] = None, max_logits: int = BLOCK_LOGITS) -> torch.Tensor:
    """Mean over rows of :func:`_identity_rows`; the targets are built block by block from the pids (never a whole
    b x B target matrix), in row blocks under activation checkpointing above ``max_logits`` logits."""
    n, m = anchors.shape[0], others.shape[0]
    if n * m <= max_logits or not torch.is_grad_enabled():
        return _identity_rows(anchors, others, scale, own_start, sdm, row_pids, col_pids) / n
    return _checkpointed_row_sum(_identity_rows, n, m, max_logits, lambda a, z: (
        anchors[a:z], others, scale, own_start + a, sdm, None if row_pids is None else row_pids[a:z], col_pids)) / n


def same_person_counts(pids: torch.Tensor) -> torch.Tensor:
    """For each pair of the batch, how many of its pairs show that pair's person, itself included (1 for an unknown
    pid, -1): from the pid counts, never a B x B matrix."""
    _, inv, counts = torch.unique(pids, return_inverse=True, return_counts=True)
    return torch.where(pids >= 0, counts[inv], torch.ones_like(inv))


def same_identity(row_pids: torch.Tensor, col_pids: torch.Tensor) -> torch.Tensor:
    """(rows, cols) bool: the two pairs show the same person. A negative pid (unknown) matches nothing, so a set
    without ids keeps one positive per row (its own pair, which the callers add by position)."""
    return (row_pids[:, None] == col_pids[None, :]) & (row_pids[:, None] >= 0)


def _exp_rows(anchors, cands, pos, tau, diag_start: Optional[int], shift=None, shift_floor=None, ids=None):
    """P = exp((anchors @ cands^T - pos) / tau - shift) and X = the exponent without the shift; when ``diag_start`` is
    given, anchor row i's own pair sits in column diag_start + i and its P entry is zeroed (g sums over j != i only).
    ``ids`` = (row pids, column pids): the entries of the same person are zeroed too (identity-aware negatives).

    ``shift`` (a detached column, per anchor) is the official code's running maximum of X ("bounds"), which keeps the
    per-pair-temperature exponentials finite; their estimators are then stored in units of exp(-shift). With
    ``shift_floor`` (the old bounds) the shift is the new bound, max(old, max_j X_ij), returned third; same-person
    entries do not count towards it (a near-duplicate caption would otherwise push the others towards underflow).

    Same-person entries get the exponent -inf before the exp, not a zero after it: their X can be large (another
    caption of the same image scores above the pair's own), and exp(X) = inf times the zero gradient of a masked
    entry would be NaN in the backward."""
    X = (anchors @ cands.t() - pos) / tau
    same = same_identity(*ids) if ids is not None else None
    if shift_floor is not None:
        shift = _new_shift(X if same is None else X.masked_fill(same, float("-inf")), shift_floor)
    E = X if shift is None else X - shift
    P = torch.exp(E if same is None else E.masked_fill(same, float("-inf")))
    if diag_start is not None:
        rows = torch.arange(anchors.shape[0], device=P.device)
        P = P.index_put((rows, diag_start + rows), P.new_zeros(()))  # out of place: X and P stay valid for autograd
    return (P, X) if shift_floor is None else (P, X, shift)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by a constant."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x, whose gradient is multiplied by ``factor`` in the backward."""
    return _ScaleGrad.apply(x, factor)


def _per_row(t, sl: slice):
    """A temperature is a scalar (global) or a column of per-row values (individual): slice only the latter."""
    return t[sl] if t.dim() > 0 else t


def _new_shift(X, floor):
    """The official running maximum: max(old bound, max_j X_ij) per row, the row's own pair (X = 0) included."""
    return torch.maximum(floor, X.detach().amax(1, keepdim=True))


def _ids_rows(ids, sl: slice):
    return None if ids is None else (ids[0][sl], ids[1])


def exp_row_stats(anchors, cands, pos, tau, diag_start, max_logits, with_h: bool, shift_floor=None, ids=None):
    """Row sums of P, differentiable (outside no_grad), and (``with_h``) the detached row sums of P*X (see _exp_rows),
    in row blocks of at most ``max_logits`` entries; with ``shift_floor`` (old bounds, a column) P is shifted by each
    row's new bound, returned third (else None)."""
    g, h, shifts = [], [], []
    for a, z in _row_blocks(anchors.shape[0], cands.shape[0], max_logits):
        sl = slice(a, z)
        out = _exp_rows(anchors[sl], cands, pos[sl], _per_row(tau, sl), None if diag_start is None else diag_start + a,
                        shift_floor=None if shift_floor is None else shift_floor[sl], ids=_ids_rows(ids, sl))
        P, X = out[0], out[1]
        if shift_floor is not None:
            shifts.append(out[2])
        g.append(P.sum(1))
        if with_h:
            h.append((P * X).detach().sum(1))  # only the per-pair temperatures' update reads it
    return torch.cat(g), (torch.cat(h) if with_h else None), (torch.cat(shifts) if shifts else None)


def _weighted_rows(anchors, cands, pos, tau, weights, diag_start, shift=None, row_ids=None, col_ids=None):
    ids = None if row_ids is None else (row_ids, col_ids)
    return (weights * _exp_rows(anchors, cands, pos, tau, diag_start, shift, ids=ids)[0].sum(1)).sum()


def weighted_exp_sum(anchors, cands, pos, tau, weights, diag_start: Optional[int], max_logits: int, shift=None,
                      ids=None):
    """sum_i weights_i * sum_j P_ij (P of _exp_rows), differentiable in anchors, cands, pos and a live tau; in row
    blocks under activation checkpointing once the matrix exceeds ``max_logits`` entries, so that the forward keeps
    one block at a time and the backward recomputes it (same value and gradient up to summation order)."""
    n, m = anchors.shape[0], cands.shape[0]
    if n * m <= max_logits or not torch.is_grad_enabled():
        return _weighted_rows(anchors, cands, pos, tau, weights, diag_start, shift, *(ids or (None, None)))

    def block(a, z):
        sl = slice(a, z)
        return (anchors[sl], cands, pos[sl], _per_row(tau, sl), weights[sl],
                None if diag_start is None else diag_start + a, None if shift is None else shift[sl],
                *(_ids_rows(ids, sl) or (None, None)))

    return _checkpointed_row_sum(_weighted_rows, n, m, max_logits, block)
