"""The retrieval protocol of the person-retrieval benchmarks on a model: features of a test set's captions and gallery
images, ranked by cosine similarity, scored as R@1/5/10, mAP, mINP and image-to-text R@1 (docs/EVAL.md).

    from fast_clip.retrieval.protocol import evaluate_model
    results = evaluate_model(model, tokenizer, transform, {"cuhk": "shards/cuhk/test"}, device)
    results["cuhk"]["R1"], results["cuhk"]["mAP"], ...

The trainer's periodic validation and the evaluation command line (evaluation/evaluate.py) both use it, so the trainer
never imports the evaluation package.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from common.transforms import build_transform
from fast_clip.retrieval.metrics import recall_at_1_from_features, retrieval_metrics_from_features, topk_indices
from fast_clip.retrieval.testset import EvalError, TestSet, check_first_sample, extract_features, load_test_set, \
    resolve_shards

KS = (1, 5, 10)
MAX_RANK = 50
TOP_SHOWN = 10

def evaluate_features(image_features: torch.Tensor, text_features: torch.Tensor, ts: TestSet,
                      chunk_size: int | None = None) -> dict:
    """Metrics of one test set from its features (rows of ``text_features`` = ``ts.captions``, rows of
    ``image_features`` = the gallery)."""
    for what, f in (("image", image_features), ("text", text_features)):
        bad = int((~torch.isfinite(f).all(dim=1)).sum())
        if bad:  # NaN similarities would rank arbitrarily and report numbers that mean nothing
            raise EvalError(f"test set {ts.name!r}: {bad} of {len(f)} {what} features are NaN or infinite; the "
                            f"weights are broken (a diverged run?); check the checkpoint's training log")
    dev = text_features.device
    q_ids = torch.as_tensor(ts.query_pids, device=dev)
    g_ids = torch.as_tensor(ts.gallery_pids, device=dev)
    m = retrieval_metrics_from_features(text_features, image_features, q_ids, g_ids, ks=KS, max_rank=MAX_RANK,
                                        chunk_size=chunk_size)
    i2t = recall_at_1_from_features(image_features, text_features, g_ids, q_ids, chunk_size=chunk_size)
    ordered = {f"R{k}": m[f"R{k}"] for k in KS}
    ordered.update(mAP=m["mAP"], mINP=m["mINP"], i2t_R1=i2t, num_queries=m["num_queries"],
                   num_gallery=m["num_gallery"], num_queries_without_match=m["num_queries_without_match"],
                   cmc=m["cmc"])
    return ordered


def first_match_ranks(image_features, text_features, ts: TestSet, chunk_size: int = 1024) -> np.ndarray:
    """1-based rank of each query's first match in the metrics' order (descending similarity, ties by ascending
    gallery index); 0 for a query without a match in the gallery."""
    g_ids = torch.as_tensor(ts.gallery_pids, device=text_features.device)
    cols = torch.arange(ts.num_gallery, device=text_features.device)
    out = []
    for lo in range(0, ts.num_queries, chunk_size):
        s = (text_features[lo:lo + chunk_size].float() @ image_features.float().t()) + 0.0
        q_ids = torch.as_tensor(ts.query_pids[lo:lo + chunk_size], device=s.device)
        match = g_ids[None, :] == q_ids[:, None]
        best = torch.where(match, s, torch.full_like(s, -torch.inf)).max(1).values[:, None]
        first = (match & (s == best)).int().argmax(1)[:, None]  # the lowest index among the best matches
        rank = 1 + (s > best).sum(1) + ((s == best) & (cols[None, :] < first)).sum(1)
        out.append(torch.where(match.any(1), rank, torch.zeros_like(rank)).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def examples(image_features, text_features, ts: TestSet, n: int, worst: int = 0) -> list[dict]:
    """Retrieval examples: ``n`` queries spread evenly over the test set (``kind`` 'sample') and the ``worst``
    queries whose first match ranks lowest ('worst'), each with its top gallery images, which of them match, and
    the rank of its first match (``first_hit``, None without a match)."""
    if (n <= 0 and worst <= 0) or ts.num_queries == 0:
        return []
    ranks = first_match_ranks(image_features, text_features, ts)
    spread = np.linspace(0, ts.num_queries - 1, max(0, n)).round().astype(int)
    picks = [(q, "sample") for q in sorted(set(spread.tolist()))]
    with_match = np.flatnonzero(ranks > 0)
    picks += [(int(q), "worst") for q in with_match[np.argsort(-ranks[with_match], kind="stable")][:max(0, worst)]]
    if not picks:
        return []
    sims = text_features[[q for q, _ in picks]] @ image_features.t()
    top = topk_indices(sims, min(TOP_SHOWN, ts.num_gallery)).cpu().numpy()
    rows = []
    for (q, kind), idx in zip(picks, top):
        rows.append(dict(title=ts.name, caption=ts.captions[q], query_index=int(q), pid=int(ts.query_pids[q]),
                         kind=kind, first_hit=int(ranks[q]) or None, gallery_indices=idx.tolist(),
                         matches=(ts.gallery_pids[idx] == ts.query_pids[q]).tolist(),
                         images=[ts.image(int(i)) for i in idx]))
    return rows


def evaluate_testset(model, tokenizer, transform, ts: TestSet, device: str | torch.device = "cpu",
                     batch_size: int = 256, num_workers: int = 0, chunk_size: int | None = None,
                     num_examples: int = 0, num_worst: int = 0) -> tuple[dict, list[dict]]:
    """(metrics, retrieval examples: ``num_examples`` sampled queries and the ``num_worst`` worst) of one loaded
    test set."""
    img, txt = extract_features(model, tokenizer, transform, ts, device, batch_size=batch_size,
                                num_workers=num_workers)
    return evaluate_features(img, txt, ts, chunk_size), examples(img, txt, ts, num_examples, num_worst)


def evaluate_model(model, tokenizer, transform, datasets: Mapping[str, str | Sequence[str] | TestSet],
                   device: str | torch.device = "cpu", batch_size: int = 256, num_workers: int = 0,
                   chunk_size: int | None = None) -> dict[str, dict]:
    """Evaluate ``model`` on every test set: ``{name: metrics}``.

    ``datasets``: name -> shard spec (directory, brace pattern, file list, ``::``-joined, list of paths) or an already
    loaded :class:`TestSet` (load once with :func:`evaluation.extract.load_test_set` to skip re-reading the tars at
    every periodic evaluation). ``transform``: PIL image -> normalised tensor (``build_transform(size, train=False)``).
    Works on any single process; in distributed training call it on rank 0 with the unwrapped model (a DDP wrapper is
    unwrapped here). The model's train/eval mode is restored. Metrics are percentages; see docs/EVAL.md.
    """
    out = {}
    for name, spec in datasets.items():
        ts = spec if isinstance(spec, TestSet) else load_test_set(spec, name=name)
        out[name], _ = evaluate_testset(model, tokenizer, transform, ts, device, batch_size, num_workers, chunk_size)
    return out


def validator(val_data: str, device):
    """``validate(model, tokenizer, image_size) -> {"val": metrics}`` on the test set ``val_data``, for the trainer's
    --val-data. Its shards are resolved now, so a typo fails before the first epoch rather than after it
    (EvalError), and so does a shard whose first sample lacks the person ids retrieval is scored by."""
    check_first_sample(resolve_shards(val_data)[0])

    def validate(model, tokenizer, image_size) -> dict:
        return evaluate_model(model, tokenizer, build_transform(image_size, train=False), {"val": val_data}, device)
    return validate
