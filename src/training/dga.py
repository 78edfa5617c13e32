"""Forward + backward of one optimizer step, in one pass or by decoupled gradient accumulation (DGA, ZeroVL).

A contrastive loss couples every sample with every other one, so plain gradient accumulation (sum of per-chunk
losses) optimises a different, smaller-batch objective. DGA keeps the full-batch objective with the memory of one
chunk:

1. forward every chunk without autograd and keep only the outputs (features, logit scale, identity cosines);
2. compute the loss once on the concatenated outputs (as leaves) and the gradient of the loss w.r.t. every output,
   including the logit scale (ZeroVL's surrogate drops that term; here it is the exact partial derivative);
3. re-forward each chunk with autograd, replaying the random state of its first forward (dropout), and
   backpropagate the cached output gradients: sum_c J_c^T dL/dout_c = dL/dtheta by the chain rule.

The logit-scale output is the same parameter in every chunk, so its gradient is injected once (in the last chunk).
Under DDP, inner chunks run under ``no_sync()`` and only the last backward all-reduces: one reduction per step.
The loss's own state (FastCLIP estimators) is updated once, in step 2.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from training.objective import mix_inputs


def _autocast(device: torch.device, precision: str):
    if precision == "amp_bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _rng_get(device: torch.device):
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _rng_set(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _slice_mix(text_mix, sl: slice):
    return None if text_mix is None else (text_mix[0], text_mix[1][sl])


def forward_backward(model, objective, batch: dict, device: torch.device, precision: str = "fp32",
                     chunks: int = 1, mix=None, teacher: dict | None = None):
    """Accumulate d(loss)/d(parameters) into ``.grad``; return (loss tensor, metrics). ``batch`` tensors are on
    ``device``. ``chunks`` = 1 is the ordinary single pass."""
    images, text_mix = mix_inputs(batch["images"], batch["texts"], mix)
    texts = batch["texts"]
    if chunks <= 1:
        with _autocast(device, precision):
            out = model(images, texts, text_mix)
        loss, metrics = objective(out, batch, mix, teacher)
        loss.backward()
        return loss, metrics

    n = images.shape[0]
    if chunks > n:
        raise ValueError(f"--accum-freq {chunks} is larger than the per-rank batch {n}")
    bounds = torch.linspace(0, n, chunks + 1).round().long().tolist()
    slices = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    # 1. outputs of every chunk, no graph kept
    rng_states, parts = [], []
    with torch.no_grad():
        for sl in slices:
            rng_states.append(_rng_get(device))
            with _autocast(device, precision):
                out = model(images[sl], texts[sl], _slice_mix(text_mix, sl))
            parts.append({k: v.detach() for k, v in out.items()})

    # 2. the loss on the whole batch, and its gradient w.r.t. each output
    learn_scale = bool(getattr(model, "module", model).logit_scale.requires_grad)
    leaves = {}
    for k in parts[0]:
        if k == "logit_scale":  # one scalar, identical in every chunk
            leaves[k] = parts[0][k].clone().requires_grad_(learn_scale)
        else:
            leaves[k] = torch.cat([p[k] for p in parts]).requires_grad_(True)
    loss, metrics = objective(leaves, batch, mix, teacher)
    names = [k for k, v in leaves.items() if v.requires_grad]
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)))
    del parts, leaves

    # 3. re-forward each chunk with autograd and push the cached gradients through it
    after = _rng_get(device)
    for c, sl in enumerate(slices):
        last = c == len(slices) - 1
        sync = nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            _rng_set(rng_states[c], device)
            with _autocast(device, precision):
                out = model(images[sl], texts[sl], _slice_mix(text_mix, sl))
            outs, out_grads = [], []
            for k, g in grads.items():
                if g is None:
                    continue
                if k == "logit_scale":
                    if last:
                        outs.append(out[k])
                        out_grads.append(g.to(out[k].dtype))
                    continue
                outs.append(out[k])
                out_grads.append(g[sl].to(out[k].dtype))
            torch.autograd.backward(outs, out_grads)
    _rng_set(after, device)
    return loss.detach(), metrics
