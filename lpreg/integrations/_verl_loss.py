"""verl's `ppo_loss` (verl/workers/utils/losses.py) with Lp-Reg on top of any registered policy loss.

Per micro-batch, the base loss is verl's own: the function verl registered under
`policy_loss.lpreg_base_loss_mode` (vanilla, gspo, cispo, sapo, ...), called exactly as verl's
`ppo_loss` calls it, aggregated by verl (`agg_loss` with the global-batch normalisation). Lp-Reg
adds a per-token correction aggregated the way that base aggregates (docs/spec.md, "Lp-Reg over
any base objective"):

    paper:    loss = base + agg(beta S D)
    released: loss = base + agg(S (surrogate - base_t) + beta S D)

so the released form trains a selected token on the raw-ratio surrogate -A r with the base's
upper caps (`released_surrogate`) instead of the base's per-token loss base_t. base_t is the
per-token loss verl's function hands to `agg_loss` (captured by `captured_aggregation`, so no
base loss is re-implemented); the correction is aggregated by that same `agg_loss` call's
mode, mask and global-batch info. geo_mean aggregates by itself (a mean over rows of per-row
token means), and so does the correction. Then, as verl's ppo_loss:
    - entropy_coeff x agg_loss(H) + kl_loss_coef x agg_loss(kl(logp, ref)).

Metrics: verl's base metrics, actor/pg_loss, and the mechanism's sums per micro-batch under
"actor/lpreg_sum/*", which `pool_mechanism_metrics` (called by the engine after the mini-batch)
turns into exact pooled ratios over every micro-batch and data-parallel rank.
"""

import contextlib
import copy
import inspect
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.core_algos import agg_loss, kl_penalty
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from ..regularize import LossTerms, lpreg_regularize, mechanism_metrics, mechanism_sums
from ..selection import SelectionThreshold
from ..token_stats import TokenStats
from . import _proxy
from ._verl_config import lpreg_options

STAT_KEYS = ("log_probs", "lpreg_proxy_log_probs", "lpreg_kl", "lpreg_entropy")
SUM_PREFIX = "actor/lpreg_sum/"  # per-micro-batch sums, pooled by `pool_mechanism_metrics`
# the mechanism's sums (lpreg.mechanism_sums) plus the divergence and the valid-token count
POOLED_SUMS = ("candidates", "filtered", "selected", "kept_mass", "push", "p_y", "kl", "valid")
_LOG_RATIO_CLAMP = 20.0  # verl's clamp of log r before exp (compute_policy_loss_vanilla)
_AGG_SIGNATURE = inspect.signature(agg_loss)
DUAL_CLIP_BASES = ("vanilla", "bypass_mode")  # the bases with verl's dual clip (clip_ratio_c), lpreg_dual_clip


def global_scale(loss_agg_mode: str, mask: Tensor, info: Dict[str, Any]):
    """(lpreg loss_agg_mode, num_tokens, factor) so that factor x lpreg's token-mean / seq-mean loss =
    verl's agg_loss (kept for callers of lpreg's own losses under verl's normalisation; lpreg_ppo_loss
    aggregates with verl's agg_loss itself)."""
    dp = float(info.get("dp_size") or 1)
    if loss_agg_mode == "token-mean":
        n = info.get("batch_num_tokens")
        return "token-mean", (None if n is None else torch.tensor(float(n))), (1.0 if n is None else dp)
    if loss_agg_mode == "token-sum":
        return "token-mean", 1, dp
    if loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        # lpreg divides by the micro-batch's B rows; verl by global_batch_size / dp (or the
        # local count of non-empty rows)
        B = mask.shape[0]
        gbs = info.get("global_batch_size")
        if gbs is not None:
            factor = B * dp / float(gbs)
        else:
            factor = B / float((mask.sum(-1) > 0).sum().clamp(min=1))
        if loss_agg_mode == "seq-mean-token-sum-norm":
            scale = info.get("loss_scale_factor")
            factor /= scale if scale is not None else mask.shape[-1]
        mode = "seq-mean-token-mean" if loss_agg_mode == "seq-mean-token-mean" else "seq-mean-token-sum"
        return mode, None, factor
    raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not supported with loss_mode=lpreg")


@contextlib.contextmanager
def captured_aggregation() -> Iterator[List[Dict[str, Any]]]:
    """Record every call of verl's `agg_loss` made inside (the base loss's per-token loss matrix,
    its mask, mode and global-batch info), each still computed by verl's `agg_loss`. verl's
    registered policy losses look `agg_loss` up in their module at call time."""
    calls: List[Dict[str, Any]] = []
    original = core_algos.agg_loss

    def recording(*args: Any, **kwargs: Any) -> Tensor:
        bound = _AGG_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return original(*args, **kwargs)

    core_algos.agg_loss = recording
    try:
        yield calls
    finally:
        core_algos.agg_loss = original


