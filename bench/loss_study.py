"""Loss study on synthetic person data (issue: FastCLIP experiment): R@1 on the held-out test identities after every
epoch, for several losses and seeds, at one global batch and a fixed number of steps. Writes a JSON of the curves, a
PNG plot (mean and min/max over seeds) and prints a table, including the share of steps each loss needs to reach
the final R@1 of `openclip`.

    python bench/loss_study.py --shards shards/demo_synth --losses openclip sogclr fastclip-v1 fastclip-v3 \
        --seeds 0 1 2 --batch-size 64 --epochs 6 --out bench/results/loss_study_b64

A loss may carry loss-flag overrides after a '+', comma-separated, to sweep one setting against a preset:
``fastclip-v3+gamma=0.8,gamma_schedule=constant`` runs the v3 preset with ``--gamma 0.8 --gamma_schedule constant``
and is reported under that label; a bare name is a switch (``openclip+id-positives,pairs-per-id=4``), and any trainer
flag can be given this way (``+id-loss=linear,id-loss-weight=0.1``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "src" / "training" / "main.py")


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """'fastclip-v3+gamma=0.8,gamma_schedule=constant' -> ('fastclip-v3', ['--gamma', '0.8', '--gamma_schedule', ...])."""
    loss, _, rest = spec.partition("+")
    flags = []
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not key:
            raise SystemExit(f"loss spec {spec!r}: override {item!r} is not flag=value or a bare flag")
        flags += [f"--{key}", value] if eq else [f"--{key}"]  # a bare name is a switch: id-positives
    return loss, flags


def run_name(spec: str, seed: int, batch: int) -> str:
    return f"{spec.replace('+', '_').replace(',', '_').replace('=', '')}-s{seed}-b{batch}"


def read_run(log: Path) -> dict:
    """Test R@1 / mAP / mINP after every epoch and the temperature (tau; the batch mean of the per-pair temperatures
    for individual_learnable) at every logged step, from a run's train_log.jsonl."""
    curve, tau, extra = [], [], {"mAP": [], "mINP": []}
    for line in open(log):
        r = json.loads(line)
        if r.get("kind", "").startswith("val") and "R1" in r:
            curve.append((r["step"], r["R1"]))
            for k in extra:
                extra[k].append((r["step"], r.get(k)))
        elif r.get("kind") == "train" and "tau" in r:
            tau.append((r["step"], r["tau"]))
    return {"r1": curve, "tau": tau, **extra}


def run(shards: str, spec: str, seed: int, batch: int, epochs: int, lr: float, logs: str) -> dict:
    """One training run (read_run of its log)."""
    loss, flags = parse_spec(spec)
    name = run_name(spec, seed, batch)
    cmd = [sys.executable, MAIN, "--train-data", f"{shards}/train", "--val-data", f"{shards}/test",
           "--val-frequency", "1", "--model", "PersonTiny", "--loss", loss, *flags, "--batch-size", str(batch),
           "--epochs", str(epochs), "--lr", str(lr), "--warmup", "50", "--workers", "1", "--seed", str(seed),
           "--logs-dir", logs, "--name", name, "--log-every-n-steps", "33", "--no-augment"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "OMP_NUM_THREADS": "1"})
    return read_run(Path(logs) / name / "train_log.jsonl")


def r1_curve(entry):
    """Entries of older studies hold the R@1 curve alone."""
    return entry["r1"] if isinstance(entry, dict) else entry


