"""Set-up shared by tests/ and bench/.

Without a CUDA device, the Triton kernels run under the interpreter: TRITON_INTERPRET must
be set before `lpreg.kernels` is first imported, so it is set here, at collection time.
Items marked `gpu` skip cleanly without a CUDA device.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
