"""Graceful stop on SIGTERM / SIGINT (SLURM's warning before a kill, torchrun stopping its workers, Ctrl-C).

The handler only records the signal; the epoch loop asks after every step whether *any* rank has one (an all-reduce
of a flag), so all ranks finish the same step, write latest.pt together and exit cleanly, and ``--resume latest``
continues exactly there. A second Ctrl-C interrupts at once. Data-loader workers ignore both signals: a job-wide
SIGTERM (SLURM signals every process of the step) must not kill them before the main process has saved.

A rank whose launcher dies stops the same way: torchrun starts each rank in a session of its own, so `kill -9` of the
launcher's process group (a closed terminal, a tmux kill, a container stop) leaves the ranks running, parented to
init, training and holding the run's lock. On Linux each rank asks the kernel for SIGTERM when its parent dies.

Where there is no step to finish, a signal does not wait for one: while the run is being built, and while the main
process waits for the loader's next batch (workers blocked on a server that does not answer), the handler raises
:class:`Interrupted` at once (:func:`interruptible`, :func:`batches`), so a stop takes seconds, not a read timeout.
With several ranks a waiting rank first gives its batch ``GRACE_S`` to come: the others may be inside a step that
needs it, and a healthy run should still stop after a step with latest.pt written.
"""
from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager

import torch

from training import distributed as dist_utils

requested: str | None = None  # name of the first stop signal received in this process
_previous: dict = {}
_waiting = False  # inside interruptible(): no step in flight
GRACE_S = 10.0  # well inside torchrun's 30 s between its SIGTERM and SIGKILL


class Interrupted(BaseException):
    """A stop signal while nothing was in flight to finish. A BaseException, like KeyboardInterrupt: the libraries it
    passes through (fsspec, the DataLoader's queue reads) catch Exception."""


def _handler(signum, frame):
    global requested
    if requested is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: stop now
    requested = signal.Signals(signum).name
    if _waiting:
        _interrupt()


def _interrupt() -> None:
    if dist_utils.is_dist():
        signal.setitimer(signal.ITIMER_REAL, GRACE_S)  # _alarm then raises, if this rank still waits
    else:
        raise Interrupted(requested)


def _alarm(signum, frame):
    if _waiting:
        raise Interrupted(requested)


@contextmanager
def interruptible():
    """Within: a stop signal (or one already received) raises :class:`Interrupted`: at once in one process, after
    ``GRACE_S`` with several ranks unless the block is left before."""
    global _waiting
    if requested is not None:
        _interrupt()
    _waiting = True
    try:
        yield
    finally:
        _waiting = False
        if requested is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)  # the grace's alarm, if any: not waiting any more


def batches(loader):
    """The loader's batches, each waited for :func:`interruptible`-ly."""
    it = iter(loader)
    while True:
        with interruptible():
            batch = next(it, None)
        if batch is None:
            return
        yield batch


_atexit_registered = False


def kill_workers() -> None:
    """Loader workers ignore SIGTERM, and multiprocessing's own exit handler ends daemonic children with SIGTERM
    and then waits for them: after an exception whose traceback still holds a loader iterator, that would wait for
    ever. This handler (registered later, so it runs first) kills what is left; the trainer calls it too when it
    gives up waiting for workers blocked on I/O (the DataLoader would wait 5 s for each)."""
    import multiprocessing as mp
    # torch's SIGCHLD handler would raise in the middle of this on the first killed worker
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = mp.active_children()
    for p in children:
        p.kill()
    for p in children:
        p.join(timeout=5)


def install() -> None:
    global requested, _atexit_registered
    requested = None
    if not _atexit_registered:
        import atexit
        atexit.register(kill_workers)
        _atexit_registered = True
    for sig, handler in ((signal.SIGTERM, _handler), (signal.SIGINT, _handler), (signal.SIGALRM, _alarm)):
        try:
            _previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a test runner thread): no handler
            return
    if os.environ.get("TORCHELASTIC_RUN_ID"):  # a torchrun child; a plain `nohup python ... &` must outlive its shell
        stop_when_parent_dies()


def stop_when_parent_dies() -> bool:
    """Have the kernel send this process SIGTERM when its parent (the launcher) dies: the handler above then stops
    the run after the current step, as on pre-emption. Linux only (prctl); False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # it died before the request: nobody will send the signal
        _handler(signal.SIGTERM, None)
    return True


def uninstall() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)  # SIGALRM's default action would end the process
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


def ignore_signals() -> None:
    """For loader workers: the main process decides when they end."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
