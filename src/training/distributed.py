"""All rank / world / device set-up and collective helpers.

Nothing else in the project touches ``torch.distributed`` directly: the trainer, the losses and the evaluation call
these functions, which degrade to no-ops in a single process so the same code runs under ``python`` and ``torchrun``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV = DistEnv()


def env() -> DistEnv:
    return _ENV


def init_distributed(device: str = "auto", backend: str | None = None) -> DistEnv:
    """Initialise the process group from torchrun's variables (or do nothing for a plain ``python`` run).

    ``device``: "auto" picks cuda:LOCAL_RANK when CUDA is available, else cpu. The backend follows the device (nccl for
    cuda, gloo for cpu) so the 2-process CPU tests run with gloo.
    """
    global _ENV
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        store = _attempt_store(world_size)
        if store is None:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    _ENV = DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)
    return _ENV


def _attempt_store(world_size: int):
    """The torchrun agent's store, with a key prefix per restart attempt (None: let env:// build the store).

    With a static rendezvous (--master_addr/--master_port, as scripts/train.sh launches) the agent keeps one TCPStore
    for the whole job, and torch's env:// handler connects every attempt to it without a per-attempt prefix (it
    assumes a fresh store per retry). After a rank dies and torchrun restarts the group, the new processes then meet
    the dead attempt's keys (gloo/nccl peer addresses, barrier counters) and can wait forever in
    init_process_group. Prefixing the keys with TORCHELASTIC_RESTART_COUNT gives every attempt a clean namespace.
    """
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                           timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"fastclip/attempt_{restart}", client)


def destroy_distributed() -> None:
    global _ENV
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _ENV = DistEnv()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_dist():
        dist.barrier()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's slice.

    With every rank computing a loss that depends on all gathered features, the gradient reaching rank r's features is
    the sum over ranks of d(loss_k)/d(features_r): exactly what the single-process gradient of sum_k loss_k has.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ws = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.n = x.shape[0]
        out = [torch.empty_like(x) for _ in range(ws)]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over ranks along dim 0 (equal shapes required); gradients flow back to every rank."""
    if not is_dist():
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` over ranks along dim 0 without a gradient path (for keys, ids, detached features)."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns ``x`` for chaining."""
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
