"""lpreg_policy_loss against an independent float64 re-implementation of docs/spec.md §3.

The oracle below is written from the text of docs/spec.md §3 alone, token by token, in plain Python and
float64 autograd: the paper's objective (batch-wide bottom-k among valid tokens, full KL) and
the released code's selective loss (bottom-k among negative-advantage tokens, k3, unclipped
surrogate for selected tokens). Batches mix peaked rows, flat rows with a noise tail and
rows with kept low-probability candidates, and labels are drawn from kept and filtered
tokens, so the bottom-k set holds tokens the filter keeps and tokens it drops.
"""

import math
import os

import pytest
import torch

import lpreg

KAPPA = 0.02


def make_batch(B=6, L=10, V=64, seed=0, adv_per_token=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.empty(B, L, V)
    labels = torch.empty(B, L, dtype=torch.long)
    for b in range(B):
        for t in range(L):
            kind = int(torch.randint(0, 3, (), generator=g))
            perm = torch.randperm(V, generator=g)
            u = float(torch.rand((), generator=g))
            if kind == 0:  # peaked: one token, a tail far below the min-p cutoff
                row = 0.5 * torch.randn(V, generator=g)
                row[perm[0]] += 9.0
                lab = perm[0] if u < 0.3 else perm[1 + int(u * 1000) % (V - 1)]
            elif kind == 1:  # flat head of 8 candidates over a noise tail
                row = -4.0 + 0.5 * torch.randn(V, generator=g)
                row[perm[:8]] = 1.0 + 0.3 * torch.randn(8, generator=g)
                lab = perm[int(u * 8)] if u < 0.6 else perm[8 + int(u * 1000) % (V - 8)]
            else:  # a leader and three kept low-probability candidates (p ~ 0.05 p_max)
                row = -5.0 + torch.randn(V, generator=g)
                row[perm[0]] = 4.0
                row[perm[1:4]] = 4.0 + math.log(0.05) + 0.3 * torch.randn(3, generator=g)
                lab = perm[1 + int(u * 3)] if u < 0.5 else (perm[0] if u < 0.7 else perm[4 + int(u * 1000) % (V - 4)])
            logits[b, t] = row
            labels[b, t] = lab
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    old = logp + 0.2 * torch.randn(B, L, generator=g)
    old[0, :3] -= 3.0  # ratio e^3 > 10: the upper clip binds for A > 0
    old[1, :3] += 3.0  # ratio e^-3: the min picks the unclipped branch
    adv = torch.randn((B, L) if adv_per_token else (B,), generator=g)
    mask = torch.ones(B, L)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    mask[torch.arange(L)[None, :] >= lengths[:, None]] = 0
    return logits, labels, adv, old, mask


def oracle(*args, **kw):
    """(loss, grad wrt logits, number selected, k), all float64, token by token from docs/spec.md §3."""
    loss, grad, selected, k = selection_oracle(*args, **kw)
    return loss, grad, len(selected), k


def selection_oracle(logits, labels, adv, old, mask, *, compat, rho, beta=1.0, clip_low=1.0, clip_high=9.0,
                     temperature=1.0, agg="token-mean", kl_estimator=None, clip_ratio_c=None, weights=None):
    """(loss, grad wrt logits, selected set, k). `weights` (B, L) or (B,), docs/spec.md §3 "Per-token
    weights": w multiplies the surrogate (dual clip included), not the Lp-Reg term; a w = 0 token is out
    of the selection pool; the aggregation is unweighted."""
    kl_estimator = kl_estimator or ("full" if compat == "paper" else "k3")
    x = logits.double().clone().requires_grad_(True)
    B, L, V = x.shape
    adv = adv.double()
    adv = adv[:, None].expand(B, L) if adv.dim() == 1 else adv
    z = x / temperature
    logp_all = torch.log_softmax(z, -1)
    zd = z.detach()
    kept = zd >= zd.max(-1, keepdim=True).values + math.log(KAPPA)
    logq_all = torch.where(kept, zd, torch.tensor(-math.inf, dtype=torch.float64)).log_softmax(-1)
    valid = [(b, t) for b in range(B) for t in range(L) if mask[b, t] > 0]
    w = None if weights is None else weights.double()
    w = w[:, None].expand(B, L) if w is not None and w.dim() == 1 else w
    pool = valid if w is None else [bt for bt in valid if w[bt] > 0]  # w = 0: not trained on

    def logp(b, t):
        return logp_all[b, t, labels[b, t]]

    def key(bt):
        return float(logp(*bt).detach())

    def logq(b, t):
        return logq_all[b, t, labels[b, t]]

    if compat == "paper":
        n = len(pool)
        k = max(1, math.floor(rho * n))
        bottom = sorted(pool, key=key)[:k]  # sorted() is stable: ties by position
        selected = {bt for bt in bottom if adv[bt] < 0 and logq(*bt) > -math.inf}
    else:
        neg = [bt for bt in pool if adv[bt] < 0]
        k = max(1, int(len(neg) * rho))
        bottom = sorted(neg, key=key)[:k] if k > 1 else []
        selected = {bt for bt in bottom if key(bt) < float(logq(*bt))}
    if beta == 0:  # docs/spec.md §3: beta = 0 turns Lp-Reg off, so nothing is selected
        selected = set()
    per_token = {}
    for bt in valid:
        a = adv[bt]
        r = torch.exp(logp(*bt) - old[bt].double())
        pg = torch.maximum(-a * r, -a * r.clamp(1 - clip_low, 1 + clip_high))
        if bt in selected:
            if kl_estimator == "full":
                q = logq_all[bt].exp()
                d = torch.where(kept[bt], q * (logq_all[bt] - logp_all[bt]), torch.zeros_like(q)).sum()
            else:
                dd = (logq(*bt) - logp(*bt)).clamp(-20, 20)
                d = (dd.exp() - dd - 1).clamp(-10, 10)
            if compat == "released":
                pg = -a * r
        if clip_ratio_c is not None and a < 0:  # dual-clip PPO: at most -A c for A < 0
            pg = torch.minimum(pg, -a * clip_ratio_c)
        if w is not None:
            pg = w[bt] * pg  # the weight: the surrogate only
        if bt in selected:
            pg = pg + beta * d
        per_token[bt] = pg
    if agg == "token-mean":
        loss = sum(per_token.values()) / max(len(valid), 1)
    else:
        seqs = []
        for b in range(B):
            toks = [per_token[bt] for bt in valid if bt[0] == b]
            s = sum(toks) if toks else torch.zeros((), dtype=torch.float64)
            seqs.append(s / max(len(toks), 1) if agg == "seq-mean-token-mean" else s)
        loss = sum(seqs) / B
    loss = loss if torch.is_tensor(loss) else torch.tensor(float(loss), dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return loss.detach(), (torch.zeros_like(x) if grad is None else grad), selected, k


def run(logits, labels, adv, old, mask, **kw):
    x = logits.clone().requires_grad_(True)
    loss, metrics = lpreg.lpreg_policy_loss(x, labels, adv, old, mask, backend=kw.pop("backend", "torch"), **kw)
    (grad,) = torch.autograd.grad(loss, x)
    n_valid = int((mask > 0).sum())
    return loss, grad, round(metrics["actor/lpreg_frac"] * n_valid), metrics


@pytest.mark.parametrize("compat", ["paper", "released"])
@pytest.mark.parametrize("rho", [0.15, 0.6])
@pytest.mark.parametrize("seed", [0, 1])
def test_conformance(compat, rho, seed):
    batch = make_batch(seed=seed)
    want, want_grad, want_n, k = oracle(*batch, compat=compat, rho=rho)
    loss, grad, n_sel, metrics = run(*batch, compat=compat, rho=rho)
    assert n_sel == want_n
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    assert metrics["actor/pg_loss"] == pytest.approx(float(want), rel=1e-5, abs=1e-6)


def test_batches_exercise_the_filter():
    """The bottom-k set of the test batches holds kept and filtered low-probability tokens."""
    logits, labels, adv, old, mask = make_batch(seed=0)
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    valid = mask > 0
    n = int(valid.sum())
    k = max(1, math.floor(0.6 * n))
    order = torch.sort(torch.where(valid, stats.logp, torch.tensor(math.inf)).reshape(-1), stable=True).indices[:k]
    kept = torch.isfinite(stats.proxy_logp.reshape(-1)[order])
    assert kept.any() and (~kept).any()
    _, _, n_sel, _ = oracle(logits, labels, adv, old, mask, compat="paper", rho=0.6)
    assert 0 < n_sel < k


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("compat", ["paper", "released"])
def test_aggregation_modes_and_per_token_advantages(agg, compat):
    batch = make_batch(seed=3, adv_per_token=True)
    want, want_grad, want_n, _ = oracle(*batch, compat=compat, rho=0.5, agg=agg, beta=0.7)
    loss, grad, n_sel, _ = run(*batch, compat=compat, rho=0.5, loss_agg_mode=agg, beta=0.7)
    assert n_sel == want_n
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compat,est", [("paper", "k3"), ("released", "full")])
def test_explicit_kl_estimator_temperature_and_clips(compat, est):
    batch = make_batch(seed=4)
    kw = dict(compat=compat, rho=0.5, kl_estimator=est, temperature=0.7, clip_low=0.2, clip_high=0.28)
    want, want_grad, want_n, _ = oracle(*batch, **kw)
    loss, grad, n_sel, metrics = run(*batch, **kw)
    assert n_sel == want_n and metrics["actor/pg_clipfrac"] > 0
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def test_ties_broken_by_position():
    """Identical rows give identical p_y: the earlier positions are selected."""
    logits, labels, adv, old, mask = make_batch(B=2, L=6, seed=5)
    logits[:, :] = logits[0, 0]
    labels[:, :] = labels[0, 0]
    adv = -torch.ones(2)
    mask = torch.ones(2, 6)
    loss, grad, n_sel, metrics = run(logits, labels, adv, old, mask, compat="paper", rho=0.25, beta=1.0)
    assert n_sel in (0, 3)
    bottom, _ = lpreg.selection.bottom_k_mask(torch.zeros(12), torch.ones(12, dtype=torch.bool),
                                              torch.tensor(3))
    assert bottom.tolist() == [True] * 3 + [False] * 9
    want, want_grad, want_n, _ = oracle(logits, labels, adv, old, mask, compat="paper", rho=0.25)
    assert n_sel == want_n
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def test_metrics_are_the_documented_means():
    logits, labels, adv, old, mask = make_batch(seed=6)
    loss, grad, n_sel, m = run(logits, labels, adv, old, mask, compat="paper", rho=0.6)
    valid = mask > 0
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    assert m["actor/entropy"] == pytest.approx(float(stats.entropy[valid].mean()), rel=1e-5)
    assert m["actor/ppo_kl"] == pytest.approx(float((old - stats.logp)[valid].mean()), rel=1e-4, abs=1e-6)
    n = int(valid.sum())
    k = max(1, math.floor(0.6 * n))
    kth = torch.sort(stats.logp[valid]).values[k - 1]
    assert m["actor/lpreg_threshold"] == pytest.approx(float(kth.exp()), rel=1e-5)
    assert m["actor/lpreg_kl"] > 0 and m["actor/lpreg_frac"] == pytest.approx(n_sel / n)
    _, tensors = lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, compat="paper", rho=0.6, backend="torch",
                                         return_tensors=True)
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in tensors.values())
    assert float(tensors["actor/lpreg_frac"]) == pytest.approx(m["actor/lpreg_frac"])


