"""Time of the contrastive loss alone (forward + backward on given features), per loss and batch, one process.

Isolates what a loss adds to a training step: InfoNCE against the FastCLIP family, and the GCL losses' one-matrix
form against their row-blocked large-batch form (``GCLLoss.block_logits``; docs/LOSSES.md section 8). Features are
random L2-normalised (B, D) tensors with grad, as the encoders would hand them over; the estimator tables hold
--data-size pairs and the keys are a fixed random subset. One warm-up call, then the median of --repeats timed calls
(CUDA: synchronised; peak memory = max_memory_allocated during the timed calls).

    python bench/bench_loss.py --batch 256 1024 4096 --losses openclip fastclip-v1 fastclip-v3     # CPU
    python bench/bench_loss.py --device cuda --batch 256 4096 16384 --block both                # GPU
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch
import torch.nn.functional as F

from fast_clip.losses import BLOCK_LOGITS, LossConfig, build_loss


def time_loss(loss_name: str, batch: int, dim: int, device: torch.device, blocked: bool | None, repeats: int,
              data_size: int, dtype: torch.dtype) -> dict:
    loss = build_loss(LossConfig.from_name(loss_name), data_size=data_size, device=device)
    if hasattr(loss, "block_logits") and blocked is not None:
        # force one form or the other whatever the batch (the default switches above 2^24 entries): blocked uses
        # the default block size, or 8 blocks where the whole matrix is smaller than that
        loss.block_logits = max(batch, min(BLOCK_LOGITS, batch * batch // 8)) if blocked else 1 << 62
    loss.set_epoch(1)
    g = torch.Generator().manual_seed(0)
    f1 = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device, dtype).requires_grad_(True)
    f2 = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device, dtype).requires_grad_(True)
    keys = torch.randperm(data_size, generator=g)[:batch].to(device)
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)

    def call():
        out, _ = loss(f1, f2, scale, keys=keys)
        out.backward()

    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device.type == "cuda" else None
    return {"loss": loss_name, "batch": batch, "form": "" if blocked is None else ("blocked" if blocked else "one"),
            "ms": 1000 * statistics.median(times), "peak_mib": peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", nargs="+", default=["openclip", "fastclip-v1", "fastclip-v3"])
    ap.add_argument("--batch", nargs="+", type=int, default=[256, 1024])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--data-size", type=int, default=100_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="dtype of the features handed to the loss (the loss computes in fp32 either way)")
    ap.add_argument("--block", default="auto", choices=["auto", "one", "blocked", "both"],
                    help="GCL form: the default switch at 2^24 entries (auto), forced, or both side by side")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="also write the rows as JSON (rewritten after every row)")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    forms = {"auto": [None], "one": [False], "blocked": [True], "both": [False, True]}[a.block]
    rows = []
    for batch in a.batch:
        for name in a.losses:
            for blocked in (forms if name != "openclip" else [None]):
                r = time_loss(name, batch, a.dim, device, blocked, a.repeats, max(a.data_size, batch), dtype)
                rows.append(r)
                print(f"# {r}", flush=True)
                if a.out:
                    Path(a.out).write_text(json.dumps({"device": str(device), "dim": a.dim, "dtype": a.dtype,
                                                       "rows": rows}, indent=1))
    print(f"\nloss forward+backward, D={a.dim}, {a.dtype} features, {device}, one process "
          f"(default block threshold {BLOCK_LOGITS} entries)")
    print("| batch | loss | GCL form | ms (median) | × openclip | peak MiB |")
    print("|---:|---|---|---:|---:|---:|")
    for r in rows:
        base = next(x["ms"] for x in rows if x["batch"] == r["batch"] and x["loss"] == "openclip") \
            if any(x["loss"] == "openclip" and x["batch"] == r["batch"] for x in rows) else None
        ratio = f"{r['ms'] / base:.2f}" if base else "–"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "–"
        print(f"| {r['batch']} | {r['loss']} | {r['form'] or 'auto'} | {r['ms']:.1f} | {ratio} | {peak} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
