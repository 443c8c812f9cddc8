"""Property-based tests of lpreg_policy_loss (both compat forms) and fused_linear_policy_loss (issue 8).

- lpreg_policy_loss against docs/spec.md §3 evaluated literally in float64 (written here from
  the spec, independent of lpreg's helpers): loss, the selected count and the logits gradient,
  for both compat forms, both KL estimators, every aggregation mode, clips, temperature, an
  optional dense proxy, off- and on-policy old_logp;
- padding: what a response_mask == 0 position holds (huge logits, NaN, +inf) changes neither
  the loss nor any other position's gradient (bitwise), and its own gradient is exactly zero;
- fused_linear_policy_loss equals lpreg_policy_loss on the materialised logits for random
  chunk sizes, 1 and N included.

`compat` is always passed explicitly (its default moves from "paper" to "released").
"""

import math

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import lpreg
from tests.backends import ALL, runnable
from tests.fuzz_profiles import fuzz

BACKENDS = runnable(*ALL)
EPS32 = torch.finfo(torch.float32).eps
AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
F32_MAX = torch.finfo(torch.float32).max


@st.composite
def loss_cases(draw, max_v=200):
    B, L = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    V = draw(st.integers(1, max_v))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = math.exp(draw(st.floats(math.log(0.01), math.log(30.0))))
    logits = torch.randn(B, L, V, generator=g) * scale
    if V > 1 and draw(st.booleans()):  # peaked rows, so that min-p filters and k3 is not 0
        idx = torch.randint(0, V, (B, L, draw(st.integers(1, min(V, 3)))), generator=g)
        logits.scatter_add_(-1, idx, torch.full(idx.shape, 5.0 * max(scale, 1.0)))
    labels = torch.randint(0, V, (B, L), generator=g)
    mask = (torch.rand(B, L, generator=g) < draw(st.sampled_from([0.0, 0.6, 1.0]))).float()
    adv = torch.randn(B, L, generator=g) if draw(st.booleans()) else torch.randn(B, generator=g)
    lp = torch.log_softmax(logits.double() / 1.0, -1).gather(-1, labels[..., None])[..., 0].float()
    old_kind = draw(st.sampled_from(["none", "on", "off"]))
    old = None if old_kind == "none" else lp if old_kind == "on" else lp + torch.randn(B, L, generator=g)
    proxy = None
    if draw(st.integers(0, 3)) == 0:
        proxy = logits + torch.randn(B, L, V, generator=g) * 0.5
    mode = draw(st.sampled_from(["min_p", "fixed"]))
    kw = dict(
        compat=draw(st.sampled_from(["paper", "released"])),
        temperature=draw(st.floats(0.1, 3.0)),
        mode=mode,
        threshold=draw(st.floats(0.0, 1.0, exclude_min=True, exclude_max=mode == "fixed")),
        rho=draw(st.one_of(st.just(1.0), st.floats(0.0, 1.0, exclude_min=True))),
        beta=draw(st.sampled_from([0.0, 1.0, 3.5])),
        clip_low=draw(st.floats(0.0, 1.0)),
        clip_high=draw(st.floats(0.0, 10.0)),
        loss_agg_mode=draw(st.sampled_from(AGGS)),
        kl_estimator=draw(st.sampled_from([None, "full", "k3"])),
    )
    return logits, labels, adv, old, mask, proxy, kw


