"""Float64 oracle for the token statistics (SPEC sections 1, 2, 4), and eager PyTorch in a dtype.

`oracle(...)` computes, in float64 with autograd, what every backend must return: the four
per-token statistics and the gradient of  sum_rows g_logp logp + g_kl kl + g_H H  w.r.t. the
logits. `eager(...)` is the same formula run by plain PyTorch in a given dtype, with the kept
set of the oracle (so that its error is arithmetic only): the yardstick of the tolerance
"a kernel's error is at most about twice what eager PyTorch in the same dtype achieves".
"""

import math

import numpy as np
import torch


def f32_log(threshold):
    """log(threshold) as the kernels see it: the op receives it as an fp32 scalar."""
    return float(np.float32(math.log(threshold)))


def kept_set(y, fixed, log_threshold):
    """K of SPEC section 1 for scaled proxy logits y (N, V) float64, the cutoff in fp32 terms."""
    ymax = y.amax(-1, keepdim=True)
    if not fixed:
        return y >= ymax + log_threshold
    lse = torch.logsumexp(y, -1, keepdim=True)
    kept = y >= lse + log_threshold
    first = torch.zeros_like(kept).scatter_(-1, y.argmax(-1, keepdim=True), True)
    return torch.where(kept.any(-1, keepdim=True), kept, first)


def _stats(x, y, labels, kept, ignore_index):
    """The four statistics of scaled logits x (any float dtype, may require grad)."""
    logp_all = torch.log_softmax(x, -1)
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    logq = torch.where(kept, y, torch.full_like(y, -math.inf)).log_softmax(-1)
    q = logq.exp()
    kl = torch.where(kept, q * (logq - logp_all), torch.zeros_like(q)).sum(-1)
    valid = torch.ones(x.shape[0], dtype=torch.bool) if labels is None else labels != ignore_index
    safe = torch.zeros(x.shape[0], 1, dtype=torch.long) if labels is None else \
        torch.where(valid, labels, torch.zeros_like(labels))[:, None]
    logp = logp_all.gather(-1, safe)[:, 0]
    proxy_logp = logq.gather(-1, safe)[:, 0].detach()
    if labels is None:
        logp = torch.zeros_like(logp)
        proxy_logp = torch.zeros_like(proxy_logp)
    return logp, proxy_logp, kl, entropy, valid


def _run(logits, labels, proxy, temperature, fixed, threshold, grads, ignore_index, dtype, kept=None):
    x_raw = logits.detach().to(dtype).requires_grad_(True)
    x = x_raw / temperature
    y = x.detach() if proxy is None else proxy.detach().to(dtype) / temperature
    y64 = y.double()
    bad = torch.isnan(y64).any(-1) | torch.isneginf(y64).all(-1) | \
        torch.isnan(logits.double()).any(-1) | torch.isneginf(logits.double()).all(-1)
    if kept is None:
        kept = kept_set(y64, fixed, f32_log(threshold))
    logp, proxy_logp, kl, entropy, valid = _stats(x, y, labels, kept, ignore_index)
    g_logp, g_kl, g_h = (g.to(dtype) for g in grads)
    use = valid & ~bad  # NaN / ignored rows take no part in the loss
    zero = torch.zeros_like(kl)
    loss = torch.where(use, g_kl * kl + g_h * entropy + (g_logp * logp if labels is not None else zero), zero).sum()
    (grad,) = torch.autograd.grad(loss, x_raw) if loss.requires_grad else (torch.zeros_like(x_raw),)
    nan = torch.full_like(kl, math.nan)
    outs = []
    for v in (logp, proxy_logp, kl, entropy):
        v = torch.where(bad, nan, v.detach())
        outs.append(torch.where(valid, v, torch.zeros_like(v)).double())
    grad = grad.double()
    grad[bad & valid] = math.nan
    grad[~valid] = 0.0
    return (*outs, grad), kept


def oracle(logits, labels, proxy, temperature, fixed, threshold, grads, ignore_index=-100):
    """Float64 truth: ((logp, proxy_logp, kl, entropy) (N,), grad (N, V)) and the kept set."""
    return _run(logits, labels, proxy, temperature, fixed, threshold, grads, ignore_index, torch.float64)


def eager(logits, labels, proxy, temperature, fixed, threshold, grads, kept, ignore_index=-100):
    """The oracle's formulas run by PyTorch in logits.dtype (the kept set given)."""
    out, _ = _run(logits, labels, proxy, temperature, fixed, threshold, grads, ignore_index, logits.dtype, kept)
    return out


def max_err(got, truth):
    """Largest |got - truth| over entries where truth is finite (0 when there are none; inf when
    got is not finite there)."""
    got, truth = got.detach().double(), truth.detach().double()
    finite = torch.isfinite(truth)
    if not bool(finite.any()):
        return 0.0
    err = (got[finite] - truth[finite]).abs()
    return math.inf if not bool(torch.isfinite(err).all()) else float(err.max())


def assert_special_values_match(got, truth, name):
    """NaN and +-inf exactly where the truth has them."""
    got, truth = got.double(), truth.double()
    assert torch.equal(torch.isnan(got), torch.isnan(truth)), f"{name}: NaN pattern differs"
    for sign in (1, -1):
        assert torch.equal(got == sign * math.inf, truth == sign * math.inf), f"{name}: inf pattern differs"