def test_all_masked_gives_zero_loss_and_zero_gradient():
    logits, labels, adv, old, _ = make_batch(B=2, L=4, seed=7)
    old[0, 0] = float("-inf")  # padding values in masked slots must not leak
    for compat in ("paper", "released"):
        loss, grad, n_sel, m = run(logits, labels, adv, old, torch.zeros(2, 4), compat=compat)
        assert loss.item() == 0.0 and n_sel == 0
        assert torch.equal(grad, torch.zeros_like(grad))
        assert all(math.isfinite(v) for v in m.values())


def test_nan_logits_give_nan_loss():
    logits, labels, adv, old, mask = make_batch(B=2, L=4, seed=8)
    mask[:] = 1
    logits[1, 2, 5] = float("nan")
    loss, _ = lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, backend="torch")
    assert math.isnan(loss.item())


def test_triton_backend_matches_oracle():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set by tests/conftest.py)")
    batch = make_batch(B=3, L=5, V=40, seed=9)
    for compat in ("paper", "released"):
        want, want_grad, want_n, _ = oracle(*batch, compat=compat, rho=0.6)
        loss, grad, n_sel, _ = run(*batch, compat=compat, rho=0.6, backend="triton")
        assert n_sel == want_n
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def test_bf16_logits():
    logits, labels, adv, old, mask = make_batch(seed=10)
    lb = logits.bfloat16()
    want, want_grad, want_n, _ = oracle(lb.float(), labels, adv, old, mask, compat="paper", rho=0.6)
    loss, grad, n_sel, _ = run(lb, labels, adv, old, mask, compat="paper", rho=0.6)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16 and n_sel == want_n
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-2, atol=1e-4)


