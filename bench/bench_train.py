"""End-to-end training throughput: our trainer (src/training/main.py) reading shards from disk, with InfoNCE
(`openclip`) and FastCLIP-v3, against open_clip's own trainer `open_clip_train` 3.3.0 on the same shards, same model,
per-GPU batch, precision and number of loader workers, in the same run. Prints one markdown table, writes JSON.

    bash bench/peer_env.sh                     # once: isolated venv with open_clip_train + webdataset 0.2.86
    python bench/bench_train.py --shards shards/bench_50k --model ViT-B-16 --image-size 384 128 \
        --batch-size 256 --workers 12 --precision amp_bf16 --warmup-steps 20 --steps 100
    OMP_NUM_THREADS=1 python bench/bench_train.py --shards /tmp/bench_synth --model PersonTiny --image-size 64 32 \
        --batch-size 32 --workers 1 --warmup-steps 5 --steps 20 --precision fp32          # CPU smoke test

How it measures. Each configuration is a fresh child process, started through a tiny launcher (``_LAUNCHER``) that
runs the trainer unchanged (``runpy``) and, at exit, writes the process's CUDA peak memory; for the peer it first
registers our model configs (``PersonTiny``) with open_clip. Throughput comes from each trainer's own log, over the
steps after ``--warmup-steps`` only:

* ours: ``train_log.jsonl`` windows of ``--log-every-n-steps`` steps (``samples_per_s``, ``data_time_share``);
* peer: its ``Train Epoch: ... Data (t): D Batch (t): T, ...`` lines (window means of data wait and whole-iteration
  time, 3 decimals), which it writes at iterations 0, L, 2L, ...; it runs ``warmup + steps + 1`` iterations so its
  measured windows hold the same number of steps (``--train-num-samples`` sets the epoch; it has no ``--max-steps``).

As a cross-check independent of either trainer's accounting, the bench also timestamps the log lines as they arrive
on the child's stdout and reports ``wall samples/s`` between the first and last measured log line.
MFU = samples/s x FLOPs per sample / peak, with FLOPs per sample counted once here on CPU by
``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward of the model. Attention runs through the
math SDPA backend so it decomposes into counted matmuls: model FLOPs only, without the recomputation of QK^T that
the fused kernels' backward formula adds (ViT-B-16 at 384x128: 120.8 GFLOP per sample, 121.6 with it).
Peak memory: ``peak_mem_mib`` of ours' ``train_log.jsonl`` when present, else the launcher's
``torch.cuda.max_memory_allocated``; on CPU the max RSS of the trainer process (``os.wait4``). The shards are read
once before the runs so every trainer finds them in the page cache.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUR_MAIN = ROOT / "src" / "training" / "main.py"
MODEL_CONFIG_DIR = ROOT / "src" / "fast_clip" / "model_configs"
DEFAULT_PEER_PYTHON = ROOT / "bench" / ".peer_venv" / "bin" / "python"
# Dense bf16 matrix rate of an H100/H200 SXM as measured on this project's GPU machine (8192^3 bf16 matmul on random
# data: 769-798 TFLOP/s on an H200; the datasheet's ~990 is not reached by any real kernel). MFU is against this.
HOPPER_BF16_TFLOPS = 790.0

# Run inside each child: `python -c _LAUNCHER script|module TARGET ARGS...`. The trainer runs unchanged as __main__.
_LAUNCHER = r"""
import json, os, runpy, sys
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target] + sys.argv[3:]
if os.environ.get("BENCH_MODEL_CONFIG_DIR"):
    import open_clip
    open_clip.add_model_config(os.environ["BENCH_MODEL_CONFIG_DIR"])
try:
    if kind == "script":
        runpy.run_path(target, run_name="__main__")
    else:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
