"""Per-token importance-sampling weights (`weights=`, docs/spec.md §3 "Per-token weights") against a
float64 transcription of the rule, token by token: w multiplies the surrogate (dual clip included),
not the Lp-Reg term; a w = 0 token is out of the selection pool; the aggregation is unweighted."""


import pytest
import torch

import lpreg
from tests.test_fused_linear import make_linear
from tests.test_policy_loss import KAPPA, make_batch, selection_oracle


def weights_for(shape, seed, zero_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(shape, generator=g) * 2
    w[torch.rand(shape, generator=g) < zero_frac] = 0.0  # MIS / token-mask: zeroed tokens
    return w


def oracle(logits, labels, adv, old, mask, w, *, loss_agg_mode="token-mean", **kw):
    """(loss, grad wrt logits, selected set), float64: test_policy_loss's oracle with the weights rule."""
    return selection_oracle(logits, labels, adv, old, mask, agg=loss_agg_mode, weights=w, **kw)[:3]


def run(logits, labels, adv, old, mask, w, **kw):
    x = logits.clone().requires_grad_(True)
    loss, m = lpreg.lpreg_policy_loss(x, labels, adv, old, mask, weights=w, backend="torch", threshold=KAPPA, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss, grad, m


@pytest.mark.parametrize("compat", ["paper", "released"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("clip_ratio_c", [None, 3.0])
def test_weights_follow_the_spec_in_float64(compat, agg, clip_ratio_c):
    logits, labels, adv, old, mask = make_batch(seed=1, adv_per_token=True)
    w = weights_for(mask.shape, seed=12)
    kw = dict(compat=compat, rho=0.6, loss_agg_mode=agg, clip_ratio_c=clip_ratio_c)
    want, want_grad, selected = oracle(logits, labels, adv, old, mask, w, **kw)
    _, _, unweighted = oracle(logits, labels, adv, old, mask, torch.ones_like(w), **kw)
    assert selected and selected != unweighted  # the rule acts on the selection pool here
    got, grad, m = run(logits, labels, adv, old, mask, w, **kw)
    n_valid = int((mask > 0).sum())
    assert round(m["actor/lpreg_frac"] * n_valid) == len(selected)
    assert abs(got.item() - want.item()) <= 1e-5 * max(1.0, abs(want.item()))
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    # the same rule from statistics the caller already has
    stats = lpreg.lpreg_token_stats(logits.clone().requires_grad_(), labels, threshold=KAPPA, backend="torch")
    loss2, m2 = lpreg.policy_loss_from_stats(stats, adv, old, mask, weights=w, **kw)
    assert abs(loss2.item() - got.item()) <= 1e-6 * max(1.0, abs(got.item())) and m2 == m


def test_unit_weights_change_nothing_and_sequence_weights_broadcast():
    logits, labels, adv, old, mask = make_batch(seed=13)
    base, base_grad, bm = run(logits, labels, adv, old, mask, None, compat="paper", rho=0.5)
    ones, ones_grad, om = run(logits, labels, adv, old, mask, torch.ones_like(mask), compat="paper", rho=0.5)
    assert torch.equal(base, ones) and torch.equal(base_grad, ones_grad) and bm == om
    seq = torch.tensor([0.5, 2.0, 0.0, 1.0, 1.5, 0.25])
    a = run(logits, labels, adv, old, mask, seq, compat="released", rho=0.5)
    b = run(logits, labels, adv, old, mask, seq[:, None].expand_as(mask).contiguous(), compat="released", rho=0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_fused_path_takes_the_same_weights():
    hidden, weight, bias, labels, adv, old, mask = make_linear(seed=3)
    w = weights_for(mask.shape, seed=15)
    kw = dict(compat="paper", rho=0.6, weights=w, threshold=KAPPA)
    logits = (hidden @ weight.T + bias).requires_grad_()
    want, wm = lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, backend="torch", **kw)
    h = hidden.clone().requires_grad_()
    got, gm = lpreg.fused_linear_policy_loss(h, weight, labels, adv, old, mask, bias=bias, chunk_size=5,
                                             backend="torch", **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert wm["actor/lpreg_frac"] > 0 and abs(gm["actor/lpreg_frac"] - wm["actor/lpreg_frac"]) < 1e-7
    (gl,) = torch.autograd.grad(want, logits)
    (gh,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(gh, gl @ weight, rtol=1e-4, atol=1e-6)


def test_nan_weight_gives_nan_loss_unless_masked():
    logits, labels, adv, old, mask = make_batch(seed=16)
    w = torch.ones_like(mask)
    w[0, 0] = float("nan")
    assert mask[0, 0] > 0
    assert run(logits, labels, adv, old, mask, w, compat="released", rho=0.5)[0].isnan()
    masked = mask.clone()
    masked[0, 0] = 0
    loss = run(logits, labels, adv, old, masked, w, compat="released", rho=0.5)[0]
    assert torch.isfinite(loss)


@pytest.mark.parametrize("bad,match", [
    (lambda m: torch.full_like(m, -0.5), r"weights must be finite and >= 0 on the valid tokens, got -0.5 at \(0, 0\)"),
    (lambda m: torch.full_like(m, float("inf")), r"weights must be finite and >= 0 .* got inf"),
    (lambda m: torch.ones(m.shape[0], m.shape[1] + 1), r"weights must have shape \(B, L\) = \(6, 10\)"),
    (lambda m: torch.ones(m.shape, dtype=torch.long), r"weights must be None or a float torch.Tensor"),
    (lambda m: [1.0] * m.shape[0], r"weights must be None or a float torch.Tensor"),
])
def test_bad_weights_name_the_argument(bad, match):
    logits, labels, adv, old, mask = make_batch(seed=17)
    with pytest.raises(ValueError, match=match):
        run(logits, labels, adv, old, mask, bad(mask), compat="released")
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    with pytest.raises(ValueError, match=match):
        lpreg.policy_loss_from_stats(stats, adv, old, mask, weights=bad(mask))


def test_negative_weight_on_a_masked_token_is_never_read():
    logits, labels, adv, old, mask = make_batch(seed=18)
    w = torch.ones_like(mask)
    off = (mask == 0).nonzero()[0]
    w[tuple(off)] = -1.0
    base = run(logits, labels, adv, old, mask, None, compat="released", rho=0.5)[0]
    assert torch.equal(run(logits, labels, adv, old, mask, w, compat="released", rho=0.5)[0], base)
