"""Time and peak memory of the retrieval metrics at ICFG-PEDES size (20k captions x 20k images), against a naive peer.

    .venv/bin/python bench/bench_eval.py [--queries 20000] [--gallery 20000] [--dim 512] [--ids 1000]
                                         [--naive-size N] [--device cpu|cuda]

Each method runs in its own child process so its peak resident memory (``ru_maxrss``) is its own; the table shows the
peak minus the child's resident memory just before the timed call (features and, for "precomputed sim", the matrix
already allocated), and the wall time of the call. Features are random unit vectors; ids are ``g % ids`` for the
gallery and uniform for the queries (ICFG-PEDES: ~20 images per person).

Methods:
- chunked/features: ``retrieval_metrics_from_features`` (similarity computed chunk by chunk; includes the matmul).
- chunked/sim: ``retrieval_metrics`` on a precomputed [Q, G] float32 matrix (matmul not timed).
- naive/numpy: the usual full-ranking implementation: ``sim = q @ g.T``, full ``argsort`` of every row
  (stable, so its numbers equal ours), gather the labels, cumulative sums for CMC / AP / INP (includes the matmul).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def naive_metrics(sim, qids, gids, max_rank=50):
    """Full-ranking reference (numpy): argsort every row, then cumulative sums over the whole ranked list."""
    import numpy as np
    order = np.argsort(-sim, axis=1, kind="stable")
    matches = gids[order] == qids[:, None]
    del order
    has = matches.any(1)
    matches = matches[has]
    m = matches.sum(1)
    first = matches.argmax(1) + 1
    cum = matches.cumsum(1)
    pos = np.arange(1, matches.shape[1] + 1)
    ap = ((cum / pos) * matches).sum(1) / m
    last = matches.shape[1] - matches[:, ::-1].argmax(1)
    inp = m / last
    out = {f"R{k}": 100 * float(np.mean(first <= k)) for k in (1, 5, 10)}
    out.update(mAP=100 * float(ap.mean()), mINP=100 * float(inp.mean()))
    return out


def child(args) -> None:
    import numpy as np
    import torch
    from fast_clip.retrieval.metrics import retrieval_metrics, retrieval_metrics_from_features

    n_q = n_g = None
    n_q, n_g = args.queries, args.gallery
    if args.method == "naive":
        n_q = n_g = args.naive_size or args.queries
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(n_q, args.dim, generator=gen), dim=1)
    g = torch.nn.functional.normalize(torch.randn(n_g, args.dim, generator=gen), dim=1)
    gids = torch.arange(n_g) % args.ids
    qids = torch.randint(0, args.ids, (n_q,), generator=gen)
    dev = torch.device(args.device)
    if args.method == "naive":
        qn, gn, qi, gi = q.numpy(), g.numpy(), qids.numpy(), gids.numpy()
        base = _rss_mib()
        t = time.perf_counter()
        sim = qn @ gn.T
        m = naive_metrics(sim, qi, gi)
        dt = time.perf_counter() - t
    elif args.method == "sim":
        sim = (q @ g.T).to(dev)
        base = _rss_mib()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        m = retrieval_metrics(sim, qids, gids)
        dt = time.perf_counter() - t
    else:
        q, g = q.to(dev), g.to(dev)
        base = _rss_mib()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        m = retrieval_metrics_from_features(q, g, qids, gids)
        dt = time.perf_counter() - t
    res = dict(method=args.method, queries=n_q, gallery=n_g, seconds=dt, peak_mib=_peak_mib(), base_mib=base,
               metrics={k: m[k] for k in ("R1", "R5", "R10", "mAP", "mINP")})
    if dev.type == "cuda" and args.method != "naive":
        res["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=20000)
    p.add_argument("--gallery", type=int, default=20000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ids", type=int, default=1000)
    p.add_argument("--naive-size", type=int, default=None, help="Q = G for the naive peer (default: --queries); "
                                                                 "it needs ~8 GB at 20k")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default="features,sim,naive")
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        return child(args)
    import torch
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", method] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("method", "methods") and v is not None]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{method}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"# {args.queries} queries x {args.gallery} gallery, d={args.dim}, {args.ids} ids, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print("| method | Q x G | time (s) | peak RSS (MiB) | peak - before call (MiB) | R1 | mAP | mINP |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["metrics"]
        extra = f" (cuda peak {r['cuda_peak_mib']:.0f})" if "cuda_peak_mib" in r else ""
        print(f"| {r['method']} | {r['queries']} x {r['gallery']} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] - r['base_mib']:.0f}{extra} | {m['R1']:.3f} | {m['mAP']:.4f} | {m['mINP']:.4f} |")
    by = {r["method"]: r for r in rows}
    if "naive" in by and "features" in by and by["naive"]["queries"] == by["features"]["queries"]:
        n, f = by["naive"], by["features"]
        print(f"\nnaive / chunked(features): time x{n['seconds'] / f['seconds']:.1f}, "
              f"memory above baseline x{(n['peak_mib'] - n['base_mib']) / max(1, f['peak_mib'] - f['base_mib']):.1f}; "
              f"metrics equal: {all(abs(n['metrics'][k] - f['metrics'][k]) < 1e-6 for k in n['metrics'])}")


if __name__ == "__main__":
    main()
