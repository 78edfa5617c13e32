# Lets tests import the packages the same way the entry points do (src/ and the repo root on sys.path), and defines
# the test markers: `cuda` (needs a CUDA device: skipped without one; `pytest -m cuda` runs exactly these, which is
# what bench/gpu_check.sh does on the GPU machine) and `slow` (minutes; the full suite runs them).
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
for p in (ROOT / "src", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one); pytest -m cuda runs them")
    config.addinivalue_line("markers", "slow: takes minutes (pytest -m 'not slow' leaves them out)")


def pytest_collection_modifyitems(config, items):
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
