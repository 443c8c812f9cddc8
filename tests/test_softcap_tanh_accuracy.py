"""The CPU kernels' soft-cap tanh (csrc/cpu/vec_tanh.h) against float64 tanh, through the compiled op.

A row of one logit under soft-cap c and multiplier 1 has logsumexp equal to its one transformed logit,
so `token_stats_fwd`'s row statistics hand back c tanh(u) exactly as the kernel computes it. With c = 1
that is the tanh itself: a dense grid of fp32 u (every 256th fp32 of [0, 9.125], and their negations)
checks the error bound vec_tanh.h states (bench/fit_softcap_tanh.py --measure measured it over every
fp32), the odd symmetry, the saturation to exactly +-1 and NaN in, NaN out. The statistics of whole rows
against the float64 oracle are tests/test_token_stats_transform.py's; here only rows on both sides of
kStoredRowMax (2^16), below which the forward keeps a soft-capped row's transformed values for its
second pass and above which that pass transforms its candidate vectors again.
"""

import math

import numpy as np
import pytest
import torch

from lpreg import _backends
from tests.spec_oracle import assert_backend_matches_spec, make_logits

pytestmark = pytest.mark.skipif(not _backends.native_available("cpu"),
                                reason="needs the compiled CPU extension (lpreg._C)")

MAX_ULP = 2.5  # vec_tanh.h's bound (2.475 ulp measured over every fp32), in ulp of the fp32 result
MAX_ABS = 9e-8  # and absolute (8.94e-8 measured)
CLAMP = 9.125  # kTanhClamp: every |u| above it is computed as this
SATURATES = 9.011  # float64 tanh rounds to fp32 1 from 13 ln 2 = 9.01091; the kernel too (measured)


def kernel_softcap(raw, cap=1.0, scale=1.0):
    """cap tanh(scale raw / cap) of each fp32 value as the CPU kernel computes it."""
    from lpreg import _native

    rows = torch.as_tensor(raw, dtype=torch.float32).reshape(-1, 1)
    out = _native.token_stats_forward(rows, None, None, 1.0, False, math.log(0.5), -100, scale, cap)
    return out[4][:, 0].numpy()


def _ulp_error(got, u):
    want = np.tanh(u.astype(np.float64))
    spacing = np.spacing(np.abs(got).astype(np.float32)).astype(np.float64)
    spacing[got == 0] = np.finfo(np.float32).smallest_subnormal
    err = np.abs(got.astype(np.float64) - want)
    return err / spacing, err


def test_error_bound_on_a_dense_grid():
    top = int(np.array(np.float32(CLAMP)).view(np.uint32))
    u = np.arange(0, top + 1, 256, dtype=np.uint32).view(np.float32)
    got = kernel_softcap(u)
    ulp, err = _ulp_error(got, u)
    assert ulp.max() <= MAX_ULP, f"{ulp.max():.3f} ulp at u = {u[ulp.argmax()]!r}"
    assert err.max() <= MAX_ABS, f"{err.max():.3e} at u = {u[err.argmax()]!r}"
    # odd, bit for bit (but for the sign of a zero, which the row's logsumexp m + log 1 drops)
    neg = kernel_softcap(-u)
    assert np.array_equal(neg[1:].view(np.uint32), (-got[1:]).view(np.uint32)) and neg[0] == 0


def test_small_and_subnormal_arguments_are_relatively_accurate():
    u = np.float32(2.0) ** -np.arange(10, 149, 0.25).astype(np.float32)
    ulp, _ = _ulp_error(kernel_softcap(u), u)
    assert ulp.max() <= MAX_ULP


def test_saturates_exactly_and_keeps_nan():
    u = np.concatenate([np.linspace(SATURATES, 12.0, 10_001), [1e4, 3.4e38]]).astype(np.float32)
    assert np.all(kernel_softcap(u) == 1.0) and np.all(kernel_softcap(-u) == -1.0)
    got = kernel_softcap(np.array([np.inf, -np.inf, np.nan, -np.nan], np.float32))
    assert got[0] == 1.0 and got[1] == -1.0 and np.isnan(got[2:]).all()
    below = np.float32(9.0)  # 1 - tanh(9) = 3.0e-8, half an ulp: not yet saturated in float64 either
    assert kernel_softcap(np.array([below]))[0] <= 1.0


@pytest.mark.parametrize("cap,scale", [(30.0, 1.0), (50.0, 2.5), (3.0, 0.5)])
def test_soft_capped_logits_match_float64_within_the_bound(cap, scale):
    # what the kernels compute: u = raw (scale / cap), then cap tanh(u); the error is the tanh's (times
    # cap) plus the two products' roundings
    g = torch.Generator().manual_seed(0)
    raw = torch.cat([torch.randn(200_000, generator=g) * cap, torch.linspace(-12 * cap, 12 * cap, 100_001)])
    got = kernel_softcap(raw, cap, scale).astype(np.float64)
    u = (raw * np.float32(scale / cap)).numpy().astype(np.float64)  # the fp32 argument the kernel forms
    want = cap * np.tanh(u)
    tol = cap * (MAX_ABS + 2.0 ** -24)
    assert np.abs(got - want).max() <= tol


@pytest.mark.parametrize("V", [1 << 16, (1 << 16) + 37])
@pytest.mark.parametrize("mode,threshold,proxy", [("min_p", 0.02, False), ("fixed", 0.01, False),
                                                  ("min_p", 0.02, True)])
def test_rows_on_both_sides_of_the_stored_row_limit_match_spec(V, mode, threshold, proxy):
    logits = make_logits(3, V, seed=21) * 8.0  # peaked, flat (many candidates) and -inf rows, some saturating
    labels = torch.randint(0, V, (3,), generator=torch.Generator().manual_seed(22))
    proxy_logits = make_logits(3, V, seed=23) * 8.0 if proxy else None
    g = torch.Generator().manual_seed(24)
    upstream = [torch.randn(3, generator=g) for _ in range(3)]
    assert_backend_matches_spec("cpu", logits, labels, upstream, temperature=0.8, mode=mode, threshold=threshold,
                                proxy_logits=proxy_logits, logit_softcap=30.0)
