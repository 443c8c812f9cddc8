"""Regression: an `ignore_index` row holding a large logit gave a NaN gradient (triton, torch).

The backward recomputed p = exp(x - lse) from the zeroed row statistics of an ignored row:
with a logit above about 88 (fp32 exp overflow) p = inf, and the zero upstream coefficients
turned it into NaN (0 * inf). The ignored-row invariant (lpreg._contract) forbids any
arithmetic on an ignored row: every backend must give it an exact zero gradient. Checked for
token stats, the sparse-proxy op and lpreg_policy_loss (padding becomes ignore_index rows).
"""

import pytest
import torch

import lpreg
from tests.backends import ALL

BACKENDS = list(ALL)
SPARSE_BACKENDS = list(ALL)


def issue_logits(seed=0):
    """The issue's example: 3 rows of 300 logits, one logit of 120 per row (120 > 88)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 300, generator=g) * 30
    z[:, 5] = 120.0
    return z


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["min_p", "fixed"])
@pytest.mark.parametrize("with_proxy", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_token_stats_ignored_row_has_exact_zero_gradient(backend, mode, with_proxy, temperature):
    z = issue_logits()
    labels = torch.tensor([1, 2, -100])  # the last row is ignored
    proxy = issue_logits(seed=1) if with_proxy else None
    x = z.clone().requires_grad_(True)
    s = lpreg.lpreg_token_stats(x, labels, temperature=temperature, mode=mode, threshold=0.05,
                                proxy_logits=proxy, backend=backend)
    (s.logp.sum() + s.kl.sum() + s.entropy.sum()).backward()
    assert torch.all(x.grad[2] == 0), x.grad[2]  # exact zeros, not merely finite
    assert torch.isfinite(x.grad).all()
    assert all(float(o[2]) == 0.0 for o in s)  # and zero outputs
    # the valid rows are unaffected by the ignored one: same result without it
    x2 = z[:2].clone().requires_grad_(True)
    s2 = lpreg.lpreg_token_stats(x2, labels[:2], temperature=temperature, mode=mode, threshold=0.05,
                                 proxy_logits=None if proxy is None else proxy[:2], backend=backend)
    (s2.logp.sum() + s2.kl.sum() + s2.entropy.sum()).backward()
    assert torch.equal(x.grad[:2], x2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_stats_ignored_row_low_precision(backend, dtype):
    z = issue_logits().to(dtype)  # 120 is exact in both formats
    labels = torch.tensor([-100, 2, -100])
    x = z.clone().requires_grad_(True)
    s = lpreg.lpreg_token_stats(x, labels, temperature=0.7, backend=backend)
    (s.logp.sum() + s.kl.sum() + s.entropy.sum()).backward()
    assert torch.all(x.grad[0] == 0) and torch.all(x.grad[2] == 0)
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_row_holding_nan_or_inf_has_zero_gradient(backend):
    # an ignored row is never read: whatever it holds, it gives zeros
    z = issue_logits()
    z[2, 7] = float("nan")
    z[0, 9] = float("inf")
    labels = torch.tensor([-100, 2, -100])
    x = z.clone().requires_grad_(True)
    s = lpreg.lpreg_token_stats(x, labels, backend=backend)
    (s.logp.sum() + s.kl.sum() + s.entropy.sum()).backward()
    assert torch.all(x.grad[0] == 0) and torch.all(x.grad[2] == 0)
    assert torch.isfinite(x.grad[1]).all()


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_sparse_proxy_ignored_row_has_exact_zero_gradient(backend):
    z = issue_logits()
    labels = torch.tensor([1, 2, -100])
    proxy = lpreg.build_proxy(issue_logits(seed=1), k=8)
    proxy.logq[2] = float("nan")  # an ignored row's proxy is never read either
    x = z.clone().requires_grad_(True)
    s = lpreg.sparse_proxy_stats(x, labels, proxy, temperature=0.8, backend=backend)
    (s.logp.sum() + s.kl.sum() + s.entropy.sum()).backward()
    assert torch.all(x.grad[2] == 0), x.grad[2]
    assert torch.isfinite(x.grad).all()
    assert all(float(o[2]) == 0.0 for o in s)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compat", ["paper", "released"])
@pytest.mark.parametrize("sparse", [False, True])
def test_policy_loss_padded_position_has_zero_gradient(backend, compat, sparse):
    # response_mask == 0 positions become ignore_index rows: a padded position holding one
    # logit of 120 must give a finite loss and a zero (not NaN) gradient
    g = torch.Generator().manual_seed(3)
    B, L, V = 2, 4, 300
    logits = torch.randn(B, L, V, generator=g) * 3
    logits[1, 3, 5] = 120.0  # a padded position
    labels = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L)
    mask[1, 3] = 0
    adv = torch.tensor([1.0, -1.0])
    old_logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0] - 0.1
    proxy = lpreg.build_proxy(logits + 0.1, labels, k=16) if sparse else None
    x = logits.clone().requires_grad_(True)
    loss, _ = lpreg.lpreg_policy_loss(x, labels, adv, old_logp, mask, compat=compat, rho=0.5, proxy=proxy,
                                      backend=backend)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(x.grad[1, 3] == 0), x.grad[1, 3]
    assert torch.isfinite(x.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ignored_row_zero_gradient_on_gpu(backend):
    z = issue_logits().cuda()
    labels = torch.tensor([1, 2, -100], device="cuda")
    for proxy in (None, lpreg.build_proxy(issue_logits(seed=1).cuda(), k=8)):
        x = z.clone().requires_grad_(True)
        if proxy is None:
            s = lpreg.lpreg_token_stats(x, labels, backend=backend)
        else:
            s = lpreg.sparse_proxy_stats(x, labels, proxy, backend=backend)
        (s.logp.sum() + s.kl.sum() + s.entropy.sum()).backward()
        assert torch.all(x.grad[2] == 0) and torch.isfinite(x.grad).all()
