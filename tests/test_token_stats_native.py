"""backend="cpu" (and, on a GPU, backend="cuda"): the compiled lpreg._C against a float64 oracle.

Tolerance (house style): each output's largest error vs float64 must be at most about twice
that of eager PyTorch computing the same formulas in the input dtype, plus a small floor.
Rows mix the cases the kernels must get right: peaked and flat rows, -inf entries, ignored
labels, NaN rows and all -inf rows.
"""

import math

import pytest
import torch

import lpreg
from lpreg import _native

from _native_oracle import assert_special_values_match, eager, f32_log, max_err, oracle

pytestmark = pytest.mark.skipif(not _native.available("cpu"), reason="lpreg._C is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (V, rows): few rows for the big vocabularies
SHAPES = [(1, 3), (7, 9), (1000, 9), (32000, 3), (50257, 2), (151936, 2)]
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}  # relative to the largest value
# when eager PyTorch itself breaks down (fp16 overflow / underflow to NaN or inf), the bound is
# instead the rounding of the output dtype: fp32 computation, outputs stored in the dtype
FALLBACK = {torch.float32: 1e-5, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -10}
NAMES = ("logp", "proxy_logp", "kl", "entropy", "grad")


def make_rows(N, V, dtype, gen, special=True):
    """(N, V) logits: row 0 peaked, row 1 flat, others random scale; -inf entries, a NaN row and an
    all -inf row when special (and N allows); labels with one ignored row, never on a -inf entry."""
    x = torch.randn(N, V, generator=gen, dtype=torch.float64) * 2.0
    x[0] *= 0.5
    x[0, int(torch.randint(V, (1,), generator=gen))] += 12.0  # peaked: min-p keeps a handful
    if N > 1:
        x[1] *= 0.05  # flat: "fixed" keeps only the argmax when every p < tau
    labels = torch.randint(V, (N,), generator=gen)
    if V > 4:
        x[2 % N, 1:4] = -math.inf
        labels[2 % N] = 0
    if N > 3:
        labels[3] = -100
    if special and N >= 7:
        x[5, V // 2] = math.nan
        x[6] = -math.inf
    return x.to(dtype), labels


def upstream(N, gen):
    return [torch.rand(N, generator=gen, dtype=torch.float64) * 4 - 2 for _ in range(3)]


def run_native(logits, labels, proxy, temperature, fixed, threshold, grads, backend="cpu"):
    """Forward + backward through the public API (custom op, autograd) on `backend`."""
    x = logits.detach().clone().requires_grad_(True)
    mode = "fixed" if fixed else "min_p"
    st = lpreg.lpreg_token_stats(x, labels, temperature=temperature, mode=mode, threshold=threshold,
                                 proxy_logits=proxy, backend=backend)
    g_logp, g_kl, g_h = (g.to(x.device, torch.float32) for g in grads)
    loss = (g_logp * st.logp + g_kl * st.kl + g_h * st.entropy).sum()
    loss.backward()
    assert x.grad.dtype == logits.dtype
    return (st.logp, st.proxy_logp, st.kl, st.entropy, x.grad)


def check_against_oracle(logits, labels, proxy, temperature, fixed, threshold, grads, backend="cpu"):
    got = run_native(logits.to(_device(backend)), labels.to(_device(backend)),
                     None if proxy is None else proxy.to(_device(backend)), temperature, fixed, threshold,
                     grads, backend)
    got = [g.cpu() for g in got]
    truth, kept = oracle(logits, labels, proxy, temperature, fixed, threshold, grads)
    ref = eager(logits, labels, proxy, temperature, fixed, threshold, grads, kept)
    for name, g, t, e in zip(NAMES, got, truth, ref):
        assert_special_values_match(g, t, name)
        scale = max(1.0, float(t[torch.isfinite(t)].abs().max())) if bool(torch.isfinite(t).any()) else 1.0
        if name == "grad":  # gradient entries are O(p / T): floor relative to the largest
            scale = float(t[torch.isfinite(t)].abs().max()) if bool(torch.isfinite(t).any()) else 1.0
        eager_err = max_err(e, t)
        if math.isfinite(eager_err):
            bound = 2.0 * eager_err + FLOOR[logits.dtype] * scale
        else:
            bound = FALLBACK[logits.dtype] * scale
        err = max_err(g, t)
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g} (eager {eager_err:.3g})"


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,N", SHAPES)
@pytest.mark.parametrize("fixed", [False, True], ids=["min_p", "fixed"])
def test_matches_oracle(fixed, V, N, dtype):
    gen = torch.Generator().manual_seed(V * 7 + N + int(fixed))
    logits, labels = make_rows(N, V, dtype, gen)
    temperature = 0.7 if V % 2 else 1.0
    check_against_oracle(logits, labels, None, temperature, fixed, 0.02, upstream(N, gen))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,N", [(7, 9), (1000, 9), (50257, 2)])
