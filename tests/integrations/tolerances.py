"""Parameter-difference bounds after a few optimiser steps, from the two runs' own gradients.

Two runs that start from the same parameters and see gradients g_t and g'_t (t = 1..T) end
apart by an amount the optimiser's update rule bounds; the tests assert the measured
difference is within that bound, element by element (a negative `excess` passes).

SGD (TRL tests, no momentum, no weight decay): theta_T - theta'_T = -lr sum_t (g_t - g'_t)
exactly, so |d theta| <= lr sum_t |g_t - g'_t|, plus the rounding of the fp32 updates
(<= 2 ulp of the parameter per step).

AdamW (verl tests, torch's AdamW as verl builds it, after verl's gradient clipping g -> c g with
c = min(1, clip / (||g|| + 1e-6))): with bias-corrected moments m^_t = sum_s w_s g_s and
v^_t = sum_s u_s g_s^2 (weights w, u >= 0 summing to 1), the step is m^ / (sqrt(v^) + eps).
Cauchy-Schwarz gives |m^| <= sqrt(sum_s w_s^2 / u_s) sqrt(v^) = a_t sqrt(v^) (a_1 = 1, a_2 = 1.0013
for betas (0.9, 0.999)); |m^ - m^'| <= max_s |g_s - g'_s| (a weighted mean) and
|sqrt(v^) - sqrt(v^')| <= max_s |g_s - g'_s| (a weighted RMS is a norm). Hence
    |step_t - step'_t| <= (1 + a_t) max_{s<=t} |g_s - g'_s| / (sqrt(v^'_t) + eps),
and weight decay contracts differences (factor 1 - lr wd <= 1), so
    |theta_T - theta'_T| <= lr sum_t (1 + a_t) max_{s<=t} |g_s - g'_s| / (sqrt(v^'_t) + eps)
                            + T x 2 ulp(theta).
An element whose gradient is ~0 (small v^) amplifies a last-bit gradient difference into a
visible parameter difference; the bound says by how much.
"""

import json
import os
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

EPS32 = 2.0 ** -24


def _rounding(p: Tensor, steps: int) -> Tensor:
    return steps * 2 * 2 * EPS32 * p.abs().clamp(min=1.0)


def sgd_excess(pa: Dict[str, Tensor], pb: Dict[str, Tensor], ga: List[Dict], gb: List[Dict], lr: float) -> float:
    """max over elements of |theta - theta'| minus the SGD bound."""
    worst = -float("inf")
    for name, p in pa.items():
        q = pb[name].reshape(p.shape)
        diff = sum((a[name].reshape(p.shape) - b[name].reshape(p.shape)).abs() for a, b in zip(ga, gb))
        worst = max(worst, ((p - q).abs() - lr * diff - _rounding(p, len(ga))).max().item())
    return worst


def _clip(grads: Dict[str, Optional[Tensor]], norm: float, clip: float) -> Dict[str, Optional[Tensor]]:
    c = min(1.0, clip / (norm + 1e-6))
    return {k: None if g is None else g.double() * c for k, g in grads.items()}


def adam_a(t: int, betas=(0.9, 0.999)) -> float:
    """a_t = sqrt(sum_s w_s^2 / u_s): the bound on |m^| / sqrt(v^) after t steps."""
    b1, b2 = betas
    w = [(1 - b1) * b1 ** (t - s) / (1 - b1 ** t) for s in range(1, t + 1)]
    u = [(1 - b2) * b2 ** (t - s) / (1 - b2 ** t) for s in range(1, t + 1)]
    return sum(x * x / y for x, y in zip(w, u)) ** 0.5


def adamw_excess(pa: Dict[str, Tensor], pb: Dict[str, Tensor], ga: Sequence[Dict], gb: Sequence[Dict],
                 norms_a: Sequence[float], norms_b: Sequence[float], *, lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, clip: float = 1.0) -> float:
    """max over elements of |theta - theta'| minus the AdamW bound (module docstring)."""
    ca = [_clip(g, n, clip) for g, n in zip(ga, norms_a)]
    cb = [_clip(g, n, clip) for g, n in zip(gb, norms_b)]
    worst = -float("inf")
    b2 = betas[1]
    for name, p in pa.items():
        if ca[0][name] is None:
            continue
        q = pb[name].reshape(p.shape)
        shape = p.shape
        v = torch.zeros(shape, dtype=torch.float64)
        dmax = torch.zeros(shape, dtype=torch.float64)
        bound = torch.zeros(shape, dtype=torch.float64)
        for t, (a, b) in enumerate(zip(ca, cb), start=1):
            gb_t = b[name].reshape(shape)
            v = b2 * v + (1 - b2) * gb_t * gb_t
            vhat = v / (1 - b2 ** t)
            dmax = torch.maximum(dmax, (a[name].reshape(shape) - gb_t).abs())
            bound += lr * (1 + adam_a(t, betas)) * dmax / (vhat.sqrt() + eps)
        excess = (p.double() - q.double()).abs() - bound - _rounding(p, len(ca)).double()
        worst = max(worst, excess.max().item())
    return worst


def record(label: str, **values) -> None:
    """Append one measured comparison to $LPREG_TOLERANCE_LOG (JSON lines; .ci/integrations.sh prints them)."""
    path = os.environ.get("LPREG_TOLERANCE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": label, **{k: float(v) for k, v in values.items()}}) + "\n")
