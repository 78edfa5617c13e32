"""Retrieval metrics: pure functions of a similarity matrix (or of two feature matrices) and two id vectors.

Protocol (see docs/EVAL.md): row ``q`` of ``sim`` scores query ``q`` against every gallery item; a gallery item is a
match when its id equals the query's id. Ranking is by descending similarity, ties broken by ascending gallery index
(a stable sort), so every number here is deterministic. Queries whose id is absent from the gallery are left out of
every average and counted in ``num_queries_without_match``. Percentages (0-100) throughout.

Exact ranks without a full argsort per query: each chunk of rows is sorted by value only (numpy's vectorised sort on
CPU, torch.sort on an accelerator), and the rank of match ``j`` of query ``q`` is

    rank_j = 1 + #{g : s_qg > s_qj} + #{g < j : s_qg == s_qj}

The first term comes from a binary search of ``s_qj`` in the sorted row; the second is only non-zero when a row holds
exact ties with a match (rare with real features, common in hand-made tests or a collapsed model), and such rows are
ranked by a stable argsort instead. From the sorted match ranks r_1 < ... < r_m: R@k counts r_1 <= k, AP = mean_i i / r_i and
INP = m / r_m.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["retrieval_metrics", "retrieval_metrics_from_features", "recall_at_1_from_features", "match_ranks",
           "topk_indices", "DEFAULT_CHUNK_ELEMENTS"]

# Rows per chunk are chosen so that a chunk holds about this many similarities (64 MiB of float32): with the sorted
# copy and the search results the working set stays a few hundred MiB whatever the gallery size.
DEFAULT_CHUNK_ELEMENTS = 1 << 24
_TIE_BLOCK_ELEMENTS = 1 << 24


def _as_tensor(x, device=None) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if device is None else x.to(device)
    return torch.as_tensor(np.asarray(x), device=device)


def _chunk_rows(num_rows: int, num_cols: int, chunk_size: int | None) -> int:
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_ELEMENTS // max(1, num_cols)
    return int(max(1, min(max(1, num_rows), chunk_size)))


def _sort_rows(s: torch.Tensor) -> torch.Tensor:
    """Ascending sort of each row (values only). On CPU numpy's SIMD sort is about 2.5x faster than torch.sort and
    releases the GIL, so row blocks are sorted on torch's intra-op thread count."""
    if s.device.type != "cpu":
        return torch.sort(s, dim=1).values
    a = s.numpy()
    out = np.empty_like(a)
    threads = max(1, min(torch.get_num_threads(), a.shape[0]))
    if threads == 1:
        out[:] = np.sort(a, axis=1)
    else:
        bounds = np.linspace(0, a.shape[0], threads + 1).astype(int)

        def work(i):
            lo, hi = bounds[i], bounds[i + 1]
            out[lo:hi] = np.sort(a[lo:hi], axis=1)

        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(work, range(threads)))
    return torch.from_numpy(out)


class _MatchTable:
    """For every distinct gallery id, the gallery indices carrying it (ascending, padded with -1)."""

    def __init__(self, gallery_ids: torch.Tensor):
        self.ids, dense = torch.unique(gallery_ids, return_inverse=True)  # ids sorted ascending
        self.counts = torch.bincount(dense, minlength=len(self.ids))
        width = int(self.counts.max()) if len(self.ids) else 0
        order = torch.sort(dense, stable=True).indices
        starts = torch.cumsum(self.counts, 0) - self.counts
        within = torch.arange(len(dense), device=dense.device) - starts[dense[order]]
        self.table = torch.full((len(self.ids), max(width, 1)), -1, dtype=torch.long, device=dense.device)
        self.table[dense[order], within] = order

    def dense(self, query_ids: torch.Tensor) -> torch.Tensor:
        """Index into ``ids`` for each query id, -1 where the id has no gallery item."""
        if len(self.ids) == 0:
            return torch.full_like(query_ids, -1, dtype=torch.long)
        pos = torch.searchsorted(self.ids, query_ids).clamp(max=len(self.ids) - 1)
        return torch.where(self.ids[pos] == query_ids, pos, torch.full_like(pos, -1))


