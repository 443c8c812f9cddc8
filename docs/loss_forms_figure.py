"""The two Lp-Reg penalty forms on one token: how each moves the selected token y and the entropy.

Writes docs/loss_forms.png and docs/loss_forms.json (read by docs/loss_forms.md):

    python docs/loss_forms_figure.py          # CPU, float64, about a second; deterministic

Setup (one position, on-policy: the proxy q is built from the same logits, detached):
a leader, the selected token y with probability p_y, and a uniform noise tail of V - 2
tokens holding `tail_mass`; min-p filter kappa = 0.02 (the tail is filtered, y and the leader
are kept), so the kept mass is m = 1 - tail_mass for every p_y. One gradient-descent step of
size eta on the logits z from the penalty alone (beta = 1, weight 1):

    full KL:  D = KL(q || p),  dD/dz = (p - q)/T
    k3:       D = e^d - d - 1 with d = log q_y - log p_y,  dD/dz = -(1/m - 1)(e_y - p)/T

For each p_y: the push on y's logit (-dD/dz_y), the first-order change of log p_y and of the
entropy H per unit step, from float64 autograd and from the closed forms of
docs/loss_forms.md (both are stored; they agree to rounding), and the exact change of H
after one step of size eta. tail_mass = 0.0324 makes 1/m - 1 = 0.0335, the kept mass the
issue's gradient figures imply (p_y (1/m - 1) = 0.00067 at p_y = 0.02).
"""

import json
import math
import os
from typing import Dict, List

import torch

SETUP = {"V": 32000, "tail_mass": 0.0324, "kappa": 0.02, "temperature": 1.0, "eta": 1.0, "beta": 1.0,
         "p_y_min": 0.02, "p_y_max": 0.45, "points": 64}
SENSITIVITY_V = (101, 1000, 32000, 151936)  # the entropy change depends on the tail; the pushes do not
TICKS = (0.02, 0.05, 0.1, 0.2, 0.45)
HERE = os.path.dirname(os.path.abspath(__file__))


def distribution(p_y: float, V: int, tail_mass: float) -> torch.Tensor:
    """(V,) float64: [leader, y, tail...]; y is index 1."""
    p = torch.full((V,), tail_mass / (V - 2), dtype=torch.float64)
    p[0] = 1.0 - p_y - tail_mass
    p[1] = p_y
    return p


def penalty(z: torch.Tensor, y: int, form: str, kappa: float, T: float) -> torch.Tensor:
    """D(z) for one row: the proxy q comes from z itself, detached (on-policy, a target)."""
    logp = torch.log_softmax(z / T, -1)
    zd = (z / T).detach()
    kept = zd >= zd.max() + math.log(kappa)
    logq = torch.where(kept, zd, torch.tensor(-math.inf, dtype=z.dtype)).log_softmax(-1)
    if form == "full":
        q = logq.exp()
        return torch.where(kept, q * (logq - logp), torch.zeros_like(q)).sum()
    d = logq[y] - logp[y]
    return d.exp() - d - 1.0


def entropy(z: torch.Tensor, T: float) -> torch.Tensor:
    logp = torch.log_softmax(z / T, -1)
    return -(logp.exp() * logp).sum()


def autograd_row(p: torch.Tensor, y: int, form: str, kappa: float, T: float, eta: float) -> Dict[str, float]:
    """Push on y, first-order d log p_y and dH per unit step, exact dH after one step."""
    z = (T * p.log()).requires_grad_(True)  # softmax(z / T) = p
    (g,) = torch.autograd.grad(penalty(z, y, form, kappa, T), z)
    step = -g  # the descent direction: z <- z + eta * step
    (dlogp,) = torch.autograd.grad(torch.log_softmax(z / T, -1)[y], z)
    (dH,) = torch.autograd.grad(entropy(z, T), z)
    with torch.no_grad():
        exact = float(entropy(z + eta * step, T) - entropy(z, T))
    return {"push_y": float(step[y]), "dlogp_y": float(dlogp @ step), "dH": float(dH @ step), "dH_exact_step": exact}


