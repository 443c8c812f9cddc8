"""The Lp-Reg policy loss (docs/spec.md §3), released-code and paper forms.

Per valid token t with advantage A, ratio r = exp(logp - old_logp):

    loss_t = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) + beta S_t D_t

released (default, docs/spec.md §3a): the k = max(1, int(rho n_neg)) smallest p_y among the
          call's A < 0 tokens, none when k <= 1; S_t also needs logp < proxy_logp; D_t = k3
          at the sampled token; and a selected token's surrogate is the unclipped -A r. (The
          released code's topk leaves ties unspecified; here they are broken by position.)
paper:    S_t = [p_y among the k = max(1, floor(rho n)) smallest of the n valid tokens, ties
          by position] & [A < 0] & [y in K];  D_t = D_KL(q || p) over the vocabulary ("full").

Why released is the default: on-policy, the full KL's gradient (p - q)/T raises the selected
token by only p_y (1/m - 1) (m: the kept mass) and lowers p_y itself when a leader holds most
of the mass, while k3 raises y's logit by (1/m - 1)(1 - p_y); docs/loss_forms.md derives both.

Every per-token quantity comes from one fused pass over the logits (`lpreg_token_stats`, or
the sparse-proxy op), so the loss and every metric cost one read of N x V forward and one
read + one write backward. The selection is a stable sort of N log-probs, no host sync.
`lpreg_policy_loss` is token statistics -> `policy_loss_from_stats`; callers that already
hold the statistics (a framework's own forward) call the latter. The helpers below
(`prepare`, `compute_token_stats`, `global_selection`, `token_terms`) are shared with
`lpreg.fused_linear`, which runs them chunk by chunk.

On-policy (`old_logp=None`): old_logp is this pass's detached logp, so r = 1 exactly (its
gradient is still d logp), the selection uses the current log-probs, and no extra forward
pass is needed. `num_tokens`: the global valid-token count (all micro-batches and ranks) as
the token-mean denominator, so the per-call losses sum to the global token-mean.
"""

import math
from typing import Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _validate
from .selection import SelectionThreshold, bottom_k_count, bottom_k_mask
from .sparse_proxy import SparseProxy, sparse_proxy_stats
from .token_stats import TokenStats, lpreg_token_stats

COMPATS = ("paper", "released")
LOG_RATIO_CLAMP = 20.0  # |log r| bound before exp (the released code's stability clamp)
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("full", "k3")
METRIC_KEYS = ("actor/pg_loss", "actor/lpreg_kl", "actor/lpreg_frac", "actor/lpreg_threshold",
               "actor/entropy", "actor/ppo_kl", "actor/pg_clipfrac")
SUM_KEYS = ("kl", "n_sel", "entropy", "ppo_kl", "clip")

NumTokens = Union[int, Tensor, None]


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


def make_config(compat: str, temperature: float, mode: str, threshold: float, rho: float, beta: float,
                clip_low: float, clip_high: float, loss_agg_mode: str, kl_estimator: Optional[str],
                ignore_index: int, backend: str) -> Config:
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

    labels: Optional[Tensor]  # (N,) int64, ignore_index where not valid; None from token statistics
    adv: Tensor  # (N,) fp32, 0 where not valid
    old_logp: Tensor  # (N,) fp32, 0 where not valid (a -inf pad cannot leak a NaN); 0 on-policy
    valid: Tensor  # (N,) bool: mask > 0 and label != ignore_index
    weight: Tensor  # (N,) fp32: loss = sum_t weight_t loss_t (the aggregation mode)
    raw_old_logp: Optional[Tensor]  # (B, L) as given, for a SelectionThreshold; None on-policy
    shape: Tuple[int, int]
    on_policy: bool = False  # old_logp=None: old_logp is this pass's detached logp


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