BAD = [
    (dict(compat="verl"), "compat"),
    (dict(loss_agg_mode="token-sum"), "loss_agg_mode"),
    (dict(kl_estimator="k2"), "kl_estimator"),
    (dict(rho=0.0), "rho"),
    (dict(rho=1.5), "rho"),
    (dict(beta=-0.1), "beta"),
    (dict(mode="top_p"), "mode"),
    (dict(threshold=1.5), "threshold"),
    (dict(temperature=0.0), "temperature"),
    (dict(clip_low=1.5), "clip_low"),
]


@pytest.mark.parametrize("kw,name", BAD)
def test_bad_keywords(kw, name):
    logits, labels, adv, old, mask = make_batch(B=2, L=3, V=16, seed=11)
    with pytest.raises(ValueError, match=name):
        lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, backend="torch", **kw)


def test_bad_shapes():
    logits, labels, adv, old, mask = make_batch(B=2, L=3, V=16, seed=12)
    f = lambda *a, **k: lpreg.lpreg_policy_loss(*a, backend="torch", **k)  # noqa: E731
    with pytest.raises(ValueError, match="advantages"):
        f(logits, labels, torch.zeros(3), old, mask)
    with pytest.raises(ValueError, match="labels"):
        f(logits, labels[:, :2], adv, old, mask)
    with pytest.raises(ValueError, match="old_logp"):
        f(logits, labels, adv, old.T, mask)
    with pytest.raises(ValueError, match="response_mask"):
        f(logits, labels, adv, old, mask[0])
    with pytest.raises(ValueError, match="logits"):
        f(logits[0], labels, adv, old, mask)
    with pytest.raises(ValueError, match="proxy"):
        f(logits, labels, adv, old, mask, proxy=logits[:, :2])
    with pytest.raises(ValueError, match="selection_threshold"):
        sel = lpreg.selection_threshold(old, mask, rho=0.5)
        f(logits, labels, adv, old, mask, compat="released", selection_threshold=sel)


