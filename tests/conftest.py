"""Test-wide set-up (TRITON_INTERPRET and the `gpu` skip live in the root conftest.py)."""

import os
import sys

import pytest
import torch

# Shared test helpers (spec_oracle.py) import by name from this folder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_everything():
    # Every test sees the same global RNG state whatever ran before it.
    torch.manual_seed(0)
