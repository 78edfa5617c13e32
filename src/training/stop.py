"""Graceful stop on SIGTERM / SIGINT (SLURM's warning before a kill, torchrun stopping its workers, Ctrl-C).

The handler only records the signal; the epoch loop asks after every step whether *any* rank has one (an all-reduce
of a flag), so all ranks finish the same step, write latest.pt together and exit cleanly, and ``--resume latest``
continues exactly there. A second Ctrl-C interrupts at once. Data-loader workers ignore both signals: a job-wide
SIGTERM (SLURM signals every process of the step) must not kill them before the main process has saved.
"""
from __future__ import annotations

import signal

import torch

from training import distributed as dist_utils

requested: str | None = None  # name of the first stop signal received in this process
_previous: dict = {}


def _handler(signum, frame):
    global requested
    if requested is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now
    requested = signal.Signals(signum).name


def install() -> None:
    global requested
    requested = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            _previous[sig] = signal.signal(sig, _handler)
        except ValueError:  # not the main thread (e.g. a test runner thread): no handler
            pass


def uninstall() -> None:
    for sig, h in list(_previous.items()):
        try:
            signal.signal(sig, h)
        except ValueError:
            pass
    _previous.clear()


def agreed() -> bool:
    """Whether any rank has a stop signal; the same answer on every rank."""
    global requested
    if not dist_utils.is_dist():
        return requested is not None
    flag = torch.tensor([1.0 if requested is not None else 0.0], device=dist_utils.env().device)
    dist_utils.all_reduce_sum(flag)
    if flag.item() > 0 and requested is None:
        requested = "a stop signal on another rank"
    return flag.item() > 0


def ignore_in_worker(_worker_id: int) -> None:
    """DataLoader worker_init_fn: the main process decides when workers end."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
