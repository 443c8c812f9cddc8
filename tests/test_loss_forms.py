"""The gradient analysis of docs/loss_forms.md: closed forms against float64 autograd, its sign
claims, the package's own penalty gradient, the stored figure data and the default form.

One position, on-policy (q built from the same logits, detached), y in the kept set K, kept
mass m < 1, c = 1/m - 1. A gradient-descent step on the logits moves z by eta * u with:

    full KL: u = (q - p)/T        k3 at y: u = c (e_y - p)/T

so the push on y's logit is c p_y / T (full) vs c (1 - p_y) / T (k3), and the first-order
changes per unit step are d log p_y = (e_y - p) . u / T and dH = -(p (log p + H)) . u / T.
"""

import importlib.util
import inspect
import json
import math
import os

import pytest
import torch

import lpreg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KAPPA = 0.02


def rows(n=40, V=50, seed=0):
    """(logits, y, T) float64 cases: peaked, flat and tailed rows; y a kept token, m < 1."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = (0.7, 1.0, 1.3)[i % 3]
        z = torch.randn(V, generator=g, dtype=torch.float64) * (0.5 + 3.0 * float(torch.rand((), generator=g)))
        z[int(torch.randint(0, V, (), generator=g))] += 6.0 * float(torch.rand((), generator=g))
        x = z / T
        kept = x >= x.max() + math.log(KAPPA)
        if kept.all():
            z[0] = z.max() - 20.0 * T  # one filtered token, so m < 1
            kept[0] = False
        idx = kept.nonzero()[:, 0]
        y = int(idx[int(torch.randint(0, len(idx), (), generator=g))])
        out.append((z, y, T))
    return out


def penalty(z, y, form, T):
    """D(z) transcribed from docs/spec.md §2: full KL(q || p) or k3 at y; q detached."""
    logp = torch.log_softmax(z / T, -1)
    x = (z / T).detach()
    kept = x >= x.max() + math.log(KAPPA)
    logq = torch.where(kept, x, torch.tensor(-math.inf, dtype=z.dtype)).log_softmax(-1)
    if form == "full":
        return torch.where(kept, logq.exp() * (logq - logp), torch.zeros_like(x)).sum()
    d = logq[y] - logp[y]
    return d.exp() - d - 1


def autograd(z, y, form, T):
    """(push on y's logit, d log p_y, dH) per unit step, float64 autograd."""
    z = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(penalty(z, y, form, T), z)
    (dlogp,) = torch.autograd.grad(torch.log_softmax(z / T, -1)[y], z)
    logp = torch.log_softmax(z / T, -1)
    (dH,) = torch.autograd.grad(-(logp.exp() * logp).sum(), z)
    return float(-g[y]), float(dlogp @ -g), float(dH @ -g)


def closed_form(z, y, form, T):
    """The same three numbers from the formulas of docs/loss_forms.md."""
    p = torch.softmax(z / T, -1)
    kept = (z / T) >= (z / T).max() + math.log(KAPPA)
    m = float(p[kept].sum())
    c = 1 / m - 1
    H = float(-(p * p.log()).sum())
    s = p * p * (p.log() + H)
    py = float(p[y])
    if form == "full":
        sq_k, sq_f = float((p[kept] ** 2).sum()), float((p[~kept] ** 2).sum())
        return c * py / T, (c * (py - sq_k) + sq_f) / T**2, (float(s[~kept].sum()) - c * float(s[kept].sum())) / T**2
    return c * (1 - py) / T, c * (1 - 2 * py + float((p * p).sum())) / T**2, \
        c * (-py * (math.log(py) + H) + float(s.sum())) / T**2


@pytest.mark.parametrize("form", ["full", "k3"])
def test_closed_forms_equal_float64_autograd(form):
    for z, y, T in rows():
        got, want = closed_form(z, y, form, T), autograd(z, y, form, T)
        # both float64; the closed forms sum V terms in another order: rounding ~1e-15 relative
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_k3_pushes_y_harder_than_the_full_kl_iff_p_y_below_half():
    """c (1 - p_y) > c p_y  <=>  p_y < 1/2, for every row with m < 1."""
    n_small = 0
    for z, y, T in rows(n=60, seed=1):
        full, k3 = autograd(z, y, "full", T)[0], autograd(z, y, "k3", T)[0]
        p_y = float(torch.softmax(z / T, -1)[y])
        assert full > 0 and k3 > 0
        assert (k3 > full) == (p_y < 0.5)
        n_small += p_y < 0.5
    assert 0 < n_small < 60  # both sides of 1/2 occur in the cases


def test_entropy_signs():
    """full KL: dH = -Cov_p(log p, q/p) / T^2 <= 0 (q/p is 1/m on the upper set K, 0 below);
    k3: dH = c (-p_y (log p_y + H) + Cov_p(p, log p)) / T^2 > 0 whenever p_y < e^-H."""
    n_k3 = 0
    for z, y, T in rows(n=60, seed=2):
        assert autograd(z, y, "full", T)[2] < 0
        p = torch.softmax(z / T, -1)
        H = float(-(p * p.log()).sum())
        if float(p[y]) < math.exp(-H):
            assert autograd(z, y, "k3", T)[2] > 0
            n_k3 += 1
    assert n_k3 > 10  # the premise holds in a fair share of the cases


def test_documented_setup_at_p_y_0_02():
    """The numbers docs/loss_forms.md quotes: V = 32000, uniform tail of mass 0.0324, T = 1."""
    V, tail, py = 32000, 0.0324, 0.02
    p = torch.full((V,), tail / (V - 2), dtype=torch.float64)
    p[0], p[1] = 1 - py - tail, py
    z = p.log()
    full, k3 = autograd(z, 1, "full", 1.0), autograd(z, 1, "k3", 1.0)
    # printed to 2 significant digits in the text: half a unit in the last digit
    assert -full[0] == pytest.approx(-0.00067, abs=5e-6) and -k3[0] == pytest.approx(-0.033, abs=5e-4)
    assert full[1] < 0 < k3[1]  # the full KL lowers p_y itself; k3 raises it
    assert full[2] == pytest.approx(-0.0157, abs=5e-5) and k3[2] == pytest.approx(0.0179, abs=5e-5)


def test_stored_figure_data_is_current():
    """docs/loss_forms.json at p_y = 0.02 equals a recomputation with the script's code."""
    path = os.path.join(ROOT, "docs", "loss_forms_figure.py")
    spec = importlib.util.spec_from_file_location("loss_forms_figure", path)
    fig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig)
    with open(os.path.join(ROOT, "docs", "loss_forms.json")) as f:
        stored = json.load(f)
    assert stored["setup"] == fig.SETUP
    s = fig.SETUP
    p = fig.distribution(0.02, s["V"], s["tail_mass"])
    for form in ("full", "k3"):
        row = fig.autograd_row(p, 1, form, s["kappa"], s["temperature"], s["eta"])
        # the same float64 ops in the same order: equal to the last digit json keeps
        assert stored["at_p_y_0.02"]["V"][form] == pytest.approx(row, rel=1e-12)
        first = {k: stored["autograd"][form][k][0] for k in ("push_y", "dlogp_y", "dH")}
        assert first == pytest.approx({k: row[k] for k in first}, rel=1e-12)  # the grid starts at 0.02
    assert stored["max_abs_diff_closed_vs_autograd"] < 1e-10


