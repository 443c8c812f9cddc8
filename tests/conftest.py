"""Test-wide set-up.

Without a CUDA device, the Triton kernels run under the interpreter: TRITON_INTERPRET must
be set before `lpreg.kernels` is first imported, so it is set here, at collection time.
Tests marked `gpu` skip cleanly without a CUDA device.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared test helpers (spec_oracle.py) import by name from this folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything():
    # Every test sees the same global RNG state whatever ran before it.
    torch.manual_seed(0)
