"""`lpreg.lpreg_regularize`: Lp-Reg over a base objective that is not lpreg's PPO-clip (docs/spec.md, "Lp-Reg
over any base objective"), against a float64 oracle written from that section, token by token.

Two bases stand for the families of the section: a CISPO-like one (-sg(min(r, 1 + eps)) A log p: it never
zeroes a negative-advantage gradient, so its released surrogate is itself, "no change") and a SAPO-like
one (-A f(r), f a soft gate sigmoid(tau (r - 1)) 4 / tau: the released form removes the gate at a selected
token, which then trains on the raw-ratio -A r). The oracle recomputes the selection, the penalty, the swap
and the token-mean in float64 from the logits; lpreg's side runs the fp32 op and the loss core.
"""

import math

import pytest
import torch

import lpreg
from tests.test_policy_loss import KAPPA, make_batch

EPS_HIGH = 0.28  # the CISPO-like base's upper cap on the (detached) ratio
TAU_POS, TAU_NEG = 1.0, 1.05  # the SAPO-like gate's temperatures for A > 0 and A < 0


def cispo(adv, logp, old):
    """-sg(min(r, 1 + eps)) A log p per token (any dtype)."""
    r = torch.exp(logp - old).detach()
    return -torch.clamp(r, max=1.0 + EPS_HIGH) * adv * logp


def sapo(adv, logp, old):
    """-A f(r), f(r) = sigmoid(tau (r - 1)) 4 / tau, tau by the sign of A."""
    tau = torch.where(adv > 0, torch.full_like(adv, TAU_POS), torch.full_like(adv, TAU_NEG))
    r = torch.exp(logp - old)
    return -adv * torch.sigmoid(tau * (r - 1.0)) * 4.0 / tau


BASES = {"cispo": cispo, "sapo": sapo}


def regularize_oracle(logits, labels, adv, old, mask, *, base, compat, rho, beta, weights=None):
    """(token-mean loss, its gradient w.r.t. the logits, selected set, candidate set), float64.

    docs/spec.md "Lp-Reg over any base objective": per valid token, paper: base + beta S D (D the full
    KL); released: (S ? surrogate : base) + beta S D (D = k3), the surrogate being -A r for the SAPO-like
    base (no upper cap) and the base itself for the CISPO-like one. S as in docs/spec.md §3; a token of
    weight 0 is out of the pool; the weight multiplies the base (and the default surrogate)."""
    x = logits.double().clone().requires_grad_(True)
    B, L, V = x.shape
    adv = adv.double()
    adv = adv[:, None].expand(B, L) if adv.dim() == 1 else adv
    logp_all = torch.log_softmax(x, -1)
    xd = x.detach()
    kept = xd >= xd.max(-1, keepdim=True).values + math.log(KAPPA)
    logq_all = torch.where(kept, xd, torch.tensor(-math.inf, dtype=torch.float64)).log_softmax(-1)
    valid = [(b, t) for b in range(B) for t in range(L) if mask[b, t] > 0]
    w = None if weights is None else weights.double()
    pool = valid if w is None else [bt for bt in valid if w[bt] > 0]

    def logp(bt):
        return logp_all[bt][labels[bt]]

    def logq(bt):
        return logq_all[bt][labels[bt]]

    def key(bt):
        return float(logp(bt).detach())

    if compat == "paper":
        k = max(1, math.floor(rho * len(pool)))
        bottom = sorted(pool, key=key)[:k]  # stable: ties by position
        selected = {bt for bt in bottom if adv[bt] < 0 and float(logq(bt)) > -math.inf}
    else:
        neg = [bt for bt in pool if adv[bt] < 0]
        k = max(1, int(len(neg) * rho))
        bottom = sorted(neg, key=key)[:k] if k > 1 else []
        selected = {bt for bt in bottom if key(bt) < float(logq(bt))}
    total = torch.zeros((), dtype=torch.float64)
    for bt in valid:
        a, lp, o = adv[bt], logp(bt), old[bt].double()
        wt = 1.0 if w is None else w[bt]
        tok = wt * BASES[base](a, lp, o)
        if bt in selected:
            if compat == "released" and base == "sapo":
                tok = wt * (-a * torch.exp(lp - o))  # the gate removed: the raw-ratio surrogate
            if compat == "paper":
                q = logq_all[bt].exp()
                d = torch.where(kept[bt], q * (logq_all[bt] - logp_all[bt]), torch.zeros_like(q)).sum()
            else:
                dd = (logq(bt) - lp).clamp(-20, 20)
                d = (dd.exp() - dd - 1).clamp(-10, 10)
            tok = tok + beta * d
        total = total + tok
    loss = total / max(len(valid), 1)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, selected, set(bottom)


