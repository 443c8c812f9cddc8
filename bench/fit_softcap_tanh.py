"""The CPU soft-cap's tanh (csrc/cpu/vec_tanh.h): fit its coefficients, measure its error.

    python bench/fit_softcap_tanh.py             # fit: print the fp32 constants vec_tanh.h holds
    python bench/fit_softcap_tanh.py --measure   # its error over every fp32 u in [0, clamp]

Fit. vec_tanh.h computes tanh |u| = em / (em + 2) with em = e^(2|u|) - 1 = 2^(k+1) (expm1(2g) / 2) + (2^k - 1),
|u| = k ln2 / 2 + g, |g| <= ln2 / 4, and expm1(f) = f + f^2 (1/2 + f (c3 + f (c4 + f (c5 + f c6)))) at f = 2g,
which it evaluates as expm1(2g) / 2 = g + g^2 (1 + g (d3 + g (d4 + g (d5 + g d6)))), d_n = 2^(n-1) c_n (exact
in fp32: the same polynomial, its roundings scaled by powers of 2). c3..c6 minimise the largest relative
error of expm1 on [-ln2/2, ln2/2]: Lawson's iteration (a weighted least-squares fit whose weights grow
where the error is largest, which converges to the minimax fit) on 3,000 Chebyshev points, the targets in
40-digit mpmath.

Measure. Every fp32 u in [0, clamp] (about 1.1e9 values) and its negation against float64 tanh: the
largest error in ulp of the fp32 result's own spacing and in absolute terms, where each occurs, and the
smallest u from which the result is exactly 1. The sweep runs vec_tanh.h compiled here with setup.py's
flags (torch.utils.cpp_extension.load_inline; the op's rows cost about 1 us each, too slow for 2.2e9),
and first checks that it agrees bit for bit with the kernel itself on 4M values: rows of one logit
through `torch.ops.lpreg_C.token_stats_fwd` with soft-cap 1 and multiplier 1, whose logsumexp is the one
transformed logit, tanh(u) exactly as the kernel computes it (tests/test_softcap_tanh_accuracy.py
checks the bound that way on a dense grid).
"""

import argparse
import math

import numpy as np

CLAMP = 9.125  # kTanhClamp of vec_tanh.h


def fit_expm1(iters=300, points=3000, dps=40):
    """c3..c6 (float64) and the fit's largest relative error on [-ln2/2, ln2/2]."""
    import mpmath as mp

    mp.mp.dps = dps
    half = float(mp.log(2) / 2) * 1.0001  # a little wider than round-to-nearest's reduced range
    f = half * np.cos(np.pi * (np.arange(points) + 0.5) / points)
    exact = np.array([float(mp.expm1(mp.mpf(v))) for v in f])
    # the fitted part: (expm1(f) - f - f^2 / 2) / f^3 = c3 + c4 f + c5 f^2 + c6 f^3
    target = np.array([float((mp.expm1(mp.mpf(v)) - v - v * v / 2) / mp.mpf(v) ** 3) for v in f])
    basis = np.stack([f ** i for i in range(4)], 1)
    w = np.ones_like(f)
    for _ in range(iters):
        scale = np.sqrt(w) * np.abs(f ** 3 / exact)  # the relative error of expm1, not of the fitted part
        c, *_ = np.linalg.lstsq(basis * scale[:, None], target * scale, rcond=None)
        err = (f + f * f / 2 + f ** 3 * (basis @ c)) / exact - 1
        w = w * np.abs(err)
        w /= w.sum()
    return c, float(np.abs(err).max())


def fit():
    c, err = fit_expm1()
    print(f"expm1 fit: largest relative error {err:.3e} on [-ln2/2, ln2/2]")
    for n, v in zip(range(3, 7), c):
        c32 = np.float32(v)
        d32 = c32 * np.float32(2.0 ** (n - 1))  # exact: a power of 2
        print(f"  c{n} = {float(c32):.17g}f   d{n} = 2^{n - 1} c{n} = {float(d32):.17g}f")
    half_ln2 = np.float32(math.log(2)) / np.float32(2)
    print(f"  ln2 / 2 = {float(half_ln2):.17g}f (error {float(half_ln2) - math.log(2) / 2:.2e})  "
          f"2 / ln2 = {float(np.float32(2 / math.log(2))):.17g}f")


