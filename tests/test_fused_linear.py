"""fused_linear_policy_loss == lpreg_policy_loss on materialised logits (loss and gradients)."""

import math

import pytest
import torch

import lpreg
from lpreg.fused_linear import default_chunk_size, fused_linear_token_stats
from tests.test_policy_loss import make_batch


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
    kw = dict(compat="paper", rho=0.5, proxy=proxy, selection_threshold=sel, temperature=0.9, kl_estimator="k3")
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
    # CPU: every fp32 chunk buffer stays below glibc's largest mmap threshold (32 MiB), so freed
    # buffers are reused warm instead of page-faulted anew (lpreg/_fused_linear_chunks.py)
    for V in (1000, 32_000, 151_936):
        c = default_chunk_size(10**6, V, cpu)
        assert c % 16 == 0 and c * V * 4 < 32 << 20 and (c + 16) * V * 4 > 30 << 20, (V, c)
    assert default_chunk_size(10**6, 32_000, cpu) == 240


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


# ---------------------------------------------------------------- the two-pass default path

def make_selectable(seed, B=4, L=9):
    """make_linear with labels drawn from each row's kept set (min-p 0.02) and per-token
    advantages of both signs, so that both forms select several tokens (make_batch's filtered
    tail labels fill the bottom-k and are never selectable)."""
    hidden, weight, bias, labels, adv, old, mask = make_linear(B=B, L=L, seed=seed)
    logits = hidden @ weight.T + bias
    kept = logits >= logits.amax(-1, keepdim=True) + math.log(0.02)
    g = torch.Generator().manual_seed(seed)
    labels = torch.where(kept, torch.rand(kept.shape, generator=g), -1.0).argmax(-1)
    adv = torch.randn(B, L, generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    old = logp + 0.3 * torch.randn(B, L, generator=g)
    return hidden, weight, bias, labels, adv, old, mask


def assert_close_grad(a, b):
    """fp32 gradients summed in another order (chunked g W and g^T h): the rounding error of a
    sum of N or V products scales with its largest term, so the absolute tolerance is relative
    to the tensor's largest entry (1e-5 of it: ~100 fp32 ulp), and 1e-4 relative per entry."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def assert_same(got, want, rtol=1e-5):
    """Loss, gradients and metrics of the fused call against the materialised one.

    Both sides compute the same fp32 logits (chunked vs whole matmul: the sums run in a
    different order, a few ulp) and then the same fp32 ops, so the loss agrees to ~1e-6
    relative; gradients go through one more sum over V or N rows (see assert_close_grad).
    """
    (loss, grads, m), (want_loss, want_grads, wm) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=1e-6)
    for a, b in zip(grads, want_grads):
        assert_close_grad(a, b)
    assert m == pytest.approx(wm, rel=1e-4, abs=1e-6)


def bottom_rows(data, **kw):
    """The selection's candidate rows (bottom-k mask) as the materialised path fixes them."""
    from lpreg import _loss_terms as pl

    hidden, weight, bias, labels, adv, old, mask = data
    cfg = lpreg.LossConfig(compat=kw.get("compat", "released"), rho=kw.get("rho", 0.01), backend="torch")
    batch = pl.prepare(tuple(hidden.shape[:2]), hidden.device, labels, adv, old, mask, cfg)
    logits = (hidden @ weight.T + (0 if bias is None else bias)).reshape(-1, weight.shape[0])
    logp = pl.compute_token_stats(logits, batch.labels, None, cfg)[0]
    return pl.global_selection(batch, logp, cfg, None)[0]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("proxy_kind", [None, "dense", "sparse"])
@pytest.mark.parametrize("compat", ["paper", "released"])
@pytest.mark.parametrize("chunk", [1, 36])  # one row per chunk; the whole batch (N = 36) in one chunk
def test_two_pass_equals_materialised(chunk, compat, proxy_kind, agg):
    data = make_selectable(seed=2)
    hidden, weight, bias = data[:3]
    logits = hidden @ weight.T + bias
    g = torch.Generator().manual_seed(6)
    proxy = None
    if proxy_kind == "dense":
        proxy = logits + 0.5 * torch.randn(logits.shape, generator=g)
    elif proxy_kind == "sparse":
        proxy = lpreg.build_proxy(logits + 0.5 * torch.randn(logits.shape, generator=g), k=6)
    kw = dict(compat=compat, rho=0.3, loss_agg_mode=agg, proxy=proxy)
    want = materialised(*data, **kw)
    assert want[2]["actor/lpreg_frac"] > 0  # the second pass has work to do
    assert_same(fused(*data, chunk_size=chunk, **kw), want)


@pytest.mark.parametrize("compat", ["paper", "released"])
def test_selected_row_in_every_chunk(compat):
    hidden, weight, bias, labels, adv, old, mask = make_selectable(B=6, L=8, seed=7)
    sign = torch.tensor([-1.0, 1.0]).repeat(4)  # A < 0 at every other position
    data = (hidden, weight, bias, labels, adv.abs() * sign, old, torch.ones_like(mask))
    kw = dict(compat=compat, rho=1.0)  # every A < 0 token is a candidate
    bottom = bottom_rows(data, **kw)
    chunk = 3
    assert all(bool(bottom[a:a + chunk].any()) for a in range(0, bottom.numel(), chunk))  # the premise
    assert_same(fused(*data, chunk_size=chunk, **kw), materialised(*data, **kw))


@pytest.mark.parametrize("compat", ["paper", "released"])
def test_no_selected_rows(compat):
    hidden, weight, bias, labels, adv, old, mask = make_linear(seed=8)
    adv = adv.abs() + 0.1  # no A < 0 token: neither form can select anything
    data = (hidden, weight, bias, labels, adv, old, mask)
    want = materialised(*data, compat=compat, rho=0.3)
    got = fused(*data, compat=compat, rho=0.3, chunk_size=5)
    assert want[2]["actor/lpreg_frac"] == 0 and got[2]["actor/lpreg_frac"] == 0
    assert_same(got, want)


def test_default_compat_is_released():
    data = make_selectable(seed=4)
    want = materialised(*data, compat="released", rho=0.3)
    paper = materialised(*data, compat="paper", rho=0.3)
    assert abs(want[0].item() - paper[0].item()) > 1e-4  # the two forms differ on this batch
    assert_same(fused(*data, rho=0.3, chunk_size=7), want)


def test_second_pass_recomputes_only_the_candidate_rows(monkeypatch):
    """Pass 1 computes every row once, pass 2 the bottom-k rows only, each chunk <= chunk_size."""
    from lpreg import _fused_linear_chunks as chunks

    data = make_selectable(seed=5)
    kw = dict(compat="paper", rho=0.25)
    k = int(bottom_rows(data, **kw).sum())
    sizes = []
    original = chunks.ChunkMatmuls.logits

    def counting(self, rows):
        out = original(self, rows)
        sizes.append(out.shape[0])
        return out

    monkeypatch.setattr(chunks.ChunkMatmuls, "logits", counting)
    fused(*data, chunk_size=5, **kw)
    assert sum(sizes) == 36 + k and max(sizes) <= 5
    sizes.clear()
    sel = lpreg.selection_threshold(data[5], data[6], rho=0.25)
    fused(*data, chunk_size=5, selection_threshold=sel, **kw)  # known selection: one pass
    assert sum(sizes) == 36


def test_threshold_path_equals_default_on_policy():
    """On-policy (old_logp = current logp) the step-wide threshold selects what the call-wide
    bottom-k does, so the one-pass and two-pass paths agree."""
    hidden, weight, bias, labels, adv, _, mask = make_selectable(seed=1)
    logp = torch.log_softmax(hidden @ weight.T + bias, -1).gather(-1, labels[..., None])[..., 0]
    data = (hidden, weight, bias, labels, adv, logp, mask)
    sel = lpreg.selection_threshold(logp, mask, rho=0.3)
    one = fused(*data, compat="paper", rho=0.3, selection_threshold=sel, chunk_size=6)
    two = fused(*data, compat="paper", rho=0.3, chunk_size=6)
    assert_same(one, two)


@pytest.mark.parametrize("compat", ["paper", "released"])
def test_on_policy_old_logp_none(compat):
    hidden, weight, bias, labels, adv, _, mask = make_selectable(seed=2)
    data = (hidden, weight, bias, labels, adv, None, mask)
    want = materialised(*data, compat=compat, rho=0.3)
    got = fused(*data, compat=compat, rho=0.3, chunk_size=7)
    assert_same(got, want)
    assert got[2]["actor/ppo_kl"] == 0.0 and got[2]["actor/pg_clipfrac"] == 0.0  # ratio exactly 1
    if compat == "paper":  # on-policy, a SelectionThreshold applies to this pass's log-probs
        # this pass's own log-probs (the fused chunks'), so that the k-th token (the new candidate count
        # metric counts it) sits exactly at the threshold, not one rounding away from it
        logp = lpreg.fused_linear_token_stats(hidden, weight, labels, bias=bias, chunk_size=7, backend="torch").logp
        sel = lpreg.selection_threshold(logp.detach(), mask, rho=0.3)
        assert_same(fused(*data, compat=compat, rho=0.3, chunk_size=7, selection_threshold=sel), want)


def test_num_tokens_is_the_token_mean_denominator():
    data = make_selectable(seed=4)
    n = int(((data[6] > 0) & (data[3] != -100)).sum())
    want = materialised(*data, rho=0.3, num_tokens=3 * n)
    got = fused(*data, rho=0.3, num_tokens=3 * n, chunk_size=8)
    assert_same(got, want)
    base = fused(*data, rho=0.3, chunk_size=8)
    torch.testing.assert_close(got[0], base[0] / 3)  # same terms, 3x the denominator (fp32 rounding)
    with pytest.raises(ValueError, match="num_tokens"):
        fused(*data, num_tokens=-1)  # 0 is legal (no valid token anywhere), a negative count is not


def test_nan_hidden_gives_nan_loss():
    hidden, weight, bias, labels, adv, old, mask = make_linear(seed=14)
    hidden = hidden.clone()
    hidden[0, 0, 3] = float("nan")
    for compat in ("paper", "released"):
        loss, _, _ = fused(hidden, weight, bias, labels, adv, old, mask, compat=compat, rho=0.3, chunk_size=5)
        assert torch.isnan(loss)


# ---------------------------------------------------------------- a real peer: Liger-Kernel

def test_liger_grpo_agrees_at_beta_zero():
    """Liger's fused linear GRPO (dapo = token-mean, beta 0) is our clipped surrogate with beta 0."""
    pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed (bench extra)")
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    hidden, weight, bias, labels, adv, old, mask = make_linear(seed=15)
    valid = mask.clone()  # liger has no ignore_index: labels stay in range, the mask drops tokens
    kw = dict(compat="paper", beta=0.0, clip_low=0.2, clip_high=0.28)
    want, want_g, wm = fused(hidden, weight, bias, labels, adv, old, valid, chunk_size=7, **kw)
    assert wm["actor/pg_clipfrac"] > 0  # the clip acts on this batch
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    liger = LigerFusedLinearGRPOLoss(beta=0.0, compiled=False, use_ref_model=False, chunk_size=1, epsilon_low=0.2,
                                     epsilon_high=0.28, loss_type="dapo")
    loss, _ = liger(h, w, labels, valid, adv, bias=b, old_per_token_logps=old)
    grads = torch.autograd.grad(loss, (h, w, b))
    # two fp32 implementations of one formula: lse and the V-long sums in different orders
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    for a, c in zip(grads, want_g):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- fused_linear_token_stats

def token_stats_pair(hidden, weight, bias, labels, chunk=None, **kw):
    """(fused stats, grads) and (materialised stats, grads) for one random upstream gradient."""
    g = torch.Generator().manual_seed(21)
    ups = [torch.randn(labels.shape, generator=g) for _ in range(3)]  # upstream for logp, kl, entropy
    results = []
    for fused_path in (True, False):
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.detach().clone().requires_grad_(True)
        b = None if bias is None else bias.detach().clone().requires_grad_(True)
        if fused_path:
            st = fused_linear_token_stats(h, w, labels, bias=b, chunk_size=chunk, backend="torch", **kw)
        else:
            logits = h.float() @ w.float().T + (0 if b is None else b.float())
            proxy = kw.pop("proxy", None)
            if isinstance(proxy, lpreg.SparseProxy):
                st = lpreg.sparse_proxy_stats(logits, labels, proxy, backend="torch", temperature=kw["temperature"])
            else:
                st = lpreg.lpreg_token_stats(logits, labels, proxy_logits=proxy, backend="torch", **kw)
        total = (st.logp * ups[0] + st.kl * ups[1] + st.entropy * ups[2]).sum()
        grads = torch.autograd.grad(total, [t for t in (h, w, b) if t is not None])
        results.append((st, grads))
    return results


@pytest.mark.parametrize("chunk", [1, 7, None])
@pytest.mark.parametrize("proxy_kind", [None, "dense", "sparse"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_token_stats_equals_materialised(chunk, proxy_kind, with_bias):
    hidden, weight, bias, labels, _, _, _ = make_linear(seed=16, with_bias=with_bias)
    labels = labels.clone()
    labels[1, 2] = labels[3, 0] = -100  # ignored rows: zeros and no gradient
    logits = hidden @ weight.T + (0 if bias is None else bias)
    g = torch.Generator().manual_seed(16)
    proxy = None
    if proxy_kind == "dense":
        proxy = logits + 0.5 * torch.randn(logits.shape, generator=g)
    elif proxy_kind == "sparse":
        proxy = lpreg.build_proxy(logits + 0.5 * torch.randn(logits.shape, generator=g), k=6, temperature=0.8)
    (got, got_g), (want, want_g) = token_stats_pair(hidden, weight, bias, labels, chunk, temperature=0.8,
                                                     proxy=proxy)
    # same fp32 logits up to the matmul's summation order: a few ulp in every statistic
    for a, b in zip(got, want):
        assert a.shape == labels.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert got.logp[1, 2] == 0 and got.kl[3, 0] == 0
    for a, b in zip(got_g, want_g):
        assert_close_grad(a, b)
    assert torch.equal(got_g[0][1, 2], torch.zeros_like(got_g[0][1, 2]))  # ignored row: exactly zero


def test_token_stats_fixed_mode_2d_and_bf16():
    hidden, weight, bias, labels, _, _, _ = make_linear(seed=17)
    h2, l2 = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # (N, H) hidden works too
    (got, got_g), (want, want_g) = token_stats_pair(h2, weight, bias, l2, 5, mode="fixed", threshold=0.05)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # as above
    for a, b in zip(got_g, want_g):
        assert_close_grad(a, b)
    hb, wb, bb = (t.to(torch.bfloat16) for t in (hidden, weight, bias))
    (got, got_g), (want, want_g) = token_stats_pair(hb, wb, bb, labels, 4)
    for a, b in zip(got, want):  # fp32 logits from the bf16 inputs on both sides
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g):  # each side rounds its fp32 gradient to bf16 once (2^-8 relative)
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=1.6e-2, atol=1e-3)


def test_token_stats_only_logp_needed_and_frozen_weight():
    hidden, weight, bias, labels, _, _, _ = make_linear(seed=18)
    h = hidden.clone().requires_grad_(True)
    st = fused_linear_token_stats(h, weight, labels, bias=bias, chunk_size=6)
    (gh,) = torch.autograd.grad(st.logp.sum(), h)
    logits = h @ weight.T + bias
    (want,) = torch.autograd.grad(torch.log_softmax(logits, -1).gather(-1, labels[..., None]).sum(), h)
    torch.testing.assert_close(gh, want, rtol=1e-4, atol=1e-5)  # fp32 vs fp32 log_softmax: summation order
    assert not st.proxy_logp.requires_grad


def test_token_stats_nan_and_bad_input():
    hidden, weight, bias, labels, _, _, _ = make_linear(B=2, L=3, H=20, V=16, seed=19)
    hn = hidden.clone()
    hn[0, 1, 0] = float("nan")
    st = fused_linear_token_stats(hn, weight, labels, bias=bias)
    assert torch.isnan(st.logp[0, 1]) and torch.isfinite(st.logp[1]).all()
    f = fused_linear_token_stats
    with pytest.raises(ValueError, match="weight"):
        f(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, labels[:, :2])
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="bias"):
        f(hidden, weight, labels, bias=bias[:3])
    with pytest.raises(ValueError, match="chunk_size"):
        f(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="threshold"):
        f(hidden, weight, labels, threshold=2.0)
    with pytest.raises(ValueError, match="proxy"):
        f(hidden, weight, labels, proxy=torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="labels"):
        f(hidden, weight, torch.full_like(labels, 99))


