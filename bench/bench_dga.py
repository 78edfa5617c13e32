"""Peak memory and step time of one optimizer step with decoupled gradient accumulation (DGA), by number of chunks.

Each configuration runs in a fresh child process (so peak memory is its own): the real trainer step
(training.step.train_step) on a random batch, one warm-up step then --steps timed steps.
Peak memory: CUDA max_memory_allocated on a GPU; on CPU the process's peak RSS minus its RSS before the first step
(i.e. what the step added: activations, gradients, optimizer state).

    python bench/bench_dga.py --model PersonTiny --batch 4096 --chunks 1 8 32 --batch 16384 --chunks 32   # CPU
    python bench/bench_dga.py --model ViT-B-16 --image-size 384 128 --batch 4096 16384 --chunks 16 64    # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(a) -> dict:
    import torch
    from fast_clip.losses import LossConfig, build_loss
    from fast_clip.model import create_model, get_tokenizer
    from training.objective import Objective, TrainModule
    from training.optim import build_optimizer
    from training.step import train_step

    device = torch.device("cuda" if torch.cuda.is_available() and a.device != "cpu" else "cpu")
    torch.manual_seed(0)
    model = create_model(a.model, image_size=tuple(a.image_size) if a.image_size else None, device=device)
    if a.grad_checkpointing:
        model.set_grad_checkpointing(True)
    loss_fn = build_loss(LossConfig.from_name(a.loss, epochs=10), data_size=a.batch, device=device)
    loss_fn.set_epoch(1)
    model.logit_scale.requires_grad_(loss_fn.learns_model_temperature)
    module = TrainModule(model)
    opt = build_optimizer(module, 1e-4, 0.1)
    h, w = model.visual.image_size if hasattr(model.visual, "image_size") else (224, 224)
    tok = get_tokenizer(a.model)
    words = ["red", "blue", "black", "white", "coat", "jeans", "backpack", "shoes", "skirt", "hat"]
    g = torch.Generator().manual_seed(0)
    texts = tok([" ".join(words[int(i)] for i in torch.randint(0, 10, (12,), generator=g)) for _ in range(a.batch)])
    batch = {"images": torch.randn(a.batch, 3, h, w, generator=g), "texts": texts,
             "keys": torch.arange(a.batch), "pids": torch.zeros(a.batch, dtype=torch.long)}
    if device.type == "cuda":
        batch = {k: v.to(device) for k, v in batch.items()}
        torch.cuda.reset_peak_memory_stats(device)
    base_rss = _rss_mib()
    precision = "amp_bf16" if device.type == "cuda" else "fp32"
    times = []
    for i in range(1 + a.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = train_step(module, Objective(loss_fn), opt, batch, device, precision, None, a.chunks)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i > 0:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return {"batch": a.batch, "chunks": a.chunks, "loss": a.loss, "device": str(device), "model": a.model,
            "step_s": sum(times) / len(times), "peak_mib": peak, "final_loss": out["loss"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="PersonTiny")
    ap.add_argument("--image-size", type=int, nargs=2, default=None)
    ap.add_argument("--batch", type=int, nargs="+", action="extend", default=None, help="effective (per-rank) batch")
    ap.add_argument("--chunks", type=int, nargs="+", action="extend", default=None)
    ap.add_argument("--loss", default="openclip")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--skip", nargs="*", default=[], help="BATCHxCHUNKS combinations not to run (e.g. 16384x1)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        a.batch, a.chunks = a.batch[0], a.chunks[0]
        print("RESULT " + json.dumps(child(a)), flush=True)
        return 0
    rows = []
    for b in dict.fromkeys(a.batch or [4096]):
        for k in dict.fromkeys(a.chunks or [1, 8]):
            if f"{b}x{k}" in a.skip or k > b:
                continue
            cmd = [sys.executable, __file__, "--child", "--model", a.model, "--batch", str(b), "--chunks", str(k),
                   "--loss", a.loss, "--steps", str(a.steps), "--device", a.device]
            if a.image_size:
                cmd += ["--image-size", *map(str, a.image_size)]
            if a.grad_checkpointing:
                cmd.append("--grad-checkpointing")
            r = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
            if r.returncode != 0 or not line:
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
                rows.append({"batch": b, "chunks": k, "error": tail[0][:120]})
            else:
                rows.append(json.loads(line[0][7:]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            if a.out:  # after every configuration: a run stopped by a time limit keeps what it measured
                Path(a.out).write_text(json.dumps(rows, indent=1))
    print(f"| batch | chunks | chunk size | step s | peak MiB ({'GPU allocated' if 'cuda' in str(rows[0].get('device')) else 'CPU RSS added'}) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['batch']} | {r['chunks']} | {-(-r['batch'] // r['chunks'])} | failed | {r['error']} |")
        else:
            print(f"| {r['batch']} | {r['chunks']} | {-(-r['batch'] // r['chunks'])} | {r['step_s']:.2f} | "
                  f"{r['peak_mib']:.0f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