# ---- the APIs the framework adapters use: old_logp=None, num_tokens, policy_loss_from_stats


def grads_of(fn, logits):
    x = logits.clone().requires_grad_(True)
    loss, m = fn(x)
    return loss, torch.autograd.grad(loss, x)[0], m


@pytest.mark.parametrize("compat", ["released", "paper"])
def test_on_policy_old_logp_none(compat):
    """old_logp=None is old_logp = this pass's logp, detached: ratio exactly 1, no ppo_kl."""
    logits, labels, adv, _, mask = make_batch(seed=13)
    current = lpreg.lpreg_token_stats(logits, labels, backend="torch").logp
    kw = dict(compat=compat, rho=0.6, beta=0.8, backend="torch")
    want, want_grad, wm = grads_of(lambda x: lpreg.lpreg_policy_loss(x, labels, adv, current, mask, **kw), logits)
    got, got_grad, m = grads_of(lambda x: lpreg.lpreg_policy_loss(x, labels, adv, None, mask, **kw), logits)
    assert wm["actor/lpreg_frac"] > 0 and m["actor/ppo_kl"] == 0.0 and m["actor/pg_clipfrac"] == 0.0
    # the same fp32 ops on the same values: logp - logp.detach() is exactly 0, as logp - current
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad) and m == wm
    oracle_loss, oracle_grad, n, _ = oracle(logits, labels, adv, current, mask, compat=compat, rho=0.6, beta=0.8)
    torch.testing.assert_close(got.double(), oracle_loss, rtol=1e-5, atol=1e-6)  # fp32 vs float64
    torch.testing.assert_close(got_grad.double(), oracle_grad, rtol=1e-4, atol=1e-6)


