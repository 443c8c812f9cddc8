"""The Lp-Reg loss's building blocks, shared by the materialised path (`lpreg.policy_loss`) and the
fused linear path (`lpreg.fused_linear`, which runs them chunk by chunk). Private: the public
entry points validate the options once (`LossConfig`) and the inputs once (`prepare`), then call
these with checked values.

Per valid token t with advantage A and ratio r = exp(logp - old_logp) (docs/spec.md §3):

    loss_t = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + beta S_t D_t

released: S_t = the k = max(1, int(rho n_neg)) smallest p_y among the call's A < 0 tokens (none when
          k <= 1), and logp < proxy_logp; D_t = k3 at the sampled token; a selected token's
          surrogate is the unclipped -A r.
paper:    S_t = [p_y among the k = max(1, floor(rho n)) smallest of the n valid tokens] & [A < 0]
          & [y in K]; D_t = D_KL(q || p) over the vocabulary. Ties by position in both forms.
beta = 0: S_t = 0 (Lp-Reg off: exactly the clipped surrogate). clip_ratio_c: dual clip, for A < 0
          the surrogate becomes min(surrogate, -A clip_ratio_c), as verl's vanilla loss does.
weights:  per-token importance-sampling weights w >= 0 (docs/spec.md §3, "Per-token weights"): the
          surrogate (dual clip included) is multiplied by w, the Lp-Reg term is not; a w = 0 token
          is out of the selection pool; the aggregation and the metrics are unchanged.
"""

import math
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .loss_config import LossConfig
from .selection import SelectionThreshold, bottom_k_count, bottom_k_mask
from .sparse_proxy import SparseProxy, sparse_proxy_stats
from .token_stats import TokenStats, lpreg_token_stats

LOG_RATIO_CLAMP = 20.0  # |log r| bound before exp: ours (docs/spec.md §3), not the released code's
METRIC_KEYS = ("actor/pg_loss", "actor/lpreg_kl", "actor/lpreg_frac", "actor/lpreg_threshold",
               "actor/entropy", "actor/ppo_kl", "actor/pg_clipfrac", "actor/pg_clipfrac_lower",
               # the mechanism (`mechanism_metrics`): what Lp-Reg acts on in this call
               "actor/lpreg_candidates", "actor/lpreg_filtered_frac", "actor/lpreg_selected",
               "actor/lpreg_kept_mass", "actor/lpreg_push", "actor/lpreg_p_y")

NumTokens = Union[int, Tensor, None]


class Batch(NamedTuple):
    """Flattened (N = B * L) per-token inputs; invalid tokens hold neutral values."""

    labels: Optional[Tensor]  # (N,) int64, ignore_index where not valid; None from token statistics
    adv: Tensor  # (N,) fp32, 0 where not valid
    old_logp: Tensor  # (N,) fp32, 0 where not valid (a -inf pad cannot leak a NaN); 0 on-policy
    valid: Tensor  # (N,) bool: mask > 0 and label != ignore_index
    weight: Tensor  # (N,) fp32: loss = sum_t weight_t loss_t (the aggregation mode)
    raw_old_logp: Optional[Tensor]  # (B, L) as given, for a SelectionThreshold; None on-policy
    shape: Tuple[int, int]
    on_policy: bool = False  # old_logp=None: old_logp is this pass's detached logp
    is_weight: Optional[Tensor] = None  # (N,) fp32 importance-sampling weights w (0 where not valid), or None
    pool: Optional[Tensor] = None  # (N,) bool: the selection pool, valid & (w > 0) (valid without weights)


def check_num_tokens(num_tokens: NumTokens, loss_agg_mode: str) -> Optional[Tensor]:
    """None, or the global token count as a 0-d fp32 tensor (>= 0, finite).

    0 is legal: a step with no valid token anywhere has loss 0 (the denominator is clamped to 1,
    as for the call's own count). A tensor's value is checked with one host sync; pass an int
    to avoid it.
    """
    if num_tokens is None:
        return None
    if loss_agg_mode != "token-mean":
        raise ValueError(f"num_tokens is the token-mean denominator: it needs loss_agg_mode='token-mean', "
                         f"got loss_agg_mode={loss_agg_mode!r} (num_tokens={num_tokens!r})")
    if isinstance(num_tokens, Tensor):
        if num_tokens.numel() != 1 or num_tokens.dim() > 1 or num_tokens.dtype == torch.bool \
                or num_tokens.is_complex():
            raise ValueError(f"num_tokens must be an int or a 0-d real tensor, got a tensor of shape "
                             f"{tuple(num_tokens.shape)} and dtype {num_tokens.dtype}")
        value = float(num_tokens)
        out = num_tokens.detach().reshape(()).float()
    elif isinstance(num_tokens, int) and not isinstance(num_tokens, bool):
        value = float(num_tokens)
        out = torch.tensor(value)
    else:
        raise ValueError(f"num_tokens must be None, an int or a 0-d tensor, got {type(num_tokens).__name__}")
    if not (value >= 0) or math.isinf(value):
        raise ValueError(f"num_tokens must be a finite count >= 0, got {value!r}")
    return out


