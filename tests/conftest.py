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


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test. Tiny models are all per-op overhead: a second OpenMP thread
    buys nothing, and on a busy 2-core machine every op then waits for a descheduled thread
    (measured: 20 SFT steps 0.7 s with one thread, 22 s with two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
