"""The Lp-Reg policy loss (SPEC section 3), paper and released-code forms.

Per valid token t with advantage A, ratio r = exp(logp - old_logp):

    loss_t = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + beta S_t D_t

paper:    S_t = [p_y among the k = max(1, floor(rho n)) smallest of the n valid tokens, ties
          by position] & [A < 0] & [y in K];  D_t = D_KL(q || p) over the vocabulary ("full").
released: the k = max(1, int(rho n_neg)) smallest p_y among the call's A < 0 tokens, none
          when k <= 1; S_t also needs logp < proxy_logp; D_t = k3; and a selected token's
          surrogate is the unclipped -A r. (The released code's topk leaves ties unspecified;
          here they are broken by position, as in the paper form.)

Every per-token quantity comes from one fused pass over the logits (`lpreg_token_stats`, or
the sparse-proxy op), so the loss and every metric cost one read of N x V forward and one
read + one write backward. The selection is a stable sort of N log-probs, no host sync.
The helpers below (`prepare`, `row_stats`, `global_selection`, `token_terms`) are shared with
`lpreg.fused_linear`, which runs them chunk by chunk.
"""

import math
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _validate
from .selection import SelectionThreshold, bottom_k_count, bottom_k_mask
from .sparse_proxy import SparseProxy, sparse_proxy_stats
from .token_stats import lpreg_token_stats

COMPATS = ("paper", "released")
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("full", "k3")
METRIC_KEYS = ("actor/pg_loss", "actor/lpreg_kl", "actor/lpreg_frac", "actor/lpreg_threshold",
               "actor/entropy", "actor/ppo_kl", "actor/pg_clipfrac")


class Config(NamedTuple):
    compat: str
    temperature: float
    mode: str
    threshold: float
    rho: float
    beta: float
    clip_low: float
    clip_high: float
    loss_agg_mode: str
    kl_estimator: str
    ignore_index: int
    backend: str


def make_config(compat, temperature, mode, threshold, rho, beta, clip_low, clip_high, loss_agg_mode,
                kl_estimator, ignore_index, backend) -> Config:
    """Check every hyper-parameter; errors name the argument and the value."""
    if compat not in COMPATS:
        raise ValueError(f"compat must be one of {COMPATS}, got {compat!r}")
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if kl_estimator is None:
        kl_estimator = "full" if compat == "paper" else "k3"
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS} or None, got {kl_estimator!r}")
    temperature = _validate.check_temperature(temperature)
    threshold = _validate.check_mode_threshold(mode, threshold)
    _validate.check_backend(backend)
    if not (0 < float(rho) <= 1):
        raise ValueError(f"rho must be in (0, 1], got {rho!r}")
    if not (float(beta) >= 0) or math.isinf(float(beta)):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if not (0 <= float(clip_low) <= 1):
        raise ValueError(f"clip_low must be in [0, 1], got {clip_low!r}")
    if not (float(clip_high) >= 0):
        raise ValueError(f"clip_high must be >= 0, got {clip_high!r}")
    return Config(compat, temperature, mode, threshold, float(rho), float(beta), float(clip_low),
                  float(clip_high), loss_agg_mode, kl_estimator, int(ignore_index), backend)


class Batch(NamedTuple):
    """Flattened (N = B * L) per-token inputs; invalid tokens hold neutral values."""

    labels: Tensor  # (N,) int64, ignore_index where not valid
    adv: Tensor  # (N,) fp32, 0 where not valid
    old_logp: Tensor  # (N,) fp32, 0 where not valid (a -inf pad cannot leak a NaN)
    valid: Tensor  # (N,) bool: mask > 0 and label != ignore_index
    weight: Tensor  # (N,) fp32: loss = sum_t weight_t loss_t (the aggregation mode)
    raw_old_logp: Tensor  # (B, L) as given, for a SelectionThreshold
    shape: Tuple[int, int]