@pytest.mark.parametrize("compat", ["released", "paper"])
def test_package_penalty_gradient_is_the_closed_form(compat):
    """lpreg_policy_loss's penalty gradient (beta = 1 minus beta = 0), on-policy, one selected
    token per row, equals the closed form for its estimator (released: k3, paper: full)."""
    V, T = 300, 0.8
    z, y = None, None
    for zz, yy, _ in rows(n=30, V=V, seed=3):  # a row whose y is kept and rare at T = 0.8
        p = torch.softmax(zz / T, -1)
        kept = (zz / T) >= (zz / T).max() + math.log(KAPPA)
        if kept[yy] and float(p[yy]) < 0.3 and not kept.all():
            z, y = zz, yy
            break
    assert z is not None
    logits = z.float().expand(1, 2, V).clone()  # two identical tokens: released needs k > 1
    labels = torch.tensor([[y, y]])
    adv, mask = -torch.ones(1), torch.ones(1, 2)
    grads = []
    for beta in (1.0, 0.0):
        x = logits.clone().requires_grad_(True)
        loss, m = lpreg.lpreg_policy_loss(x, labels, adv, None, mask, compat=compat, beta=beta, rho=1.0,
                                          temperature=T, backend="torch")
        assert beta == 0.0 or m["actor/lpreg_frac"] == 1.0
        grads.append(torch.autograd.grad(loss, x)[0][0, 0].double())
    push = -(grads[0] - grads[1]) * 2  # token-mean over 2 tokens: weight 1/2
    want = closed_form(z.float().double(), y, "k3" if compat == "released" else "full", T)[0]
    # fp32 logits and softmax: gradient entries carry ~1e-7 absolute error
    assert float(push[y]) == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_default_form_is_released():
    for f in (lpreg.lpreg_policy_loss, lpreg.policy_loss.policy_loss_from_stats):
        assert inspect.signature(f).parameters["compat"].default == "released"
    z, y, _ = rows(n=1, seed=4)[0]
    logits = z.float().expand(2, 3, -1).clone()
    labels = torch.full((2, 3), y)
    kw = dict(rho=1.0, backend="torch")
    args = (labels, -torch.ones(2), None, torch.ones(2, 3))
    default, _ = lpreg.lpreg_policy_loss(logits, *args, **kw)
    released, _ = lpreg.lpreg_policy_loss(logits, *args, compat="released", **kw)
    paper, _ = lpreg.lpreg_policy_loss(logits, *args, compat="paper", **kw)
    assert float(default) == float(released) != float(paper)


def test_full_kl_does_not_keep_ratios_within_k():
    """A gradient step on the logits moves log(p_i / p_j) by c (p_i - p_j) / T^2 per unit step
    under the full KL (i, j in K): the larger kept token gains, so y loses ground to the leader;
    under k3 y gains c (1 - p_y + p_j) / T^2 on every other token j."""
    for z, y, T in rows(n=20, seed=5):
        p = torch.softmax(z / T, -1)
        lead = int(p.argmax())
        if lead == y:
            continue
        kept = (z / T) >= (z / T).max() + math.log(KAPPA)
        c = 1 / float(p[kept].sum()) - 1
        for form, want in (("full", c * float(p[y] - p[lead]) / T**2), ("k3", c * float(1 - p[y] + p[lead]) / T**2)):
            x = z.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(penalty(x, y, form, T), x)
            got = float(-(g[y] - g[lead]) / T)  # d/d(eta) of (z_y - z_lead) / T
            assert got == pytest.approx(want, rel=1e-9, abs=1e-15)  # float64, a handful of terms
            assert (got < 0) == (form == "full")
