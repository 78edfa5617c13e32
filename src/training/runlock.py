"""One live writer per run folder: an exclusive flock on RUN/.lock, held by rank 0 for the whole run.

The OS releases a flock when the last descriptor of its open file is closed, however the process ends. Forked
data-loader workers inherit that descriptor, so each closes its copy when it starts (``close_in_child``): otherwise a
SIGKILLed trainer's workers, which linger a few seconds, would keep the run locked against its own resume.
"""
from __future__ import annotations

import os

from common import runs

_lock = None  # the open lock file of this process's run


def acquire(run_dir: str) -> str | None:
    """Take the lock; None on success, else what holds it."""
    global _lock
    import fcntl
    try:
        f = runs.open_run_file(os.path.join(run_dir, runs.LOCK), "a+")  # a planted link is refused, not truncated
    except runs.CheckpointError as e:
        return str(e)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        return (f"another live process (pid {holder}) is writing {run_dir}; wait for it or stop it, or choose "
                f"another --name")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}@{os.uname().nodename}")
    f.flush()
    _lock = f
    return None


def release() -> None:
    global _lock
    if _lock is not None:
        _lock.close()
        _lock = None


def close_in_child() -> None:
    """In a forked child: drop the inherited descriptor without releasing the parent's lock (flock belongs to the
    open file, which the parent still has open)."""
    global _lock
    if _lock is not None:
        try:
            os.close(_lock.fileno())
        except OSError:
            pass
        _lock = None
