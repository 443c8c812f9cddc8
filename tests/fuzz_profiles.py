"""Hypothesis profiles for the property-based tests (tests/test_fuzz_*.py).

    pytest tests/test_fuzz_*.py                            # "ci": derandomised, small budgets
    LPREG_FUZZ_PROFILE=long pytest tests/test_fuzz_*.py    # "long": 25x the examples, still derandomised
    LPREG_FUZZ_PROFILE=random pytest tests/test_fuzz_*.py  # "long" budgets, fresh random seed each run

Every fuzz test declares its CI example count with `fuzz(n)`; the profile multiplies it.
Derandomised profiles draw the same examples on every run (CI never flakes on a new seed);
the failing example is printed and shrunk either way, and each failure found is kept as a
plain test in tests/test_fuzz_regressions.py. No deadline: the Triton interpreter and the
first call of a backend (lazy import, kernel tracing) are slow in ways unrelated to the code
under test.
"""

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("LPREG_FUZZ_PROFILE", "ci")
_SCALE = {"ci": 1, "long": 25, "random": 25}
if PROFILE not in _SCALE:
    raise ValueError(f"LPREG_FUZZ_PROFILE must be one of {tuple(_SCALE)}, got {PROFILE!r}")

_COMMON = dict(
    deadline=None,
    print_blob=True,
    # strategies build tensors from a few drawn numbers; big V is the point, not a smell
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                           HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("long", derandomize=True, database=None, **_COMMON)
settings.register_profile("random", derandomize=False, **_COMMON)
settings.load_profile(PROFILE)


def fuzz(ci_examples: int) -> settings:
    """Settings for one test: `ci_examples` under the CI profile, scaled under the others."""
    return settings(max_examples=max(1, ci_examples * _SCALE[PROFILE]))