def steps_to_reach(curve, target):
    for step, r1 in curve:
        if r1 >= target:
            return step
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="shards/demo_synth")
    ap.add_argument("--losses", nargs="+", default=["openclip", "sogclr", "fastclip-v1", "fastclip-v3"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="bench/results/loss_study")
    ap.add_argument("--jobs", type=int, default=1, help="Runs at a time (each one thread).")
    ap.add_argument("--rescan", nargs="*", default=None, metavar="LOGS_DIR",
                    help="Rebuild every entry whose run folder is in OUT/logs (or these folders) from its log: picks up "
                         "mAP/mINP and tau for runs recorded by an older version of this script.")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "curves.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if a.rescan is not None:
        for loss in a.losses:
            for seed in a.seeds:
                for d in [out / "logs", *map(Path, a.rescan)]:
                    log = d / run_name(loss, seed, a.batch_size) / "train_log.jsonl"
                    if log.is_file():
                        results[f"{loss}/{seed}"] = read_run(log)
        results_path.write_text(json.dumps(results, indent=1))
    todo = [(loss, seed) for loss in a.losses for seed in a.seeds if f"{loss}/{seed}" not in results]
    from concurrent.futures import ThreadPoolExecutor  # re-runs continue a partial study

    def one(job):
        loss, seed = job
        return f"{loss}/{seed}", run(a.shards, loss, seed, a.batch_size, a.epochs, a.lr, str(out / "logs"))

    with ThreadPoolExecutor(max(1, a.jobs)) as pool:
        for key, entry in pool.map(one, todo):
            results[key] = entry
            results_path.write_text(json.dumps(results, indent=1))
            print(f"{key}: final R@1 {entry['r1'][-1][1]:.2f}", flush=True)

    import numpy as np
    summary = {}
    for loss in a.losses:
        curves = [r1_curve(results[f"{loss}/{s}"]) for s in a.seeds]
        steps = [s for s, _ in curves[0]]
        r1 = np.array([[v for _, v in c] for c in curves])
        summary[loss] = {"steps": steps, "mean": r1.mean(0).tolist(), "min": r1.min(0).tolist(),
                         "max": r1.max(0).tolist(), "final": [c[-1][1] for c in curves]}
        entries = [results[f"{loss}/{s}"] for s in a.seeds]
        for k in ("mAP", "mINP"):
            if all(isinstance(e, dict) and e.get(k) for e in entries):
                summary[loss][k + "_final"] = [e[k][-1][1] for e in entries]
        taus = [results[f"{loss}/{s}"].get("tau", []) for s in a.seeds if isinstance(results[f"{loss}/{s}"], dict)]
        if taus and all(taus) and len({len(t) for t in taus}) == 1:
            summary[loss]["tau_steps"] = [s for s, _ in taus[0]]
            summary[loss]["tau_mean"] = np.array([[v for _, v in t] for t in taus]).mean(0).tolist()
    ref = float(np.mean(summary["openclip"]["final"])) if "openclip" in summary else None
    total = summary[a.losses[0]]["steps"][-1]
    print(f"\nglobal batch {a.batch_size}, {total} steps, seeds {a.seeds}, PersonTiny on {a.shards}")
    print("| loss | final R@1 mean | min | max | final mAP mean | final mINP mean | final tau (mean) | "
          "steps to openclip's final R@1 (mean curve) |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda s, k: f"{np.mean(s[k]):.2f}" if k in s else "n/a"  # noqa: E731
    for loss, s in summary.items():
        reach = steps_to_reach(list(zip(s["steps"], s["mean"])), ref) if ref is not None else None
        share = f"{reach} ({100 * reach / total:.0f}%)" if reach else "not reached"
        tau = f"{s['tau_mean'][-1]:.4f}" if "tau_mean" in s else "n/a"
        print(f"| {loss} | {np.mean(s['final']):.2f} | {min(s['final']):.2f} | {max(s['final']):.2f} | "
              f"{fmt(s, 'mAP_final')} | {fmt(s, 'mINP_final')} | {tau} | {share} |")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        with_tau = any("tau_mean" in s for s in summary.values())
        fig, axes = plt.subplots(1, 2 if with_tau else 1, figsize=(12 if with_tau else 6, 4), squeeze=False)
        ax = axes[0][0]
        for loss, s in summary.items():
            ax.plot(s["steps"], s["mean"], marker="o", label=loss)
            ax.fill_between(s["steps"], s["min"], s["max"], alpha=0.2)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("test R@1 (%)")
        ax.set_title(f"synthetic persons, global batch {a.batch_size}, {len(a.seeds)} seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if with_tau:
            ax = axes[0][1]
            for loss, s in summary.items():
                if "tau_mean" in s:
                    ax.plot(s["tau_steps"], s["tau_mean"], label=loss)
            ax.set_xlabel("optimizer steps")
            ax.set_ylabel("learnt temperature tau (mean over seeds)")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "r1_curves.png", dpi=120)
        print(f"plot: {out / 'r1_curves.png'}")
    except ImportError:
        print("matplotlib missing: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
