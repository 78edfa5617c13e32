# Test markers (declared in pyproject.toml, which also puts src/ and the repo root on pytest's path): `cuda` needs a
# CUDA device and is skipped without one (`pytest -m cuda` runs exactly these, as bench/gpu_check.sh does on the GPU
# machine); `slow` starts processes (the full suite runs them; `pytest -m "not slow"` is the in-process tier).
import pytest


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
