"""A float64 oracle of Lp-Reg over a few of verl's policy losses (docs/spec.md, "Lp-Reg over any base
objective"), written from the definitions, for test_verl.py's beta > 0 checks.

Per token, r = exp(logp - old_logp), A the advantage, c = clip_ratio_c, eps the clip:
  vanilla:  base = max(-A r, -A clip(r, 1 - eps, 1 + eps)), and for A < 0 at most -A c (dual clip);
            released surrogate: min(-A r, -A c)
  sapo:     base = -A f(r), f(r) = sigmoid(tau (r - 1)) 4 / tau (tau_pos if A > 0 else tau_neg);
            released surrogate: -A r
  dppo_tv:  base = -A min(r, c) log p [A > 0: p - p_old <= eps; else p - p_old >= -eps];
            released surrogate: -A min(r, c) log p (no trust-region mask)
  gspo:     s = exp(row mean of log r), base = max(-A s, -A clip(s, 1 - eps, 1 + eps)) (paper form only)
Lp-Reg (k3, q from the rollout-time logits, the proxy's filtered labels at about -1e4):
  released: among the call's valid A < 0 tokens, k = int(rho n_neg); if k > 1 the k lowest current
            log p, of those the ones with log p < log q are selected: loss = surrogate + beta k3
  paper:    the k = max(1, floor(rho n)) lowest OLD log p of the n valid tokens (the step-wide set, one
            micro-batch per step here), A < 0, label kept by the proxy: loss = base + beta k3
k3 = clamp(e^d - d - 1, -10, 10), d = log q - log p. Returns (per-token loss, selected), 0 off the mask.
"""

import torch
from torch import Tensor


def base_tokens(base: str, logp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, *, eps: float, c: float,
                tau_pos: float = 1.0, tau_neg: float = 1.05) -> Tensor:
    r = torch.exp(logp - old)
    if base == "vanilla":
        pg = torch.maximum(-adv * r, -adv * r.clamp(1 - eps, 1 + eps))
        return torch.where(adv < 0, torch.minimum(pg, -adv * c), pg)
    if base == "sapo":
        tau = torch.where(adv > 0, torch.full_like(r, tau_pos), torch.full_like(r, tau_neg))
        return -adv * torch.sigmoid(tau * (r - 1)) * 4 / tau
    if base == "dppo_tv":
        dp = logp.exp() - old.exp()
        keep = torch.where(adv > 0, dp <= eps, dp >= -eps)
        return -adv * r.clamp(max=c) * logp * keep
    if base == "gspo":
        m = mask.double()
        s = torch.exp(((logp - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)).expand_as(r)
        return torch.maximum(-adv * s, -adv * s.clamp(1 - eps, 1 + eps))
    raise ValueError(base)


def surrogate_tokens(base: str, logp: Tensor, old: Tensor, adv: Tensor, *, c: float) -> Tensor:
    r = torch.exp(logp - old)
    if base == "vanilla":
        return torch.minimum(-adv * r, -adv * c)
    if base == "sapo":
        return -adv * r
    if base == "dppo_tv":
        return -adv * r.clamp(max=c) * logp
    raise ValueError(f"no released surrogate for {base}")


def lpreg_tokens(base: str, compat: str, logp: Tensor, old: Tensor, tgt: Tensor, adv: Tensor, mask: Tensor, *,
                 rho: float, beta: float, eps: float, c: float):
    logp, old, tgt, adv = (t.double() for t in (logp, old, tgt, adv))
    valid = mask > 0
    loss = base_tokens(base, logp, old, adv, mask, eps=eps, c=c)
    d = tgt - logp
    k3 = (torch.exp(d) - d - 1).clamp(-10, 10)
    flat = torch.zeros(valid.numel(), dtype=torch.bool)
    if compat == "released":
        pool = (valid & (adv < 0)).reshape(-1).nonzero()[:, 0]
        k = int(pool.numel() * rho)
        if k > 1:
            low = pool[torch.topk(logp.reshape(-1)[pool], k, largest=False).indices]
            flat[low] = logp.reshape(-1)[low] < tgt.reshape(-1)[low]
        selected = flat.reshape(valid.shape)
        loss = torch.where(selected, surrogate_tokens(base, logp, old, adv, c=c) + beta * k3, loss)
    else:
        pool = valid.reshape(-1).nonzero()[:, 0]
        k = max(1, int(pool.numel() * rho))
        low = pool[torch.topk(old.reshape(-1)[pool], k, largest=False).indices]
        flat[low] = True
        selected = flat.reshape(valid.shape) & (adv < 0) & (tgt > -1e3)
        loss = loss + beta * torch.where(selected, k3, torch.zeros_like(k3))
    return torch.where(valid, loss, torch.zeros_like(loss)), selected