def test_on_policy_with_selection_threshold():
    """The step-wide threshold is applied to this pass's log-probs when old_logp is None."""
    logits, labels, adv, _, mask = make_batch(seed=17)
    current = lpreg.lpreg_token_stats(logits, labels, backend="torch").logp
    sel = lpreg.selection_threshold(current, mask, rho=0.6)
    kw = dict(compat="paper", rho=0.6, selection_threshold=sel, backend="torch")
    want, want_grad, wm = grads_of(lambda x: lpreg.lpreg_policy_loss(x, labels, adv, current, mask, **kw), logits)
    got, got_grad, m = grads_of(lambda x: lpreg.lpreg_policy_loss(x, labels, adv, None, mask, **kw), logits)
    assert wm["actor/lpreg_frac"] > 0
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad) and m == wm  # same ops, same values


def test_global_selection_needs_logp_on_policy():
    """The fused path's contract: on-policy the selection reads the current log-probs."""
    from lpreg import _loss_terms as pl

    logits, labels, adv, _, mask = make_batch(B=2, L=4, seed=15)
    cfg = lpreg.LossConfig(compat="paper", rho=0.5, backend="torch")
    batch = pl.prepare((2, 4), logits.device, labels, adv, None, mask, cfg)
    sel = lpreg.selection_threshold(torch.zeros(2, 4), mask, rho=0.5)
    assert batch.on_policy and pl.needs_current_logp(batch, sel)
    with pytest.raises(ValueError, match="logp"):
        pl.global_selection(batch, None, cfg, sel)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_tokens_micro_batches_sum_to_the_global_token_mean(as_tensor):
    logits, labels, adv, old, mask = make_batch(B=8, L=10, seed=16)
    n = int(((mask > 0) & (labels != -100)).sum())
    kw = dict(compat="paper", rho=0.5, backend="torch")
    whole, whole_grad, wm = grads_of(lambda x: lpreg.lpreg_policy_loss(
        x, labels, adv, old, mask, selection_threshold=lpreg.selection_threshold(old, mask, rho=0.5), **kw), logits)
    assert wm["actor/lpreg_frac"] > 0
    parts = [slice(0, 3), slice(3, 4), slice(4, 8)]
    sels = lpreg.selection_threshold([old[p] for p in parts], [mask[p] for p in parts], rho=0.5)
    total, grads = 0.0, []
    for p, sel in zip(parts, sels):
        x = logits[p].clone().requires_grad_(True)
        loss, _ = lpreg.lpreg_policy_loss(x, labels[p], adv[p], old[p], mask[p], selection_threshold=sel,
                                          num_tokens=torch.tensor(n) if as_tensor else n, **kw)
        total, grads = total + loss, grads + [torch.autograd.grad(loss, x)[0]]
    # the same per-token terms summed in another order: fp32 rounding of a sum of ~60 terms
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat(grads), whole_grad, rtol=1e-5, atol=1e-7)