def released_surrogate(base: str, config: Any, dual_clip: bool, logp: Tensor, old_logp: Tensor, adv: Tensor,
                       weights: Optional[Tensor], base_token_loss: Tensor) -> Tensor:
    """(B, L) the loss a selected token (A < 0) trains on in the released form: the raw-ratio
    surrogate -A r with the base's upper caps and weights (docs/spec.md, "Lp-Reg over any base
    objective").

    vanilla, bypass_mode (ppo_clip): -A r, with verl's dual clip min(., -A clip_ratio_c) when
        lpreg_dual_clip (False: no dual clip in the base either, `without_dual_clip`); x the
        rollout-correction weight (vanilla; bypass_mode applies none);
    dppo_tv, dppo_kl: their own -A sg(min(r, clip_ratio_c)) log p without the trust-region mask
        (the truncation at clip_ratio_c is their upper cap);
    sapo, clip_cov, kl_cov: -A r (no soft gate, no covariance clip or penalty; none caps it);
    cispo, gpg, dro, bypass_mode (reinforce): the base itself (none zeroes a negative-advantage
        token's gradient: nothing to un-clip).
    """
    if base in ("cispo", "gpg", "dro"):
        return base_token_loss
    if base == "bypass_mode":
        corr = config.policy_loss.get("rollout_correction", None)
        if (corr.get("loss_type", "ppo_clip") if corr is not None else "ppo_clip") == "reinforce":
            return base_token_loss
        weights = None  # bypass mode's PPO-clip applies no importance weight (its ratio is the correction)
    ratio = torch.exp((logp - old_logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    if base in ("dppo_tv", "dppo_kl"):
        truncation = float(config.get("clip_ratio_c", 20.0))
        surrogate = -adv * ratio.clamp(max=truncation).detach() * logp
    else:
        surrogate = -adv * ratio
        if base in ("vanilla", "bypass_mode") and dual_clip:
            dual = -adv * float(config.get("clip_ratio_c", 3.0))
            surrogate = torch.where(adv < 0, torch.minimum(surrogate, dual), surrogate)
    return surrogate if weights is None else surrogate * weights


def without_dual_clip(config: Any) -> Any:
    """A shallow copy of the actor config whose clip_ratio_c is +inf: verl's vanilla loss (and
    bypass_mode's PPO-clip) then caps nothing, min(-A r_clipped, -A inf) = -A r_clipped for A < 0
    (lpreg_dual_clip=False: the Lp-Reg objective and the released code have no dual clip). The copy
    shares global_batch_info with the original, which verl's loss reads."""
    view = copy.copy(config)
    object.__setattr__(view, "clip_ratio_c", float("inf"))  # verl's configs refuse setattr once built
    return view


def _geo_mean_aggregate(loss_mat: Tensor, loss_mask: Tensor) -> Tensor:
    """geo_mean's own aggregation (compute_policy_loss_geo_mean): a mean over the micro-batch's
    rows of each row's token mean."""
    mask = loss_mask.to(loss_mat.dtype)
    return ((loss_mat * mask).sum(-1) / (mask.sum(-1) + 1e-8)).mean()


def base_and_correction(config: Any, o: Dict[str, Any], stats: TokenStats, old_logp: Tensor, adv: Tensor,
                        mask: Tensor, weights: Optional[Tensor],
                        selection: Optional[SelectionThreshold]) -> Tuple[Tensor, Dict[str, Any], Tensor, LossTerms]:
    """(verl's base loss, its metrics, the aggregated Lp-Reg correction, the per-token terms)."""
    base = o["lpreg_base_loss_mode"]
    if not o["lpreg_dual_clip"] and base in DUAL_CLIP_BASES:
        config = without_dual_clip(config)
    with captured_aggregation() as calls:
        pg_base, base_metrics = core_algos.get_policy_loss_fn(base)(
            old_log_prob=old_logp, log_prob=stats.logp, advantages=adv, response_mask=mask,
            loss_agg_mode=config.loss_agg_mode, config=config, rollout_is_weights=weights)
    if base == "geo_mean" and not calls:
        base_t, agg_mask, aggregate = torch.zeros_like(stats.logp), mask, _geo_mean_aggregate
    elif len(calls) == 1:
        call = calls[0]
        base_t, agg_mask = call["loss_mat"], call["loss_mask"].to(bool)
        extra = {k: v for k, v in call.items() if k not in ("loss_mat", "loss_mask")}

        def aggregate(loss_mat: Tensor, loss_mask: Tensor) -> Tensor:
            return agg_loss(loss_mat=loss_mat, loss_mask=loss_mask, **extra)
    else:
        raise RuntimeError(f"lpreg_base_loss_mode={base!r}: verl's {base} policy loss aggregated {len(calls)} "
                           f"per-token losses through agg_loss (one expected), so lpreg cannot aggregate Lp-Reg as it "
                           f"aggregates; use a base loss that calls agg_loss once")
    # the pool: tokens the base trains on (its own mask: bypass mode's rejection) with weight > 0
    pool = agg_mask & mask
    pool_w = pool.float() if weights is None or base == "bypass_mode" else pool.float() * weights.float()
    surrogate = None
    if o["lpreg_compat"] == "released":
        surrogate = released_surrogate(base, config, o["lpreg_dual_clip"], stats.logp, old_logp, adv,
                                       None if weights is None else weights.float(), base_t)
    terms = lpreg_regularize(base_t.float(), stats, adv, old_logp, mask, released_surrogate=surrogate,
                             weights=pool_w, selection_threshold=selection, compat=o["lpreg_compat"],
                             rho=o["lpreg_rho"], beta=o["lpreg_beta"], kl_estimator=o["lpreg_kl_estimator"])
    # 0 exactly on every token not selected (and so at beta = 0): the base stays verl's, bit for bit
    delta = torch.where(mask, terms.loss - terms.base_loss, torch.zeros((), device=terms.loss.device))
    return pg_base, base_metrics, aggregate(delta.to(base_t.dtype), agg_mask), terms


def lpreg_ppo_loss(config, model_output, data, dp_group=None,
                   selection: Optional[SelectionThreshold] = None) -> tuple[torch.Tensor, dict]:
    """verl's `ppo_loss` with Lp-Reg over the configured base loss (see the module docstring)."""
    stats = TokenStats(*(no_padding_2_padding(model_output[k], data) for k in STAT_KEYS))
    config.global_batch_info["dp_size"] = data["dp_size"]
    config.global_batch_info["batch_num_tokens"] = data["batch_num_tokens"]
    config.global_batch_info["global_batch_size"] = data["global_batch_size"]
    config.global_batch_info["loss_scale_factor"] = config.loss_scale_factor
    info = config.global_batch_info
    summed = (data["dp_size"] > 1 or data["batch_num_tokens"] is not None or data["global_batch_size"] is not None
              or config.loss_scale_factor is not None)
    aggregation = AggregationType.SUM if summed else AggregationType.MEAN

    o = lpreg_options(config.policy_loss)
    fields = ["response_mask", "old_log_probs", "advantages"]
    fields += [k for k in ("rollout_is_weights", "ref_log_prob", _proxy.ROLLOUT_LOGQ) if k in data]
    sparse = _proxy.SPARSE_KEYS[0] in data  # the engine took the full KL against the sparse record
    if o["lpreg_proxy"] == "rollout" and _proxy.ROLLOUT_LOGQ not in data:
        raise ValueError("lpreg_proxy='rollout' but the batch holds no rollout proxy: lpreg records it in the "
                         "trainer's old-log-prob pass (RayPPOTrainer or the v1 PPOTrainer _compute_old_log_prob, "
                         "checked when the trainer starts); this trainer did not run that pass through lpreg's hook, "
                         "or algorithm.rollout_correction.bypass_mode=True skipped it. Use lpreg_proxy='current' "
                         "to train without it")
    data = data.select(*fields).to_padded_tensor()
    mask = data["response_mask"].to(bool)
    if _proxy.ROLLOUT_LOGQ in data and not sparse:
        # k3 against the rollout proxy: its log q(y) replaces the current one
        stats = _proxy.with_rollout_logq(stats, data[_proxy.ROLLOUT_LOGQ].float())
    weights = data["rollout_is_weights"] if "rollout_is_weights" in data else None
    pg_base, base_metrics, correction, terms = base_and_correction(
        config, o, stats, data["old_log_probs"], data["advantages"], mask, weights, selection)
    pg_loss = pg_base + correction

    metrics = Metric.from_dict(base_metrics, aggregation=AggregationType.MEAN)  # as verl's ppo_loss
    sums = mechanism_sums(terms, mask)
    sums["kl"] = terms.divergence.detach().float().sum()
    sums["valid"] = mask.float().sum()
    # the selection's probability threshold: the step-wide one (paper; exp(-inf) = 0 when nothing is
    # valid), else the largest candidate p_y (the k-th lowest), 0 without a candidate
    zero = torch.zeros((), device=mask.device)
    kth = (selection.logp.to(zero.device).exp() if selection is not None
           else torch.where(terms.candidate, terms.p_y, zero).max())
    values = torch.stack([sums[k].reshape(()).float() for k in POOLED_SUMS] + [kth.reshape(()).float()]).tolist()
    metrics.update({SUM_PREFIX + k: Metric(AggregationType.SUM, v) for k, v in zip(POOLED_SUMS, values)})
    metrics["actor/lpreg_threshold"] = Metric(AggregationType.MEAN, values[-1])
    # this micro-batch's ratios; `pool_mechanism_metrics` replaces them by the exact pooled ones
    sel = dict(zip(POOLED_SUMS, values))
    metrics["actor/lpreg_kl"] = Metric(AggregationType.MEAN, sel["kl"] / max(sel["selected"], 1.0))
    metrics["actor/lpreg_frac"] = Metric(AggregationType.MEAN, sel["selected"] / max(sel["valid"], 1.0))
    metrics["actor/pg_loss"] = Metric(value=pg_loss.detach(), aggregation=aggregation)
    policy_loss = pg_loss
    if "entropy" in model_output:  # verl's entropy bonus, aggregated as verl does
        entropy_loss = agg_loss(loss_mat=stats.entropy, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **info)
        policy_loss = policy_loss - config.entropy_coeff * entropy_loss
        metrics["actor/entropy_loss"] = Metric(value=entropy_loss, aggregation=aggregation)
    if config.use_kl_loss:
        kld = kl_penalty(logprob=stats.logp, ref_logprob=data["ref_log_prob"], kl_penalty=config.kl_loss_type)
        kl_loss = agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=config.loss_agg_mode, **info)
        policy_loss = policy_loss + kl_loss * config.kl_loss_coef
        metrics["kl_loss"] = Metric(value=kl_loss, aggregation=aggregation)
        metrics["kl_coef"] = config.kl_loss_coef
    return policy_loss, metrics


def pool_mechanism_metrics(metrics: Dict[str, Any], group: Any = None) -> None:
    """Turn the per-micro-batch sums lpreg_ppo_loss logged ("actor/lpreg_sum/*") into the exact
    pooled metrics of the mini-batch, in place; a collective: call it on every rank of `group`.

    verl reduces a metric over micro-batches and ranks only by mean, sum, min or max, which cannot
    form a ratio of pooled sums. So the sums are added over this rank's micro-batches, all-reduced
    (SUM) over the data-parallel group, turned into ratios (`lpreg.mechanism_metrics`, and
    actor/lpreg_kl = sum D / selected, actor/lpreg_frac = selected / valid tokens), and each is
    written as a MEAN Metric holding that value once per micro-batch: verl's Metric.aggregate_dp
    (the mean over ranks, then over micro-batches) returns it exactly. Counts are the mini-batch's
    totals over every rank.

    Args:
        metrics: The "metrics" dict of the engine's forward_backward_batch output (key -> a Metric
            of per-micro-batch values, or a list); left unchanged without lpreg's sums.
        group: The data-parallel process group, or None for one process.
    """
    if SUM_PREFIX + POOLED_SUMS[0] not in metrics:
        return
    per_micro = {}
    for key in POOLED_SUMS:
        entry = metrics.pop(SUM_PREFIX + key)
        per_micro[key] = [float(v) for v in (entry.values if isinstance(entry, Metric) else entry)]
    n_micro = len(per_micro[POOLED_SUMS[0]])
    totals = torch.tensor([sum(per_micro[k]) for k in POOLED_SUMS], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        from verl.utils.device import get_device_id

        pooled = totals.to(get_device_id())
        dist.all_reduce(pooled, op=dist.ReduceOp.SUM, group=group)
        totals = pooled.cpu()
    sums = dict(zip(POOLED_SUMS, totals.unbind()))
    out = {f"actor/{k}": v for k, v in mechanism_metrics(sums).items()}
    out["actor/lpreg_kl"] = sums["kl"] / sums["selected"].clamp(min=1)
    out["actor/lpreg_frac"] = sums["selected"] / sums["valid"].clamp(min=1)
    for key, value in out.items():
        metric = Metric(AggregationType.MEAN)
        metric.extend([float(value)] * n_micro)
        metrics[key] = metric