def kernel_tanh(u):
    """tanh(u) as the CPU kernel computes it: u (n,) fp32 -> (n,) fp32."""
    import torch

    from lpreg import _native

    rows = torch.from_numpy(u).reshape(-1, 1)
    out = _native.token_stats_forward(rows, None, None, 1.0, False, math.log(0.5), -100, 1.0, 1.0)
    return out[4][:, 0].numpy()


def compiled_tanh():
    """vec_tanh.h as a function of an fp32 tensor, built with the flags setup.py gives lpreg._C."""
    import os

    import torch
    from torch.utils import cpp_extension

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "setup.py")
    with open(path) as f:
        source = f.read().split("\next_modules, cmdclass = _extensions()")[0]
    flags = {"__file__": path}
    exec(compile(source, path, "exec"), flags)  # setup.py's helpers, without running setup()
    cflags = ["-O3", f"-std={flags['_cxx_standard'](torch)}"] + flags["_cpu_isa_flags"](torch)
    mod = cpp_extension.load_inline(
        "lpreg_vec_tanh_sweep", cpp_sources=[_SWEEP], functions=["vec_tanh_all"], extra_cflags=cflags,
        extra_include_paths=[os.path.join(root, "csrc")], verbose=False)
    return lambda u: mod.vec_tanh_all(torch.from_numpy(u)).numpy()


_SWEEP = r"""
#include <torch/extension.h>
#include "cpu/vec_tanh.h"
torch::Tensor vec_tanh_all(torch::Tensor u) {
  using Vec = at::vec::Vectorized<float>;
  auto out = torch::empty_like(u);
  const float* src = u.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const int64_t n = u.numel();
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) lpreg::cpu::vec_tanh(Vec::loadu(src + i)).store(dst + i);
  if (i < n) lpreg::cpu::vec_tanh(Vec::loadu(src + i, n - i)).store(dst + i, n - i);
  return out;
}
"""


def measure(chunk=1 << 24):
    """Every fp32 in [0, CLAMP] and its negation; prints the largest errors."""
    import torch

    torch.set_num_threads(1)
    sweep = compiled_tanh()
    sample = np.linspace(-CLAMP - 1, CLAMP + 1, 1 << 22).astype(np.float32)
    assert np.array_equal(sweep(sample), kernel_tanh(sample)), "the sweep's build differs from the kernel"
    top = int(np.array(np.float32(CLAMP)).view(np.uint32))
    worst_ulp = (0.0, 0.0)
    worst_abs = (0.0, 0.0)
    last_below_one = 0.0  # the largest u whose result is not exactly 1
    for start in range(0, top + 1, chunk):
        bits = np.arange(start, min(top + 1, start + chunk), dtype=np.uint32)
        u = bits.view(np.float32)
        got = sweep(u).astype(np.float64)
        neg = sweep(-u).astype(np.float64)
        assert np.array_equal(-got, neg), "tanh(-u) != -tanh(u)"
        want = np.tanh(u.astype(np.float64))
        ulp = np.spacing(np.abs(got).astype(np.float32)).astype(np.float64)
        ulp = np.where(got == 0, np.float64(np.finfo(np.float32).smallest_subnormal), ulp)
        e_abs = np.abs(got - want)
        e_ulp = e_abs / ulp
        i, j = int(e_ulp.argmax()), int(e_abs.argmax())
        if e_ulp[i] > worst_ulp[0]:
            worst_ulp = (float(e_ulp[i]), float(u[i]))
        if e_abs[j] > worst_abs[0]:
            worst_abs = (float(e_abs[j]), float(u[j]))
        not_one = np.nonzero(got != 1.0)[0]
        if len(not_one):
            last_below_one = float(u[not_one[-1]])
    print(f"largest error: {worst_ulp[0]:.3f} ulp at u = {worst_ulp[1]!r}; "
          f"{worst_abs[0]:.3e} absolute at u = {worst_abs[1]!r}")
    sat = float(np.nextafter(np.float32(last_below_one), np.float32(np.inf)))
    print(f"exactly 1 from u = {sat!r} up to the clamp {CLAMP} (float64 tanh rounds to 1 from 9.0109); "
          "odd bit for bit")
    inf = kernel_tanh(np.array([np.inf, -np.inf, np.nan, 1e30, -0.0, 0.0], np.float32))
    print(f"tanh(+inf, -inf, nan, 1e30, -0, +0) = {inf.tolist()} (signs of zeros: {np.signbit(inf[4:]).tolist()})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="measure the compiled kernel's error")
    args = parser.parse_args()
    measure() if args.measure else fit()