@pytest.mark.parametrize("fixed", [False, True], ids=["min_p", "fixed"])
def test_proxy_matches_oracle(fixed, V, N, dtype):
    gen = torch.Generator().manual_seed(V + 3 * N + int(fixed))
    logits, labels = make_rows(N, V, dtype, gen)
    proxy = (logits.double() + 0.3 * torch.randn(N, V, generator=gen, dtype=torch.float64)).to(dtype)
    proxy[torch.isneginf(logits)] = -math.inf  # q > 0 where p = 0 would make kl infinite
    check_against_oracle(logits, labels, proxy, 1.3, fixed, 0.05, upstream(N, gen))


def test_mixed_dtype_proxy_and_strided_rows():
    gen = torch.Generator().manual_seed(5)
    big, labels = make_rows(6, 1030, torch.bfloat16, gen, special=False)
    logits = big[:, 3:1003]  # rows of unit stride, row stride 1030, unaligned start
    labels = labels.clamp(max=999)
    proxy = (logits.double() + 0.2).float()
    check_against_oracle(logits, labels, proxy, 1.0, False, 0.02, upstream(6, gen))


@pytest.mark.parametrize("threshold", [0.25, 1.0])
def test_min_p_ties_at_threshold(threshold):
    # max 0 and entries exactly at log(kappa) in fp32: ">=" keeps them (and kappa = 1 keeps
    # every tie of the maximum)
    V = 300
    cut = f32_log(threshold)
    x = torch.full((2, V), -9.0)
    x[:, 0] = 0.0
    x[:, 10:20] = cut
    x[:, 20:25] = cut - 1e-3
    x[1, 100] = 0.0  # a second maximum
    labels = torch.tensor([15, 22])
    stats = lpreg.lpreg_token_stats(x, labels, mode="min_p", threshold=threshold, backend="cpu")
    # row 0: K = {0} U [10, 20), so log q(15) = cut - log(1 + 10 e^cut); row 1: label 22 dropped
    assert stats.proxy_logp[0].item() == pytest.approx(cut - math.log1p(10 * math.exp(cut)), abs=1e-6)
    assert stats.proxy_logp[1].item() == -math.inf
    check_against_oracle(x, labels, None, 1.0, False, threshold, upstream(2, torch.Generator().manual_seed(0)))


def test_fixed_mode_falls_back_to_first_argmax():
    # every p < tau: K = {first argmax}; kl = log(1 / p_argmax) and the argmax is stored
    V = 1000
    x = torch.zeros(1, V)
    x[0, 5] = x[0, 9] = 0.5
    st = _native.token_stats_forward(x, torch.tensor([9]), None, 1.0, True, math.log(0.02), -100)
    logp, proxy_logp, kl, _, row_stats = st
    assert row_stats[0, 4].item() == 5.0
    assert row_stats[0, 3].item() == math.inf
    assert proxy_logp.item() == -math.inf  # label 9 ties the maximum but is not the first
    p5 = math.exp(0.5) / (2 * math.exp(0.5) + (V - 2))
    assert kl.item() == pytest.approx(-math.log(p5), rel=1e-6)
    check_against_oracle(x, torch.tensor([5]), None, 1.0, True, 0.02, upstream(1, torch.Generator().manual_seed(1)))


def test_special_rows_and_empty_batch():
    x = torch.randn(4, 50)
    x[1, 7] = math.nan
    x[2] = -math.inf
    labels = torch.tensor([1, 2, 3, -100])
    out = _native.token_stats_forward(x, labels, None, 1.0, False, math.log(0.02), -100)
    for v in out[:4]:
        assert torch.isnan(v[1]) and torch.isnan(v[2]) and v[3] == 0 and torch.isfinite(v[0])
    assert torch.isnan(out[4][1:3, 0]).all()
    grad = _native.token_stats_backward(x, labels, None, out[4], torch.ones(4), torch.ones(4), torch.ones(4), 1.0,
                                        -100)
    assert torch.isnan(grad[1:3]).all() and (grad[3] == 0).all() and torch.isfinite(grad[0]).all()
    empty = torch.empty(0, 11, dtype=torch.bfloat16)
    out = _native.token_stats_forward(empty, torch.empty(0, dtype=torch.long), None, 1.0, True, -3.0, -100)
    assert [tuple(o.shape) for o in out] == [(0,)] * 4 + [(0, 5)]
    grad = _native.token_stats_backward(empty, None, None, out[4], None, torch.empty(0), None, 1.0, -100)
    assert grad.shape == (0, 11) and grad.dtype == torch.bfloat16


