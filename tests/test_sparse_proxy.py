"""SparseProxy: build_proxy, the lpreg::sparse_proxy_stats op (torch and Triton), the loss."""

import math
import os

import pytest
import torch

import lpreg
from lpreg.sparse_proxy import sparse_proxy_stats_op

from test_policy_loss import make_batch

KAPPA = 0.02


def kept_mask64(z):
    return z >= z.max(-1, keepdim=True).values + math.log(KAPPA)


def test_build_proxy_matches_definition():
    logits, *_ = make_batch(B=3, L=5, V=64, seed=0)
    k = 4
    p = lpreg.build_proxy(logits, k=k)
    assert p.indices.shape == (3, 5, k) and p.logq.shape == (3, 5, k) and p.coverage.shape == (3, 5)
    z = logits.double()
    kept = kept_mask64(z)
    for b in range(3):
        for t in range(5):
            row, K = z[b, t], torch.nonzero(kept[b, t])[:, 0]
            top = K[torch.argsort(row[K], descending=True)][:k]
            assert set(p.indices[b, t][torch.isfinite(p.logq[b, t])].tolist()) == set(top.tolist())
            cov = torch.exp(torch.logsumexp(row[top], 0) - torch.logsumexp(row[K], 0))
            assert float(p.coverage[b, t]) == pytest.approx(float(cov), rel=1e-5)
            assert float(p.logq[b, t].exp().sum()) == pytest.approx(1.0, rel=1e-5)  # renormalised
    many = kept.sum(-1) > k
    assert many.any() and (p.coverage[many] < 1).all()  # |K| > k: coverage reports the loss
    assert torch.all(p.coverage[~many] == 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_equals_dense_when_k_covers_the_kept_set(dtype):
    logits, labels, *_ = make_batch(B=4, L=6, V=64, seed=1)
    old = (logits + 0.3 * torch.randn_like(logits)).to(dtype)  # a different (rollout) policy
    x = logits.to(dtype)
    proxy = lpreg.build_proxy(old, k=64)
    assert torch.all(proxy.coverage == 1)
    labels[0, 0] = -100
    g = torch.randn(3, 4, 6)
    outs = []
    for which in ("dense", "sparse"):
        xx = x.clone().requires_grad_(True)
        if which == "dense":
            s = lpreg.lpreg_token_stats(xx, labels, proxy_logits=old, backend="torch")
        else:
            s = lpreg.sparse_proxy_stats(xx, labels, proxy, backend="torch")
        (grad,) = torch.autograd.grad((g[0] * s.logp + g[1] * s.kl + g[2] * s.entropy).sum(), xx)
        outs.append((s, grad))
    (sd, gd), (ss, gs) = outs
    for a, b in zip(sd, ss):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(gd.float(), gs.float(), **tol)


def test_sparse_kl_float64_and_coverage_below_one():
    logits, labels, *_ = make_batch(B=2, L=6, V=64, seed=2)
    old = logits + 0.5 * torch.randn_like(logits)
    proxy = lpreg.build_proxy(old, k=3)
    assert (proxy.coverage < 1).any()
    s = lpreg.sparse_proxy_stats(logits, labels, proxy, backend="torch")
    z = logits.double()
    logp_all = torch.log_softmax(z, -1)
    idx = proxy.indices.long()
    q = proxy.logq.double().exp()
    want = torch.where(q > 0, q * (proxy.logq.double() - logp_all.gather(-1, idx)), torch.zeros_like(q)).sum(-1)
    torch.testing.assert_close(s.kl.double(), want, rtol=1e-5, atol=1e-6)
    hit = idx == labels[..., None]
    want_plogp = torch.where(hit, proxy.logq, torch.full_like(proxy.logq, -math.inf)).amax(-1)
    assert torch.equal(s.proxy_logp, want_plogp)


def _op_case(seed=3, V=45, k=5, N=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (2 * torch.randn(N, V, generator=g)).to(dtype)
    x[1, :10] = float("-inf")  # masked vocabulary
    old = x.float() + 0.3 * torch.randn(N, V, generator=g)
    old[1, :10] = float("-inf")
    p = lpreg.build_proxy(old, k=k)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[2] = -100
    labels[3] = p.indices[3, 0].long()  # a label inside the proxy
    return x, labels, p.indices.long().contiguous(), p.logq.contiguous()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype,V", [(torch.float32, 45), (torch.bfloat16, 45), (torch.float32, 2100)])
def test_triton_kernel_matches_torch_path(dtype, V):
    x, labels, idx, logq = _op_case(dtype=dtype, V=V)  # V = 2100: several vocabulary blocks
    g = torch.randn(3, x.shape[0], generator=torch.Generator().manual_seed(0))
    res = {}
    for backend in ("torch", "triton"):
        xx = x.clone().requires_grad_(True)
        out = sparse_proxy_stats_op(xx, labels, idx, logq, 1 / 0.8, -100, backend)
        loss = (g[0] * out[0] + g[1] * out[2] + g[2] * out[3]).sum()
        (grad,) = torch.autograd.grad(loss, xx)
        res[backend] = (out, grad)
    (ot, gt), (ok, gk) = res["torch"], res["triton"]
    for a, b in zip(ot, ok):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
    # both paths round each fp32 gradient entry once: at most one bf16 ulp apart
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(gt.float(), gk.float(), **tol)
    assert torch.all(gk[2] == 0)  # ignore_index row: zero gradient


def test_nan_row_gives_nan():
    x, labels, idx, logq = _op_case()
    x[4, 7] = float("nan")
    out = sparse_proxy_stats_op(x, labels, idx, logq, 1.0, -100, "torch")
    assert all(math.isnan(float(o[4])) for o in out[:4])


def test_policy_loss_with_sparse_proxy_equals_dense_proxy():
    logits, labels, adv, old_logp, mask = make_batch(B=5, L=8, V=64, seed=4)
    old_logits = logits + 0.3 * torch.randn_like(logits)
    sparse = lpreg.build_proxy(old_logits, k=64)
    res = []
    for proxy in (old_logits, sparse):
        x = logits.clone().requires_grad_(True)
        loss, m = lpreg.lpreg_policy_loss(x, labels, adv, old_logp, mask, rho=0.6, proxy=proxy, backend="torch")
        res.append((loss, torch.autograd.grad(loss, x)[0], m))
    assert res[0][2]["actor/lpreg_frac"] > 0
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-5, atol=1e-7)
    assert res[0][2] == pytest.approx(res[1][2], rel=1e-5, abs=1e-7)


def test_bad_input():
    logits, labels, *_ = make_batch(B=2, L=3, V=16, seed=5)
    with pytest.raises(ValueError, match="k must"):
        lpreg.build_proxy(logits, k=0)
    with pytest.raises(ValueError, match="threshold"):
        lpreg.build_proxy(logits, threshold=2.0)
    p = lpreg.build_proxy(logits, k=4)
    with pytest.raises(ValueError, match="proxy"):
        lpreg.sparse_proxy_stats(logits[:1], labels[:1, :2], p)
    wide = lpreg.build_proxy(logits, k=20)  # k > V pads with -inf
    assert wide.logq.shape[-1] == 20 and torch.isneginf(wide.logq[..., 16:]).all()
    wide_stats = lpreg.sparse_proxy_stats(logits, labels, wide)  # its padding indices are in range
    assert torch.isfinite(wide_stats.kl).all()
    broken = lpreg.SparseProxy(p.indices.clone(), p.logq, p.coverage)
    broken.indices[0, 1, 2] = 16  # out of the vocabulary: an error, never a silent clamp
    with pytest.raises(ValueError, match=r"proxy.indices must be in \[0, 16\), got 16"):
        lpreg.sparse_proxy_stats(logits, labels, broken)
