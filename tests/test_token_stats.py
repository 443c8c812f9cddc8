"""lpreg_token_stats / lpreg_kl against a float64 evaluation of docs/spec.md, on every backend here.

The Triton kernels run on CPU tensors through TRITON_INTERPRET=1 (set in conftest.py), on
small shapes; the torch and compiled-CPU backends also take the large vocabularies.
"""

import math

import pytest
import torch

import lpreg
from lpreg import _backends
from tests.backends import ALL, runnable
from tests.spec_oracle import OUTPUTS, assert_backend_matches_spec, make_logits, spec_grad, spec_token_stats

BACKENDS = list(ALL)
# The interpreter executes Triton programs in numpy: keep its rows short.
TRITON_MAX_V = 1000


def _upstream(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * 2 + 0.5 for _ in range(3)]


def _check_against_spec(backend, V, dtype, mode, temperature, rows=5, seed=0, proxy=False, threshold=None,
                        device="cpu"):
    threshold = threshold or (0.02 if mode == "min_p" else 0.01)
    logits = make_logits(rows, V, seed=seed).to(dtype).reshape(1, rows, V)
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, V, (1, rows), generator=g)
    if rows > 1:
        labels[0, 1] = -100  # an ignored position
    proxy_logits = make_logits(rows, V, seed=seed + 7).to(dtype).reshape(1, rows, V) if proxy else None
    assert_backend_matches_spec(backend, logits, labels, _upstream(labels.shape, seed + 2), temperature=temperature,
                                mode=mode, threshold=threshold, proxy_logits=proxy_logits, device=device)


def _cases(vocabularies):
    """backend x V, without interpreted Triton on long rows (those run on GPU machines)."""
    return [(b, V) for b in runnable(*BACKENDS) for V in vocabularies if not (b == "triton" and V > TRITON_MAX_V)]


@pytest.mark.parametrize("backend,V", _cases([1, 7, 1000, 32000, 50257, 151936, 262144]))
@pytest.mark.parametrize("mode,temperature", [("min_p", 0.7), ("fixed", 1.3), ("min_p", 1.0)])
def test_fp32_matches_spec(backend, V, mode, temperature):
    rows = 5 if V <= 50257 else 2  # the largest vocabularies: fewer rows
    _check_against_spec(backend, V, torch.float32, mode, temperature, rows=rows, seed=V)


@pytest.mark.parametrize("backend,V", _cases([7, 1000, 32000]))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["min_p", "fixed"])
def test_low_precision_within_twice_eager_error(backend, dtype, V, mode):
    _check_against_spec(backend, V, dtype, mode, 0.9, rows=4, seed=3 * V)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("V", [7, 32000, 151936])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode,proxy", [("min_p", False), ("fixed", False), ("min_p", True), ("fixed", True)])
