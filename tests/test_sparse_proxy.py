"""SparseProxy: build_proxy, the lpreg::sparse_proxy_stats op (torch and Triton), the loss."""

import math
import os

import pytest
import torch

import lpreg
from lpreg._sparse_proxy_ops import sparse_proxy_stats_op
from tests.test_policy_loss import make_batch

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
        out = sparse_proxy_stats_op(xx, labels, idx, logq, None, 1 / 0.8, -100, backend)
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
    out = sparse_proxy_stats_op(x, labels, idx, logq, None, 1.0, -100, "torch")
    assert all(math.isnan(float(o[4])) for o in out[:4])


def test_policy_loss_with_sparse_proxy_equals_dense_proxy():
    logits, labels, adv, old_logp, mask = make_batch(B=5, L=8, V=64, seed=4)
    old_logits = logits + 0.3 * torch.randn_like(logits)
    sparse = lpreg.build_proxy(old_logits, k=64)
    res = []
    for proxy in (old_logits, sparse):
        x = logits.clone().requires_grad_(True)
        # compat="paper" (the default when this test was written): its selection is active here
        loss, m = lpreg.lpreg_policy_loss(x, labels, adv, old_logp, mask, rho=0.6, proxy=proxy, backend="torch",
                                          compat="paper")
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


# ---------------------------------------------------------------- the sampled label's exact log q

def spec_label_logq64(logits, labels, *, temperature, mode, threshold, ignore_index=-100):
    """Float64 transcription of docs/spec.md §1: log q(label) = y_label - logsumexp_K(y),
    y = logits / T; -inf for a label outside K, 0 for an ignored position."""
    y = logits.double() / temperature
    if mode == "min_p":
        kept = y >= y.amax(-1, keepdim=True) + math.log(threshold)
    else:
        kept = y >= torch.logsumexp(y, -1, keepdim=True) + math.log(threshold)
        first = torch.zeros_like(kept).scatter_(-1, y.argmax(-1, keepdim=True), True)
        kept = torch.where(kept.any(-1, keepdim=True), kept, first)
    lse_k = torch.logsumexp(torch.where(kept, y, torch.full_like(y, -math.inf)), -1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))[..., None]
    exact = torch.where(kept.gather(-1, safe)[..., 0], y.gather(-1, safe)[..., 0] - lse_k,
                        torch.full_like(lse_k, -math.inf))
    return torch.where(valid, exact, torch.zeros_like(exact))


def _outside_top_k_case(seed=6, k=2):
    """(logits, labels) where several labels are kept (in K) but not among the k largest."""
    logits, labels, *_ = make_batch(B=4, L=8, V=64, seed=seed)
    probs_rank = logits.argsort(-1, descending=True)
    labels[0, :4] = probs_rank[0, :4, k]  # rank k (0-based): outside the top k
    labels[1, 0] = -100
    return logits, labels


