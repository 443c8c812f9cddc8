"""Test-wide set-up (TRITON_INTERPRET and the `gpu` skip live in the root conftest.py).

tests/ is a package: shared helpers are modules in it, imported by their package name
(`from tests.spec_oracle import ...`, `from tests.fuzz_profiles import ...`).
"""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_everything():
    # Every test sees the same global RNG state whatever ran before it.
    torch.manual_seed(0)