def test_num_tokens_scales_the_token_mean():
    logits, labels, adv, old, mask = make_batch(seed=17)
    n_local = int(((mask > 0) & (labels != -100)).sum())
    base, _ = lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, rho=0.5, backend="torch")
    scaled, _ = lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, rho=0.5, backend="torch",
                                        num_tokens=4 * n_local)
    assert float(scaled) == pytest.approx(float(base) / 4, rel=1e-6)  # fp32 division by n vs 4n


# 0 is legal (a step with no valid token anywhere: loss 0, tests/test_fuzz_regressions.py)
@pytest.mark.parametrize("bad", [-3, 2.5, True, "10", torch.tensor([3, 4]), torch.tensor(-1.0),
                                 torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(True)])
def test_bad_num_tokens(bad):
    logits, labels, adv, old, mask = make_batch(B=2, L=3, V=16, seed=18)
    with pytest.raises(ValueError, match="num_tokens"):
        lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, num_tokens=bad, backend="torch")


def test_num_tokens_needs_token_mean():
    logits, labels, adv, old, mask = make_batch(B=2, L=3, V=16, seed=19)
    with pytest.raises(ValueError, match="num_tokens.*seq-mean-token-mean"):
        lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, num_tokens=6, loss_agg_mode="seq-mean-token-mean",
                                backend="torch")


@pytest.mark.parametrize("compat", ["released", "paper"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("with_proxy", [False, True])
def test_from_stats_equals_the_logits_path(compat, agg, with_proxy):
    from lpreg.policy_loss import policy_loss_from_stats

    logits, labels, adv, old, mask = make_batch(seed=23, adv_per_token=True)
    labels[0, 1] = -100  # an ignored label inside the mask: not valid on either path
    proxy = logits + 0.3 * torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)) if with_proxy \
        else None
    kw = dict(compat=compat, rho=0.5, beta=0.7, loss_agg_mode=agg)
    want, want_grad, wm = grads_of(lambda x: lpreg.lpreg_policy_loss(
        x, labels, adv, old, mask, proxy=proxy, backend="torch", **kw), logits)
    valid = (mask > 0) & (labels != -100)

    def from_stats(x):
        stats = lpreg.lpreg_token_stats(x, labels, proxy_logits=proxy, backend="torch")
        return policy_loss_from_stats(stats, adv, old, valid, **kw)

    got, got_grad, m = grads_of(from_stats, logits)
    assert wm["actor/lpreg_frac"] > 0
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad) and m == wm  # one code path, same ops


def test_from_stats_never_reads_masked_entries():
    from lpreg.policy_loss import policy_loss_from_stats

    logits, labels, adv, old, mask = make_batch(seed=23)
    x = logits.clone().requires_grad_(True)
    stats = lpreg.lpreg_token_stats(x, labels, backend="torch")
    loss, m = policy_loss_from_stats(stats, adv, old, mask, rho=0.5)
    # garbage (NaN, inf) where the mask is 0, e.g. a framework's padding
    fill = torch.where(mask > 0, 0.0, float("nan"))
    dirty = lpreg.TokenStats(stats.logp + fill, stats.proxy_logp - fill.abs(), stats.kl * (1 + fill),
                             stats.entropy + fill)
    dloss, dm = policy_loss_from_stats(dirty, adv, old, mask, rho=0.5)
    assert torch.equal(dloss, loss) and dm == m
    (g,) = torch.autograd.grad(dloss, x)
    assert torch.isfinite(g).all() and torch.equal(g[mask == 0], torch.zeros_like(g[mask == 0]))
    nan_valid = stats.logp.detach().clone()
    nan_valid[mask > 0] = nan_valid[mask > 0].index_fill(0, torch.tensor([0]), float("nan"))
    bad, _ = policy_loss_from_stats(lpreg.TokenStats(nan_valid, *stats[1:]), adv, old, mask, rho=0.5)
    assert math.isnan(float(bad))  # a NaN in a counted token is never a finite loss