def test_empty_batch():
    h = torch.randn(2, 0, 8, requires_grad=True)
    w = torch.randn(16, 8, requires_grad=True)
    lab, old, mask = torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0), torch.ones(2, 0)
    loss, m = lpreg.fused_linear_policy_loss(h, w, lab, torch.randn(2), old, mask)
    loss.backward()
    assert loss.item() == 0.0 and m["actor/lpreg_frac"] == 0.0
    assert h.grad.shape == h.shape and torch.equal(w.grad, torch.zeros_like(w))
    st = fused_linear_token_stats(h, w, lab)
    assert all(t.shape == (2, 0) for t in st)


@pytest.mark.parametrize("logit_scale,logit_softcap", [(0.125, None), (1.0, 2.0), (1.5, 3.0)])
@pytest.mark.parametrize("proxy_kind", [None, "dense", "sparse"])
def test_logit_transform_equals_materialised(logit_scale, logit_softcap, proxy_kind):
    """Issue 30: the fused statistics of a scaled / soft-capped head (the chunk matmul gives x, the
    per-chunk op applies z = c tanh(s x / c) or s x) equal the op on the materialised raw logits with
    the same transform, values and gradients w.r.t. hidden, weight and bias, with chunks that do not
    divide N."""
    hidden, weight, bias, labels, *_ = make_linear(seed=3)
    weight = weight * 4  # logits large enough that the soft-cap bends them
    kw = dict(temperature=0.9, logit_scale=logit_scale, logit_softcap=logit_softcap, backend="torch")
    V = weight.shape[0]
    proxy = None
    if proxy_kind is not None:
        dense = torch.randn(*labels.shape, V, generator=torch.Generator().manual_seed(5)) * 3
        proxy = dense if proxy_kind == "dense" else lpreg.build_proxy(dense, labels, k=8, **kw)
    g = [torch.randn(labels.shape, generator=torch.Generator().manual_seed(6 + i)) for i in range(3)]
    results = []
    for path in ("fused", "materialised"):
        h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
        if path == "fused":
            st = fused_linear_token_stats(h, w, labels, bias=b, proxy=proxy, chunk_size=5, **kw)
        elif proxy_kind == "sparse":
            st = lpreg.sparse_proxy_stats(h @ w.T + b, labels, proxy, **kw)
        else:
            st = lpreg.lpreg_token_stats(h @ w.T + b, labels, proxy_logits=proxy, **kw)
        grads = torch.autograd.grad((st.logp * g[0] + st.kl * g[1] + st.entropy * g[2]).sum(), [h, w, b])
        results.append((st, grads))
    (fs, fg), (ms, mg) = results
    for a, b_ in zip(fs, ms):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-5)
    for a, b_ in zip(fg, mg):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-5)
    # the transform matters here: without it the statistics differ
    plain = fused_linear_token_stats(hidden, weight, labels, bias=bias, proxy=proxy, chunk_size=5, temperature=0.9,
                                     backend="torch")
    assert not torch.allclose(plain.logp, fs.logp, atol=1e-3)


def test_fused_build_proxy_with_logit_transform():
    hidden, weight, bias, labels, *_ = make_linear(seed=4)
    kw = dict(temperature=0.8, k=6, logit_scale=2.0, logit_softcap=5.0)
    got = lpreg.fused_linear_build_proxy(hidden, weight * 4, labels, bias=bias, chunk_size=7, **kw)
    want = lpreg.build_proxy(hidden @ (weight * 4).T + bias, labels, **kw)
    assert torch.equal(got.indices, want.indices)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