@pytest.mark.parametrize("mode,threshold", [("min_p", 0.02), ("min_p", 0.3), ("fixed", 0.01)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_build_proxy_label_logq_matches_float64(mode, threshold, temperature):
    logits, labels = _outside_top_k_case()
    p = lpreg.build_proxy(logits, labels=labels, temperature=temperature, mode=mode, threshold=threshold, k=2)
    want = spec_label_logq64(logits, labels, temperature=temperature, mode=mode, threshold=threshold)
    assert p.label_logq.shape == labels.shape and p.label_logq.dtype == torch.float32
    assert torch.equal(torch.isneginf(p.label_logq), torch.isneginf(want))  # the same kept set
    # fp32 logsumexp of at most 64 terms of magnitude <= ~25: a few ulp of 25, about 1e-5
    torch.testing.assert_close(p.label_logq.double(), want, rtol=1e-5, atol=1e-5)
    assert float(p.label_logq[1, 0]) == 0.0  # ignored position
    if mode == "min_p" and threshold == 0.02:  # kept labels outside the top 2 exist here
        cap = (p.indices.long() == labels[..., None]).any(-1)
        assert (torch.isfinite(p.label_logq) & ~cap).any()
    # without labels the proxy carries no label slot; the (index, log q) pairs are the same
    plain = lpreg.build_proxy(logits, temperature=temperature, mode=mode, threshold=threshold, k=2)
    assert plain.label_logq is None
    assert torch.equal(plain.indices, p.indices) and torch.equal(plain.logq, p.logq)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpu"])
def test_sparse_proxy_stats_returns_the_exact_label_logq(backend):
    logits, labels = _outside_top_k_case()
    old = logits + 0.3 * torch.randn_like(logits)
    p = lpreg.build_proxy(old, labels=labels, temperature=0.9, k=2)
    assert (p.coverage < 1).any()
    dense = lpreg.lpreg_token_stats(logits, labels, temperature=0.9, proxy_logits=old, backend="torch")
    s = lpreg.sparse_proxy_stats(logits, labels, p, temperature=0.9, backend=backend)
    assert torch.equal(s.proxy_logp, p.label_logq)  # returned as stored
    # the dense proxy's log q of the label: the same kept set, the same value to fp32 rounding
    assert torch.equal(torch.isneginf(s.proxy_logp), torch.isneginf(dense.proxy_logp))
    torch.testing.assert_close(s.proxy_logp, dense.proxy_logp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compat", ["paper", "released"])
def test_off_policy_loss_with_sparse_proxy_equals_dense_rollout_logits(compat):
    # coverage 1 (k = V): build_proxy(rollout_logits, labels=...) is the dense proxy, exactly
    logits, labels, adv, old_logp, mask = make_batch(B=5, L=8, V=64, seed=7)
    rollout_logits = logits + 0.3 * torch.randn_like(logits)
    kw = dict(temperature=0.9, mode="min_p", threshold=0.02)
    sparse = lpreg.build_proxy(rollout_logits, labels=labels, k=64, **kw)
    assert torch.all(sparse.coverage == 1)
    res = []
    for proxy in (rollout_logits, sparse):
        x = logits.clone().requires_grad_(True)
        # rho = 0.9: both compat forms select a few tokens of this batch
        loss, m = lpreg.lpreg_policy_loss(x, labels, adv, old_logp, mask, compat=compat, rho=0.9, proxy=proxy,
                                          backend="torch", **kw)
        res.append((loss, torch.autograd.grad(loss, x)[0], m))
    assert res[0][2]["actor/lpreg_frac"] > 0
    # fp32 on both sides; the sparse KL sums the same kept terms in another order
    torch.testing.assert_close(res[1][0], res[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-5, atol=1e-7)
    assert res[1][2] == pytest.approx(res[0][2], rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("compat", ["paper", "released"])
def test_label_outside_the_top_k_is_still_selected(compat):
    # k = 2 < |K|: kept labels beyond the top 2 must keep their exact log q, so the Lp-Reg
    # selection (and the k3 term, which reads only logp and proxy_logp) equals the dense one
    logits, labels = _outside_top_k_case(seed=8)
    B, L, V = logits.shape
    adv = -torch.ones(B)
    mask = torch.ones(B, L)
    old_logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    rollout_logits = logits + 0.2 * torch.randn_like(logits)
    with_labels = lpreg.build_proxy(rollout_logits, labels=labels, k=2)
    without = lpreg.build_proxy(rollout_logits, k=2)
    assert (with_labels.coverage < 1).any()
    outside = ~(with_labels.indices.long() == labels[..., None]).any(-1) & torch.isfinite(with_labels.label_logq)
    assert outside.sum() >= 3  # kept labels outside the top k
    kw = dict(compat=compat, rho=0.9, kl_estimator="k3", backend="torch")
    frac = {}
    for name, proxy in (("dense", rollout_logits), ("labels", with_labels), ("no_labels", without)):
        x = logits.clone().requires_grad_(True)
        loss, m = lpreg.lpreg_policy_loss(x, labels, adv, old_logp, mask, proxy=proxy, **kw)
        frac[name] = (loss, torch.autograd.grad(loss, x)[0], m["actor/lpreg_frac"])
    assert frac["labels"][2] == pytest.approx(frac["dense"][2], abs=1e-7)  # the same tokens selected
    assert frac["labels"][2] > frac["no_labels"][2]  # the outside-top-k labels are among them
    torch.testing.assert_close(frac["labels"][0], frac["dense"][0], rtol=1e-5, atol=1e-6)  # fp32, same terms
    torch.testing.assert_close(frac["labels"][1], frac["dense"][1], rtol=1e-5, atol=1e-7)


def test_build_proxy_label_checks_and_backend_resolution():
    logits, labels, *_ = make_batch(B=2, L=3, V=16, seed=9)
    with pytest.raises(ValueError, match=r"labels must have shape"):
        lpreg.build_proxy(logits, labels=labels[:, :2])
    bad = labels.clone()
    bad[0, 0] = 16
    with pytest.raises(ValueError, match=r"labels must be in \[0, 16\) or ignore_index=-100, got 16"):
        lpreg.build_proxy(logits, labels=bad)
    p = lpreg.build_proxy(logits, labels=labels, k=4)
    assert p.flatten().label_logq.shape == (6,) and p.flatten().rows(1, 3).label_logq.shape == (2,)
    wrong = p._replace(label_logq=p.label_logq[:, :2])
    with pytest.raises(ValueError, match=r"proxy.label_logq must have shape \(2, 3\), got \(2, 2\)"):
        lpreg.sparse_proxy_stats(logits, labels, wrong)
    # the backend is resolved as for token stats: the same errors, never a silent torch run
    for backend in ("cuda", "bogus"):
        with pytest.raises(ValueError) as want:
            lpreg.lpreg_token_stats(logits, labels, backend=backend)
        with pytest.raises(ValueError) as got:
            lpreg.sparse_proxy_stats(logits, labels, p, backend=backend)
        assert str(got.value) == str(want.value)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_sparse_proxy_op(backend):
    x, labels, idx, logq = _op_case()
    label_logq = torch.randn(x.shape[0])
    for lab, llq in ((labels, label_logq), (labels, None), (None, None)):
        torch.library.opcheck(sparse_proxy_stats_op, (x.clone().requires_grad_(), lab, idx, logq, llq, 1.0, -100,
                                                      backend))