def prepare(lead_shape, device, labels, advantages, old_logp, response_mask, cfg: Config) -> Batch:
    """Check the (B, L) inputs against the leading shape of logits / hidden and flatten them."""
    if len(lead_shape) != 2:
        raise ValueError(f"logits must have shape (B, L, V), got leading shape {tuple(lead_shape)}")
    B, L = lead_shape
    for name, t in (("labels", labels), ("old_logp", old_logp), ("response_mask", response_mask)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (B, L):
            raise ValueError(f"{name} must have shape (B, L) = {(B, L)}, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
    if not isinstance(advantages, Tensor):
        raise ValueError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if tuple(advantages.shape) == (B,):
        advantages = advantages[:, None].expand(B, L)
    elif tuple(advantages.shape) != (B, L):
        raise ValueError(f"advantages must have shape (B, L) = {(B, L)} or (B,) = {(B,)}, "
                         f"got {tuple(advantages.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    valid = (response_mask > 0) & (labels != cfg.ignore_index)
    zero = torch.zeros((), device=device)
    lab = torch.where(valid, labels.long(), torch.full_like(labels, cfg.ignore_index, dtype=torch.long))
    adv = torch.where(valid, advantages.detach().float(), zero)
    old = torch.where(valid, old_logp.detach().float(), zero)
    w = valid.float()
    if cfg.loss_agg_mode == "token-mean":
        w = w / w.sum().clamp(min=1)
    elif cfg.loss_agg_mode == "seq-mean-token-mean":
        w = w / (w.sum(-1, keepdim=True).clamp(min=1) * max(B, 1))
    else:  # seq-mean-token-sum
        w = w / max(B, 1)
    return Batch(lab.reshape(-1), adv.reshape(-1), old.reshape(-1), valid.reshape(-1), w.reshape(-1),
                 old_logp, (B, L))


def row_stats(logits2d: Tensor, labels: Tensor, proxy, cfg: Config):
    """(logp, proxy_logp, kl, entropy), each (n,) fp32, for (n, V) logits and a proxy slice."""
    if isinstance(proxy, SparseProxy):
        return sparse_proxy_stats(logits2d, labels, proxy, temperature=cfg.temperature,
                                  ignore_index=cfg.ignore_index, backend=cfg.backend)
    return lpreg_token_stats(logits2d, labels, temperature=cfg.temperature, mode=cfg.mode,
                             threshold=cfg.threshold, proxy_logits=proxy, ignore_index=cfg.ignore_index,
                             backend=cfg.backend)


def global_selection(batch: Batch, logp: Optional[Tensor], cfg: Config, sel: Optional[SelectionThreshold]):
    """The step- or call-wide part of S_t: (bottom-k mask (N,) bool, k-th log-prob 0-d).

    `logp` is the current log-prob of every token (N,), detached; unused with `sel`.
    """
    if sel is not None:
        mask = sel.mask(batch.raw_old_logp, batch.valid.reshape(batch.shape)).reshape(-1)
        return mask, sel.logp.to(mask.device)
    if cfg.compat == "paper":
        k = bottom_k_count(batch.valid.sum(), cfg.rho)
        return bottom_k_mask(logp, batch.valid, k)
    neg = batch.valid & (batch.adv < 0)
    k = bottom_k_count(neg.sum(), cfg.rho)
    mask, kth = bottom_k_mask(logp, neg, k)
    return mask & (k > 1), kth  # the released code selects nothing when k <= 1


def k3(logp: Tensor, proxy_logp: Tensor) -> Tensor:
    """SPEC 2 'low_var_kl': d = clamp(log q_y - log p_y, -20, 20), clamp(e^d - d - 1, -10, 10)."""
    d = (proxy_logp - logp).clamp(-20.0, 20.0)
    return (d.exp() - d - 1.0).clamp(-10.0, 10.0)


def token_terms(stats, bottom: Tensor, batch: Batch, cfg: Config, sl=slice(None)):
    """Per-token loss (n,) and the metric sums (0-d tensors) for the tokens `sl` of `batch`."""
    logp, proxy_logp, kl, entropy = stats
    adv, old, valid = batch.adv[sl], batch.old_logp[sl], batch.valid[sl]
    ratio = torch.exp(logp - old)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(pg1, pg2)
    if cfg.compat == "paper":
        selected = bottom[sl] & (adv < 0) & (proxy_logp > float("-inf"))
    else:
        selected = bottom[sl] & (logp.detach() < proxy_logp)
    div = k3(logp, proxy_logp) if cfg.kl_estimator == "k3" else kl
    zero = torch.zeros((), device=logp.device)
    div = torch.where(selected, div, zero)
    if cfg.compat == "released":
        pg = torch.where(selected, pg1, pg)  # selected tokens: unclipped surrogate
    loss_t = pg + cfg.beta * div
    vf = valid.float()
    sums = {
        "kl": div.detach().sum(),
        "n_sel": selected.float().sum(),
        "entropy": (entropy.detach() * vf).sum(),
        "ppo_kl": ((old - logp.detach()) * vf).sum(),
        "clip": ((pg2 > pg1).float() * vf).sum(),
    }
    return loss_t, sums


def finish_metrics(loss: Tensor, sums: Dict[str, Tensor], n_valid: Tensor, kth_logp: Tensor) -> Dict[str, Tensor]:
    """0-d fp32 tensors under the verl names; a mean over no token is 0."""
    n = n_valid.float().clamp(min=1)
    return {
        "actor/pg_loss": loss.detach().float(),
        "actor/lpreg_kl": sums["kl"] / sums["n_sel"].clamp(min=1),
        "actor/lpreg_frac": sums["n_sel"] / n,
        # +inf marks "no valid token": report 0 rather than e^inf
        "actor/lpreg_threshold": torch.where(kth_logp == float("inf"), torch.zeros_like(kth_logp),
                                             kth_logp.exp()).float(),
        "actor/entropy": sums["entropy"] / n,
        "actor/ppo_kl": sums["ppo_kl"] / n,
        "actor/pg_clipfrac": sums["clip"] / n,
    }


def to_floats(metrics: Dict[str, Tensor]) -> Dict[str, float]:
    """One host sync for all metrics (a stack and one .tolist())."""
    values = torch.stack([metrics[k].detach().float().reshape(()) for k in METRIC_KEYS]).tolist()
    return dict(zip(METRIC_KEYS, values))


def check_proxy(proxy, lead_shape, V, device):
    if proxy is None or isinstance(proxy, SparseProxy):
        if isinstance(proxy, SparseProxy) and tuple(proxy.indices.shape[:-1]) != tuple(lead_shape):
            raise ValueError(f"proxy (SparseProxy) must have leading shape {tuple(lead_shape)}, "
                             f"got indices of shape {tuple(proxy.indices.shape)}")
        return
    if not isinstance(proxy, Tensor):
        raise ValueError(f"proxy must be None, a SparseProxy or dense logits, got {type(proxy).__name__}")
    if tuple(proxy.shape) != (*lead_shape, V):
        raise ValueError(f"proxy (dense logits) must have shape {(*lead_shape, V)}, got {tuple(proxy.shape)}")


def lpreg_policy_loss(
    logits: Tensor,
    labels: Tensor,
    advantages: Tensor,
    old_logp: Tensor,
    response_mask: Tensor,
    *,
    compat: str = "paper",
    temperature: float = 1.0,
    mode: str = "min_p",
    threshold: float = 0.02,
    rho: float = 0.01,
    beta: float = 1.0,
    clip_low: float = 1.0,
    clip_high: float = 9.0,
    loss_agg_mode: str = "token-mean",
    proxy=None,
    kl_estimator: Optional[str] = None,
    selection_threshold: Optional[SelectionThreshold] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    return_tensors: bool = False,
):
    """Lp-Reg GRPO policy loss; returns (loss 0-d fp32, metrics dict).

    logits: (B, L, V) current policy, any float dtype (accumulated in fp32); labels: (B, L)
    sampled tokens; advantages: (B, L) or (B,); old_logp: (B, L) rollout log-probs of the
    labels; response_mask: (B, L), > 0 where a token counts (a label equal to ignore_index
    never counts). An all-zero mask gives loss 0 and a zero gradient.

    compat: "paper" (default) or "released" (every SPEC difference at once, see the module
        docstring). kl_estimator: None picks "full" (paper) / "k3" (released).
    proxy: None (on-policy: the current logits, detached), dense (B, L, V) logits of the
        rollout policy, or a `SparseProxy` from `lpreg.build_proxy`.
    selection_threshold: paper only. None selects on the current p_y within this call (the
        paper's definition when the call holds the whole step). A `SelectionThreshold` from
        `lpreg.selection_threshold` selects on old_logp with the step-wide percentile, exact
        across micro-batches and ranks; on-policy the two choices agree.
    return_tensors: False gives python floats (one host sync for all of them); True gives
        0-d tensors and no sync, for callers that accumulate over micro-batches.

    Metrics: actor/pg_loss (the returned loss), actor/lpreg_kl (mean D over selected tokens),
    actor/lpreg_frac (selected / valid), actor/lpreg_threshold (p at the rho-percentile),
    actor/entropy, actor/ppo_kl (mean old_logp - logp), actor/pg_clipfrac.
    """
    cfg = make_config(compat, temperature, mode, threshold, rho, beta, clip_low, clip_high, loss_agg_mode,
                      kl_estimator, ignore_index, backend)
    _validate.check_logits(logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, L, V), got {tuple(logits.shape)}")
    if selection_threshold is not None and cfg.compat != "paper":
        raise ValueError(f"selection_threshold is a compat='paper' feature, got compat={cfg.compat!r}")
    if selection_threshold is not None and not isinstance(selection_threshold, SelectionThreshold):
        raise ValueError(f"selection_threshold must be a SelectionThreshold (see lpreg.selection_threshold), "
                         f"got {type(selection_threshold).__name__}")
    B, L, V = logits.shape
    check_proxy(proxy, (B, L), V, logits.device)
    batch = prepare((B, L), logits.device, labels, advantages, old_logp, response_mask, cfg)
    if isinstance(proxy, Tensor):
        proxy = proxy.reshape(B * L, V)
    elif isinstance(proxy, SparseProxy):
        proxy = proxy.flatten()
    stats = row_stats(logits.reshape(B * L, V), batch.labels, proxy, cfg)
    bottom, kth = global_selection(batch, stats[0].detach(), cfg, selection_threshold)
    loss_t, sums = token_terms(stats, bottom, batch, cfg)
    loss = (loss_t * batch.weight).sum()
    metrics = finish_metrics(loss, sums, batch.valid.sum(), kth)
    return loss, (metrics if return_tensors else to_floats(metrics))