def test_from_stats_k3_does_not_read_kl():
    from lpreg.policy_loss import policy_loss_from_stats

    logits, labels, adv, old, mask = make_batch(seed=22)
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    a, _ = policy_loss_from_stats(stats, adv, old, mask, compat="released", rho=0.5)
    b, _ = policy_loss_from_stats(stats._replace(kl=torch.zeros_like(stats.kl)), adv, old, mask, compat="released",
                                  rho=0.5)
    assert torch.equal(a, b)


def test_from_stats_bad_input():
    from lpreg.policy_loss import policy_loss_from_stats

    logits, labels, adv, old, mask = make_batch(B=2, L=3, V=16, seed=23)
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    with pytest.raises(ValueError, match="stats"):
        policy_loss_from_stats(stats.logp, adv, old, mask)
    with pytest.raises(ValueError, match="stats.kl"):
        policy_loss_from_stats(stats._replace(kl=stats.kl[:, :2]), adv, old, mask)
    with pytest.raises(ValueError, match="stats.entropy"):
        policy_loss_from_stats(stats._replace(entropy=stats.entropy.long()), adv, old, mask)
    with pytest.raises(ValueError, match="old_logp"):
        policy_loss_from_stats(stats, adv, old[:, :2], mask)
    with pytest.raises(ValueError, match="response_mask"):
        policy_loss_from_stats(stats, adv, old, None)
    with pytest.raises(ValueError, match="compat"):
        policy_loss_from_stats(stats, adv, old, mask, compat="x")


# ---- beta = 0 and the dual clip (the adapters' exactness at beta = 0 rests on both)


@pytest.mark.parametrize("compat", ["paper", "released"])
def test_beta_zero_is_the_plain_clipped_surrogate(compat):
    """beta = 0 selects nothing: even a bottom-k token whose ratio is below 1 - clip_low keeps the
    clipped surrogate (the released code would switch it to -A r at coefficient 0)."""
    logits, labels, adv, old, mask = make_batch(seed=30, adv_per_token=True)
    old = old.clone()
    old[2:, :] += 1.0  # ratios ~ e^-1 < 1 - 0.2 on many tokens: the lower clip binds for A < 0
    kw = dict(compat=compat, rho=0.6, beta=0.0, clip_low=0.2, clip_high=0.2)
    loss, grad, n_sel, m = run(logits, labels, adv, old, mask, **kw)
    x = logits.double().clone().requires_grad_(True)
    logp = torch.log_softmax(x, -1).gather(-1, labels[..., None])[..., 0]
    a = adv.double()
    r = torch.exp(logp - old.double())
    pg = torch.maximum(-a * r, -a * r.clamp(0.8, 1.2))
    want = (pg * mask).sum() / mask.sum()
    (want_grad,) = torch.autograd.grad(want, x)
    assert n_sel == 0 and m["actor/lpreg_frac"] == 0.0
    assert m["actor/pg_clipfrac"] > 0  # the clip really acts on this batch
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    ref_sel = oracle(logits, labels, adv, old, mask, compat=compat, rho=0.6, beta=1.0, clip_low=0.2, clip_high=0.2)
    assert ref_sel[2] > 0  # at beta > 0 the same batch does select tokens


