"""Every GPU figure of the project in one prepared run (started by bench/gpu_check.sh, which installs the carried
wheels first and sets PYTHONPATH; see bench/README.md).

Steps, in order, each a child process with its own hard time limit (its process group is killed at the limit), its
result appended to steps.jsonl the moment it ends:

  env      GPU name, driver, versions of torch / open_clip / webdataset (ours and the peer's), CPU count
  shards   synthetic person shards (~50k training pairs at 384x128) with every CPU core
  tests    the CUDA-only tests (pytest -m cuda)
  train    bench/bench_train.py: ours with InfoNCE and FastCLIP-v3, and open_clip_train from its own package target
  compile  ours with --torchcompile (optional: only if its budget still fits before the deadline)
  loss     bench/bench_loss.py, loss-only forward+backward, one-matrix vs row-blocked GCL
  dga      bench/bench_dga.py, ViT-B-16 at effective batch 4096/16384 in DGA chunks (optional)

and last one summary table (summary.md), since only the end of the output may survive a cut-off. An optional step runs
only when its whole budget fits before the deadline while keeping the budgets of the required steps after it; a
required step gets at most what is left. Exit code 0 when every step that ran ended well.

    python bench/gpu_check.py                  # the GPU run (use bench/gpu_check.sh)
    python bench/gpu_check.py --cpu-smoke      # the same steps on CPU with PersonTiny and tiny shards
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from bench_train import HOPPER_BF16_TFLOPS  # noqa: E402 (bench/ is on the path: it is this script's folder)

# name -> (default budget in seconds: GPU run, CPU smoke; required?)
STEPS = {
    "env": ((30, 60), True),
    "shards": ((75, 60), True),
    "tests": ((90, 90), True),
    "train": ((210, 150), True),
    "compile": ((100, 120), False),
    "loss": ((40, 40), True),
    "dga": ((75, 60), False),
}


def settings(a) -> dict:
    """The sizes of each step: the GPU run, or the CPU dry run of the same code paths."""
    if a.cpu_smoke:
        return dict(num_ids=40, shard_hw=(128, 64), maxcount=64, model="PersonTiny", image_size=(64, 32), batch=16,
                    workers=2, warmup=2, steps=4, precision="fp32", peak=None, device="cpu",
                    loss_batches=[64, 256], loss_repeats=2, dga=["--model", "PersonTiny", "--batch", "256",
                                                               "--chunks", "1", "4"])
    return dict(num_ids=a.num_ids, shard_hw=(384, 128), maxcount=1000, model="ViT-B-16", image_size=(384, 128),
                batch=256, workers=12, warmup=a.warmup_steps, steps=a.steps, precision="amp_bf16",
                peak=HOPPER_BF16_TFLOPS, device="cuda", loss_batches=[256, 4096, 16384], loss_repeats=5,
                dga=["--model", "ViT-B-16", "--image-size", "384", "128", "--batch", "4096", "16384",
                     "--chunks", "16", "64", "--skip", "16384x16"])


class Check:
    def __init__(self, a):
        self.a = a
        self.out, self.work = a.out, a.work
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.t0 = a.t0 or time.time()
        self.deadline = self.t0 + a.total
        self.budget = {k: v[0][1 if a.cpu_smoke else 0] for k, v in STEPS.items()}
        self.budget.update(a.budget)
        self.results: dict[str, dict] = {}
        self.steps_file = self.out / "steps.jsonl"
        self.steps_file.write_text("")

    def left(self) -> float:
        return self.deadline - time.time()

    def record(self, name: str, rec: dict) -> None:
        rec = {"step": name, **rec}
        self.results[name] = rec
        with open(self.steps_file, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"[gpu_check] {name}: {rec['status']} in {rec.get('seconds', 0):.1f}s "
              f"({self.left():.0f}s left of {self.a.total:.0f})", flush=True)

    def allowance(self, name: str) -> float:
        """Seconds this step may take: its budget, cut to what the deadline leaves after the later required steps
        (for an optional step: 0 unless the whole budget fits)."""
        if STEPS[name][1]:
            return min(self.budget[name], self.left() - self.a.reserve)
        names = list(STEPS)
        later = sum(self.budget[n] for n in names[names.index(name) + 1:] if STEPS[n][1] and n in self.a.only)
        room = self.left() - later - self.a.reserve
        return self.budget[name] if room >= self.budget[name] else 0.0

    def run(self, name: str, cmd: list[str], log: Path | None = None) -> tuple[dict, list[str]]:
        """Run one step's command with a hard limit (the whole process group is killed at it); its output goes to
        our stdout (and to `log`) as it comes, and is returned as lines."""
        limit = self.allowance(name)
        if limit < 5:
            return {"status": "skipped", "why": f"no time left ({self.left():.0f}s before the deadline)"}, []
        print(f"\n[gpu_check] === {name} (limit {limit:.0f}s): {' '.join(cmd)}", flush=True)
        t = time.time()
        sink = open(log, "w") if log else None
        lines = []
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        killed = [False]

        def stop(_signum=None, _frame=None):
            # SIGTERM first (bench_train.py then takes its trainers, which run in sessions of their own, down with
            # it), SIGKILL to whatever of the group is left 3 s later
            killed[0] = True
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            for _ in range(30):
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lines.append(line.rstrip("\n"))
                if sink:
                    sink.write(line)
            proc.wait()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            if sink:
                sink.close()
        secs = time.time() - t
        status = "timeout" if killed[0] else ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})")
        return {"status": status, "seconds": secs, "limit_s": limit, "command": " ".join(cmd)}, lines


def step_env(c: Check, s: dict) -> None:
    code = r"""
