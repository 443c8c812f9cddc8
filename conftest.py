"""Set-up shared by tests/ and bench/.

Without a CUDA device, the Triton kernels run under the interpreter: TRITON_INTERPRET must
be set before `lpreg.kernels` is first imported, so it is set here, at collection time.
Items marked `gpu` skip cleanly without a CUDA device. Items parametrized with a compiled backend
(`backend` or `provider` = "cpu" / "cuda") skip where lpreg._C cannot serve it, with the reason
`lpreg.backends()` gives (the build's error or the import's), so a missing extension is reported,
never silently left out.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_cannot_run():
    """Why Triton's CPU interpreter cannot run our kernels in this environment ("" when it can).

    Triton before 3.3 (torch 2.6's 3.2) turns a scalar kernel argument used as a loop bound into
    int(a 1-element array), which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted").
    Only the interpreter does this: compiled for a GPU, the same kernels never meet NumPy.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ""
    try:
        import numpy
        from triton.runtime import interpreter
    except ImportError:
        return ""
    with open(interpreter.__file__) as f:
        old_index = "int(self.handle.data)" in f.read()
    try:
        int(numpy.array([1]))
    except TypeError:
        if old_index:
            import triton

            return (f"triton {triton.__version__}'s CPU interpreter cannot run under numpy {numpy.__version__} "
                    "(it converts 1-element arrays to int); pip install 'numpy<2.4' to run these cases")
    return ""


def pytest_collection_modifyitems(config, items):
    from lpreg import _backends

    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_interpreter = _interpreter_cannot_run()
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        params = getattr(getattr(item, "callspec", None), "params", {})
        for key in ("backend", "provider"):
            name = params.get(key)
            if name in ("cpu", "cuda") and not _backends.native_available(name):
                reason = f"{key}={name!r} unavailable: {_backends.native_unavailable_reason(name)}"
                item.add_marker(pytest.mark.skip(reason=reason))
            if name == "triton" and no_interpreter:
                item.add_marker(pytest.mark.skip(reason=no_interpreter))
