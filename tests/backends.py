"""The backend names the op tests run, and the skip that tells why a compiled one cannot run here.

Parametrized tests list every backend, the compiled "cpu" included: where lpreg._C is missing, the
root conftest.py skips those cases with `lpreg.backends()`'s reason (the build's error, or the
import's), so a missing extension shows in the test report instead of shrinking the lists.
Tests that loop over backends inside one case, or draw one with hypothesis, use `runnable`.
"""

from lpreg import _backends

ALL = ("torch", "triton", "cpu")
COMPILED = ("cpu", "cuda")


def runnable(*names: str) -> list:
    """The names among `names` that can run here (a compiled backend only where lpreg._C serves it)."""
    return [n for n in names if n not in COMPILED or _backends.native_available(n)]