def spec_loss(logits, labels, adv, old, mask, proxy, *, compat, temperature, mode, threshold, rho, beta,
              clip_low, clip_high, loss_agg_mode, kl_estimator, ignore_index=-100):
    """docs/spec.md §1-§3 in float64. Returns (loss, n_selected, grad wrt logits, ambiguous):
    `ambiguous` says fp32 rounding could change a discrete choice (the kept set, the
    rho-percentile, logp < proxy_logp, a clip edge), so the example says nothing."""
    B, L, V = logits.shape
    est = kl_estimator or ("full" if compat == "paper" else "k3")
    z = logits.double().reshape(-1, V).requires_grad_()
    x = z / temperature
    y = (x.detach() if proxy is None else proxy.double().reshape(-1, V) / temperature)
    logp_all = torch.log_softmax(x, -1)
    ymax = y.amax(-1, keepdim=True)
    lse_y = torch.logsumexp(y, -1, keepdim=True)
    cut = ymax + math.log(threshold) if mode == "min_p" else lse_y + math.log(threshold)
    kept = y >= cut
    if mode == "fixed":
        first = torch.zeros_like(kept).scatter_(-1, y.argmax(-1, keepdim=True), True)
        kept = torch.where(kept.any(-1, keepdim=True), kept, first)
    logq_all = torch.log_softmax(y.masked_fill(~kept, -math.inf), -1)
    lab = labels.reshape(-1)
    valid = (mask.reshape(-1) > 0) & (lab != ignore_index)
    safe = torch.where(valid, lab, 0)[:, None]
    logp = logp_all.gather(-1, safe)[:, 0]
    proxy_logp = logq_all.gather(-1, safe)[:, 0]
    q = logq_all.exp()
    kl = torch.where(kept, q * (logq_all - logp_all), torch.zeros_like(q)).sum(-1)
    d = (proxy_logp - logp).clamp(-20, 20)
    k3 = (d.exp() - d - 1).clamp(-10, 10)
    a = (adv[:, None].expand(B, L) if adv.dim() == 1 else adv).reshape(-1).double()
    o = logp.detach() if old is None else old.reshape(-1).double()
    ratio = torch.exp((logp - o).clamp(-20.0, 20.0))  # docs/spec.md §3: log r clamped before exp

    margin = 1e-5 * (1 + float(torch.where(torch.isfinite(x), x, 0).abs().max()) + float(
        torch.where(torch.isfinite(y), y, 0).abs().max()))
    ambiguous = False
    y_lab = y.gather(-1, safe)[:, 0]
    ambiguous |= bool((valid & ((y_lab - cut[:, 0]).abs() <= margin) & (y_lab != ymax[:, 0])).any())
    if mode == "fixed" and V > 1:
        top2 = y.topk(2, -1).values
        ambiguous |= bool((valid & ((top2[:, 0] - top2[:, 1]).abs() <= margin)).any())
    for edge in (1 - clip_low, 1 + clip_high):
        ambiguous |= bool((valid & ((ratio.detach() - edge).abs() <= margin * (1 + edge))).any())

    lpd = logp.detach()
    if compat == "paper":
        pop = valid
        k = max(1, math.floor(int(pop.sum()) * rho))
    else:
        pop = valid & (a < 0)
        k = max(1, int(int(pop.sum()) * rho))
    order = sorted((float(lpd[i]), i) for i in range(lpd.numel()) if pop[i])
    bottom = torch.zeros_like(valid)
    for _, i in order[:k]:
        bottom[i] = True
    if len(order) > k:  # the k-th and (k+1)-th must be told apart in fp32 (exact ties are fine)
        gap = abs(order[k][0] - order[k - 1][0])
        ambiguous |= 0 < gap <= margin
    if compat == "paper":
        selected = bottom & (a < 0) & (proxy_logp > -math.inf)
    else:
        selected = bottom & (k > 1) & (lpd < proxy_logp)
        ambiguous |= bool((bottom & ((lpd - proxy_logp).abs() <= margin) & (lpd != proxy_logp)).any())
    if beta == 0:  # docs/spec.md §3: beta = 0 turns Lp-Reg off, so nothing is selected
        selected = torch.zeros_like(selected)
    pg1 = -a * ratio
    pg2 = -a * ratio.clamp(1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    if compat == "released":
        pg = torch.where(selected, pg1, pg)
    div = torch.where(selected, k3 if est == "k3" else kl, 0)
    loss_t = torch.where(valid, pg + beta * div, 0)
    w = valid.double().reshape(B, L)
    if loss_agg_mode == "token-mean":
        w = w / w.sum().clamp(min=1)
    elif loss_agg_mode == "seq-mean-token-mean":
        w = w / (w.sum(-1, keepdim=True).clamp(min=1) * B)
    else:
        w = w / B
    loss = (loss_t * w.reshape(-1)).sum()
    (grad,) = torch.autograd.grad(loss, z) if loss.requires_grad else (torch.zeros_like(z),)
    # the size of one token's loss term and of its weight, for the tolerances: |A| r from the
    # surrogate, beta * 12 from the divergence (|dk3/dd| = |e^d - 1| < 12 where k3 is not clamped)
    term = float(torch.where(valid, a.abs() * ratio.detach() + beta * 12, 0).max()) if valid.any() else 0.0
    log_ratio = float(torch.where(valid, (logp - o).detach().abs(), 0).max()) if valid.any() else 0.0
    # the mechanism (docs/spec.md "Lp-Reg over any base objective"): the candidates are the lowest-rho set
    # (none at beta = 0 or, released, when k <= 1), their filtered share, and m, 1/m - 1, p_y at S
    cand = bottom & (beta > 0) & ((k > 1) | (compat == "paper"))
    m_sel = torch.exp(lpd - proxy_logp)[selected]
    mech = dict(n_cand=int(cand.sum()), n_filt=int((cand & (proxy_logp == -math.inf)).sum()),
                kept_mass=m_sel.tolist(), p_y=lpd.exp()[selected].tolist())
    return dict(loss=loss.detach(), n_sel=int(selected.sum()), grad=grad.reshape(B, L, V), ambiguous=ambiguous,
                term=term, w_max=float(w.max()) if w.numel() else 0.0, log_ratio=log_ratio, **mech)


def assert_mechanism(m, ref, eps):
    """The loss's mechanism metrics against the spec's: counts exactly, means within the log-domain
    budget `eps` (m = e^(logp - log q) and p_y = e^logp carry its relative error)."""
    assert m["actor/lpreg_candidates"] == ref["n_cand"] and m["actor/lpreg_selected"] == ref["n_sel"]
    assert round(float(m["actor/lpreg_filtered_frac"]) * max(ref["n_cand"], 1)) == ref["n_filt"]
    n = max(ref["n_sel"], 1)
    for key, values in (("kept_mass", ref["kept_mass"]), ("p_y", ref["p_y"])):
        want = sum(values) / n
        assert abs(float(m[f"actor/lpreg_{key}"]) - want) <= 4 * eps * abs(want) + 1e-6, (key, m, want)
    push = sum(1 / v - 1 for v in ref["kept_mass"]) / n
    inv = sum(1 / v for v in ref["kept_mass"]) / n
    assert abs(float(m["actor/lpreg_push"]) - push) <= 4 * eps * inv + 1e-6, (m, push)


def _budget(logits, proxy, temperature):
    """fp32 budget of the per-token log-domain values: z/T is formed in fp32 (relative eps32 per
    entry), so logp, log q and the KL carry ~eps32 |x|max each; x16 for the exp/log/lse
    roundings; 1e-5 as the token-stats tests for fp32 sums over the vocabulary."""
    X = logits.abs().max() if logits.numel() else torch.tensor(0.0)
    if proxy is not None and proxy.numel():
        X = torch.maximum(X, proxy.abs().max())
    return 1e-5 + 16 * EPS32 * float(X) / temperature


@fuzz(50)
@given(case=loss_cases(), backend=st.sampled_from(BACKENDS))
def test_policy_loss_matches_spec(case, backend):
    logits, labels, adv, old, mask, proxy, kw = case
    if backend == "triton":  # the interpreter: small rows only
        logits, labels = logits[..., :64], labels.clamp(max=min(63, logits.shape[-1] - 1))
        proxy = None if proxy is None else proxy[..., :64]
    ref = spec_loss(logits, labels, adv, old, mask, proxy, **kw)
    assume(not ref["ambiguous"])
    x = logits.clone().requires_grad_()
    loss, m = lpreg.lpreg_policy_loss(x, labels, adv, old, mask, proxy=proxy, backend=backend,
                                      return_tensors=True, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    n_valid = int(((mask > 0) & (labels != -100)).sum())
    assert round(float(m["actor/lpreg_frac"]) * max(n_valid, 1)) == ref["n_sel"]
    eps = _budget(logits, proxy, kw["temperature"])
    assert_mechanism(m, ref, eps)
    # a token's term carries (|A| r + 12 beta) x the log-domain budget (r = e^(logp - old) has
    # the relative error of logp); the weighted mean keeps that bound
    want = float(ref["loss"])
    if abs(want) > F32_MAX:  # the true loss is beyond fp32: its rounding is the infinity of its sign
        assert float(loss) == math.copysign(math.inf, want), (float(loss), want)
    else:
        assert abs(float(loss) - want) <= eps * ref["term"] + 1e-6 * abs(want), (float(loss), want)
    assert bool(grad.isfinite().all())
    # each gradient entry is w_t x term x (a difference of probabilities, |.| <= 2) / T: the same
    # budget, x4 for the two probabilities and their product with r
    err = (grad.double() - ref["grad"]).abs().max().item() if grad.numel() else 0.0
    assert err <= 4 * eps * ref["term"] * ref["w_max"] / kw["temperature"] + 1e-7, err


@fuzz(30)
@given(case=loss_cases(max_v=120), backend=st.sampled_from(BACKENDS),
       pad=st.sampled_from([1e4, 120.0, math.nan, math.inf, -math.inf]))
def test_padding_changes_nothing(case, backend, pad):
    logits, labels, adv, old, mask, proxy, kw = case
    assume(bool((mask == 0).any()))
    poisoned = logits.clone()
    col = labels.clamp(max=logits.shape[-1] - 1)[..., None]
    poisoned.scatter_(-1, col, torch.where(mask[..., None] == 0, pad, poisoned.gather(-1, col)))
    poisoned[..., 0] = torch.where(mask == 0, torch.full_like(mask, pad), poisoned[..., 0])
    res = []
    for z in (logits, poisoned):
        x = z.clone().requires_grad_()
        loss, m = lpreg.lpreg_policy_loss(x, labels, adv, old, mask, proxy=proxy, backend=backend,
                                          return_tensors=True, **kw)
        (g,) = torch.autograd.grad(loss, x)
        res.append((loss, g, m))
    (l0, g0, m0), (l1, g1, m1) = res
    pad_rows = mask == 0
    assert bool((g1[pad_rows] == 0).all()), "a padded position got a gradient"
    assert torch.equal(l0, l1) or (l0.isnan() and l1.isnan()), (l0, l1)
    assert torch.equal(g0[~pad_rows], g1[~pad_rows])
    assert torch.equal(m0["actor/lpreg_frac"], m1["actor/lpreg_frac"])


@fuzz(30)
@given(data=st.data())
def test_fused_linear_equals_materialised(data):
    B, L = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 5))
    H, V = data.draw(st.integers(1, 24)), data.draw(st.integers(1, 150))
    N = B * L
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    hidden = torch.randn(B, L, H, generator=g)
    weight = torch.randn(V, H, generator=g) * data.draw(st.sampled_from([0.1, 1.0, 3.0]))
    bias = torch.randn(V, generator=g) if data.draw(st.booleans()) else None
    labels = torch.randint(0, V, (B, L), generator=g)
    mask = (torch.rand(B, L, generator=g) < 0.8).float()
    adv = torch.randn(B, generator=g)
    old = None if data.draw(st.booleans()) else torch.randn(B, L, generator=g) - 3
    chunk = data.draw(st.one_of(st.just(1), st.just(N), st.integers(1, N + 2), st.none()))
    kw = dict(compat=data.draw(st.sampled_from(["paper", "released"])),
              rho=data.draw(st.floats(0.05, 1.0)), temperature=data.draw(st.floats(0.1, 3.0)),
              mode=data.draw(st.sampled_from(["min_p", "fixed"])),
              loss_agg_mode=data.draw(st.sampled_from(AGGS)), backend="torch")
    kw["threshold"] = data.draw(st.floats(0.001, 0.999))
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    logits = leaves[0] @ leaves[1].T + (leaves[2] if bias is not None else 0)
    want, wm = lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, return_tensors=True, **kw)
    want_g = torch.autograd.grad(want, leaves) if want.requires_grad else [torch.zeros_like(t) for t in leaves]
    ref = spec_loss(logits.detach(), labels, adv, old, mask, None, kl_estimator=None, beta=1.0,
                    clip_low=1.0, clip_high=9.0, **{k: v for k, v in kw.items() if k != "backend"})
    assume(not ref["ambiguous"])  # the two paths round the matmul differently: keep the choices clear
    leaves2 = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    got, gm = lpreg.fused_linear_policy_loss(leaves2[0], leaves2[1], labels, adv, old, mask,
                                             bias=leaves2[2] if bias is not None else None, chunk_size=chunk,
                                             return_tensors=True, **kw)
    got_g = torch.autograd.grad(got, leaves2) if got.requires_grad else [torch.zeros_like(t) for t in leaves2]
    assert torch.equal(gm["actor/lpreg_frac"], wm["actor/lpreg_frac"])
    for key in ("candidates", "filtered_frac", "selected"):  # the mechanism, summed over the chunks
        assert torch.equal(gm[f"actor/lpreg_{key}"], wm[f"actor/lpreg_{key}"]), key
    for key in ("kept_mass", "push", "p_y"):
        torch.testing.assert_close(gm[f"actor/lpreg_{key}"], wm[f"actor/lpreg_{key}"], rtol=1e-4, atol=1e-5)
    # the same fp32 math on logits from a chunked matmul: a few ulps of the logit scale
    X = float(logits.detach().abs().max()) / kw["temperature"]
    tol = 1e-5 + 64 * EPS32 * X
    torch.testing.assert_close(got, want, rtol=1e-5, atol=tol)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=tol * (1 + float(b.abs().max())))