def run(logits, labels, adv, old, mask, *, base, compat, rho, beta, weights=None):
    """lpreg's side: the fp32 op, the caller's base from its log-probs, lpreg_regularize, a token-mean."""
    x = logits.clone().requires_grad_(True)
    stats = lpreg.lpreg_token_stats(x, labels, backend="torch", threshold=KAPPA)
    a = adv[:, None].expand_as(mask) if adv.dim() == 1 else adv
    w = torch.ones_like(mask) if weights is None else weights
    base_loss = w * BASES[base](a, stats.logp, old)
    surrogate = base_loss if base == "cispo" else None  # CISPO: the released form changes nothing
    terms = lpreg.lpreg_regularize(base_loss, stats, adv, old, mask, released_surrogate=surrogate, weights=weights,
                                   compat=compat, rho=rho, beta=beta)
    m = mask > 0
    loss = (terms.loss * m).sum() / m.sum().clamp(min=1)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad, terms


def as_set(mask):
    return {tuple(i) for i in mask.nonzero().tolist()}


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("compat", ["released", "paper"])
@pytest.mark.parametrize("seed", [0, 1])
def test_against_the_float64_oracle(base, compat, seed):
    batch = make_batch(seed=seed, adv_per_token=True)
    want, want_grad, want_sel, want_cand = regularize_oracle(*batch, base=base, compat=compat, rho=0.6, beta=0.7)
    got, got_grad, terms = run(*batch, base=base, compat=compat, rho=0.6, beta=0.7)
    assert len(want_sel) > 0 and as_set(terms.selected) == want_sel and as_set(terms.candidate) == want_cand
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("compat", ["released", "paper"])
def test_weight_zero_tokens_are_out_of_the_pool(base, compat):
    batch = make_batch(seed=3, adv_per_token=True)
    g = torch.Generator().manual_seed(3)
    weights = (torch.rand(batch[4].shape, generator=g) > 0.3).float() * 1.5
    want, want_grad, want_sel, _ = regularize_oracle(*batch, base=base, compat=compat, rho=0.6, beta=0.7,
                                                     weights=weights)
    got, got_grad, terms = run(*batch, base=base, compat=compat, rho=0.6, beta=0.7, weights=weights)
    assert as_set(terms.selected) == want_sel and not (terms.candidate & (weights == 0)).any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def test_released_surrogate_swaps_only_the_selected_tokens():
    logits, labels, adv, old, mask = make_batch(seed=4, adv_per_token=True)
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    base = sapo(adv, stats.logp, old)
    surrogate = torch.full_like(base, 7.0)  # a marker: where it shows, the swap happened
    terms = lpreg.lpreg_regularize(base, stats, adv, old, mask, released_surrogate=surrogate, rho=0.6, beta=0.5)
    sel = terms.selected
    assert sel.any() and (~sel & (mask > 0)).any()
    torch.testing.assert_close(terms.loss[sel], 7.0 + 0.5 * terms.divergence[sel])
    assert torch.equal(terms.loss[~sel & (mask > 0)], base[~sel & (mask > 0)])
    assert torch.equal(terms.base_loss[mask > 0], base[mask > 0])
    paper = lpreg.lpreg_regularize(base, stats, adv, old, mask, released_surrogate=surrogate, compat="paper",
                                   rho=0.6, beta=0.5)
    assert not (paper.loss == 7.0 + 0.5 * paper.divergence)[paper.selected].any()  # paper keeps the base


