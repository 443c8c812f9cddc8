"""A float64 transcription of the authors' released Lp-Reg loss, for the adapters' tests.

Transcribed from the behaviour of `compute_policy_loss_lp_reg` (verl/trainer/ppo/core_algos.py)
and of the actor that feeds it with `minp_old_log_prob=True` (verl/workers/actor/dp_actor.py) in
CarlanLark/Lp-Reg-dev, written here from scratch in float64:

proxy (rollout-time logits z0, min-p kappa): tokens with softmax(z0)_i < kappa * max_j softmax(z0)_j
    get the logit -1e4, the result is divided by T and log-softmaxed: tgt = log q(y)
    (a filtered label gets about -1e4: never selected, as lpreg's -inf);
per token: r = exp(logp - old_logp) (no clamp), pg = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high));
selection (one call = one micro-batch): among the valid A < 0 tokens, k = max(1, int(n_neg * rho)); if
    k > 1, the k smallest current log-probs; of those, the tokens with logp < tgt are selected;
selected tokens: -A r + beta * k3, k3 = clamp(e^d - d - 1, -10, 10) with d = tgt - logp (no clamp of d);
the positive-advantage branch of the released code is off (logp_pos_k_percent = 0 in every recipe).

Returns the (B, L) per-token loss matrix and the selected mask; the caller aggregates it as its
framework does (TRL's loss_type, verl's loss_agg_mode). Ties in the k smallest log-probs are left
unspecified by the released topk; in float64 on sampled tokens they do not occur.
"""

import torch
from torch import Tensor


def minp_target_logp(rollout_logits: Tensor, labels: Tensor, kappa: float, temperature: float = 1.0) -> Tensor:
    """log q(y) as the released actor computes it with minp_old_log_prob=True: (B, L, V) -> (B, L)."""
    z = rollout_logits.double()
    p = torch.softmax(z, -1)
    z = torch.where(p >= kappa * p.amax(-1, keepdim=True), z, torch.full_like(z, -1e4))
    return torch.log_softmax(z / temperature, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]


def released_token_losses(logp: Tensor, old_logp: Tensor, tgt: Tensor, adv: Tensor, mask: Tensor, *, clip_low: float,
                          clip_high: float, rho: float, beta: float):
    """(per-token loss (B, L) float64, selected (B, L) bool) of one micro-batch."""
    logp, old_logp, tgt, adv = (t.double() for t in (logp, old_logp, tgt, adv))
    valid = mask > 0
    ratio = torch.exp(logp - old_logp)
    pg1 = -adv * ratio
    loss = torch.maximum(pg1, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    selected = torch.zeros_like(valid)
    neg = (valid & (adv < 0)).reshape(-1).nonzero()[:, 0]
    k = max(1, int(neg.numel() * rho))
    if neg.numel() > 0 and k > 1:
        lowest = neg[torch.topk(logp.reshape(-1)[neg], k, largest=False).indices]
        flat = selected.reshape(-1)
        flat[lowest] = logp.reshape(-1)[lowest] < tgt.reshape(-1)[lowest]
        selected = flat.reshape(valid.shape)
    d = tgt - logp
    k3 = (torch.exp(d) - d - 1).clamp(-10, 10)
    loss = torch.where(selected, pg1 + beta * k3, loss)
    return torch.where(valid, loss, torch.zeros_like(loss)), selected


def label_logp(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(y) in float64: (B, L, V), (B, L) -> (B, L)."""
    return torch.log_softmax(logits.double() / temperature, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]


def regularized_token_losses(base: Tensor, surrogate: Tensor, logp: Tensor, tgt: Tensor, adv: Tensor, mask: Tensor, *,
                             compat: str, rho: float, beta: float, old_logp: Tensor = None):
    """Lp-Reg over any base objective (docs/spec.md), k3 against log q(y) = tgt, in float64, one call:
    (per-token loss (B, L), selected (B, L)).

    released: the selection above (k smallest current log-probs among the A < 0 tokens, none when k <= 1,
              then logp < tgt); a selected token trains on `surrogate` instead of `base`, plus beta k3.
    Ties (equal log-probs: completions of one prompt share their first tokens) by position, as lpreg breaks them.
    paper:    k = max(1, floor(rho n)) smallest `old_logp` (the step-wide selection reads the old
              log-probs; the current ones when None) of the n valid tokens, then A < 0 and y kept by the
              proxy (tgt > -1e3: the released filter's -1e4 logit); base + beta k3.
    """
    logp, tgt, adv, base, surrogate = (t.double() for t in (logp, tgt, adv, base, surrogate))
    valid = mask > 0
    flat_valid = valid.reshape(-1)
    selected = torch.zeros_like(flat_valid)
    if compat == "released":
        pool = (flat_valid & (adv.reshape(-1) < 0)).nonzero()[:, 0]
        k = max(1, int(pool.numel() * rho))
        if pool.numel() > 0 and k > 1:
            lowest = pool[torch.sort(logp.reshape(-1)[pool], stable=True).indices[:k]]
            selected[lowest] = logp.reshape(-1)[lowest] < tgt.reshape(-1)[lowest]
    else:
        ref = (logp if old_logp is None else old_logp.double()).reshape(-1)
        pool = flat_valid.nonzero()[:, 0]
        k = max(1, int(pool.numel() * rho))
        lowest = pool[torch.sort(ref[pool], stable=True).indices[:k]]
        selected[lowest] = (adv.reshape(-1)[lowest] < 0) & (tgt.reshape(-1)[lowest] > -1e3)
    selected = selected.reshape(valid.shape)
    d = tgt - logp
    k3 = (torch.exp(d) - d - 1).clamp(-10, 10)
    pg = torch.where(selected, surrogate, base) if compat == "released" else base
    loss = pg + beta * torch.where(selected, k3, torch.zeros_like(k3))
    return torch.where(valid, loss, torch.zeros_like(loss)), selected
