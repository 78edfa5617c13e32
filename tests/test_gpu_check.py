"""bench/gpu_check.sh, the one prepared command for the rare GPU machine, dry-run on CPU so that it cannot rot before
its first GPU run: the carried wheels (made by bench/gpu_wheels.sh) install into two package targets, every step runs
(the peer from its own target, with its own webdataset), results are written as each step ends, a step over its
limit is killed without losing what came before, and one summary table comes last."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """The repository's .whl/.whl_peer when gpu_wheels.sh was run here already, else a fresh download into tmp."""
    if list((ROOT / ".whl").glob("*.whl")) and list((ROOT / ".whl_peer").glob("*.whl")):
        return {"WHEELS": str(ROOT / ".whl"), "PEER_WHEELS": str(ROOT / ".whl_peer")}
    d = tmp_path_factory.mktemp("wheels")
    env = {**os.environ, "WHEELS": str(d / "ours"), "PEER_WHEELS": str(d / "peer")}
    r = subprocess.run(["bash", "bench/gpu_wheels.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"bench/gpu_wheels.sh failed (needs the package index):\n{r.stdout}\n{r.stderr}"
    assert "MiB to carry" in r.stdout
    return {"WHEELS": env["WHEELS"], "PEER_WHEELS": env["PEER_WHEELS"]}


def _gpu_check(tmp_path, wheels, *args, timeout=600):
    out = tmp_path / "out"
    env = {**os.environ, **wheels, "OUT": str(out), "SITE": str(tmp_path / "site"), "OMP_NUM_THREADS": "1",
           "PYTHON": os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python"))}
    if not Path(env["PYTHON"]).exists():
        import sys
        env["PYTHON"] = sys.executable
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke", "--work", str(tmp_path / "work"), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    steps = {}
    if (out / "steps.jsonl").is_file():
        steps = {rec["step"]: rec for rec in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
    return r, out, steps


@pytest.mark.slow
def test_cpu_smoke_runs_every_step(tmp_path, wheels):
    r, out, steps = _gpu_check(tmp_path, wheels)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert {k: v["status"] for k, v in steps.items()} == {k: "ok" for k in
                                                          ("env", "shards", "tests", "train", "compile", "loss", "dga")}
    env = steps["env"]["env"]
    # ours and the peer import from their own targets: the peer's webdataset is 0.2.86, ours 1.0.2
    assert env["webdataset"] == "1.0.2" and env["peer"]["webdataset"] == "0.2.86", env
    assert env["open_clip_torch"] == env["peer"]["open_clip_torch"] == "3.3.0"
    assert steps["shards"]["train_pairs"] > 0
    # `pytest -m cuda` selects exactly the CUDA-only tests: on CPU they are all skipped, none fail
    assert steps["tests"]["skipped"] >= 4 and steps["tests"]["passed"] == steps["tests"]["failed"] == 0

    train = json.loads((out / "bench_train.json").read_text())
    by = {(x["trainer"], x["loss"]): x for x in train["rows"]}
    assert set(by) == {("ours", "openclip"), ("ours", "fastclip-v3"), ("open_clip_train", "openclip (ClipLoss)")}
    for x in by.values():
        assert x["measured_steps"] == 4 and x["samples_per_s"] > 0 and 0 <= x["data_wait_share"] <= 1
    comp = json.loads((out / "bench_train_compile.json").read_text())["rows"]
    assert comp[0]["loss"] == "openclip" and "--torchcompile" in comp[0]["command"]
    loss = json.loads((out / "bench_loss.json").read_text())["rows"]
    assert {(x["loss"], x["form"]) for x in loss} >= {("fastclip-v3", "one"), ("fastclip-v3", "blocked")}
    dga = json.loads((out / "bench_dga.json").read_text())
    assert [(x["batch"], x["chunks"]) for x in dga] == [(256, 1), (256, 4)]
    assert abs(dga[0]["final_loss"] - dga[1]["final_loss"]) < 1e-4  # DGA: same loss in 1 or 4 chunks

    summary = (out / "summary.md").read_text()
    assert "open_clip_train" in summary and "FastCLIP-v3 / InfoNCE step time" in summary
    # the summary is the last thing printed (only the end of the output may survive) and the log holds it all
    assert r.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    assert summary.strip() in (out / "gpu_check.log").read_text()
    assert len(list(out.iterdir())) <= 8  # the device tool brings back at most 8 files


@pytest.mark.slow
def test_a_step_over_its_limit_is_killed_and_later_steps_still_run(tmp_path, wheels):
    r, out, steps = _gpu_check(tmp_path, wheels, "--only", "shards", "train", "loss", "--budget", "train=8",
                               "--total", "90")
    assert r.returncode == 1  # a step that did not end well
    assert steps["train"]["status"] == "timeout" and steps["train"]["seconds"] < 8 + 6
    assert steps["loss"]["status"] == "ok" and (out / "bench_loss.json").is_file()
    assert "| train | timeout |" in (out / "summary.md").read_text()
    # no trainer left running after the limit (they run in sessions of their own under bench_train.py)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "work") not in ps


@pytest.mark.slow
def test_missing_wheels_is_one_error_line(tmp_path):
    env = {**os.environ, "WHEELS": str(tmp_path / "none"), "PEER_WHEELS": str(tmp_path / "none"),
           "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--cpu-smoke"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error:") and "gpu_wheels.sh" in r.stderr and len(r.stderr.splitlines()) == 1
