"""Every defect the property-based tests (tests/test_fuzz_*.py) found, shrunk to a plain test.

Each test asserts the correct behaviour; every one of these defects is fixed.
"""

import math

import pytest
import torch

import lpreg
from tests.backends import ALL

BACKENDS = list(ALL)
F32_MAX = torch.finfo(torch.float32).max


# ---- an ignored row whose logits overflow exp() got a NaN gradient (torch, triton)

@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_row_with_a_large_logit_has_an_exactly_zero_gradient(backend):
    z = torch.zeros(2, 3)
    z[:, 1] = 120.0  # exp(120) overflows fp32
    x = z.clone().requires_grad_()
    s = lpreg.lpreg_token_stats(x, torch.tensor([0, -100]), backend=backend)
    (grad,) = torch.autograd.grad((s.logp + s.kl + s.entropy).sum(), x)
    assert torch.equal(grad[1], torch.zeros(3))
    assert bool(grad[0].isfinite().all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_position_with_a_large_logit_has_an_exactly_zero_gradient(backend):
    logits = torch.zeros(1, 2, 3)
    logits[0, 1, 1] = 120.0
    x = logits.clone().requires_grad_()
    loss, _ = lpreg.lpreg_policy_loss(x, torch.tensor([[0, 2]]), torch.tensor([-1.0]), None,
                                      torch.tensor([[1.0, 0.0]]), compat="paper", backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad[0, 1], torch.zeros(3))
    assert bool(grad.isfinite().all())


# ---- a row holding +inf gives NaN for that row only, like a NaN row (all four outputs)

@pytest.mark.parametrize("backend", BACKENDS)
def test_posinf_row_proxy_logp_is_nan(backend):
    x = torch.tensor([[1.5, -0.3], [math.inf, 0.5]])
    s = lpreg.lpreg_token_stats(x, torch.tensor([1, 1]), backend=backend)
    assert all(bool(t[1].isnan()) for t in s), s
    assert all(bool(t[0].isfinite()) for t in s), s


@pytest.mark.parametrize("backend", BACKENDS)
def test_posinf_row_with_a_dense_proxy_is_nan(backend):
    x = torch.tensor([[math.inf]])
    s = lpreg.lpreg_token_stats(x, torch.tensor([0]), proxy_logits=torch.tensor([[-0.8]]), backend=backend)
    assert all(bool(t[0].isnan()) for t in s), s


# ---- V = 1: torch calls an (N, 1) tensor contiguous whatever its last stride

@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_of_one_with_a_zero_last_stride(backend):
    x = torch.empty_strided((2, 1), (1, 0)).fill_(0.5).requires_grad_()
    assert x.is_contiguous()
    s = lpreg.lpreg_token_stats(x, torch.tensor([0, -100]), backend=backend)
    (grad,) = torch.autograd.grad((s.logp + s.entropy).sum(), x)
    assert s.logp.tolist() == [0.0, 0.0] and grad.tolist() == [[0.0], [0.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_proxy_vocabulary_of_one_with_a_zero_last_stride(backend):
    x = torch.empty_strided((2, 1), (1, 0)).fill_(0.5)
    proxy = lpreg.build_proxy(x, k=2)
    s = lpreg.sparse_proxy_stats(x, torch.tensor([0, 0]), proxy, backend=backend)
    assert s.logp.tolist() == [0.0, 0.0] and s.kl.tolist() == [0.0, 0.0]


# ---- finite logits near the fp32 maximum

@pytest.mark.parametrize("backend", BACKENDS)
def test_spread_beyond_fp32_range_keeps_the_entropy_gradient_finite(backend):
    # x - lse = -6e38 rounds to -inf (p = 0 exactly); p (log p + H) must be 0 there, not 0 * -inf
    x = torch.tensor([[3e38, -3e38]], requires_grad=True)
    s = lpreg.lpreg_token_stats(x, torch.tensor([0]), backend=backend)
    (grad,) = torch.autograd.grad(s.entropy.sum(), x)
    assert s.entropy.item() == 0.0 and grad.tolist() == [[0.0, 0.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_logits_beyond_fp32_count_as_infinite(backend):
    # docs/spec.md §4: z/T is formed in fp32, so it must lie in the fp32 range. Above it the row
    # holds +inf (NaN row, never a silent finite answer); below it the token is masked, which is
    # also its float64 limit (p = (0, 1): logp = 0, H = 0, zero gradient).
    above = torch.tensor([[F32_MAX * 0.6, 0.0]], requires_grad=True)
    s = lpreg.lpreg_token_stats(above, torch.tensor([0]), temperature=0.5, backend=backend)
    (grad,) = torch.autograd.grad(s.logp.sum(), above)
    assert all(math.isnan(t.item()) for t in s) and not grad.isfinite().any()
    below = torch.tensor([[-F32_MAX * 0.6, 0.0]], requires_grad=True)
    s = lpreg.lpreg_token_stats(below, torch.tensor([1]), temperature=0.5, backend=backend)
    (grad,) = torch.autograd.grad(s.logp.sum() + s.entropy.sum(), below)
    assert [s.logp.item(), s.entropy.item(), s.kl.item()] == [0.0, 0.0, 0.0]
    assert grad.tolist() == [[0.0, 0.0]]


# ---- num_tokens = 0: a step with no valid token (every response empty) is legal

def test_num_tokens_zero_gives_zero_loss():
    x = torch.randn(1, 2, 5, requires_grad=True)
    loss, _ = lpreg.lpreg_policy_loss(x, torch.tensor([[0, 1]]), torch.tensor([-1.0]), None,
                                      torch.zeros(1, 2), compat="paper", num_tokens=0, backend="torch")
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(x))


# ---- degenerate shapes: an empty batch is contiguous for torch whatever its strides

@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_with_a_strided_vocabulary(backend):
    x = torch.zeros(0, 4, requires_grad=True)[:, ::2]  # (0, 2), stride(-1) = 2, is_contiguous()
    s = lpreg.lpreg_token_stats(x, torch.zeros(0, dtype=torch.long), backend=backend)
    kl = lpreg.lpreg_kl(x, backend=backend)
    assert s.logp.shape == (0,) and kl.shape == (0,)


# ---- a kept proxy token at a -inf logit: q > 0 = p, so KL(q || p) = +inf, even when q underflows

@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_token_masked_in_the_policy_gives_infinite_kl(backend):
    # kept: threshold 1e-300 keeps y = -110 (log q = -110 in float64; e^-110 underflows fp32)
    x = torch.tensor([[0.0, -math.inf]])
    proxy = torch.tensor([[0.0, -110.0]])
    s = lpreg.lpreg_token_stats(x, torch.tensor([0]), proxy_logits=proxy, mode="min_p", threshold=1e-300,
                                backend=backend)
    assert s.kl.item() == math.inf


# ---- an off-policy log-ratio above ~88: r = e^(logp - old) overflows fp32

@pytest.mark.parametrize("compat", ["paper", "released"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_overflowing_ratio_on_a_clipped_token_has_a_finite_gradient(backend, compat):
    # A > 0 and r >> 1 + clip_high: the clipped branch -A (1 + clip_high) is the loss, and its
    # gradient is exactly 0 (float64: the same). log r is clamped to 20 before exp (docs/spec.md §3).
    x = torch.zeros(1, 1, 2, requires_grad=True)
    loss, _ = lpreg.lpreg_policy_loss(x, torch.tensor([[0]]), torch.tensor([1.0]), torch.tensor([[-100.0]]),
                                      torch.ones(1, 1), compat=compat, backend=backend)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == -10.0
    assert torch.equal(grad, torch.zeros_like(grad))
