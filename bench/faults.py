"""Soak test: SIGKILL a CPU training run at random steps (checkpoint writes included), resume each time with
--resume latest, and compare with an uninterrupted run: same pair order (logged keys), same parameters, same FastCLIP
estimators. The shards carry injected faults (corrupt JPEGs, bad captions, missing json, a truncated tar) whose
counts must come back exactly. Prints one table.

    python bench/faults.py [--kills 5] [--seed 0] [--workdir /tmp/fastclip_soak]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import torch

def _load_fixtures():
    """The test suite's shard writer (tests/shard_fixtures.py), loaded from its file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("shard_fixtures", ROOT / "tests" / "shard_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


write_shards = _load_fixtures().write_shards

MAIN = str(ROOT / "src" / "training" / "main.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/fastclip_soak")
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    n_pairs = 48 * 2 * 2
    faults = {}
    picks = rng.sample(range(n_pairs - 32), 14)  # the last shard is truncated instead
    for k in picks[:10]:
        faults[k] = "bad_image"   # ~5% corrupt JPEGs
    faults[picks[10]] = faults[picks[11]] = "caption_not_utf8"
    faults[picks[12]] = "empty_caption"
    faults[picks[13]] = "missing_json"
    info = write_shards(str(work / "shards"), num_ids=48, shard_size=16, corrupt=faults)
    last = Path(info["shards"][-1])
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    injected = Counter(faults.values())
    injected["truncated_shard"] = 1
    epochs = 3  # every epoch meets each fault once, and counts it once

    args = ["--train-data", info["dir"], "--model", "PersonTiny", "--batch-size", "8", "--workers", "2",
            "--epochs", "3", "--logs-dir", str(work / "logs"), "--warmup", "5", "--loss", "fastclip-v3",
            "--log-keys", "--save-every-n-steps", "1", "--log-every-n-steps", "1000"]
    subprocess.run([sys.executable, MAIN, *args, "--name", "clean"], env=ENV, check=True, capture_output=True)
    clean = work / "logs" / "clean"
    total_steps = json.load(open(clean / "summary.json"))["global_step"]

    kill_steps = sorted(rng.sample(range(2, total_steps - 2), a.kills))
    killed_at, during_write = [], 0
    latest = work / "logs" / "soak" / "checkpoints" / "latest.pt"
    for target in kill_steps + [None]:
        p = subprocess.Popen([sys.executable, MAIN, *args, "--name", "soak", "--resume", "latest"], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if target is None:
            p.wait()
            break
        while p.poll() is None:
            try:
                step = torch.load(latest, weights_only=True)["step"] if latest.exists() else 0
            except Exception:
                step = 0
            if step >= target:
                break
            time.sleep(0.02)
        # Aim some kills at the checkpoint write itself: wait for a temporary file to appear.
        if len(killed_at) % 2 == 1:
            t_end = time.time() + 5
            while time.time() < t_end and p.poll() is None:
                if any(n.startswith(".latest.pt.tmp") for n in os.listdir(latest.parent)):
                    during_write += 1
                    break
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait()
            killed_at.append(target)

    soak = work / "logs" / "soak"
    a_ck = torch.load(clean / "checkpoints" / "epoch_3.pt", weights_only=True)
    b_ck = torch.load(soak / "checkpoints" / "epoch_3.pt", weights_only=True)
    max_param_diff = max(float((a_ck["state_dict"][k] - b_ck["state_dict"][k]).abs().max()) for k in a_ck["state_dict"])
    max_est_diff = max(float((a_ck["loss"][k] - b_ck["loss"][k]).abs().max())
                       for k in ("u1", "u2") if k in a_ck["loss"])
    full = [json.loads(l) for l in open(clean / "keys_rank0.jsonl")]
    by_step = {}
    for l in open(soak / "keys_rank0.jsonl"):
        r = json.loads(l)
        by_step[r["step"]] = r["keys"]
    order_equal = [by_step.get(r["step"]) for r in full] == [r["keys"] for r in full]
    lost = repeated = 0
    for epoch in range(3):
        seen_clean = Counter(k for r in full if r["epoch"] == epoch for k in r["keys"])
        seen_soak = Counter(k for s, keys in by_step.items() for r in full if r["step"] == s and r["epoch"] == epoch
                            for k in keys)
        lost += sum(1 for k in seen_clean if k not in seen_soak)
        repeated += sum(max(0, seen_soak[k] - seen_clean[k]) for k in seen_soak)
    counted = json.load(open(soak / "summary.json"))["bad_samples"]
    counted = {k: v for k, v in counted.items() if ":" not in k}
    rows = [
        ("kills (SIGKILL) survived", len(killed_at), f"at steps {killed_at}, {during_write} during a checkpoint write"),
        ("steps", total_steps, "3 epochs, batch 8, 2 workers"),
        ("same pair order as uninterrupted", order_equal, ""),
        ("pairs lost / repeated vs uninterrupted", f"{lost} / {repeated}", ""),
        ("max |param diff|", f"{max_param_diff:.3g}", ""),
        ("max |estimator diff|", f"{max_est_diff:.3g}", "u1, u2"),
        ("faults injected (in the shards)", dict(sorted(injected.items())), f"met once per epoch, {epochs} epochs"),
        ("faults counted (whole run)", dict(sorted(counted.items())), ""),
    ]
    print("| check | value | note |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    ok = order_equal and lost == 0 and repeated == 0 and max_param_diff == 0 and \
        {k: v * epochs for k, v in injected.items()} == counted
    print("SOAK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