def _check_bl(name: str, t, B: int, L: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != (B, L):
        raise ValueError(f"{name} must have shape (B, L) = {(B, L)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _aggregation_weight(valid: Tensor, cfg: LossConfig, num_tokens: Optional[Tensor]) -> Tensor:
    """(B, L) fp32 weights w with loss = sum_t w_t loss_t for the aggregation mode."""
    B = valid.shape[0]
    w = valid.float()
    if cfg.loss_agg_mode == "token-mean":
        denom = (w.sum() if num_tokens is None else num_tokens.to(w.device)).clamp(min=1)
        return w / denom
    if cfg.loss_agg_mode == "seq-mean-token-mean":
        return w / (w.sum(-1, keepdim=True).clamp(min=1) * max(B, 1))
    return w / max(B, 1)  # seq-mean-token-sum


def check_weights(weights: Optional[Tensor], B: int, L: int, device: torch.device, valid: Tensor) -> Optional[Tensor]:
    """None, or the per-token weights as (B, L) fp32, 0 off the valid tokens. (B, L) or (B,) (one weight per
    sequence); finite and >= 0 on the valid tokens (one host sync checks it); NaN is passed on (the loss
    is then NaN: NaN in never becomes a finite number out)."""
    if weights is None:
        return None
    if not isinstance(weights, Tensor) or not weights.dtype.is_floating_point:
        got = getattr(weights, "dtype", type(weights).__name__)
        raise ValueError(f"weights must be None or a float torch.Tensor of shape (B, L) or (B,), got {got}")
    if tuple(weights.shape) == (B,):
        weights = weights[:, None].expand(B, L)
    elif tuple(weights.shape) != (B, L):
        raise ValueError(f"weights must have shape (B, L) = {(B, L)} or (B,) = {(B,)}, got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights must be on {device}, got {weights.device}")
    w = torch.where(valid, weights.detach().float(), torch.zeros((), device=device))
    bad = valid & ((w < 0) | torch.isinf(w))
    if bool(bad.any()):
        at = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"weights must be finite and >= 0 on the valid tokens, got {w[at].item()!r} at {at}")
    return w


def prepare(lead_shape: Sequence[int], device: torch.device, labels: Optional[Tensor], advantages: Tensor,
            old_logp: Optional[Tensor], response_mask: Tensor, cfg: LossConfig, *,
            num_tokens: NumTokens = None, weights: Optional[Tensor] = None) -> Batch:
    """Check the (B, L) inputs against the leading shape of logits / hidden and flatten them.

    labels=None (statistics already computed): valid is response_mask > 0 alone.
    old_logp=None: on-policy (see lpreg.policy_loss). num_tokens: see `check_num_tokens`.
    weights: None or the per-token importance-sampling weights (`check_weights`).
    """
    if len(lead_shape) != 2:
        raise ValueError(f"logits must have shape (B, L, V), got leading shape {tuple(lead_shape)}")
    B, L = lead_shape
    named = (("labels", labels), ("old_logp", old_logp), ("response_mask", response_mask))
    for name, t in named:
        if t is not None or name == "response_mask":
            _check_bl(name, t, B, L, device)
    if not isinstance(advantages, Tensor):
        raise ValueError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if tuple(advantages.shape) == (B,):
        advantages = advantages[:, None].expand(B, L)
    elif tuple(advantages.shape) != (B, L):
        raise ValueError(f"advantages must have shape (B, L) = {(B, L)} or (B,) = {(B,)}, "
                         f"got {tuple(advantages.shape)}")
    total = check_num_tokens(num_tokens, cfg.loss_agg_mode)
    valid = response_mask > 0
    lab = None
    if labels is not None:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        valid = valid & (labels != cfg.ignore_index)
        lab = torch.where(valid, labels.long(), torch.full_like(labels, cfg.ignore_index, dtype=torch.long))
        lab = lab.reshape(-1)
    zero = torch.zeros((), device=device)
    adv = torch.where(valid, advantages.detach().float(), zero)
    old = zero.expand(B, L) if old_logp is None else torch.where(valid, old_logp.detach().float(), zero)
    w = _aggregation_weight(valid, cfg, total)
    is_w = check_weights(weights, B, L, device, valid)
    pool = valid if is_w is None else valid & (is_w > 0)  # a w = 0 (or NaN) token is not trained on
    return Batch(lab, adv.reshape(-1), old.reshape(-1), valid.reshape(-1), w.reshape(-1), old_logp, (B, L),
                 on_policy=old_logp is None, is_weight=None if is_w is None else is_w.reshape(-1),
                 pool=pool.reshape(-1))


def flat_proxy(proxy: Union[None, Tensor, SparseProxy], N: int, V: int) -> Union[None, Tensor, SparseProxy]:
    """A checked proxy as (N, V) detached dense logits or a flattened SparseProxy; None stays None."""
    if isinstance(proxy, Tensor):
        return proxy.detach().reshape(N, V)
    if isinstance(proxy, SparseProxy):
        return proxy.flatten()
    return None


def compute_token_stats(logits2d: Tensor, labels: Tensor, proxy: Union[None, Tensor, SparseProxy],
                        cfg: LossConfig, process_group=None) -> TokenStats:
    """(logp, proxy_logp, kl, entropy), each (n,) fp32, for (n, V) logits and a proxy slice; with a
    process_group, (n, V_r) vocabulary shards combined across it (the same statistics on every rank)."""
    # the LM head's logit transform (docs/spec.md) is applied by the op, to the raw logits, before T
    if isinstance(proxy, SparseProxy):
        return sparse_proxy_stats(logits2d, labels, proxy, temperature=cfg.temperature,
                                  ignore_index=cfg.ignore_index, backend=cfg.backend, process_group=process_group,
                                  logit_scale=cfg.logit_scale, logit_softcap=cfg.logit_softcap)
    return lpreg_token_stats(logits2d, labels, temperature=cfg.temperature, mode=cfg.mode,
                             threshold=cfg.threshold, proxy_logits=proxy, ignore_index=cfg.ignore_index,
                             backend=cfg.backend, process_group=process_group,
                             logit_scale=cfg.logit_scale, logit_softcap=cfg.logit_softcap)


def flat_stats(stats: Sequence[Tensor], batch: Batch) -> TokenStats:
    """Caller-given (B, L) statistics flattened to (N,) fp32, 0 off the valid tokens (a NaN there never
    reaches the loss, its gradient or a metric); proxy_logp (a target) and entropy (a metric) detached."""
    logp, proxy_logp, kl, entropy = (t.reshape(-1).float() for t in stats)
    keep = lambda t: torch.where(batch.valid, t, 0.0)  # noqa: E731
    return TokenStats(keep(logp), keep(proxy_logp.detach()), keep(kl), keep(entropy.detach()))


def needs_current_logp(batch: Batch, sel: Optional[SelectionThreshold]) -> bool:
    """Whether `global_selection` reads the current log-probs of every token (a first pass
    in the fused path): always without a SelectionThreshold, and on-policy with one (the
    threshold is then applied to this pass's log-probs, which are the old ones)."""
    return sel is None or batch.on_policy


def global_selection(batch: Batch, logp: Optional[Tensor], cfg: LossConfig,
                     sel: Optional[SelectionThreshold]) -> Tuple[Tensor, Tensor]:
    """The step- or call-wide part of S_t: (bottom-k mask (N,) bool, k-th log-prob 0-d).

    `logp` is the current log-prob of every token (N,), detached; read unless a
    `SelectionThreshold` is given with explicit old_logp (see `needs_current_logp`).
    """
    if needs_current_logp(batch, sel) and logp is None:
        raise ValueError("global_selection needs the current log-probs (logp) without a selection_threshold "
                         "or on-policy (old_logp=None), got logp=None")
    pool = batch.valid if batch.pool is None else batch.pool  # the tokens trained on (w > 0)
    if sel is not None:
        old = logp.detach().reshape(batch.shape) if batch.on_policy and logp is not None else batch.raw_old_logp
        assert old is not None  # on-policy: logp was checked above; off-policy: raw_old_logp is set
        mask = sel.mask(old, pool.reshape(batch.shape)).reshape(-1)
        return mask, sel.logp.to(mask.device)
    assert logp is not None  # checked above: no selection_threshold needs the current log-probs
    if cfg.compat == "paper":
        k = bottom_k_count(pool.sum(), cfg.rho)
        return bottom_k_mask(logp, pool, k)
    neg = pool & (batch.adv < 0)
    k = bottom_k_count(neg.sum(), cfg.rho)
    mask, kth = bottom_k_mask(logp, neg, k)
    return mask & (k > 1), kth  # the released code selects nothing when k <= 1


def k3(logp: Tensor, proxy_logp: Tensor) -> Tensor:
    """docs/spec.md §2: d = clamp(log q_y - log p_y, -20, 20), clamp(e^d - d - 1, -10, 10)."""
    d = (proxy_logp - logp).clamp(-20.0, 20.0)
    return (d.exp() - d - 1.0).clamp(-10.0, 10.0)


class LossTerms(NamedTuple):
    """The loss core's per-token result (docs/spec.md, "Lp-Reg over any base objective").

    Each field has the shape of the tokens: (B, L) from `lpreg.lpreg_regularize`, (n,) inside the losses.

    Attributes:
        loss: fp32, the per-token loss: the base (swapped for the released surrogate where the released
            form selects) + beta S D. Aggregate it as the base objective aggregates its own.
        base_loss: fp32, the base objective's per-token loss before any swap.
        candidate: bool, in the lowest-rho set (released: of the A < 0 pool; paper: of the pool).
        selected: bool, S_t: the tokens Lp-Reg acts on.
        divergence: fp32, D_t (k3 or the full KL), 0 where not selected.
        filtered: bool, a valid token whose sampled token the proxy filters out (proxy_logp = -inf).
        kept_mass: fp32, m = exp(logp - proxy_logp), detached: the proxy's kept mass when the proxy is
            the current policy; NaN where filtered or not valid.
        p_y: fp32, exp(logp), detached.
    """

    loss: Tensor  # fp32: base (swapped where the released form selects) + beta S D; what the caller aggregates
    base_loss: Tensor  # fp32: the base objective's per-token loss before any swap
    candidate: Tensor  # bool: in the lowest-rho set (released: of the A < 0 pool; paper: of the pool)
    selected: Tensor  # bool: S_t
    divergence: Tensor  # fp32: D_t (k3 or the full KL), 0 where not selected
    filtered: Tensor  # bool: a valid token whose label the proxy filters out (proxy_logp = -inf)
    kept_mass: Tensor  # fp32: m = exp(logp - proxy_logp), detached; NaN where filtered or not valid
    p_y: Tensor  # fp32: exp(logp), detached


MECHANISM_KEYS = ("candidates", "filtered", "selected", "kept_mass", "push", "p_y")


def regularize_terms(base: Tensor, surrogate: Tensor, logp: Tensor, proxy_logp: Tensor, kl: Tensor, adv: Tensor,
                     valid: Tensor, bottom: Tensor, cfg: LossConfig) -> LossTerms:
    """Lp-Reg over a base objective, token by token (the one code path of every loss).

    base: the base objective's per-token loss; surrogate: the released form's loss at a selected
    token (the raw-ratio -A r with the base's upper caps); logp, proxy_logp, kl: the statistics
    (proxy_logp detached); adv: advantages; valid: the tokens that count; bottom: the lowest-rho
    set (`global_selection`). All (n,), 0 where not valid.

    released: S_t = bottom & [logp < proxy_logp] (bottom holds A < 0 tokens only), D_t = k3, and a
              selected token trains on `surrogate` instead of `base`.
    paper:    S_t = bottom & [A < 0] & [y in K], D_t = the full KL by default; the base is kept.
    beta = 0: Lp-Reg off: no candidate, nothing selected, loss = base exactly.
    """
    lp = logp.detach()
    if cfg.beta == 0:
        candidate = torch.zeros_like(valid)
        selected = candidate
    elif cfg.compat == "paper":
        candidate = bottom
        selected = bottom & (adv < 0) & (proxy_logp > float("-inf"))
    else:
        candidate = bottom
        selected = bottom & (lp < proxy_logp)
    div = k3(logp, proxy_logp) if cfg.kl_estimator == "k3" else kl
    div = torch.where(selected, div, torch.zeros((), device=logp.device))
    pg = torch.where(selected, surrogate, base) if cfg.compat == "released" else base
    filtered = valid & (proxy_logp == float("-inf"))
    # m: the proxy's kept mass when the proxy is the current policy (q_y = p_y / m on the kept set)
    kept_mass = torch.where(filtered | ~valid, float("nan"), torch.exp(lp - proxy_logp))
    return LossTerms(pg + cfg.beta * div, base, candidate, selected, div, filtered, kept_mass, torch.exp(lp))


def mechanism_sums(terms: LossTerms, valid: Tensor) -> Dict[str, Tensor]:
    """Sums and counts of the mechanism over the `valid` tokens, 0-d fp32, additive across micro-batches
    and ranks: candidates, filtered (among the candidates), selected, and over the selected tokens the
    kept mass m, the push 1/m - 1 and p_y. Pool them (add, all_reduce SUM), then `mechanism_metrics`."""
    cand = terms.candidate & valid
    sel = terms.selected & valid
    zero = torch.zeros((), dtype=torch.float32, device=terms.loss.device)
    m = torch.where(sel, terms.kept_mass.detach().float(), zero)  # a selected token is kept: m is finite
    return {
        "candidates": cand.float().sum(),
        "filtered": (cand & terms.filtered).float().sum(),
        "selected": sel.float().sum(),
        "kept_mass": m.sum(),
        "push": torch.where(sel, 1.0 / m - 1.0, zero).sum(),
        "p_y": torch.where(sel, terms.p_y.detach().float(), zero).sum(),
    }


def mechanism_metrics(sums: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The pooled mechanism metrics from (pooled) `mechanism_sums`: counts of candidates and selected
    tokens, the filtered share of the candidates, and the means of m, 1/m - 1 and p_y over the selected
    tokens (0 when none)."""
    n_sel = sums["selected"].clamp(min=1)
    return {
        "lpreg_candidates": sums["candidates"],
        "lpreg_filtered_frac": sums["filtered"] / sums["candidates"].clamp(min=1),
        "lpreg_selected": sums["selected"],
        "lpreg_kept_mass": sums["kept_mass"] / n_sel,
        "lpreg_push": sums["push"] / n_sel,
        "lpreg_p_y": sums["p_y"] / n_sel,
    }


def token_terms(stats: Sequence[Tensor], bottom: Tensor, batch: Batch, cfg: LossConfig,
                sl: Union[slice, Tensor] = slice(None)) -> Tuple[LossTerms, Dict[str, Tensor]]:
    """lpreg's own loss, Lp-Reg over the PPO-clip base, for the tokens `sl` of `batch`: the per-token
    terms (n,) and the metric sums (0-d tensors)."""
    logp, proxy_logp, kl, entropy = stats
    adv, valid = batch.adv[sl], batch.valid[sl]
    # on-policy: old := this pass's logp, detached, so r = 1 exactly and dr = d logp
    old = torch.where(valid, logp.detach(), 0.0) if batch.on_policy else batch.old_logp[sl]
    # log r clamped to [-20, 20] before exp: an overflowing r would meet the clipped branch's zero
    # gradient as 0 * inf = NaN under a finite loss (docs/spec.md §3)
    ratio = torch.exp((logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg1 = -adv * ratio  # the raw-ratio surrogate: the released form's loss at a selected token
    pg2 = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    base, surrogate = torch.maximum(pg1, pg2), pg1
    if cfg.clip_ratio_c is not None:  # dual clip, an upper cap that both keep: an A < 0 token's loss <= -A c
        pg3 = -adv * cfg.clip_ratio_c
        base = torch.where(adv < 0, torch.minimum(base, pg3), base)
        surrogate = torch.where(adv < 0, torch.minimum(surrogate, pg3), surrogate)
    if batch.is_weight is not None:  # importance-sampling weights: the surrogate only (docs/spec.md §3)
        base, surrogate = base * batch.is_weight[sl], surrogate * batch.is_weight[sl]
    out = regularize_terms(base, surrogate, logp, proxy_logp, kl, adv, valid, bottom[sl], cfg)
    vf = valid.float()
    dual = torch.zeros_like(valid)
    if cfg.clip_ratio_c is not None:  # the dual clip's share, on the surrogate each token trains on
        pre = torch.where(out.selected, pg1, torch.maximum(pg1, pg2)) if cfg.compat == "released" \
            else torch.maximum(pg1, pg2)
        dual = (adv < 0) & (pre > -adv * cfg.clip_ratio_c)
    sums = {
        "kl": out.divergence.detach().sum(),
        "entropy": (entropy.detach() * vf).sum(),
        "ppo_kl": ((old - logp.detach()) * vf).sum(),
        "clip": ((pg2 > pg1).float() * vf).sum(),
        "clip_lower": (dual.float() * vf).sum(),
        **mechanism_sums(out, valid),
    }
    return out, sums


def finish_metrics(loss: Tensor, sums: Dict[str, Tensor], n_valid: Tensor, kth_logp: Tensor) -> Dict[str, Tensor]:
    """0-d fp32 tensors under the verl names; a mean over no token is 0."""
    n = n_valid.float().clamp(min=1)
    return {
        "actor/pg_loss": loss.detach().float(),
        "actor/lpreg_kl": sums["kl"] / sums["selected"].clamp(min=1),
        "actor/lpreg_frac": sums["selected"] / n,
        # +inf marks "no valid token": report 0 rather than e^inf
        "actor/lpreg_threshold": torch.where(kth_logp == float("inf"), torch.zeros_like(kth_logp),
                                             kth_logp.exp()).float(),
        "actor/entropy": sums["entropy"] / n,
        "actor/ppo_kl": sums["ppo_kl"] / n,
        "actor/pg_clipfrac": sums["clip"] / n,
        "actor/pg_clipfrac_lower": sums["clip_lower"] / n,
        **{f"actor/{key}": value for key, value in mechanism_metrics(sums).items()},
    }


def to_floats(metrics: Dict[str, Tensor]) -> Dict[str, float]:
    """One host sync for all metrics (a stack and one .tolist())."""
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in METRIC_KEYS]).tolist()
    return dict(zip(METRIC_KEYS, values))


def check_proxy(proxy: Union[None, Tensor, SparseProxy], lead_shape: Sequence[int], V: int,
                device: torch.device) -> None:
    """A proxy is None, a SparseProxy of leading shape (B, L) or dense (B, L, V) logits."""
    if proxy is None or isinstance(proxy, SparseProxy):
        if isinstance(proxy, SparseProxy) and tuple(proxy.indices.shape[:-1]) != tuple(lead_shape):
            raise ValueError(f"proxy (SparseProxy) must have leading shape {tuple(lead_shape)}, "
                             f"got indices of shape {tuple(proxy.indices.shape)}")
        return
    if not isinstance(proxy, Tensor):
        raise ValueError(f"proxy must be None, a SparseProxy or dense logits, got {type(proxy).__name__}")
    if tuple(proxy.shape) != (*lead_shape, V):
        raise ValueError(f"proxy (dense logits) must have shape {(*lead_shape, V)}, got {tuple(proxy.shape)}")


def check_selection_threshold(selection_threshold, cfg: LossConfig) -> None:
    """A SelectionThreshold is the paper form's step-wide percentile."""
    if selection_threshold is None:
        return
    if cfg.compat != "paper":
        raise ValueError(f"selection_threshold is a compat='paper' feature, got compat={cfg.compat!r}")
    if not isinstance(selection_threshold, SelectionThreshold):
        raise ValueError(f"selection_threshold must be a SelectionThreshold (see lpreg.selection_threshold), "
                         f"got {type(selection_threshold).__name__}")


def check_stats(stats) -> Tuple[int, int]:
    """A TokenStats (or 4-tuple) of (B, L) float tensors on one device -> (B, L)."""
    if not (isinstance(stats, tuple) and len(stats) == 4 and all(isinstance(t, Tensor) for t in stats)):
        raise ValueError(f"stats must be a TokenStats (logp, proxy_logp, kl, entropy) of (B, L) tensors, "
                         f"got {type(stats).__name__}")
    shape = tuple(stats[0].shape)
    for name, t in zip(TokenStats._fields, stats):
        if tuple(t.shape) != shape or len(shape) != 2:
            raise ValueError(f"stats.{name} must have shape (B, L) like stats.logp {shape}, got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"stats.{name} must be a float tensor, got dtype {t.dtype}")
        if t.device != stats[0].device:
            raise ValueError(f"stats.{name} must be on {stats[0].device}, got {t.device}")
    return shape


def loss_from_flat(stats: TokenStats, batch: Batch, cfg: LossConfig,
                   sel: Optional[SelectionThreshold]) -> Tuple[Tensor, Dict[str, Tensor]]:
    """(loss 0-d, metric tensors) from flattened (N,) statistics that are 0 off the valid tokens: the
    one loss code path of the materialised entry points."""
    bottom, kth = global_selection(batch, stats.logp.detach(), cfg, sel)
    out, sums = token_terms(stats, bottom, batch, cfg)
    loss = (out.loss * batch.weight).sum()
    return loss, finish_metrics(loss, sums, batch.valid.sum(), kth)
