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
    forward = _Forward(model, images, batch["texts"], text_mix, device, precision)
    if chunks <= 1:
        loss, metrics = objective(forward(slice(None)), batch, mix, teacher)
        loss.backward()
        return loss, metrics
    slices = micro_batches(images.shape[0], chunks)
    rng_states, leaves = _outputs_without_graph(forward, slices, device)
    learn_scale = bool(getattr(model, "module", model).logit_scale.requires_grad)
    leaves["logit_scale"].requires_grad_(learn_scale)
    loss, metrics = objective(leaves, batch, mix, teacher)
    names = [k for k, v in leaves.items() if v.requires_grad]
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)))
    del leaves
    _replay_backward(model, forward, slices, rng_states, grads, device)
    return loss.detach(), metrics


def micro_batches(n: int, chunks: int) -> list[slice]:
    if chunks > n:
        raise ValueError(f"--accum-freq {chunks} is larger than the per-rank batch {n}")
    bounds = torch.linspace(0, n, chunks + 1).round().long().tolist()
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class _Forward:
    """The model's forward on one micro-batch (a slice of the step batch), under the step's autocast."""

    def __init__(self, model, images, texts, text_mix, device, precision):
        self.model, self.images, self.texts, self.text_mix = model, images, texts, text_mix
        self.device, self.precision = device, precision

    def __call__(self, sl: slice) -> dict:
        with _autocast(self.device, self.precision):
            return self.model(self.images[sl], self.texts[sl], _slice_mix(self.text_mix, sl))


def _outputs_without_graph(forward: _Forward, slices: list[slice], device) -> tuple[list, dict]:
    """1. Every chunk's outputs with no graph kept, and the random state each forward started from. The outputs are
    concatenated into leaves for the loss; the logit scale is one scalar, identical in every chunk."""
    rng_states, parts = [], []
    with torch.no_grad():
        for sl in slices:
            rng_states.append(_rng_get(device))
            parts.append({k: v.detach() for k, v in forward(sl).items()})
    leaves = {k: parts[0][k].clone() if k == "logit_scale" else torch.cat([p[k] for p in parts]).requires_grad_(True)
              for k in parts[0]}
    return rng_states, leaves


def _replay_backward(model, forward: _Forward, slices: list[slice], rng_states: list, grads: dict, device) -> None:
    """3. Re-forward each chunk with autograd from the random state of its first forward and push the cached output
    gradients through it; the logit scale's gradient goes in once, with the last chunk, whose backward alone
    all-reduces under DDP."""
    after = _rng_get(device)
    for c, sl in enumerate(slices):
        last = c == len(slices) - 1
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            _rng_set(rng_states[c], device)
            out = forward(sl)
            outs, out_grads = [], []
            for k, g in grads.items():
                if g is None or (k == "logit_scale" and not last):
                    continue
                outs.append(out[k])
                out_grads.append((g if k == "logit_scale" else g[sl]).to(out[k].dtype))
            torch.autograd.backward(outs, out_grads)
    _rng_set(after, device)