def _aggregation_weight(valid: Tensor, cfg: Config, num_tokens: Optional[Tensor]) -> Tensor:
    """(B, L) fp32 weights w with loss = sum_t w_t loss_t for the aggregation mode."""
    B = valid.shape[0]
    w = valid.float()
    if cfg.loss_agg_mode == "token-mean":
        denom = (w.sum() if num_tokens is None else num_tokens.to(w.device)).clamp(min=1)
        return w / denom
    if cfg.loss_agg_mode == "seq-mean-token-mean":
        return w / (w.sum(-1, keepdim=True).clamp(min=1) * max(B, 1))
    return w / max(B, 1)  # seq-mean-token-sum


def prepare(lead_shape: Sequence[int], device: torch.device, labels: Optional[Tensor], advantages: Tensor,
            old_logp: Optional[Tensor], response_mask: Tensor, cfg: Config, *,
            num_tokens: NumTokens = None) -> Batch:
    """Check the (B, L) inputs against the leading shape of logits / hidden and flatten them.

    labels=None (statistics already computed): valid is response_mask > 0 alone.
    old_logp=None: on-policy (see the module docstring). num_tokens: see `check_num_tokens`.
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
    return Batch(lab, adv.reshape(-1), old.reshape(-1), valid.reshape(-1), w.reshape(-1), old_logp, (B, L),
                 on_policy=old_logp is None)


def compute_token_stats(logits2d: Tensor, labels: Tensor, proxy: Union[None, Tensor, SparseProxy],
                        cfg: Config) -> TokenStats:
    """(logp, proxy_logp, kl, entropy), each (n,) fp32, for (n, V) logits and a proxy slice."""
    if isinstance(proxy, SparseProxy):
        return sparse_proxy_stats(logits2d, labels, proxy, temperature=cfg.temperature,
                                  ignore_index=cfg.ignore_index, backend=cfg.backend)
    return lpreg_token_stats(logits2d, labels, temperature=cfg.temperature, mode=cfg.mode,
                             threshold=cfg.threshold, proxy_logits=proxy, ignore_index=cfg.ignore_index,
                             backend=cfg.backend)


def needs_current_logp(batch: Batch, sel: Optional[SelectionThreshold]) -> bool:
    """Whether `global_selection` reads the current log-probs of every token (a first pass
    in the fused path): always without a SelectionThreshold, and on-policy with one (the
    threshold is then applied to this pass's log-probs, which are the old ones)."""
    return sel is None or batch.on_policy


def global_selection(batch: Batch, logp: Optional[Tensor], cfg: Config,
                     sel: Optional[SelectionThreshold]) -> Tuple[Tensor, Tensor]:
    """The step- or call-wide part of S_t: (bottom-k mask (N,) bool, k-th log-prob 0-d).

    `logp` is the current log-prob of every token (N,), detached; read unless a
    `SelectionThreshold` is given with explicit old_logp (see `needs_current_logp`).
    """
    if needs_current_logp(batch, sel) and logp is None:
        raise ValueError("global_selection needs the current log-probs (logp) without a selection_threshold "
                         "or on-policy (old_logp=None), got logp=None")
    if sel is not None:
        old = logp.detach().reshape(batch.shape) if batch.on_policy else batch.raw_old_logp
        mask = sel.mask(old, batch.valid.reshape(batch.shape)).reshape(-1)
        return mask, sel.logp.to(mask.device)
    if cfg.compat == "paper":
        k = bottom_k_count(batch.valid.sum(), cfg.rho)
        return bottom_k_mask(logp, batch.valid, k)
    neg = batch.valid & (batch.adv < 0)
    k = bottom_k_count(neg.sum(), cfg.rho)
    mask, kth = bottom_k_mask(logp, neg, k)
    return mask & (k > 1), kth  # the released code selects nothing when k <= 1


def k3(logp: Tensor, proxy_logp: Tensor) -> Tensor:
    """docs/spec.md §2 'low_var_kl': d = clamp(log q_y - log p_y, -20, 20), clamp(e^d - d - 1, -10, 10)."""
    d = (proxy_logp - logp).clamp(-20.0, 20.0)
    return (d.exp() - d - 1.0).clamp(-10.0, 10.0)


def token_terms(stats: Sequence[Tensor], bottom: Tensor, batch: Batch, cfg: Config,
                sl: slice = slice(None)) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Per-token loss (n,) and the metric sums (0-d tensors) for the tokens `sl` of `batch`."""
    logp, proxy_logp, kl, entropy = stats
    adv, valid = batch.adv[sl], batch.valid[sl]
    # on-policy: old := this pass's logp, detached, so r = 1 exactly and dr = d logp
    old = torch.where(valid, logp.detach(), 0.0) if batch.on_policy else batch.old_logp[sl]
    # log r clamped to [-20, 20] before exp, as the released code does: an overflowing r would meet
    # the clipped branch's zero gradient as 0 * inf = NaN under a finite loss (docs/spec.md §3)
    ratio = torch.exp((logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
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


def check_selection_threshold(selection_threshold, cfg: Config) -> None:
    """A SelectionThreshold is the paper form's step-wide percentile."""
    if selection_threshold is None:
        return
    if cfg.compat != "paper":
        raise ValueError(f"selection_threshold is a compat='paper' feature, got compat={cfg.compat!r}")
    if not isinstance(selection_threshold, SelectionThreshold):
        raise ValueError(f"selection_threshold must be a SelectionThreshold (see lpreg.selection_threshold), "
                         f"got {type(selection_threshold).__name__}")


def _check_stats(stats) -> Tuple[int, int]:
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


def _loss(stats: TokenStats, batch: Batch, cfg: Config,
          sel: Optional[SelectionThreshold]) -> Tuple[Tensor, Dict[str, Tensor]]:
    """(loss 0-d, metric tensors) from flattened (N,) statistics: the one loss code path."""
    bottom, kth = global_selection(batch, stats.logp.detach(), cfg, sel)
    loss_t, sums = token_terms(stats, bottom, batch, cfg)
    loss = (loss_t * batch.weight).sum()
    return loss, finish_metrics(loss, sums, batch.valid.sum(), kth)


def policy_loss_from_stats(
    stats: Sequence[Tensor],
    advantages: Tensor,
    old_logp: Optional[Tensor],
    response_mask: Tensor,
    *,
    compat: str = "released",
    rho: float = 0.01,
    beta: float = 1.0,
    clip_low: float = 1.0,
    clip_high: float = 9.0,
    loss_agg_mode: str = "token-mean",
    kl_estimator: Optional[str] = None,
    selection_threshold: Optional[SelectionThreshold] = None,
    num_tokens: NumTokens = None,
    return_tensors: bool = False,
) -> Tuple[Tensor, Dict[str, Union[float, Tensor]]]:
    """The Lp-Reg policy loss from per-token statistics the caller already has.

    stats: a `TokenStats` (logp, proxy_logp, kl, entropy), each (B, L) float, e.g. from
        `lpreg_token_stats` or a framework's own forward at its temperature and filter:
        logp = log p_y (differentiable), proxy_logp = log q_y or -inf when y was filtered
        (a target: detached here), kl = D_KL(q || p) (read only when the estimator is
        "full"; pass zeros for k3), entropy = H(p) (a metric only, detached here).
        Entries where response_mask is 0 are never read, whatever they hold (NaN included).
    advantages: (B, L) or (B,); response_mask: (B, L), > 0 where a token counts.
    old_logp: (B, L) rollout log-probs of the labels, or None for on-policy: old_logp is
        stats.logp detached (ratio exactly 1, no extra forward) and selection uses it.
    num_tokens: None, or the global number of valid tokens (int or 0-d tensor, >= 0) over
        every micro-batch and rank, the token-mean denominator (loss_agg_mode "token-mean"
        only), so that the per-call losses add up to the global token-mean. Metrics stay
        means over this call's tokens; actor/pg_loss is the returned loss. A tensor costs
        one host sync (its value is checked); an int none.
    Other keywords as in `lpreg_policy_loss`.

    Returns (loss 0-d fp32, metrics), exactly what `lpreg_policy_loss` returns for logits
    whose statistics are `stats`.
    """
    cfg = make_config(compat, 1.0, "min_p", 0.02, rho, beta, clip_low, clip_high, loss_agg_mode, kl_estimator,
                      -100, "auto")  # temperature / filter / backend: already applied to stats
    B, L = _check_stats(stats)
    check_selection_threshold(selection_threshold, cfg)
    batch = prepare((B, L), stats[0].device, None, advantages, old_logp, response_mask, cfg, num_tokens=num_tokens)
    logp, proxy_logp, kl, entropy = (t.reshape(-1).float() for t in stats)
    # masked entries never reach the loss, its gradient or a metric (a NaN there stays out)
    keep = lambda t: torch.where(batch.valid, t, 0.0)  # noqa: E731
    flat = TokenStats(keep(logp), keep(proxy_logp.detach()), keep(kl), keep(entropy.detach()))
    loss, metrics = _loss(flat, batch, cfg, selection_threshold)
    return loss, (metrics if return_tensors else to_floats(metrics))


def lpreg_policy_loss(
    logits: Tensor,
    labels: Tensor,
    advantages: Tensor,
    old_logp: Optional[Tensor],
    response_mask: Tensor,
    *,
    compat: str = "released",
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
    num_tokens: NumTokens = None,
    ignore_index: int = -100,
    backend: str = "auto",
    return_tensors: bool = False,
) -> Tuple[Tensor, Dict[str, Union[float, Tensor]]]:
    """Lp-Reg GRPO policy loss; returns (loss 0-d fp32, metrics dict).

    logits: (B, L, V) current policy, any float dtype (accumulated in fp32); labels: (B, L)
    sampled tokens; advantages: (B, L) or (B,); old_logp: (B, L) rollout log-probs of the
    labels, or None for on-policy (this pass's log-probs, detached: ratio exactly 1, no
    extra forward); response_mask: (B, L), > 0 where a token counts (a label equal to
    ignore_index never counts). An all-zero mask gives loss 0 and a zero gradient.

    compat: "released" (default: the form that produced the paper's results, docs/spec.md
        §3a) or "paper" (the literal Eq. 6); the module docstring lists every difference.
        kl_estimator: None picks "k3" (released) / "full" (paper).
    proxy: None (on-policy: the current logits, detached), dense (B, L, V) logits of the
        rollout policy, or a `SparseProxy` from `lpreg.build_proxy`.
    selection_threshold: paper only. None selects on the current p_y within this call (the
        paper's definition when the call holds the whole step). A `SelectionThreshold` from
        `lpreg.selection_threshold` selects on old_logp with the step-wide percentile, exact
        across micro-batches and ranks; on-policy the two choices agree.
    num_tokens: the global valid-token count for loss_agg_mode="token-mean" (see
        `policy_loss_from_stats`); None: this call's count.
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
    check_selection_threshold(selection_threshold, cfg)
    B, L, V = logits.shape
    check_proxy(proxy, (B, L), V, logits.device)
    batch = prepare((B, L), logits.device, labels, advantages, old_logp, response_mask, cfg, num_tokens=num_tokens)
    if isinstance(proxy, Tensor):
        proxy = proxy.reshape(B * L, V)
    elif isinstance(proxy, SparseProxy):
        proxy = proxy.flatten()
    stats = compute_token_stats(logits.reshape(B * L, V), batch.labels, proxy, cfg)
    return policy_loss_from_stats(
        TokenStats(*(t.reshape(B, L) for t in stats)), advantages, old_logp, batch.valid.reshape(B, L),
        compat=compat, rho=rho, beta=beta, clip_low=clip_low, clip_high=clip_high, loss_agg_mode=loss_agg_mode,
        kl_estimator=kl_estimator, selection_threshold=selection_threshold, num_tokens=num_tokens,
        return_tensors=return_tensors,
    )