def _chunk_match_ranks(s: torch.Tensor, qdense: torch.Tensor, mt: _MatchTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted 1-based ranks of the matches of each row of ``s`` (all rows have >= 1 match).

    Returns ``(ranks, m)``: ranks [rows, width] ascending with padding ``G + 1`` beyond column ``m - 1``."""
    n, g = s.shape
    counts = mt.counts[qdense]
    width = int(counts.max())
    idx = mt.table[qdense, :width]                                  # [n, width] gallery index of each match, -1 pad
    valid = idx >= 0
    thr = s.gather(1, idx.clamp(min=0))                              # similarity of each match
    srt = _sort_rows(s)
    left = torch.searchsorted(srt, thr, right=False)                # #{s < t}
    right = torch.searchsorted(srt, thr, right=True)                # #{s <= t}
    ranks = (g - right) + 1                                          # 1 + #{s > t}
    # Rows with an exact tie involving a match: rank those rows by a stable sort (descending value, then ascending
    # gallery index), which is the tie-break by definition. Rare with real features, so the cost does not matter.
    tied_rows = torch.nonzero(((right - left) > 1).logical_and(valid).any(1)).flatten()
    if len(tied_rows):
        step = max(1, _TIE_BLOCK_ELEMENTS // max(1, g))
        for lo in range(0, len(tied_rows), step):
            rows = tied_rows[lo:lo + step]
            order = torch.sort(-s[rows], dim=1, stable=True).indices
            pos = torch.empty_like(order)
            pos.scatter_(1, order, torch.arange(g, device=s.device).expand_as(order).contiguous())
            ranks[rows] = pos.gather(1, idx[rows].clamp(min=0)) + 1
    ranks = torch.where(valid, ranks, torch.full_like(ranks, g + 1))
    return torch.sort(ranks, dim=1).values, counts


def _iter_sim_chunks(sim: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    for lo in range(0, sim.shape[0], rows):
        yield lo, sim[lo:lo + rows]


def _iter_feature_chunks(qf: torch.Tensor, gf: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    gt = gf.t()
    for lo in range(0, qf.shape[0], rows):
        yield lo, qf[lo:lo + rows] @ gt


def _metrics_from_chunks(chunks, num_queries: int, num_gallery: int, query_ids: torch.Tensor,
                         gallery_ids: torch.Tensor, ks: Sequence[int], max_rank: int) -> dict:
    mt = _MatchTable(gallery_ids)
    qdense_all = mt.dense(query_ids)
    first_ranks = []
    ap_sum = torch.zeros((), dtype=torch.float64, device=query_ids.device)
    inp_sum = torch.zeros((), dtype=torch.float64, device=query_ids.device)
    for lo, s in chunks:
        qd = qdense_all[lo:lo + s.shape[0]]
        keep = qd >= 0
        if not bool(keep.any()):
            continue
        s = s[keep] if not bool(keep.all()) else s
        s = s.float() + 0.0  # fp32 everywhere; "+ 0.0" turns -0.0 into +0.0 (they compare equal anyway)
        if bool(torch.isnan(s).any()):
            raise ValueError("similarity matrix contains NaN")
        ranks, m = _chunk_match_ranks(s.contiguous(), qd[keep], mt)
        r = ranks.double()
        order = torch.arange(1, r.shape[1] + 1, device=r.device, dtype=torch.float64)
        within = order[None, :] <= m[:, None]
        ap_sum += (torch.where(within, order / r, torch.zeros_like(r)).sum(1) / m).sum()
        last = ranks.gather(1, (m - 1)[:, None]).squeeze(1)
        inp_sum += (m.double() / last.double()).sum()
        first_ranks.append(ranks[:, 0])
    valid = int((qdense_all >= 0).sum())
    out: dict = {}
    if valid == 0:
        for k in ks:
            out[f"R{k}"] = math.nan
        out.update(mAP=math.nan, mINP=math.nan, cmc=[math.nan] * max_rank)
    else:
        first = torch.cat(first_ranks)
        for k in ks:
            out[f"R{k}"] = 100.0 * float((first <= k).sum()) / valid
        out["mAP"] = 100.0 * float(ap_sum) / valid
        out["mINP"] = 100.0 * float(inp_sum) / valid
        hist = torch.bincount(first.clamp(max=max_rank + 1), minlength=max_rank + 2)[1:max_rank + 1]
        out["cmc"] = (100.0 * torch.cumsum(hist, 0).double() / valid).tolist()
    out["num_queries"] = int(num_queries)
    out["num_gallery"] = int(num_gallery)
    out["num_queries_without_match"] = int(num_queries - valid)
    return out


def _check_ids(q_ids: torch.Tensor, g_ids: torch.Tensor, nq: int, ng: int) -> None:
    if q_ids.ndim != 1 or len(q_ids) != nq:
        raise ValueError(f"query_ids has shape {tuple(q_ids.shape)}, expected ({nq},)")
    if g_ids.ndim != 1 or len(g_ids) != ng:
        raise ValueError(f"gallery_ids has shape {tuple(g_ids.shape)}, expected ({ng},)")


def retrieval_metrics(sim, query_ids, gallery_ids, ks: Sequence[int] = (1, 5, 10), max_rank: int = 50,
                      chunk_size: int | None = None) -> dict:
    """Text-to-image (or any) retrieval metrics of a [num_queries, num_gallery] similarity matrix.

    ``sim``: torch tensor (any device, any float dtype) or numpy array. ``query_ids`` / ``gallery_ids``: integer
    person ids. ``chunk_size``: query rows processed at once (default: about 16M similarities per chunk); the result
    does not depend on it. Returns ``R{k}`` for k in ``ks``, ``mAP``, ``mINP`` (percent), ``cmc`` (R@k for k = 1..
    ``max_rank``, percent), ``num_queries``, ``num_gallery``, ``num_queries_without_match``. Averages are over the
    queries with at least one match (NaN when there is none).
    """
    sim = _as_tensor(sim)
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D [queries, gallery], got shape {tuple(sim.shape)}")
    q_ids = _as_tensor(query_ids, sim.device).long()
    g_ids = _as_tensor(gallery_ids, sim.device).long()
    nq, ng = sim.shape
    _check_ids(q_ids, g_ids, nq, ng)
    rows = _chunk_rows(nq, ng, chunk_size)
    return _metrics_from_chunks(_iter_sim_chunks(sim, rows), nq, ng, q_ids, g_ids, ks, max_rank)


def retrieval_metrics_from_features(query_features, gallery_features, query_ids, gallery_ids,
                                    ks: Sequence[int] = (1, 5, 10), max_rank: int = 50,
                                    chunk_size: int | None = None) -> dict:
    """Same as :func:`retrieval_metrics` with ``sim = query_features @ gallery_features.T`` computed one chunk of
    query rows at a time (fp32), so the full matrix never exists: memory is O(chunk_size x num_gallery)."""
    qf = _as_tensor(query_features).float()
    gf = _as_tensor(gallery_features, qf.device).float()
    if qf.ndim != 2 or gf.ndim != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"feature shapes {tuple(qf.shape)} and {tuple(gf.shape)} do not match")
    q_ids = _as_tensor(query_ids, qf.device).long()
    g_ids = _as_tensor(gallery_ids, qf.device).long()
    nq, ng = qf.shape[0], gf.shape[0]
    _check_ids(q_ids, g_ids, nq, ng)
    rows = _chunk_rows(nq, ng, chunk_size)
    return _metrics_from_chunks(_iter_feature_chunks(qf, gf, rows), nq, ng, q_ids, g_ids, ks, max_rank)


def recall_at_1_from_features(query_features, gallery_features, query_ids, gallery_ids,
                              chunk_size: int | None = None) -> float:
    """R@1 (percent) with the same tie-break (first maximum = lowest gallery index), chunked; used for image-to-text
    retrieval. Queries whose id has no gallery item are left out (NaN if none has)."""
    qf = _as_tensor(query_features).float()
    gf = _as_tensor(gallery_features, qf.device).float()
    q_ids = _as_tensor(query_ids, qf.device).long()
    g_ids = _as_tensor(gallery_ids, qf.device).long()
    _check_ids(q_ids, g_ids, qf.shape[0], gf.shape[0])
    has = torch.isin(q_ids, g_ids)
    if not bool(has.any()):
        return math.nan
    hits = 0
    for lo, s in _iter_feature_chunks(qf, gf, _chunk_rows(qf.shape[0], gf.shape[0], chunk_size)):
        best = torch.argmax(s, dim=1)  # first occurrence of the maximum
        hits += int(((g_ids[best] == q_ids[lo:lo + s.shape[0]]) & has[lo:lo + s.shape[0]]).sum())
    return 100.0 * hits / int(has.sum())


def match_ranks(sim_row, query_id, gallery_ids) -> list[int]:
    """1-based ranks of the matches of a single query (for inspection and tests)."""
    s = _as_tensor(sim_row).float()[None] + 0.0
    g_ids = _as_tensor(gallery_ids, s.device).long()
    mt = _MatchTable(g_ids)
    qd = mt.dense(_as_tensor([query_id], s.device).long())
    if int(qd[0]) < 0:
        return []
    ranks, m = _chunk_match_ranks(s, qd, mt)
    return ranks[0, :int(m[0])].tolist()


def topk_indices(sim_rows, k: int) -> torch.Tensor:
    """Gallery indices of the top ``k`` of each row in the metric's order (descending, ties by ascending index)."""
    s = _as_tensor(sim_rows).float()
    if s.ndim == 1:
        s = s[None]
    order = torch.sort(-(s + 0.0), dim=1, stable=True).indices
    return order[:, :k]