finally:
    rec = {}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        rec = {"cuda_max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
               "cuda_max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
    with open(os.environ["BENCH_MEM_FILE"], "w") as f:
        json.dump(rec, f)
"""

# open_clip_train 3.3.0, train.py: f"Train Epoch: {epoch} [{num_samples:>{digits}}/{samples_per_epoch} ({pct:.0f}%)] "
# f"Data (t): {data_time_m.avg:.3f} Batch (t): {batch_time_m.avg:.3f}, {sps:#g}/s, {sps_gpu:#g}/s/gpu LR: ..."
PEER_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) \(\s*\d+%\)\] Data \(t\): ([0-9.]+) "
                       r"Batch \(t\): ([0-9.]+), ([0-9.e+-]+)/s, ([0-9.e+-]+)/s/gpu")
# Our console line (training/observers.py StepLog): "... | epoch E step S (b/n) loss ..."
OUR_LINE = re.compile(r"\| epoch (\d+) step (\d+) \((\d+)/(\d+)\)")


# ---------------------------------------------------------------------------------------------------------- inputs
def find_split(shards: str) -> Path:
    d = Path(shards)
    for cand in (d / "train", d):
        if (cand / "sizes.json").is_file():
            return cand
    raise SystemExit(f"error: --shards {shards!r}: no sizes.json in {d / 'train'} or {d} "
                     f"(make shards with data_prep/make_shards.py; see docs/DATA.md)")


def read_sizes(split: Path) -> list[tuple[str, int]]:
    with open(split / "sizes.json") as f:
        sizes = json.load(f)
    shards = sorted((name, int(n)) for name, n in sizes.items() if name.endswith(".tar"))
    missing = [name for name, _ in shards if not (split / name).is_file()]
    if not shards or missing:
        raise SystemExit(f"error: {split / 'sizes.json'} lists {len(shards)} shards; missing on disk: {missing[:5]}")
    return shards


def peer_urls(split: Path, shards: list[tuple[str, int]]) -> str:
    """A brace range when the names are PREFIX-000000.tar ... contiguous (open_clip's own style), else '::'-joined."""
    names = [n for n, _ in shards]
    m = [re.fullmatch(r"(.*?)(\d+)\.tar", n) for n in names]
    if all(m) and len({x.group(1) for x in m}) == 1 and len({len(x.group(2)) for x in m}) == 1:
        nums = [int(x.group(2)) for x in m]
        width = len(m[0].group(2))
        if nums == list(range(nums[0], nums[0] + len(nums))):
            if len(nums) == 1:
                return str(split / names[0])
            return f"{split}/{m[0].group(1)}{{{nums[0]:0{width}d}..{nums[-1]:0{width}d}}}.tar"
    return "::".join(str(split / n) for n in names)


def warm_page_cache(split: Path, shards) -> float:
    total = 0
    for name, _ in shards:
        with open(split / name, "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total / 2**20


def log_every_for(warmup: int, steps: int) -> int:
    """The largest L <= 10 dividing both: log windows then never straddle the end of warm-up or of the run."""
    g = math.gcd(warmup, steps)
    return max(d for d in range(1, min(g, 10) + 1) if g % d == 0)


def peer_capacity_ok(shards, batch: int, workers: int, needed: int) -> tuple[bool, str]:
    """open_clip_train splits the (shuffled) shards over its workers and gives each worker ceil(batches / W) batches;
    a worker holding too few pairs ends early and the epoch comes up short. Check the worst case."""
    w = max(1, workers)
    if workers > 0 and len(shards) < workers:
        return False, (f"open_clip_train needs at least one shard per loader worker ({len(shards)} shards, "
                       f"--workers {workers}): make more, smaller shards (make_shards.py --maxcount)")
    per_worker = math.ceil(needed / w)
    smallest = sorted(n for _, n in shards)[: len(shards) // w]
    if sum(smallest) // batch < per_worker:
        return False, (f"open_clip_train: the worst-placed of {w} workers may hold only {sum(smallest)} pairs "
                       f"({sum(smallest) // batch} batches of {batch}) but each worker must give {per_worker}; "
                       f"use more pairs, fewer --workers or fewer --steps")
    return True, ""


# ---------------------------------------------------------------------------------------------------------- FLOPs
def flops_per_sample(model_name: str, image_size, batch: int = 2) -> float:
    """FLOPs of one training step (forward + backward, no optimizer) per sample, counted on CPU."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fast_clip.model import create_model, get_tokenizer

    torch.manual_seed(0)
    model = create_model(model_name, image_size=tuple(image_size), device="cpu").train()
    texts = get_tokenizer(model_name)(["a man in a red jacket and blue jeans carrying a black backpack"] * batch)
    images = torch.randn(batch, 3, *image_size)
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        out = model(images, texts)
        if isinstance(out, dict):
            img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        else:
            img, txt, scale = out[:3]
        logits = scale * img @ txt.t()
        labels = torch.arange(batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        loss.backward()
    return counter.get_total_flops() / batch


# ---------------------------------------------------------------------------------------------------------- runs
_LIVE: set[int] = set()  # process groups of running trainer children


def _stop_children(signum, _frame):
    """SIGTERM/SIGINT (e.g. bench/gpu_check.py's time limit): the trainers run in their own sessions, so take them
    down with us instead of leaving them on the GPU."""
    for pgid in list(_LIVE):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)


class Run:
    """One trainer child: stdout+stderr timestamped line by line as they arrive, and copied to a file."""

    def __init__(self, name: str, cmd: list[str], env: dict, console_path: Path, mem_path: Path, timeout: float):
        self.name, self.cmd, self.console_path, self.mem_path = name, cmd, console_path, mem_path
        self.lines: list[tuple[float, str]] = []
        t_start = time.perf_counter()
        with open(console_path, "w") as console:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    bufsize=1, cwd=str(ROOT), start_new_session=True)

            def reader():
                for line in proc.stdout:
                    self.lines.append((time.perf_counter(), line.rstrip("\n")))
                    console.write(line)
                    console.flush()

            _LIVE.add(proc.pid)
            th = threading.Thread(target=reader, daemon=True)
            th.start()
            timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
            timer.start()
            try:
                _, status, usage = os.wait4(proc.pid, 0)
            finally:
                timer.cancel()
                _LIVE.discard(proc.pid)
            proc.returncode = os.waitstatus_to_exitcode(status)
            th.join(timeout=30)
        self.returncode = proc.returncode
        self.timed_out = self.returncode == -signal.SIGKILL and time.perf_counter() - t_start >= timeout
        self.wall_s = time.perf_counter() - t_start
        self.max_rss_mib = usage.ru_maxrss / 1024  # KiB on Linux: the trainer process (its largest, loader incl.)
        try:
            self.mem = json.loads(mem_path.read_text())
        except (OSError, ValueError):
            self.mem = {}

    def tail(self, n: int = 15) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def child_env(extra: dict, pythonpath: str | None = None) -> dict:
    """pythonpath, when given, replaces PYTHONPATH (the peer runs from its own package target, which must not see
    ours: its webdataset is 0.2.86, ours 1.0.2)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("BENCH_MODEL_CONFIG_DIR", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    env.update(extra)
    return env


def summarise(windows, batch: int, warm_end: int, run_end: int, wall_marks, peak, peak_source, run: Run) -> dict:
    """windows: (first step, last step, seconds, data seconds) per log window, steps counted from 1."""
    meas = [w for w in windows if w[0] > warm_end and w[1] <= run_end]
    n_steps = sum(w[1] - w[0] + 1 for w in meas)
    if n_steps != run_end - warm_end:
        raise RuntimeError(f"{run.name}: its log covers {n_steps} of the {run_end - warm_end} measured steps "
                           f"(exit code {run.returncode}{', killed after --timeout' if run.timed_out else ''}); console log {run.console_path}:\n{run.tail()}")
    secs = sum(w[2] for w in meas)
    data = sum(w[3] for w in meas)
    rec = {"measured_steps": n_steps, "samples_per_s": n_steps * batch / secs, "data_wait_share": data / secs,
           "step_ms": 1e3 * secs / n_steps, "compute_ms": 1e3 * (secs - data) / n_steps,
           "peak_mem_mib": peak, "peak_mem_source": peak_source, "exit_code": run.returncode,
           "wall_s": run.wall_s, "console_log": str(run.console_path), "command": readable(run.cmd)}
    if warm_end in wall_marks and run_end in wall_marks and wall_marks[run_end] > wall_marks[warm_end]:
        rec["wall_samples_per_s"] = n_steps * batch / (wall_marks[run_end] - wall_marks[warm_end])
    else:
        rec["wall_samples_per_s"] = None
    return rec


def readable(cmd: list[str]) -> str:
    """The trainer's command without the launcher: python SCRIPT ARGS or python -m MODULE ARGS."""
    import shlex
    kind, target, args = cmd[3], cmd[4], cmd[5:]
    return shlex.join([cmd[0], *(["-m", target] if kind == "module" else [target]), *args])


def peak_of(run: Run, logged=None) -> tuple[float, str]:
    if logged is not None:
        return logged, "train_log peak_mem_mib"
    if "cuda_max_allocated_mib" in run.mem:
        return run.mem["cuda_max_allocated_mib"], "cuda max allocated"
    return run.max_rss_mib, "max RSS"


def run_ours(a, split: Path, loss: str, log_every: int, logs: Path) -> dict:
    name = f"ours-{loss}"
    total = a.warmup_steps + a.steps
    cmd = [sys.executable, "-c", _LAUNCHER, "script", str(OUR_MAIN),
           "--train-data", str(split), "--model", a.model, "--image-size", *map(str, a.image_size),
           "--batch-size", str(a.batch_size), "--workers", str(a.workers), "--precision", a.precision,
           "--loss", loss, "--epochs", "1", "--max-steps", str(total), "--lr", str(a.lr), "--warmup", "10",
           "--seed", "0", "--log-every-n-steps", str(log_every), "--logs-dir", str(logs), "--name", name]
    if a.torchcompile:
        cmd += ["--torchcompile", "--torchcompile-backend", a.torchcompile_backend]
    run = Run(name, cmd, child_env({"BENCH_MEM_FILE": str(logs / f"{name}.mem.json")}),
              logs / f"{name}.console.log", logs / f"{name}.mem.json", a.timeout)
    records = []
    log_path = logs / name / "train_log.jsonl"
    if log_path.is_file():
        records = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
    records = [r for r in records if r.get("kind") == "train" and "samples_per_s" in r]
    windows, prev = [], 0
    for r in records:
        step = int(r["step"])
        secs = (step - prev) * a.batch_size / r["samples_per_s"]
        windows.append((prev + 1, step, secs, secs * r["data_time_share"]))
        prev = step
    marks = {}
    for t, line in run.lines:
        m = OUR_LINE.search(line)
        if m:
            marks[int(m.group(2))] = t
    logged_peaks = [r["peak_mem_mib"] for r in records if r.get("peak_mem_mib") is not None]
    peak, src = peak_of(run, max(logged_peaks) if logged_peaks else None)
    rec = summarise(windows, a.batch_size, a.warmup_steps, total, marks, peak, src, run)
    rec.update(trainer="ours", loss=loss, log=str(log_path))
    return rec


def run_peer(a, split: Path, shards, log_every: int, logs: Path) -> dict:
    name = "open_clip_train"
    total = a.warmup_steps + a.steps + 1  # it logs at iterations 0, L, 2L, ...: one more to close the last window
    cmd = [str(a.peer_python), "-c", _LAUNCHER, "module", "open_clip_train.main",
           "--train-data", peer_urls(split, shards), "--train-num-samples", str(total * a.batch_size),
           "--dataset-type", "webdataset", "--batch-size", str(a.batch_size), "--workers", str(a.workers),
           "--model", a.model, "--force-image-size", *map(str, a.image_size), "--precision", a.precision,
           "--epochs", "1", "--lr", str(a.lr), "--warmup", "10", "--seed", "0",
           "--log-every-n-steps", str(log_every), "--logs", str(logs), "--name", name, "--save-frequency", "0"]
    if a.torchcompile:
        cmd.append("--torchcompile")
    env = child_env({"BENCH_MEM_FILE": str(logs / f"{name}.mem.json"), "BENCH_MODEL_CONFIG_DIR": str(MODEL_CONFIG_DIR)},
                    a.peer_pythonpath)
    run = Run(name, cmd, env, logs / f"{name}.console.log", logs / f"{name}.mem.json", a.timeout)
    out_log = logs / name / "out.log"
    text = out_log.read_text() if out_log.is_file() else "\n".join(l for _, l in run.lines)
    windows, prev = [], 0
    for m in PEER_LINE.finditer(text):
        count = int(m.group(2)) // a.batch_size  # iterations done (single process, no accumulation)
        n = count - prev
        if n <= 0:
            continue
        data_avg, batch_avg = float(m.group(4)), float(m.group(5))
        windows.append((prev + 1, count, n * batch_avg, n * data_avg))
        prev = count
    marks = {}
    for t, line in run.lines:
        m = PEER_LINE.search(line)
        if m:
            marks[int(m.group(2)) // a.batch_size] = t
    peak, src = peak_of(run)
    # measured: iterations warmup+2 .. warmup+steps+1 (the first `warmup + 1` are warm-up)
    rec = summarise(windows, a.batch_size, a.warmup_steps + 1, total, marks, peak, src, run)
    rec.update(trainer="open_clip_train", loss="openclip (ClipLoss)", log=str(out_log))
    return rec


# ---------------------------------------------------------------------------------------------------------- report
def fmt(v, spec, none="n/a"):
    return none if v is None else format(v, spec)


def table(rows: list[dict], peer: dict | None) -> str:
    head = ("| trainer | loss | samples/s | x peer | wall samples/s | MFU | data wait | peak mem (MiB) | step ms | "
            "compute ms |")
    out = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['trainer']} | {r['loss']} | failed: {r['error'][:80]} |" + " |" * 7)
            continue
        ratio = r["samples_per_s"] / peer["samples_per_s"] if peer else None
        out.append(f"| {r['trainer']} | {r['loss']} | {r['samples_per_s']:.1f} | {fmt(ratio, '.2f')} | "
                   f"{fmt(r['wall_samples_per_s'], '.1f')} | {fmt(r['mfu'], '.1%')} | {r['data_wait_share']:.1%} | "
                   f"{r['peak_mem_mib']:.0f} ({r['peak_mem_source']}) | {r['step_ms']:.1f} | {r['compute_ms']:.1f} |")
    return "\n".join(out)


def device_info() -> dict:
    import torch
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return {"device": "cuda", "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1)}
    return {"device": "cpu", "name": f"CPU, {os.cpu_count()} cores", "torch_threads": torch.get_num_threads()}


def peer_versions(peer_python: Path, pythonpath: str | None = None) -> dict:
    code = ("import importlib.metadata as m, json; import open_clip_train.main; "
            "print(json.dumps({k: m.version(k) for k in ('torch', 'open_clip_torch', 'webdataset')}))")
    p = subprocess.run([str(peer_python), "-c", code], capture_output=True, text=True, env=child_env({}, pythonpath))
    if p.returncode != 0:
        raise SystemExit(f"error: the peer environment {peer_python} cannot import open_clip_train:\n"
                         f"{p.stderr[-2000:]}\nre-create it with: bash bench/peer_env.sh")
    return json.loads(p.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shards", required=True, help="make_shards.py output (DIR/train/sizes.json) or a split folder.")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model name (PersonTiny for CPU).")
    p.add_argument("--image-size", type=int, nargs=2, default=[384, 128], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=256, help="Per-GPU (per-process) batch.")
    p.add_argument("--workers", type=int, default=12, help="Data loader workers, the same for every trainer.")
    p.add_argument("--steps", type=int, default=100, help="Measured optimizer steps.")
    p.add_argument("--warmup-steps", type=int, default=20, help="Steps run first and excluded from the figures.")
    p.add_argument("--precision", choices=["amp_bf16", "fp32"], default="amp_bf16")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help=f"Peak of the device for MFU; default {HOPPER_BF16_TFLOPS} (H100/H200 bf16 dense, measured) on CUDA, "
                        "none (MFU n/a) on CPU.")
    p.add_argument("--losses", nargs="+", default=["openclip", "fastclip-v3"], help="Our loss variants to run.")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True, help="Also run open_clip_train.")
    p.add_argument("--peer-python", type=Path, default=DEFAULT_PEER_PYTHON,
                   help="Python of the peer environment (bash bench/peer_env.sh).")
    p.add_argument("--peer-pythonpath", default=None,
                   help="PYTHONPATH for the peer instead of ours: a `pip install --target` folder holding open_clip_torch "
                        "and webdataset 0.2.86 (bench/gpu_check.sh), with --peer-python the same interpreter as ours.")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--torchcompile", action="store_true", help="Pass --torchcompile to both trainers.")
    p.add_argument("--torchcompile-backend", default="inductor",
                   help="Our trainer's torch.compile backend (the peer always uses inductor).")
    p.add_argument("--timeout", type=float, default=1800, help="Seconds per trainer run before it is killed.")
    p.add_argument("--logs", type=Path, default=ROOT / "bench" / "results" / "bench_train" / "logs",
                   help="Run folders go to LOGS/<timestamp>/.")
    p.add_argument("--keep-checkpoints", action="store_true", help="Keep the checkpoints the trainers write at the end.")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_train" / "results.json")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup_steps < 1:
        p.error("--steps and --warmup-steps must be >= 1")
    if a.batch_size < 1 or a.workers < 0:
        p.error("--batch-size must be >= 1 and --workers >= 0")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_children)
    split = find_split(a.shards)
    shards = read_sizes(split)
    n_pairs = sum(n for _, n in shards)
    total = a.warmup_steps + a.steps
    if n_pairs // a.batch_size < total:
        raise SystemExit(f"error: {n_pairs} pairs give {n_pairs // a.batch_size} batches of {a.batch_size}; "
                         f"--warmup-steps + --steps = {total} need more pairs")
    if a.peer:
        if not a.peer_python.exists():
            print(f"error: no peer environment at {a.peer_python}.\n"
                  f"Create it (once, a few minutes) with:\n\n    bash bench/peer_env.sh\n\n"
                  f"or pass --peer-python PATH, or --no-peer to run our trainer only.", file=sys.stderr)
            return 2
        ok, why = peer_capacity_ok(shards, a.batch_size, a.workers, total + 1)
        if not ok:
            raise SystemExit(f"error: {why}")
        versions = peer_versions(a.peer_python, a.peer_pythonpath)
    else:
        versions = None
    dev = device_info()
    peak_tflops = a.peak_tflops if a.peak_tflops is not None else (HOPPER_BF16_TFLOPS if dev["device"] == "cuda" else None)
    if dev["device"] == "cpu" and a.precision == "amp_bf16":
        print("note: on CPU our trainer runs amp_bf16 as fp32 but open_clip_train autocasts to bf16; "
              "use --precision fp32 for a like-for-like CPU run", file=sys.stderr)

    log_every = log_every_for(a.warmup_steps, a.steps)
    logs = a.logs / time.strftime("%Y%m%d-%H%M%S")
    logs.mkdir(parents=True, exist_ok=False)
    t0 = time.perf_counter()
    fl = flops_per_sample(a.model, a.image_size)
    flop_s = time.perf_counter() - t0
    cached = warm_page_cache(split, shards)
    print(f"# bench_train: {a.model} {a.image_size[0]}x{a.image_size[1]}, batch {a.batch_size}, {a.workers} workers, "
          f"{a.precision}, {a.warmup_steps} warm-up + {a.steps} measured steps (log every {log_every})", flush=True)
    print(f"device: {dev['name']} | shards: {split} ({len(shards)} shards, {n_pairs} pairs, {cached:.0f} MiB read "
          f"into the page cache) | {fl / 1e9:.2f} GFLOP per sample per step (counted in {flop_s:.1f}s) | peak "
          f"{fmt(peak_tflops, '.0f')} TFLOP/s | peer: {versions or 'off'} | logs: {logs}", flush=True)

    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
              "device": dev, "peak_tflops": peak_tflops, "flops_per_sample": fl, "shards": str(split),
              "num_shards": len(shards), "num_pairs": n_pairs, "log_every": log_every, "peer_versions": versions,
              "logs": str(logs), "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": []}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    jobs = [(f"ours, loss {loss}", "ours", loss, lambda loss=loss: run_ours(a, split, loss, log_every, logs))
            for loss in a.losses]
    if a.peer:
        jobs.append(("open_clip_train", "open_clip_train", "openclip (ClipLoss)",
                     lambda: run_peer(a, split, shards, log_every, logs)))
    rows = result["rows"]
    for title, trainer, loss, job in jobs:
        print(f"... {title}", flush=True)
        try:
            rows.append(job())
        except RuntimeError as e:  # one failed or killed trainer must not lose the figures of the others
            print(f"error: {title}: {e}", file=sys.stderr, flush=True)
            rows.append({"trainer": trainer, "loss": loss, "error": str(e).splitlines()[0]})
        finish_rows(rows, fl, peak_tflops)
        a.out.write_text(json.dumps(result, indent=2))  # after every trainer: a later overrun loses nothing
    if not a.keep_checkpoints:
        for ck in logs.glob("*/checkpoints"):
            shutil.rmtree(ck, ignore_errors=True)

    peer = next((r for r in rows if r["trainer"] == "open_clip_train" and "error" not in r), None)
    print()
    print(table(rows, peer))
    ratio = v3_ratio(rows)
    if ratio:
        print(f"\nFastCLIP-v3 vs InfoNCE (ours): step time {ratio['step'] - 1:+.1%}, "
              f"compute time {ratio['compute'] - 1:+.1%}")
    print(f"\nwrote {a.out}")
    return 0 if all("error" not in r for r in rows) else 1


def finish_rows(rows: list[dict], fl: float, peak_tflops: float | None) -> None:
    """MFU and the ratios to the peer, for the rows measured so far."""
    peer = next((r for r in rows if r["trainer"] == "open_clip_train" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            continue
        r["mfu"] = r["samples_per_s"] * fl / (peak_tflops * 1e12) if peak_tflops else None
        r["ratio_to_peer"] = r["samples_per_s"] / peer["samples_per_s"] if peer else None
        if peer and r["wall_samples_per_s"] and peer["wall_samples_per_s"]:
            r["wall_ratio_to_peer"] = r["wall_samples_per_s"] / peer["wall_samples_per_s"]


def v3_ratio(rows: list[dict]) -> dict | None:
    """FastCLIP-v3 over InfoNCE, our trainer: step and compute time ratios (None unless both ran)."""
    by_loss = {r["loss"]: r for r in rows if r["trainer"] == "ours" and "error" not in r}
    if "openclip" in by_loss and "fastclip-v3" in by_loss:
        o, f = by_loss["openclip"], by_loss["fastclip-v3"]
        return {"step": f["step_ms"] / o["step_ms"], "compute": f["compute_ms"] / o["compute_ms"]}
    return None


if __name__ == "__main__":
    sys.exit(main())
