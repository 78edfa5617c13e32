"""Process-group set-up (rank / world / device, rendezvous, teardown) and the object collectives of the trainer.

With common/collectives.py (rank, world size and the tensor collectives the losses use, re-exported here) this is
all of the project's ``torch.distributed``; everything degrades to a no-op in a single process so the same code runs
under ``python`` and ``torchrun``.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

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
    rank, world_size, local_rank, rendezvous = launcher_env(os.environ)
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
        # srun: the rendezvous comes from the SLURM allocation; under torchrun from its agent's store or env://
        store = _step_store(rendezvous, rank, world_size) if rendezvous else _attempt_store(world_size)
        if store is None:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size)
    _ENV = DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)
    return _ENV


class Rendezvous(NamedTuple):
    """Where the ranks of one srun step meet, and the key prefix that keeps them among themselves."""
    addr: str
    port: int
    tag: str


# Ports derived for srun steps: 20000 + (job id mod 750) * 16 + step id mod 16, all below Linux's ephemeral range
# (32768-60999), where any outgoing connection on the node may hold a port. The 16 step slots of a job keep its
# concurrent steps (a sweep, an eval beside a train) apart; two jobs meet on a port only when they share their first
# node, run at once, and their ids differ by a multiple of 750 at the same step slot. Then the second one's rank 0
# cannot bind it (one error line), and the key prefix per job step keeps its other ranks out of the first one's world.
PORT_BASE, PORT_JOBS, PORT_STEPS = 20000, 750, 16


def step_port(job_id: int, step_id: int) -> int:
    return PORT_BASE + (job_id % PORT_JOBS) * PORT_STEPS + step_id % PORT_STEPS


def launcher_env(env) -> tuple[int, int, int, Rendezvous | None]:
    """(rank, world size, local rank, rendezvous) of this process, from torchrun's variables or from srun's.

    torchrun sets WORLD_SIZE/RANK/LOCAL_RANK. ``srun python src/training/main.py`` (the official FastCLIP launch; one
    task per GPU) sets SLURM_NTASKS/SLURM_PROCID/SLURM_LOCALID inside a job step (SLURM_STEP_ID): the tasks then form
    one world, meeting at MASTER_ADDR:MASTER_PORT when given, else at the first node of the allocation and a port of
    their own job step (:func:`step_port`). A plain ``python`` in an sbatch script (no srun step) is one process.
    Launches that would form several worlds in one run folder (srun starting N tasks that each run their own torchrun
    whose world is not one torchrun per task, ``--nnodes N``) are refused."""
    ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
    in_step = "SLURM_STEP_ID" in env and "SLURM_PROCID" in env
    if "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        nodes = int(env.get("GROUP_WORLD_SIZE") or ntasks)  # torchrun's --nnodes
        if in_step and ntasks > 1 and (ntasks > world or nodes != ntasks):
            raise SystemExit(f"error: srun started {ntasks} tasks but each runs a torchrun with --nnodes {nodes} "
                             f"(a world of {world}): they would train separate runs into one folder. Launch with "
                             f"srun alone (one task per GPU), or one torchrun per node (srun --ntasks-per-node=1) "
                             f"with --nnodes {ntasks}")
        return int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")), None
    if in_step and ntasks > 1:
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        if not addr:
            raise SystemExit("error: srun with several tasks but no MASTER_ADDR and no SLURM_JOB_NODELIST to take the "
                             "first node from; export MASTER_ADDR")
        job, step = int(env.get("SLURM_JOB_ID", "0") or 0), int(env["SLURM_STEP_ID"] or 0)
        port = int(env.get("MASTER_PORT") or step_port(job, step))
        return (int(env["SLURM_PROCID"]), ntasks, int(env.get("SLURM_LOCALID", "0")),
                Rendezvous(addr, port, f"fastclip/job{job}.step{step}"))
    return 0, 1, 0, None


def srun_threads(env) -> int | None:
    """The intra-op threads of a rank that srun started, as torchrun would set them (None: leave torch's default).

    An explicit OMP_NUM_THREADS wins; else SLURM_CPUS_PER_TASK (the cores the task was given); else 1 when several
    tasks share the node (torchrun's rule: each rank using every core makes CPU runs many times slower)."""
    if "OMP_NUM_THREADS" in env or "SLURM_STEP_ID" not in env or "WORLD_SIZE" in env:
        return None
    if env.get("SLURM_CPUS_PER_TASK"):
        return int(env["SLURM_CPUS_PER_TASK"])
    return 1 if tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""), int(env.get("SLURM_NODEID", "0"))) > 1 \
        else None


def tasks_on_node(spec: str, node: int) -> int:
    """The tasks SLURM placed on node ``node`` of a step, from its compressed list: '2(x3),1' -> 2, 2, 2, 1."""
    counts = []
    for part in filter(None, spec.split(",")):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if node < len(counts) else 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[03-05,07],cpu1' -> 'gpu03' (what `scontrol show hostnames` would
    print first, without needing scontrol)."""
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
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                           timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"fastclip/attempt_{restart}", client)


def _step_store(rv: Rendezvous, rank: int, world_size: int):
    """The srun step's rendezvous store, its keys under the job step's prefix: a rank that reaches another step's
    store (a port taken by another job, MASTER_PORT exported to two steps) waits among its own keys and never joins
    that world; the rank 0 that cannot bind the port says so."""
    try:
        store = dist.TCPStore(rv.addr, rv.port, world_size, is_master=rank == 0, timeout=timedelta(minutes=10),
                              wait_for_workers=False)
    except RuntimeError as e:  # torch's DistNetworkError: the port is taken, or the address does not resolve
        raise SystemExit(f"error: rank {rank}: the rendezvous at {rv.addr}:{rv.port} failed ({str(e).splitlines()[0]});"
                         f" another process on {rv.addr} may hold that port: export MASTER_PORT=<a free port>, "
                         f"another for each concurrent job step") from None
    return dist.PrefixStore(rv.tag, store)


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


def require_same(values: dict) -> None:
    """Every rank of the world holds the same ``values`` (flag -> value), else one error line on every rank naming
    the flags and the ranks that differ: a rank of another job step in this world, or a launch that gave its ranks
    different flags, must not train beside the others. A digest is compared first; the values only on a mismatch."""
    if not is_dist():
        return
    digest = hashlib.sha256(repr(sorted(values.items())).encode()).hexdigest()
    if len(set(all_gather_object(digest))) == 1:
        return
    raise SystemExit(f"error: {disagreement(all_gather_object(values))}: every rank of a world must run the same "
                     f"flags (ranks of another job step in this world, or a launch that gives ranks different "
                     f"flags); nothing was trained or written")


def disagreement(per_rank: list[dict]) -> str:
    """'ranks disagree on --lr (rank 0: 1e-05, rank 1: 0.01), ...': each differing key, rank 0's value and the first
    rank that holds another."""
    keys = list(dict.fromkeys(k for values in per_rank for k in values))
    parts = []
    for k in keys:
        shown = [repr(values[k]) if k in values else "<absent>" for values in per_rank]
        other = next((r for r, v in enumerate(shown) if v != shown[0]), None)
        if other is not None:
            parts.append(f"{k} (rank 0: {shown[0]}, rank {other}: {shown[other]})")
    return "ranks disagree on " + ", ".join(parts)
