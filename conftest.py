# Test markers (declared in pyproject.toml, which also puts src/ and the repo root on pytest's path): `cuda` needs a
# CUDA device and is skipped without one (`pytest -m cuda` runs exactly these, as bench/gpu_check.sh does on the GPU
# machine); `slow` starts processes (the full suite runs them; `pytest -m "not slow"` is the in-process tier).
import os

import pytest

# One thread per process, as scripts/test.sh sets it: plain `pytest` on a 2-core machine otherwise runs every torch op
# and every 2-process torchrun job with a thread per core each (measured: 619 s instead of 176 s for the fast tier on
# a loaded machine, issue #24). Set before torch is imported, so the subprocesses the tests start inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config):
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def dist_worker(tmp_path_factory):
    """``run(nproc, loss, *flags)``: what tests/dist_train_worker.py saved after its steps under torchrun with
    ``nproc`` processes; each argument list runs once per session (the 2-ranks-equal-1 test and the DGA test compare
    against the same reference runs, ~15 s each on the 2-core CI machine)."""
    import torch
    from pathlib import Path
    from test_training import torchrun
    worker = str(Path(__file__).resolve().parent / "tests" / "dist_train_worker.py")
    done = {}

    def run(nproc: int, *args) -> dict:
        key = (nproc, *map(str, args))
        if key not in done:
            out = tmp_path_factory.mktemp("dist_worker") / "out.pt"
            torchrun(nproc, worker, out, *args)
            done[key] = out
        return torch.load(done[key])
    return run
