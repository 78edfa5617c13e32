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