import json, os, platform, subprocess, importlib.metadata as md
import torch
r = {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
     "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
for k in ("open_clip_torch", "webdataset", "torchvision", "timm", "numpy"):
    try:
        r[k] = md.version(k)
    except md.PackageNotFoundError:
        r[k] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    r.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
try:
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=20)
    r["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
except (OSError, subprocess.TimeoutExpired) as e:
    r["nvidia_smi"] = f"unavailable ({e.__class__.__name__})"
import open_clip, webdataset  # the carried wheels import
print("ENV " + json.dumps(r))
"""
    peer_code = ("import importlib.metadata as md, json; import open_clip_train.main, webdataset; "
                 "print('ENV ' + json.dumps({k: md.version(k) for k in ('open_clip_torch', 'webdataset')}))")
    rec, lines = c.run("env", [sys.executable, "-c", code])
    env_line = None
    found = [l[4:] for l in lines if l.startswith("ENV ")]
    if rec["status"] == "ok" and found:
        env_line = json.loads(found[-1])
        peer = subprocess.run([sys.executable, "-c", peer_code], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": c.a.peer_pythonpath or ""})
        if peer.returncode == 0:
            env_line["peer"] = json.loads(peer.stdout.split("ENV ", 1)[1])
        else:
            env_line["peer"] = {"error": (peer.stderr.strip().splitlines() or ["?"])[-1]}
        print("environment: " + ", ".join(f"{k}={v}" for k, v in env_line.items()), flush=True)
    c.record("env", {**rec, "env": env_line})


def step_shards(c: Check, s: dict) -> Path:
    h, w = s["shard_hw"]
    out = c.work / f"shards_{s['num_ids']}ids_{h}x{w}"
    cmd = [sys.executable, "data_prep/make_shards.py", "synthetic", "--num-ids", str(s["num_ids"]),
           "--images-per-id", "4", "--captions-per-image", "2", "--height", str(h), "--width", str(w),
           "--seed", "0", "--maxcount", str(s["maxcount"]), "--workers", str(os.cpu_count()), "--no-progress",
           "--output", str(out)]
    rec, _ = c.run("shards", cmd)
    sizes = out / "train" / "sizes.json"
    if sizes.is_file():
        n = json.loads(sizes.read_text())
        rec["train_pairs"] = sum(v for k, v in n.items() if k.endswith(".tar"))
        rec["train_shards"] = sum(1 for k in n if k.endswith(".tar"))
        rec["pairs_per_s"] = rec["train_pairs"] / max(rec["seconds"], 1e-9)
    c.record("shards", rec)
    print(f"shards: {rec.get('train_pairs', 0)} training pairs in {rec.get('train_shards', 0)} shards, "
          f"{h}x{w}, {rec['seconds']:.1f}s with {os.cpu_count()} workers (all splits)", flush=True)
    return out


def step_tests(c: Check, s: dict) -> None:
    log = c.out / "cuda_tests.txt"
    rec, _ = c.run("tests", [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "-rs",
                          "tests"], log=log)
    text = log.read_text() if log.is_file() else ""
    for word in ("passed", "failed", "skipped", "error", "deselected"):
        m = re.findall(rf"(\d+) {word}", text.splitlines()[-1] if text.strip() else "")
        rec[word] = int(m[-1]) if m else 0
    c.record("tests", rec)


def bench_train_cmd(c: Check, s: dict, shards: Path, out: Path, per_run: float, extra: list[str]) -> list[str]:
    h, w = s["image_size"]
    cmd = [sys.executable, "bench/bench_train.py", "--shards", str(shards), "--model", s["model"],
           "--image-size", str(h), str(w), "--batch-size", str(s["batch"]), "--workers", str(s["workers"]),
           "--precision", s["precision"], "--warmup-steps", str(s["warmup"]), "--steps", str(s["steps"]),
           "--timeout", f"{per_run:.0f}", "--logs", str(c.work / "logs"), "--out", str(out)]
    if s["peak"]:
        cmd += ["--peak-tflops", str(s["peak"])]
    return cmd + extra


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def step_train(c: Check, s: dict, shards: Path) -> None:
    out = c.out / "bench_train.json"
    # three trainers share the step's budget; each gets a third (less start-up of the bench itself)
    per_run = max(30.0, (c.allowance("train") - 15) / 3)
    cmd = bench_train_cmd(c, s, shards, out, per_run, ["--losses", "openclip", "fastclip-v3",
                                                       "--peer-python", sys.executable,
                                                       "--peer-pythonpath", c.a.peer_pythonpath or ""])
    rec, _ = c.run("train", cmd)
    c.record("train", {**rec, "result": str(out.name) if out.is_file() else None})


def step_compile(c: Check, s: dict, shards: Path) -> None:
    out = c.out / "bench_train_compile.json"
    per_run = max(30.0, c.allowance("compile") - 10)
    # The CPU dry run checks that the model compiles (dynamo + AOT autograd) without inductor's C++ kernel build
    # (~90 s cold on 2 cores): on the GPU inductor writes Triton kernels, a path the CPU cannot exercise anyway.
    backend = "aot_eager" if c.a.cpu_smoke else "inductor"
    rec, _ = c.run("compile", bench_train_cmd(c, s, shards, out, per_run, ["--losses", "openclip", "--no-peer",
                                                                          "--torchcompile", "--torchcompile-backend",
                                                                          backend]))
    c.record("compile", {**rec, "result": str(out.name) if out.is_file() else None})


def step_loss(c: Check, s: dict) -> None:
    out = c.out / "bench_loss.json"
    cmd = [sys.executable, "bench/bench_loss.py", "--device", s["device"], "--batch", *map(str, s["loss_batches"]),
           "--block", "both", "--repeats", str(s["loss_repeats"]), "--out", str(out)]
    if s["device"] == "cuda":
        cmd += ["--dtype", "bfloat16"]
    rec, _ = c.run("loss", cmd)
    c.record("loss", {**rec, "result": str(out.name) if out.is_file() else None})


def step_dga(c: Check, s: dict) -> None:
    out = c.out / "bench_dga.json"
    rec, _ = c.run("dga", [sys.executable, "bench/bench_dga.py", *s["dga"], "--out", str(out)])
    c.record("dga", {**rec, "result": str(out.name) if out.is_file() else None})


# ---------------------------------------------------------------------------------------------------------- summary
def summary(c: Check, s: dict) -> str:
    r = c.results
    lines = [f"# gpu_check summary ({'CPU smoke' if c.a.cpu_smoke else 'GPU run'}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {time.time() - c.t0:.0f}s of {c.a.total:.0f}s)", ""]
    env = (r.get("env") or {}).get("env") or {}
    if env:
        peer = env.get("peer", {})
        lines.append(f"environment: {env.get('gpu') or 'no GPU'} ({env.get('nvidia_smi', 'n/a')}), "
                     f"{env.get('cpus')} CPUs, python {env.get('python')}, torch {env.get('torch')} "
                     f"(CUDA {env.get('torch_cuda')}), open_clip {env.get('open_clip_torch')}, webdataset "
                     f"{env.get('webdataset')}; peer: open_clip {peer.get('open_clip_torch')}, webdataset "
                     f"{peer.get('webdataset')}{' ' + peer['error'] if 'error' in peer else ''}")
        lines.append("")
    lines += ["| step | status | seconds | figures |", "|---|---|---:|---|"]
    for name in STEPS:
        if name not in c.a.only:
            continue
        rec = r.get(name, {"status": "not run"})
        lines.append(f"| {name} | {rec['status']}{' (' + rec['why'] + ')' if 'why' in rec else ''} | "
                     f"{rec.get('seconds', 0):.1f} | {figures(c, name, rec)} |")
    bt = read_json(c.out / "bench_train.json")
    if bt and bt.get("rows"):
        fl = bt["flops_per_sample"]
        lines += ["", f"train: {s['model']} {s['image_size'][0]}x{s['image_size'][1]}, batch {s['batch']}, "
                  f"{s['precision']}, {s['workers']} workers, {s['warmup']} warm-up + {s['steps']} measured steps; "
                  f"{fl / 1e9:.1f} GFLOP/sample; MFU against "
                  f"{'%.0f TFLOP/s (bf16 dense, measured on this H200 kind, not the datasheet)' % s['peak'] if s['peak'] else 'n/a (CPU)'}",
                  "", "| trainer | loss | samples/s | x peer | MFU | data wait | peak MiB | step ms |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        rows = list(bt["rows"])
        comp = read_json(c.out / "bench_train_compile.json")
        for row in (comp or {}).get("rows", []):
            rows.append({**row, "loss": row["loss"] + " + torch.compile"})
        peer = next((x for x in rows if x["trainer"] == "open_clip_train" and "error" not in x), None)
        for x in rows:
            if "error" in x:
                lines.append(f"| {x['trainer']} | {x['loss']} | failed: {x['error'][:60]} | | | | | |")
                continue
            ratio = f"{x['samples_per_s'] / peer['samples_per_s']:.2f}" if peer else "n/a"
            mfu = f"{x['mfu']:.1%}" if x.get("mfu") is not None else "n/a"  # bench_train's, same peak
            lines.append(f"| {x['trainer']} | {x['loss']} | {x['samples_per_s']:.1f} | {ratio} | {mfu} | "
                         f"{x['data_wait_share']:.1%} | {x['peak_mem_mib']:.0f} | {x['step_ms']:.1f} |")
        ours = {x["loss"]: x for x in rows if x["trainer"] == "ours" and "error" not in x}
        if "openclip" in ours and "fastclip-v3" in ours:
            lines.append(f"\nFastCLIP-v3 / InfoNCE step time: {ours['fastclip-v3']['step_ms'] / ours['openclip']['step_ms']:.3f}"
                         f" (compute only {ours['fastclip-v3']['compute_ms'] / ours['openclip']['compute_ms']:.3f})")
        if "openclip" in ours and "openclip + torch.compile" in ours:
            lines.append(f"torch.compile / eager samples/s (InfoNCE): "
                         f"{ours['openclip + torch.compile']['samples_per_s'] / ours['openclip']['samples_per_s']:.3f}")
    bl = read_json(c.out / "bench_loss.json")
    if bl and bl.get("rows"):
        lines += ["", f"loss alone (forward+backward, D={bl['dim']}, {bl['dtype']} features, {bl['device']}):", "",
                  "| batch | loss | form | ms | peak MiB |", "|---:|---|---|---:|---:|"]
        for x in bl["rows"]:
            peak = f"{x['peak_mib']:.0f}" if x.get("peak_mib") is not None else "–"
            lines.append(f"| {x['batch']} | {x['loss']} | {x['form'] or 'auto'} | {x['ms']:.2f} | {peak} |")
    dg = read_json(c.out / "bench_dga.json")
    if dg:
        lines += ["", "DGA (one optimizer step, effective batch in chunks):", "",
                  "| batch | chunks | step s | peak MiB |", "|---:|---:|---:|---:|"]
        for x in dg:
            if "error" in x:
                lines.append(f"| {x['batch']} | {x['chunks']} | failed: {x['error'][:60]} | |")
            else:
                lines.append(f"| {x['batch']} | {x['chunks']} | {x['step_s']:.2f} | {x['peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def figures(c: Check, name: str, rec: dict) -> str:
    if name == "shards" and "train_pairs" in rec:
        return f"{rec['train_pairs']} train pairs, {rec['train_shards']} shards, {rec['pairs_per_s']:.0f} pairs/s"
    if name == "tests":
        return ", ".join(f"{rec.get(k, 0)} {k}" for k in ("passed", "failed", "skipped", "error"))
    if name == "env" and rec.get("env"):
        return f"torch {rec['env'].get('torch')}"
    if rec.get("result"):
        return rec["result"]
    return ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="CPU dry run: PersonTiny, tiny shards, a few steps.")
    p.add_argument("--total", type=float, default=None,
                   help="Wall-clock limit of the whole run in seconds, install included (default 540; 420 smoke).")
    p.add_argument("--reserve", type=float, default=10.0, help="Seconds kept for the summary.")
    p.add_argument("--budget", action="append", default=[], metavar="STEP=SECONDS",
                   help=f"Override a step's budget; defaults (GPU/smoke): "
                        f"{', '.join(f'{k}={v[0][0]}/{v[0][1]}' for k, v in STEPS.items())}.")
    p.add_argument("--only", nargs="+", default=list(STEPS), choices=list(STEPS), metavar="STEP",
                   help=f"Run only these steps ({', '.join(STEPS)}; train and compile need shards).")
    p.add_argument("--num-ids", type=int, default=7900,
                   help="Synthetic identities (x 4 images x 2 captions; ~80%% go to train: 7900 -> ~50k pairs).")
    p.add_argument("--steps", type=int, default=100, help="Measured training steps per trainer.")
    p.add_argument("--warmup-steps", type=int, default=20, help="Warm-up steps per trainer, not measured.")
    p.add_argument("--out", type=Path, default=None, help="Results folder (default $OUT, else bench/results/gpu).")
    p.add_argument("--work", type=Path, default=None,
                   help="Shards and run folders (default /tmp/gpu_check, /tmp/gpu_check_smoke for --cpu-smoke).")
    p.add_argument("--peer-pythonpath", default=os.environ.get("GPU_CHECK_PEER_SITE"),
                   help="Package target of the peer (open_clip_torch + webdataset 0.2.86).")
    p.add_argument("--t0", type=float, default=float(os.environ.get("GPU_CHECK_T0", 0)) or None,
                   help="Start time (epoch seconds) the total counts from; gpu_check.sh passes its own.")
    a = p.parse_args(argv)
    budgets = {}
    for item in a.budget:
        k, _, v = item.partition("=")
        if k not in STEPS or not v:
            p.error(f"--budget {item!r}: expected STEP=SECONDS with STEP one of {', '.join(STEPS)}")
        budgets[k] = float(v)
    a.budget = budgets
    a.total = a.total or (420.0 if a.cpu_smoke else 540.0)
    a.out = a.out or Path(os.environ.get("OUT") or ROOT / "bench" / "results" / "gpu")
    a.work = a.work or Path("/tmp/gpu_check_smoke" if a.cpu_smoke else "/tmp/gpu_check")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    c = Check(a)
    s = settings(a)
    shards = None
    if "env" in a.only:
        step_env(c, s)
    if "shards" in a.only:
        shards = step_shards(c, s)
    if "tests" in a.only:
        step_tests(c, s)
    have_shards = shards is not None and (shards / "train" / "sizes.json").is_file()
    for name, fn in (("train", step_train), ("compile", step_compile)):
        if name in a.only:
            if have_shards:
                fn(c, s, shards)
            else:
                c.record(name, {"status": "skipped", "why": "no shards"})
    if "loss" in a.only:
        step_loss(c, s)
    if "dga" in a.only:
        step_dga(c, s)
    text = summary(c, s)
    (c.out / "summary.md").write_text(text)
    print("\n" + text, flush=True)
    bad = [k for k, v in c.results.items() if v["status"] not in ("ok", "skipped")]
    if bad:
        print(f"[gpu_check] steps that did not end well: {', '.join(bad)} (details above and in {c.out})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
