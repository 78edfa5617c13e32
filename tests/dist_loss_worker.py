"""Helper for tests/test_losses_dist.py: a few simulated DDP training steps of every loss variant.

``python tests/dist_loss_worker.py OUT_DIR WORLD_SIZE`` spawns WORLD_SIZE gloo processes (init_method file://); each
runs :func:`run_steps` on its slice of a fixed global batch and rank 0 saves the results to OUT_DIR/result.pt.
The test runs the same :func:`run_steps` in one process on the whole batch and compares.

"DDP" is simulated exactly: tiny linear encoders W1, W2 and a logit-scale parameter p are replicated on every rank;
after backward their gradients are averaged over ranks (what DDP does), then an SGD step is applied.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

from fast_clip.losses import LossConfig, build_loss
from training import distributed as dist_utils

VARIANTS = ["openclip", "sogclr", "isogclr", "fastclip-v0", "fastclip-v1", "fastclip-v2", "fastclip-v3"]
B, DIN, D, DATA_SIZE = 8, 5, 6, 20
EPOCHS = (0, 2, 3)
# Identity-aware runs: persons 1 and 2 have a pair on each rank, person 0 two pairs on rank 0, -1 is unknown.
PIDS = torch.tensor([0, 1, 0, 2, 1, 3, -1, 2])
ID_VARIANTS = VARIANTS + ["sdm"]
CASES = [(v, blocked, False) for v in VARIANTS for blocked in (False, True)] + \
        [(v, blocked, True) for v in ID_VARIANTS for blocked in (False, True)]  # one step per epoch: gamma = 1, then gamma < 1 with the same keys (estimators are used)


def make_data():
    g = torch.Generator().manual_seed(1234)
    x1 = torch.randn(B, DIN, generator=g, dtype=torch.float64)
    x2 = torch.randn(B, DIN, generator=g, dtype=torch.float64)
    keys = torch.randperm(DATA_SIZE, generator=g)[:B]
    W1 = torch.randn(DIN, D, generator=g, dtype=torch.float64)
    W2 = torch.randn(DIN, D, generator=g, dtype=torch.float64)
    return x1, x2, keys, W1, W2


def make_cfg(variant: str, ids: bool = False) -> LossConfig:
    # Non-trivial values everywhere (rho > 0, an lr_tau that moves the individual temperatures visibly).
    over = dict(gamma_decay_epochs=4, temperature=0.1 if variant not in ("openclip", "sdm") else 0.07,
                id_positives=ids)
    if variant in ("isogclr", "fastclip-v2"):
        over.update(lr_tau=0.02, rho=0.5)
    if variant == "fastclip-v3":
        over.update(rho=0.5)
    return LossConfig.from_name(variant, **over)


# Small enough that every GCL matrix of the worker (b x B local, (B-b) x b remote) is processed in row blocks.
SMALL_BLOCK = 5


def run_steps(variant: str, block_logits: int | None = None, ids: bool = False) -> dict:
    """Simulated DDP steps on this rank's slice of the global batch; returns grads per step and the final state.
    ``block_logits`` overrides the GCL losses' row-blocking threshold (None: the default, no blocking here)."""
    x1, x2, keys, W1, W2 = make_data()
    K, r = dist_utils.world_size(), dist_utils.rank()
    b = B // K
    sl = slice(r * b, (r + 1) * b)
    cfg = make_cfg(variant, ids)
    loss_fn = build_loss(cfg, DATA_SIZE, torch.device("cpu"), dtype=torch.float64)
    if block_logits is not None and hasattr(loss_fn, "block_logits"):
        loss_fn.block_logits = block_logits
    W1 = W1.clone().requires_grad_(True)
    W2 = W2.clone().requires_grad_(True)
    p = torch.tensor(loss_fn.initial_logit_scale(), dtype=torch.float64, requires_grad=True)
    out = {"grads": [], "losses": []}
    for epoch in EPOCHS:
        loss_fn.set_epoch(epoch)
        f1 = F.normalize(x1[sl] @ W1, dim=-1)
        f2 = F.normalize(x2[sl] @ W2, dim=-1)
        loss, metrics = loss_fn(f1, f2, p.exp(), keys=keys[sl], pids=PIDS[sl] if ids else None)
        for t in (W1, W2, p):
            t.grad = None
        loss.backward()
        grads = []
        for t in (W1, W2, p):
            gr = t.grad if t.grad is not None else torch.zeros_like(t)
            grads.append(dist_utils.all_reduce_mean(gr.detach().clone()))  # DDP's average
        out["grads"].append(grads)
        out["losses"].append(float(metrics.get("tau", 0.0)))
        with torch.no_grad():
            for t, gr in zip((W1, W2, p), grads):
                t -= 0.5 * gr
    out["state"] = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {(v, blocked, ids): run_steps(v, SMALL_BLOCK if blocked else None, ids)
                   for v, blocked, ids in CASES}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "result.pt"))
        # also check all ranks hold identical loss state
        for v in results:
            for k, t in results[v]["state"].items():
                ref = t.clone()
                dist.broadcast(ref, 0)
                if not torch.equal(ref, t):
                    raise AssertionError(f"rank {rank}: state {v}/{k} differs from rank 0")
        # Every check of this rank passed: say so in a file, so that the test can tell a failed check from a crash
        # in gloo's teardown (seen once in ~10 suite runs: "terminate called without an active exception").
        open(os.path.join(out_dir, f"rank{rank}.ok"), "w").close()
        dist.barrier()  # leave together: one rank tearing down while the other still talks is the racy part
    finally:
        dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    out_dir, world = sys.argv[1], int(sys.argv[2])
    init_file = os.path.join(out_dir, "dist_init")
    mp.spawn(_worker, args=(world, init_file, out_dir), nprocs=world, join=True)


if __name__ == "__main__":
    main()