def test_results_independent_of_thread_count():
    gen = torch.Generator().manual_seed(11)
    x, labels = make_rows(64, 5003, torch.bfloat16, gen)
    g = [t.float() for t in upstream(64, gen)]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = _native.token_stats_forward(x, labels, None, 0.9, True, math.log(0.02), -100)
            results.append((*out, _native.token_stats_backward(x, labels, None, out[4], *g, 0.9, -100)))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a.view(torch.int32),
                           b.view(torch.uint8) if b.dtype != torch.float32 else b.view(torch.int32))


def test_opcheck_compiled_ops():
    gen = torch.Generator().manual_seed(2)
    x, labels = make_rows(5, 33, torch.float32, gen, special=False)
    proxy = x + 0.1
    for args in [(x, labels, None, 1.0, False, math.log(0.02), -100),
                 (x.bfloat16(), None, proxy.bfloat16(), 0.5, True, math.log(0.1), -100)]:
        torch.library.opcheck(torch.ops.lpreg_C.token_stats_fwd.default, args)
        fwd = torch.ops.lpreg_C.token_stats_fwd(*args)
        g = torch.randn(5)
        bwd_args = (args[0], args[1], args[2], fwd[4], g if args[1] is not None else None, g, g, args[3], -100)
        torch.library.opcheck(torch.ops.lpreg_C.token_stats_bwd.default, bwd_args)


def test_clear_errors():
    x = torch.randn(3, 10)
    with pytest.raises(RuntimeError, match=r"2-D"):
        torch.ops.lpreg_C.token_stats_fwd(x[0], None, None, 1.0, False, -3.0, -100)
    with pytest.raises(RuntimeError, match=r"labels must have shape \(3,\), got \[2\]"):
        torch.ops.lpreg_C.token_stats_fwd(x, torch.zeros(2, dtype=torch.long), None, 1.0, False, -3.0, -100)
    with pytest.raises(RuntimeError, match="unit stride"):
        torch.ops.lpreg_C.token_stats_fwd(x.t().contiguous().t(), None, None, 1.0, False, -3.0, -100)
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 10\) or ignore_index=-100, got 10"):
        torch.ops.lpreg_C.token_stats_fwd(x, torch.tensor([0, 10, -100]), None, 1.0, False, -3.0, -100)
    with pytest.raises(RuntimeError, match=r"g_logp needs labels"):
        torch.ops.lpreg_C.token_stats_bwd(x, None, None, torch.zeros(3, 5), torch.ones(3), None, None, 1.0, -100)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.lpreg_C.token_stats_fwd(x.int(), None, None, 1.0, False, -3.0, -100)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,N", [(7, 9), (1000, 9), (32000, 3), (151936, 2)])
@pytest.mark.parametrize("fixed", [False, True], ids=["min_p", "fixed"])
@pytest.mark.parametrize("with_proxy", [False, True], ids=["onpolicy", "proxy"])
def test_cuda_matches_oracle(with_proxy, fixed, V, N, dtype):
    if not _native.available("cuda"):
        pytest.skip("lpreg._C was built without CUDA")
    gen = torch.Generator().manual_seed(V + N + int(fixed))
    logits, labels = make_rows(N, V, dtype, gen)
    proxy = None
    if with_proxy:
        proxy = (logits.double() + 0.3 * torch.randn(N, V, generator=gen, dtype=torch.float64)).to(dtype)
        proxy[torch.isneginf(logits)] = -math.inf
    check_against_oracle(logits, labels, proxy, 0.7, fixed, 0.02, upstream(N, gen), backend="cuda")


@pytest.mark.gpu
def test_cuda_unaligned_rows_and_ties():
    if not _native.available("cuda"):
        pytest.skip("lpreg._C was built without CUDA")
    gen = torch.Generator().manual_seed(3)
    big, labels = make_rows(9, 1013, torch.bfloat16, gen)
    logits = big[:, 1:1008]  # odd start and odd V: scalar head and tail around 16-byte loads
    labels = labels.clamp(max=1006)
    check_against_oracle(logits, labels, None, 1.0, False, 0.02, upstream(9, gen), backend="cuda")
    x = torch.zeros(1, 1000)
    x[0, 5] = x[0, 9] = 0.5
    check_against_oracle(x, torch.tensor([9]), None, 1.0, True, 0.02, upstream(1, gen), backend="cuda")
