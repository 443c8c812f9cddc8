"""backend="cpu" (and, on a GPU, backend="cuda"): what is specific to the compiled lpreg._C.

The float64 oracle matrix of docs/spec.md (modes, temperatures, vocabularies, dtypes, ties,
NaN / -inf rows, ignore_index, proxies) runs for every backend, "cpu" included, in
test_token_stats.py. Here: mixed-dtype and unaligned rows, the native ops called directly (row
statistics, special rows, empty batches), results independent of the thread count, opcheck of
the compiled ops, the TORCH_CHECK messages; issue 8's ignored row with a logit of 120 (cpu, and
cuda / triton on a GPU); and, on a GPU, the CUDA forward's block skipping against the oracle.
"""

import math

import pytest
import torch

import lpreg
from lpreg import _native
from tests.spec_oracle import assert_backend_matches_spec, make_logits

pytestmark = pytest.mark.skipif(not _native.available("cpu"), reason=_native.unavailable_reason("cpu"))


def upstream(N, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(N, generator=gen, dtype=torch.float64) * 4 - 2 for _ in range(3)]


def f32_log(threshold):
    """log(threshold) as the kernels see it: the op receives it as an fp32 scalar."""
    return float(torch.tensor(math.log(threshold), dtype=torch.float32))


def test_mixed_dtype_proxy_and_strided_rows():
    big = make_logits(6, 1030, seed=5, neg_inf=False).bfloat16()
    logits = big[:, 3:1003]  # rows of unit stride, row stride 1030, unaligned start
    labels = torch.tensor([0, 999, 500, -100, 7, 3])
    proxy = (logits.double() + 0.2 * torch.randn(6, 1000, dtype=torch.float64)).float()
    assert_backend_matches_spec("cpu", logits, labels, upstream(6, 5), temperature=1.0, mode="min_p",
                                threshold=0.02, proxy_logits=proxy)


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
    assert_backend_matches_spec("cpu", x, torch.tensor([5]), upstream(1, 1), temperature=1.0, mode="fixed",
                                threshold=0.02)


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
    x = make_logits(64, 5003, seed=11).bfloat16()
    x[5, 100] = math.nan
    labels = torch.randint(0, 5003, (64,), generator=torch.Generator().manual_seed(11))
    labels[3] = -100
    g = [t.float() for t in upstream(64, 12)]
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
    x = make_logits(5, 33, seed=2, neg_inf=False)
    labels = torch.tensor([0, 32, 5, -100, 9])
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
def test_cuda_unaligned_rows_and_ties():
    if not _native.available("cuda"):
        pytest.fail("on a CUDA machine lpreg._C must be built with CUDA (see bench/gpu_check.sh)")
    big = make_logits(9, 1013, seed=3).bfloat16()
    logits = big[:, 1:1008]  # odd start and odd V: scalar head and tail around 16-byte loads
    labels = torch.randint(0, 1007, (9,), generator=torch.Generator().manual_seed(3))
    assert_backend_matches_spec("cuda", logits, labels, upstream(9, 3), temperature=1.0, mode="min_p",
                                threshold=0.02, device="cuda")
    x = torch.zeros(1, 1000)
    x[0, 5] = x[0, 9] = 0.5
    assert_backend_matches_spec("cuda", x, torch.tensor([9]), upstream(1, 4), temperature=1.0, mode="fixed",
                                threshold=0.02, device="cuda")


# ---- issue 8: an ignored row with a logit above fp32 exp's range --------------------------

@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu),
                                     pytest.param("triton", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ignored_row_with_large_logits_has_zero_gradient(backend, dtype):
    # issue 8's example: one logit of 120 per row (e^120 overflows fp32), the last row ignored.
    # A backward that recomputed p = e^(x - lse) from the ignored row's zeroed lse gave NaN.
    device = "cpu" if backend == "cpu" else "cuda"
    if backend == "cuda" and not _native.available("cuda"):
        pytest.fail("on a CUDA machine lpreg._C must be built with CUDA (see bench/gpu_check.sh)")
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(3, 300, generator=gen) * 30
    z[:, 5] = 120.0
    labels = torch.tensor([1, 2, -100])
    x = z.to(dtype).to(device).requires_grad_(True)
    for proxy in (None, (z + 1.0).to(dtype).to(device)):
        x.grad = None
        s = lpreg.lpreg_token_stats(x, labels.to(device), backend=backend, proxy_logits=proxy)
        (s.logp.sum() + s.kl.sum() + s.entropy.sum()).backward()
        grad = x.grad.float().cpu()
        assert torch.equal(grad[2], torch.zeros(300)), "the ignored row's gradient must be exactly zero"
        assert torch.isfinite(grad[:2]).all()
        for out in s:  # proxy_logp is -inf for a label outside the kept set: not NaN
            assert out[2].item() == 0.0 and not torch.isnan(out[:2]).any()
    # the valid rows are the float64 oracle's, rows with the ignored one included
    assert_backend_matches_spec(backend, z.to(dtype), labels, upstream(3, 8), temperature=0.7, mode="min_p",
                                threshold=0.02, device=device)


# ---- CUDA block skipping: rows whose kept tokens sit in few chunks ------------------------

def _peaked(rows, V, seed, peak=25.0):
    """Noise with a few far larger logits per row: only chunks holding a peak are re-read."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, generator=gen) * 2
    for r in range(rows):
        idx = torch.randint(0, V, (1 + r % 3,), generator=gen)
        x[r, idx] = peak - r
    return x


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_block_skipping_matches_spec(dtype):
    if not _native.available("cuda"):
        pytest.fail("on a CUDA machine lpreg._C must be built with CUDA (see bench/gpu_check.sh)")
    V = 151_936
    big = _peaked(4, V + 3, seed=1).to(dtype)
    labels = torch.tensor([0, 17, V - 1, 4096])
    for logits in (big[:, :V], big[:, 3:]):  # aligned rows, and a scalar head before the chunks
        assert_backend_matches_spec("cuda", logits, labels, upstream(4, 1), temperature=1.0, mode="min_p",
                                    threshold=0.02, device="cuda")
        proxy = (logits.float() + 0.3).to(dtype)  # same element size: the chunked path too
        assert_backend_matches_spec("cuda", logits, labels, upstream(4, 2), temperature=0.8, mode="min_p",
                                    threshold=0.1, proxy_logits=proxy, device="cuda")
    # "fixed" with no token at tau: K = {first argmax}, in a chunk whose max is below the
    # cutoff (+inf); the argmax's chunk alone is re-read
    flat = torch.randn(3, V, generator=torch.Generator().manual_seed(2)) * 0.1
    flat[:, 70_001] = 1.0
    assert_backend_matches_spec("cuda", flat.to(dtype), torch.tensor([70_001, 3, 5]), upstream(3, 3),
                                temperature=1.0, mode="fixed", threshold=0.5, device="cuda")


@pytest.mark.gpu
def test_cuda_rows_beyond_the_chunk_table():
    # fp32 rows longer than 8192 chunks x 128 columns: chunks past the shared-memory table are
    # always re-read (never skipped), so a kept token there still counts
    if not _native.available("cuda"):
        pytest.fail("on a CUDA machine lpreg._C must be built with CUDA (see bench/gpu_check.sh)")
    V = 8192 * 128 + 5000
    x = _peaked(2, V, seed=4, peak=20.0)
    x[0, V - 3000] = 22.0  # the maximum, past the table
    x[1, 100] = 22.0
    assert_backend_matches_spec("cuda", x, torch.tensor([V - 3000, 7]), upstream(2, 4), temperature=1.0,
                                mode="min_p", threshold=0.02, device="cuda")