def test_cuda_backends_match_spec(backend, V, dtype, mode, proxy):
    if not _backends.native_available("cuda") and backend == "cuda":
        pytest.fail("the CUDA extension was not built on this CUDA machine")
    _check_against_spec(backend, V, dtype, mode, 0.9, rows=7, seed=V, proxy=proxy, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["min_p", "fixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_proxy_logits_match_spec(backend, mode, dtype):
    _check_against_spec(backend, 300, dtype, mode, 0.8, rows=6, seed=11, proxy=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_threshold_are_kept(backend):
    # log(kappa) = -1.5 exactly in float32 and float64, so z = zmax - 1.5 sits exactly on
    # the min-p cut: docs/spec.md §1's ">=" keeps it.
    kappa = math.exp(-1.5)
    assert math.log(kappa) == -1.5
    x = torch.full((3, 8), -6.0)
    x[:, 0] = 2.0
    x[:, 1] = 0.5  # exactly at the cut
    x[:, 2] = 0.49  # just below
    labels = torch.tensor([1, 2, 0])
    out = lpreg.lpreg_token_stats(x, labels, mode="min_p", threshold=kappa, backend=backend)
    ref = spec_token_stats(x, labels, mode="min_p", threshold=kappa)
    assert ref["kept"][0, 1] and not ref["kept"][0, 2]
    assert torch.isfinite(out.proxy_logp[0]) and out.proxy_logp[1] == -math.inf
    for name in OUTPUTS:
        torch.testing.assert_close(getattr(out, name).double(), ref[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kappa_one_keeps_only_the_maxima(backend):
    x = torch.tensor([[3.0, 3.0, 1.0, -2.0], [0.0, 5.0, 4.999, 1.0]]).requires_grad_()
    labels = torch.tensor([1, 2])
    out = lpreg.lpreg_token_stats(x, labels, mode="min_p", threshold=1.0, backend=backend)
    ref = spec_token_stats(x, labels, mode="min_p", threshold=1.0)
    assert ref["kept"].sum().item() == 3  # two tied maxima, then one
    for name in OUTPUTS:
        torch.testing.assert_close(getattr(out, name).double(), ref[name], rtol=1e-5, atol=1e-6)
    assert out.proxy_logp[1] == -math.inf
    (grad,) = torch.autograd.grad(out.kl.sum(), x)
    torch.testing.assert_close(grad.double(), spec_grad(ref, g_kl=torch.ones(2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_mode_with_no_token_reaching_tau_keeps_the_first_argmax(backend):
    x = torch.zeros(2, 100)  # every p = 0.01 < tau = 0.05; ties everywhere
    x[1, 7] = x[1, 9] = 0.01  # two tied maxima: the first one (7) alone is kept
    labels = torch.tensor([0, 9])
    out = lpreg.lpreg_token_stats(x, labels, mode="fixed", threshold=0.05, backend=backend)
    assert out.proxy_logp[0].item() == 0.0  # q = one-hot at index 0
    assert out.proxy_logp[1].item() == -math.inf
    torch.testing.assert_close(out.kl[0], torch.tensor(math.log(100.0)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_is_nan_and_other_rows_are_untouched(backend):
    x = make_logits(4, 50, seed=5)
    x[1, 17] = float("nan")
    x[2] = -math.inf
    labels = torch.tensor([3, 4, 5, 6])
    out = lpreg.lpreg_token_stats(x.clone().requires_grad_(), labels, backend=backend)
    ref = spec_token_stats(x, labels)
    for name in ("logp", "kl", "entropy", "proxy_logp"):
        v = getattr(out, name)
        assert torch.isnan(v[1]) and torch.isnan(v[2]), name
        torch.testing.assert_close(v[[0, 3]].double(), ref[name][[0, 3]], rtol=1e-5, atol=1e-6)
    xg = x.clone().requires_grad_()
    out = lpreg.lpreg_token_stats(xg, labels, backend=backend)
    (grad,) = torch.autograd.grad(out.logp[[0, 3]].sum() + out.kl[1], xg)
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 3]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_give_zeros_and_no_gradient(backend):
    x = make_logits(3, 64, seed=2).requires_grad_()
    labels = torch.tensor([-100, 5, -100])
    out = lpreg.lpreg_token_stats(x, labels, backend=backend)
    for name in OUTPUTS:
        assert getattr(out, name)[[0, 2]].eq(0).all(), name
    (grad,) = torch.autograd.grad((out.logp + out.kl + out.entropy).sum(), x)
    assert grad[[0, 2]].eq(0).all() and grad[1].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.zeros(0, 3, 10, requires_grad=True)
    labels = torch.zeros(0, 3, dtype=torch.long)
    out = lpreg.lpreg_token_stats(x, labels, backend=backend)
    assert all(getattr(out, n).shape == (0, 3) for n in OUTPUTS)
    (grad,) = torch.autograd.grad(out.kl.sum() + out.logp.sum(), x)
    assert grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_lpreg_kl_reductions_and_gradient(backend):
    x = make_logits(6, 40, seed=9).reshape(2, 3, 40).requires_grad_()
    ref = spec_token_stats(x, None, temperature=1.5)
    kl = lpreg.lpreg_kl(x, temperature=1.5, backend=backend)
    assert kl.shape == (2, 3)
    torch.testing.assert_close(kl.reshape(-1).double(), ref["kl"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lpreg.lpreg_kl(x, temperature=1.5, reduction="sum", backend=backend).double(),
                               ref["kl"].sum(), rtol=1e-5, atol=1e-5)
    mean = lpreg.lpreg_kl(x, temperature=1.5, reduction="mean", backend=backend)
    torch.testing.assert_close(mean.double(), ref["kl"].mean(), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(mean, x)
    want = spec_grad(ref, g_kl=torch.full((6,), 1 / 6), temperature=1.5)
    torch.testing.assert_close(grad.reshape(-1, 40).double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend):
    base = make_logits(40, 6, seed=4).t()  # (6, 40) with a non-unit vocabulary stride
    labels = torch.arange(6)
    out = lpreg.lpreg_token_stats(base, labels, backend=backend)
    ref = spec_token_stats(base, labels)
    torch.testing.assert_close(out.logp.double(), ref["logp"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["logp", "kl", "entropy"])
def test_each_upstream_gradient_alone(backend, which):
    x = make_logits(4, 33, seed=8).requires_grad_()
    labels = torch.tensor([0, 5, 32, 9])
    out = lpreg.lpreg_token_stats(x, labels, temperature=0.6, backend=backend)
    g = torch.tensor([0.3, -2.0, 1.7, 0.0])
    (grad,) = torch.autograd.grad((getattr(out, which) * g).sum(), x)
    ref = spec_token_stats(x, labels, temperature=0.6)
    want = spec_grad(ref, **{f"g_{which}": g}, temperature=0.6)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)


def test_backends_agree_with_each_other():
    x = make_logits(7, 500, seed=21)
    labels = torch.randint(0, 500, (7,))
    outs = [lpreg.lpreg_token_stats(x, labels, mode="fixed", threshold=0.003, backend=b) for b in runnable(*BACKENDS)]
    for other in outs[1:]:
        for name in OUTPUTS:
            torch.testing.assert_close(getattr(other, name), getattr(outs[0], name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,threshold", [("min_p", 0.02), ("fixed", 0.01), ("fixed", 0.5)])
@pytest.mark.parametrize("proxy", [False, True])
def test_rows_spanning_several_blocks(backend, mode, threshold, proxy):
    # V > the CPU block (1024): the kept set sits in some blocks and not others, so the
    # forward's block skipping in pass 2 and the tail mask are both exercised.
    V, rows = 2500, 6
    x = make_logits(rows, V, seed=31)
    x[0, 2400] += 12.0  # dominant token in the last (partial) block
    x[3, 1100] += 9.0
    x[3, 10] += 8.5  # kept tokens in two different blocks
    x[4] = 0.0
    x[4, 1500] = 0.001  # flat row: every block is kept ("fixed" 0.5 keeps only the argmax)
    logits = x.requires_grad_()
    labels = torch.tensor([2400, 1100, 7, 10, 1500, 2499])
    kw = dict(mode=mode, threshold=threshold, temperature=1.1,
              proxy_logits=make_logits(rows, V, seed=32) if proxy else None)
    out = lpreg.lpreg_token_stats(logits, labels, backend=backend, **kw)
    ref = spec_token_stats(logits, labels, **kw)
    for name in OUTPUTS:
        torch.testing.assert_close(getattr(out, name).double(), ref[name], rtol=1e-5, atol=1e-5, msg=name)
    g = torch.randn(3, rows)
    (grad,) = torch.autograd.grad((out.logp * g[0] + out.kl * g[1] + out.entropy * g[2]).sum(), logits)
    want = spec_grad(ref, g[0], g[1], g[2], temperature=1.1)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)
