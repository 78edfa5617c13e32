"""The run folder, LOGS/NAME: claimed once (a name is not reused by accident, the folder must be writable, one
process group at a time), and what ends up in it besides logs and checkpoints: params.json, summary.json, and a
fatal error's record. The folder's file names and how they are written are common/runs.py's."""
from __future__ import annotations

import json
import os
import time
from collections import Counter

from common import runs
from training import distributed as dist_utils
from training import runlock
from training.config import RunConfig


class RunFolder:
    def __init__(self, path: str, name: str):
        self.path, self.name = path, name
        self.ckpt_dir = os.path.join(path, runs.CHECKPOINTS)
        self.existed = False  # (rank 0) the folder was there before this claim
        # Set once the run is built and resumed: before that, a refused start leaves the folder's files as they were
        # (params.json and summary.json keep describing the run that wrote the checkpoints).
        self.started = False

    @classmethod
    def claim(cls, run: RunConfig) -> "RunFolder":
        """Creates LOGS/NAME on rank 0 and takes its lock; every rank gets the same folder or the same error."""
        name = run.name
        if name is None:
            name = dist_utils.broadcast_object(time.strftime("run-%Y%m%d-%H%M%S"))
        folder = cls(os.path.join(run.logs, name), name)
        problem = folder._claim(run.resume) if dist_utils.is_main() else None
        problem = dist_utils.broadcast_object(problem)  # every rank stops, none waits in a barrier for rank 0
        if problem is not None:
            raise SystemExit(f"error: {problem}")
        return folder

    def _claim(self, resume: str | None) -> str | None:
        self.existed = os.path.isdir(self.path)
        links = [n for n in runs.IN_PLACE if os.path.islink(os.path.join(self.path, n))]
        if links:  # they are appended to or truncated in place: a link would carry the writes to its target
            return (f"{self.path} holds symbolic link(s) {', '.join(links)}; a run folder's files are written in "
                    f"place, never through a link: remove them")
        held = holds_a_run(self.path) if self.existed else None
        if held and resume is None:
            # open_clip's rule: an experiment name is not reused by accident (a second run would overwrite the
            # first one's checkpoints and mix its logs)
            return (f"--name {self.name}: {self.path} already holds a run ({held}); continue it with --resume "
                    f"latest, or choose another --name")
        try:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            probe = os.path.join(self.ckpt_dir, f".write_probe.{os.getpid()}")
            if os.path.lexists(probe):
                os.remove(probe)
            with os.fdopen(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as f:
                f.write(b"x")
                f.flush()
                os.fsync(f.fileno())
            os.remove(probe)
            return runlock.acquire(self.path)
        except OSError as e:
            return (f"the log folder {self.ckpt_dir!r} is not writable ({e.strerror}); choose another --logs or "
                    f"free space before training")

    def start(self, flags: dict) -> None:
        """The run is built and resumed: from here on it writes its folder, params.json first."""
        self.started = True
        self.write_json(runs.PARAMS, flags)

    def write_json(self, name: str, obj) -> None:
        """(rank 0) One of the run's JSON files, atomically; a full disk is one error line."""
        if not dist_utils.is_main():
            return
        try:
            runs.write_json(os.path.join(self.path, name), obj)
        except runs.CheckpointError as e:
            raise SystemExit(f"error: {e}; free space, then --resume latest") from e

    def fresh_start_note(self) -> str:
        """What --resume latest says when there is nothing to resume: plainly whether the run folder is new, and the
        runs beside it (a mistyped --name shows)."""
        if self.existed:
            return f"--resume latest: {self.path} holds no checkpoint yet; starting this run from the beginning"
        logs = os.path.dirname(self.path)
        others = sorted(n for n in os.listdir(logs) if n != self.name and os.path.isdir(os.path.join(logs, n))
                        and holds_a_run(os.path.join(logs, n)))
        note = f"--resume latest: there is no run named {self.name!r} under {logs} yet; starting it fresh"
        if others:
            shown = ", ".join(others[:20]) + (f" and {len(others) - 20} more" if len(others) > 20 else "")
            note += f" (runs there: {shown}; check --name if you meant one of them)"
        return note

    def write_summary(self, status: str, progress: dict, per_rank: list[dict]) -> None:
        """The run's counters and every rank's bad-sample and per-source counts (``per_rank``), summed, in
        summary.json beside the logs."""
        if not dist_utils.is_main():
            return
        bad, sources = Counter(), Counter()
        for r in per_rank:
            bad.update(r["bad"])
            sources.update(r["sources"])
        bad, sources = dict(bad), dict(sources)
        summary = {"status": status, **progress, "bad_samples": bad, "source_counts": sources}
        self.write_json(runs.SUMMARY, summary)
        print(json.dumps({"status": status, "steps": progress["global_step"], "skipped_samples": bad,
                          "nonfinite_steps": progress["nonfinite_total"]}), flush=True)

    def record_fatal(self, message: str) -> None:
        """A run that ends in an error says so in its own folder: the message (or traceback) at the end of out.log
        and in summary.json (rank 0); the summary of an earlier run is left as it was by a start that was refused."""
        if not dist_utils.is_main():
            return
        try:
            with runs.open_run_file(os.path.join(self.path, runs.OUT_LOG)) as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} | FATAL {message.rstrip()}\n")
            path = os.path.join(self.path, runs.SUMMARY)
            if not self.started and holds_a_run(self.path):
                return  # a refused start (resume): the summary stays that of the run which wrote the checkpoints
            summary = runs.read_json(path) if os.path.isfile(path) else {}
            summary.setdefault("status", "failed")
            summary["error"] = message.rstrip().splitlines()[-1]
            runs.write_json(path, summary)
        except (OSError, runs.CheckpointError):
            pass  # the folder itself may be the problem; the error still reaches the terminal


def holds_a_run(run_dir: str) -> str | None:
    """What makes ``run_dir`` a run of its own (a checkpoint or logged steps); a failed start leaves neither."""
    ckpt_dir = os.path.join(run_dir, runs.CHECKPOINTS)
    if os.path.isdir(ckpt_dir) and any(n.endswith(".pt") for n in os.listdir(ckpt_dir)):
        return "checkpoints"
    log = os.path.join(run_dir, runs.TRAIN_LOG)
    if os.path.isfile(log) and os.path.getsize(log) > 0:
        return "logged training steps"
    return None


def tell_launcher(message: str) -> None:
    """scripts/train.sh prints the lowest rank's line of this file last, below torchrun's own failure report."""
    path = os.environ.get("FASTCLIP_ERROR_FILE")
    lines = message.rstrip().splitlines()
    if not path or not lines:
        return
    try:
        with open(f"{path}.rank{os.environ.get('RANK', '0')}", "w", encoding="utf-8") as f:
            f.write(lines[-1] + "\n")
    except OSError:
        pass