@pytest.mark.parametrize("compat", ["paper", "released"])
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_dual_clip_matches_the_spec(compat, beta):
    """clip_ratio_c = 3: an A < 0 token's surrogate is capped at -3 A (verl's dual-clip PPO), selected
    tokens included; actor/pg_clipfrac_lower is the share of valid tokens where the cap binds."""
    logits, labels, adv, old, mask = make_batch(seed=22)
    old = old.clone()
    old[:, :4] -= 1.5  # ratios ~ e^1.5 > 3 on the first tokens of every row
    kw = dict(compat=compat, rho=0.6, beta=beta, clip_low=0.2, clip_high=0.28)
    want, want_grad, want_n, _ = oracle(logits, labels, adv, old, mask, clip_ratio_c=3.0, **kw)
    loss, grad, n_sel, m = run(logits, labels, adv, old, mask, clip_ratio_c=3.0, **kw)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    assert n_sel == want_n
    # the cap binds exactly where A < 0 and max(-A r, -A clip(r)) > -3 A, i.e. r > 3
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None])[..., 0]
    a = adv.double()[:, None].expand_as(logp)
    binds = (a < 0) & (torch.exp(logp - old.double()) > 3.0) & (mask > 0)
    assert binds.sum() > 0
    assert m["actor/pg_clipfrac_lower"] == pytest.approx(float(binds.sum() / (mask > 0).sum()), abs=1e-7)
    no_cap = run(logits, labels, adv, old, mask, **kw)
    assert no_cap[3]["actor/pg_clipfrac_lower"] == 0.0 and abs(no_cap[0].item() - loss.item()) > 1e-4


def test_dual_clip_same_in_the_fused_path():
    from tests.test_fused_linear import fused, make_selectable, materialised

    data = make_selectable(seed=3)
    old = data[5].clone() - 1.5
    data = (*data[:5], old, data[6])
    kw = dict(compat="released", rho=0.4, clip_ratio_c=3.0)
    want, got = materialised(*data, **kw), fused(*data, chunk_size=7, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[2]["actor/pg_clipfrac_lower"] == pytest.approx(want[2]["actor/pg_clipfrac_lower"])
    assert want[2]["actor/pg_clipfrac_lower"] > 0


@pytest.mark.parametrize("scale,softcap", [(0.5, None), (1.3, 4.0), (1.0, 2.5)])
@pytest.mark.parametrize("compat", ["released", "paper"])
def test_logit_transform_is_the_loss_of_the_transformed_logits(scale, softcap, compat):
    """logit_scale / logit_softcap (a scaled or soft-capped LM head): the loss, its gradient w.r.t. the raw
    logits and the metrics are those of z = c tanh(s x / c) (or s x), in every entry point."""
    logits, labels, adv, old, mask = make_batch(seed=23)
    kw = dict(compat=compat, rho=1.0, beta=0.8, backend="torch")

    def transformed(x):
        return softcap * torch.tanh(scale * x / softcap) if softcap is not None else scale * x

    x = logits.clone().requires_grad_(True)
    want, wm = lpreg.lpreg_policy_loss(transformed(x), labels, adv, old, mask, **kw)
    (want_grad,) = torch.autograd.grad(want, x)
    y = logits.clone().requires_grad_(True)
    got, gm = lpreg.lpreg_policy_loss(y, labels, adv, old, mask, logit_scale=scale, logit_softcap=softcap, **kw)
    (got_grad,) = torch.autograd.grad(got, y)
    assert wm["actor/lpreg_selected"] > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)
    assert gm == pytest.approx(wm, rel=1e-4, abs=1e-6)
    # the fused path against the materialised one on the same transformed head
    B, L, V = logits.shape
    h = torch.randn(B, L, 16, generator=torch.Generator().manual_seed(5))
    w = torch.randn(V, 16, generator=torch.Generator().manual_seed(6))
    ref, rm = lpreg.lpreg_policy_loss(transformed(h @ w.T), labels, adv, old, mask, **kw)
    fused, fm = lpreg.fused_linear_policy_loss(h, w, labels, adv, old, mask, chunk_size=7, logit_scale=scale,
                                               logit_softcap=softcap, **kw)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    assert fm == pytest.approx(rm, rel=1e-4, abs=1e-6)


def test_logit_transform_options_are_checked_in_the_loss():
    logits, labels, adv, old, mask = make_batch(B=2, L=3, V=16, seed=22)
    with pytest.raises(lpreg.LossConfigError, match="logit_softcap"):
        lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, logit_softcap=-1.0)
    with pytest.raises(lpreg.LossConfigError, match="logit_scale"):
        lpreg.fused_linear_policy_loss(torch.randn(2, 3, 4), torch.randn(16, 4), labels, adv, old, mask,
                                       logit_scale=0.0)
