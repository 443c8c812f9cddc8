"""fused_linear_policy_loss == lpreg_policy_loss on materialised logits (loss and gradients)."""

import pytest
import torch

import lpreg
from lpreg.fused_linear import default_chunk_size

from test_policy_loss import make_batch


def make_linear(B=4, L=9, H=72, V=64, seed=0, dtype=torch.float32, with_bias=True):
    """hidden / weight whose logits are the peaked / flat / tailed rows of make_batch."""
    logits, labels, adv, old, mask = make_batch(B=B, L=L, V=V, seed=seed)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g)
    weight = 0.3 * torch.randn(V, H, generator=g)
    bias = 0.1 * torch.randn(V, generator=g) if with_bias else None
    # hidden states whose logits are the structured rows (H > V: the least-squares fit is exact)
    target = logits.reshape(-1, V) - (0 if bias is None else bias)
    hidden = torch.linalg.lstsq(weight, target.T).solution.T.reshape(B, L, H)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), labels, adv, old, mask


def materialised(hidden, weight, bias, labels, adv, old, mask, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    # fp32 logits from the (possibly bf16) inputs, as the fused path computes them
    logits = h.float() @ w.float().T + (0 if b is None else b.float())
    loss, m = lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, backend="torch", **kw)
    grads = torch.autograd.grad(loss, [t for t in (h, w, b) if t is not None])
    return loss, grads, m


def fused(hidden, weight, bias, labels, adv, old, mask, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    loss, m = lpreg.fused_linear_policy_loss(h, w, labels, adv, old, mask, bias=b, backend="torch", **kw)
    grads = torch.autograd.grad(loss * 1.0, [t for t in (h, w, b) if t is not None])
    for g, t in zip(grads, (h, w, b)):
        assert g.dtype == t.dtype
    return loss, grads, m


@pytest.mark.parametrize("chunk", [5, 12, None])  # N = 36: 5 does not divide it, 12 does
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("compat", ["paper", "released"])
def test_fp32_equals_materialised(chunk, with_bias, compat):
    data = make_linear(with_bias=with_bias, seed=1)
    kw = dict(compat=compat, rho=0.6)
    want, want_g, wm = materialised(*data, **kw)
    got, got_g, gm = fused(*data, chunk_size=chunk, **kw)
    assert wm["actor/lpreg_frac"] > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert gm == pytest.approx(wm, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("chunk", [7, 9])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bf16_equals_materialised(chunk, with_bias):
    data = make_linear(with_bias=with_bias, seed=2, dtype=torch.bfloat16)
    kw = dict(compat="paper", rho=0.6, loss_agg_mode="seq-mean-token-mean")
    want, want_g, wm = materialised(*data, **kw)
    got, got_g, gm = fused(*data, chunk_size=chunk, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # fp32 logits on both sides
    for a, b in zip(got_g, want_g):  # gradients are rounded to bf16 once on both sides
        torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-3)
    assert gm["actor/lpreg_frac"] == wm["actor/lpreg_frac"]


def test_sparse_proxy_threshold_and_temperature():
    hidden, weight, bias, labels, adv, old, mask = make_linear(seed=3)
    logits = hidden @ weight.T + bias
    proxy = lpreg.build_proxy(logits + 0.2 * torch.randn_like(logits), k=8, temperature=0.9)
    sel = lpreg.selection_threshold(old, mask, rho=0.5)
    kw = dict(rho=0.5, proxy=proxy, selection_threshold=sel, temperature=0.9, kl_estimator="k3")
    want, want_g, wm = materialised(hidden, weight, bias, labels, adv, old, mask, **kw)
    got, got_g, gm = fused(hidden, weight, bias, labels, adv, old, mask, chunk_size=10, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert gm == pytest.approx(wm, rel=1e-4, abs=1e-6)


def test_dense_proxy_and_all_masked():
    hidden, weight, bias, labels, adv, old, mask = make_linear(seed=4)
    proxy = hidden @ weight.T + bias + 0.3
    want, want_g, _ = materialised(hidden, weight, bias, labels, adv, old, mask, proxy=proxy, rho=0.4)
    got, got_g, _ = fused(hidden, weight, bias, labels, adv, old, mask, proxy=proxy, rho=0.4, chunk_size=8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    zero, zero_g, m = fused(hidden, weight, bias, labels, adv, old, torch.zeros_like(mask), chunk_size=8)
    assert zero.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in zero_g)


def test_default_chunk_size():
    cpu = torch.device("cpu")
    assert default_chunk_size(10, 64, cpu) == 10
    c = default_chunk_size(10**6, 151936, torch.device("cuda"))
    assert c % 16 == 0 and c * 151936 <= 1 << 25
    assert default_chunk_size(10**6, 10**8, cpu) == 1


def test_bad_input():
    hidden, weight, bias, labels, adv, old, mask = make_linear(B=2, L=3, H=20, V=16, seed=5)
    f = lpreg.fused_linear_policy_loss
    with pytest.raises(ValueError, match="weight"):
        f(hidden, weight[:, :4], labels, adv, old, mask)
    with pytest.raises(ValueError, match="bias"):
        f(hidden, weight, labels, adv, old, mask, bias=bias[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        f(hidden, weight, labels, adv, old, mask, chunk_size=0)
    with pytest.raises(ValueError, match="hidden"):
        f(hidden[0], weight, labels, adv, old, mask)
    with pytest.raises(ValueError, match="advantages"):
        f(hidden, weight, labels, adv[:1], old, mask)
    with pytest.raises(ValueError, match="compat"):
        f(hidden, weight, labels, adv, old, mask, compat="x")