def closed_form_row(p: torch.Tensor, y: int, form: str, kappa: float, T: float) -> Dict[str, float]:
    """The same three first-order quantities from the formulas of docs/loss_forms.md."""
    kept = p >= kappa * p.max()
    m = float(p[kept].sum())
    c = 1.0 / m - 1.0
    H = float(-(p * p.log()).sum())
    s = p * p * (p.log() + H)  # p_j^2 (log p_j + H)
    sq_kept, sq_filtered = float((p[kept] ** 2).sum()), float((p[~kept] ** 2).sum())
    py = float(p[y])
    if form == "full":
        return {"push_y": c * py / T,
                "dlogp_y": (c * (py - sq_kept) + sq_filtered) / T**2,
                "dH": (float(s[~kept].sum()) - c * float(s[kept].sum())) / T**2}
    return {"push_y": c * (1.0 - py) / T,
            "dlogp_y": c * (1.0 - 2.0 * py + float((p * p).sum())) / T**2,
            "dH": c * (-py * (math.log(py) + H) + float(s.sum())) / T**2}


def grid(setup: Dict) -> List[float]:
    lo, hi, n = math.log(setup["p_y_min"]), math.log(setup["p_y_max"]), setup["points"]
    return [math.exp(lo + (hi - lo) * i / (n - 1)) for i in range(n)]


def compute(setup: Dict = SETUP) -> Dict:
    """Everything the figure and the text use, as plain floats."""
    out = {"setup": dict(setup), "p_y": grid(setup), "autograd": {}, "closed_form": {}}
    args = (setup["kappa"], setup["temperature"])
    for form in ("full", "k3"):
        rows = [autograd_row(distribution(py, setup["V"], setup["tail_mass"]), 1, form, *args, setup["eta"])
                for py in out["p_y"]]
        closed = [closed_form_row(distribution(py, setup["V"], setup["tail_mass"]), 1, form, *args)
                  for py in out["p_y"]]
        out["autograd"][form] = {k: [r[k] for r in rows] for k in rows[0]}
        out["closed_form"][form] = {k: [r[k] for r in closed] for k in closed[0]}
    out["max_abs_diff_closed_vs_autograd"] = max(
        abs(a - b) for form in ("full", "k3") for k in ("push_y", "dlogp_y", "dH")
        for a, b in zip(out["autograd"][form][k], out["closed_form"][form][k]))
    at = {}
    for V in SENSITIVITY_V:
        p = distribution(0.02, V, setup["tail_mass"])
        at[str(V)] = {form: autograd_row(p, 1, form, *args, setup["eta"]) for form in ("full", "k3")}
    out["at_p_y_0.02"] = {"V": at[str(setup["V"])], "by_V": at,
                          "grad_on_y_logit": {f: -at[str(setup["V"])][f]["push_y"] for f in ("full", "k3")}}
    return out


def plot(data: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    x = data["p_y"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = [("push_y", "push on y's logit, $-\\partial D/\\partial z_y$", True),
              ("dlogp_y", "$\\Delta \\log p_y$ per unit step", False),
              ("dH", "entropy change $\\Delta H$ per unit step", False)]
    style = {"full": ("full KL (paper)", "tab:blue"), "k3": ("k3 at y (released)", "tab:red")}
    for ax, (key, title, logy) in zip(axes, panels):
        for form, (label, color) in style.items():
            ax.plot(x, data["autograd"][form][key], color=color, label=label)
        ax.axvline(0.02, color="0.6", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xticks(TICKS, [f"{t:g}" for t in TICKS])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        if logy:
            ax.set_yscale("log")
        else:
            ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_xlabel("$p_y$ (selected token)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=9)
    s = data["setup"]
    fig.suptitle(f"Lp-Reg penalty alone, on-policy: V = {s['V']}, kept mass m = {1 - s['tail_mass']:.4f}, "
                 f"min-p $\\kappa$ = {s['kappa']}, T = {s['temperature']}, $\\beta$ = 1, step $\\eta$ = {s['eta']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    data = compute()
    with open(os.path.join(HERE, "loss_forms.json"), "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    plot(data, os.path.join(HERE, "loss_forms.png"))
    at = data["at_p_y_0.02"]["V"]
    for form in ("full", "k3"):
        r = at[form]
        print(f"p_y = 0.02, {form:4s}: grad on y's logit {-r['push_y']:+.5f}, d log p_y {r['dlogp_y']:+.5f}, "
              f"dH {r['dH']:+.5f} (exact step {r['dH_exact_step']:+.5f})")
    print(f"closed form vs autograd: max |diff| = {data['max_abs_diff_closed_vs_autograd']:.2e}")


if __name__ == "__main__":
    main()