def test_beta_zero_is_the_base_exactly():
    logits, labels, adv, old, mask = make_batch(seed=5, adv_per_token=True)
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    base = cispo(adv, stats.logp, old)
    for compat in ("released", "paper"):
        terms = lpreg.lpreg_regularize(base, stats, adv, old, mask, compat=compat, rho=0.6, beta=0.0)
        assert torch.equal(terms.loss[mask > 0], base[mask > 0])
        assert not terms.selected.any() and not terms.candidate.any()


@pytest.mark.parametrize("compat", ["released", "paper"])
def test_ppo_clip_base_is_lpregs_own_loss(compat):
    """lpreg's own loss is this composition over the PPO-clip base, with dual clip and weights."""
    logits, labels, adv, old, mask = make_batch(seed=6, adv_per_token=True)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(6)) + 0.5
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    kw = dict(compat=compat, rho=0.6, beta=0.8)
    want, m = lpreg.policy_loss_from_stats(stats, adv, old, mask, weights=weights, clip_low=0.2, clip_high=0.28,
                                           clip_ratio_c=3.0, return_tensors=True, **kw)
    r = torch.exp(stats.logp - old)
    clipped = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.28))
    dual = lambda t: torch.where(adv < 0, torch.minimum(t, -adv * 3.0), t)  # noqa: E731
    terms = lpreg.lpreg_regularize(weights * dual(clipped), stats, adv, old, mask, weights=weights,
                                   released_surrogate=weights * dual(-adv * r), **kw)
    valid = mask > 0
    torch.testing.assert_close((terms.loss * valid).sum() / valid.sum(), want)
    sums = lpreg.mechanism_sums(terms, valid)
    for key, value in lpreg.mechanism_metrics(sums).items():
        torch.testing.assert_close(value, m[f"actor/{key}"], msg=key)


def test_on_policy_selects_on_the_current_log_probs():
    logits, labels, adv, _, mask = make_batch(seed=7, adv_per_token=True)
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    base = sapo(adv, stats.logp, stats.logp.detach())
    on = lpreg.lpreg_regularize(base, stats, adv, None, mask, rho=0.6)
    off = lpreg.lpreg_regularize(base, stats, adv, stats.logp.detach(), mask, rho=0.6)
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_bad_input_names_the_argument():
    logits, labels, adv, old, mask = make_batch(B=2, L=3, V=16, seed=8)
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    base = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="base_loss"):
        lpreg.lpreg_regularize(torch.zeros(2, 4), stats, adv, old, mask)
    with pytest.raises(ValueError, match="base_loss"):
        lpreg.lpreg_regularize(torch.zeros(2, 3, dtype=torch.long), stats, adv, old, mask)
    with pytest.raises(ValueError, match="released_surrogate"):
        lpreg.lpreg_regularize(base, stats, adv, old, mask, released_surrogate=torch.zeros(3))
    with pytest.raises(ValueError, match="rho"):
        lpreg.lpreg_regularize(base, stats, adv, old, mask, rho=2.0)
    with pytest.raises(ValueError, match="selection_threshold"):
        sel = lpreg.selection_threshold(old, mask, rho=0.5)
        lpreg.lpreg_regularize(base, stats, adv, old, mask, selection_threshold=sel)  # released: per call
    with pytest.raises(ValueError, match="valid"):
        lpreg.mechanism_sums(lpreg.lpreg_regularize(base, stats, adv, old, mask), torch.ones(3))
    with pytest.raises(ValueError, match="push"):
        lpreg.mechanism_metrics({"candidates": torch.zeros(())})


def test_nan_base_stays_nan():
    logits, labels, adv, old, mask = make_batch(B=2, L=3, V=16, seed=9)
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    base = torch.zeros(2, 3)
    base[0, 0] = float("nan")
    mask[0, 0] = 1.0
    terms = lpreg.lpreg_regularize(base, stats, adv, old, mask, compat="paper", rho=1.0)
    assert torch.isnan(terms.loss[0, 0]) and torch.isnan((terms.loss * mask).sum())
