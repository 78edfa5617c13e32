"""Process-group set-up (rank / world / device, rendezvous, teardown) and the object collectives of the trainer.

With common/collectives.py (rank, world size and the tensor collectives the losses use, re-exported here) this is
all of the project's ``torch.distributed``; everything degrades to a no-op in a single process so the same code runs
under ``python`` and ``torchrun``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# rank / world size and the tensor collectives live below the trainer (the losses use them); re-exported here
from common.collectives import (all_gather_no_grad, all_gather_with_grad, all_reduce_mean,  # noqa: F401
                                   all_reduce_sum, is_dist, rank, world_size)


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
    rank, world_size, local_rank, init_method = launcher_env(os.environ)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        # srun --gpus-per-task 1 leaves each task one visible GPU (cuda:0) whatever its local rank
        dev = torch.device("cuda", local_rank if local_rank < torch.cuda.device_count() else 0)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        store = _attempt_store(world_size)
        if init_method is not None:  # srun: the rendezvous address comes from the SLURM allocation
            dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size)
        elif store is None:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    _ENV = DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)
    return _ENV


def launcher_env(env) -> tuple[int, int, int, str | None]:
    """(rank, world size, local rank, init_method) of this process, from torchrun's variables or from srun's.

    torchrun sets WORLD_SIZE/RANK/LOCAL_RANK. ``srun python src/training/main.py`` (the official FastCLIP launch; one
    task per GPU) sets SLURM_NTASKS/SLURM_PROCID/SLURM_LOCALID inside a job step (SLURM_STEP_ID): the tasks then form
    one world, meeting at MASTER_ADDR:MASTER_PORT when given, else at the first node of the allocation and a port
    derived from the job id. A plain ``python`` in an sbatch script (no srun step) is one process. Launches that
    would form several worlds in one run folder (srun starting N tasks that each run their own torchrun with a world
    smaller than N) are refused."""
    ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
    in_step = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env
    if "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        if in_step and ntasks > world:
            raise SystemExit(f"error: srun started {ntasks} tasks but torchrun formed a world of {world} in each: "
                             f"they would train {ntasks} separate runs into one folder. Launch with srun alone (one "
                             f"task per GPU), or one torchrun per node (srun --ntasks-per-node=1) with --nnodes")
        return int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")), None
    if in_step and ntasks > 1:
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        if not addr:
            raise SystemExit("error: srun with several tasks but no MASTER_ADDR and no SLURM_JOB_NODELIST to take the "
                             "first node from; export MASTER_ADDR")
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
        return (int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", "0")), f"tcp://{addr}:{port}")
    return 0, 1, 0, None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,07],cpu1' -> 'gpu03' (what `scontrol show hostnames` would
    print first, without needing scontrol)."""
    import re
    m = re.match(r"\s*([^,\[]+)(?:\[([^\]]+)\])?", nodelist or "")
    if not m:
        return ""
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


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


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if is_dist():
        dist.barrier()


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
