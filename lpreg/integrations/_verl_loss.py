"""verl's `ppo_loss` (verl/workers/utils/losses.py) with the policy term from lpreg.

Per micro-batch, with verl's global-batch normalisation (`agg_loss` with global_batch_info):

    loss = factor x lpreg.policy_loss_from_stats(stats, A, old_logp, mask, agg, num_tokens)
           - entropy_coeff x agg_loss(H)  +  kl_loss_coef x agg_loss(kl(logp, ref))   (as verl)

`_global_scale` maps each verl loss_agg_mode to lpreg's aggregation and the factor that makes
the two equal (dp = data-parallel size; verl multiplies by dp because FSDP / DDP average the
gradients over ranks):
    token-mean               verl: sum / N_global x dp       lpreg: token-mean over N_global, x dp
    token-sum                verl: sum x dp                  lpreg: token-mean over 1 token, x dp
    seq-mean-token-mean      verl: sum_seq mean / G x dp     lpreg: seq-mean over B rows, x B dp / G
    seq-mean-token-sum[-norm] as above with token sums (and / loss_scale_factor, default the horizon)
G = global_batch_size (or the micro-batch's non-empty rows when verl passes none).
"""

from typing import Any, Dict, Optional

import torch
from torch import Tensor
from verl.trainer.ppo.core_algos import agg_loss, kl_penalty
from verl.utils.metric import AggregationType, Metric
from verl.workers.utils.padding import no_padding_2_padding

from ..policy_loss import policy_loss_from_stats
from ..selection import SelectionThreshold
from ..token_stats import TokenStats
from . import _proxy
from ._verl_config import lpreg_options

STAT_KEYS = ("log_probs", "lpreg_proxy_log_probs", "lpreg_kl", "lpreg_entropy")
_PG_METRICS = ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/lpreg_kl", "actor/lpreg_frac",
               "actor/lpreg_threshold")


def global_scale(loss_agg_mode: str, mask: Tensor, info: Dict[str, Any]):
    """(lpreg loss_agg_mode, num_tokens, factor) so that factor x lpreg's loss = verl's agg_loss."""
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


def lpreg_ppo_loss(config, model_output, data, dp_group=None,
                   selection: Optional[SelectionThreshold] = None) -> tuple[torch.Tensor, dict]:
    """verl's `ppo_loss` with Lp-Reg's policy term (see the module docstring)."""
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
    adv = data["advantages"].float()
    if "rollout_is_weights" in data:
        # verl multiplies the surrogate by the (detached, positive) weight w:
        # -min(rA, clip(r)A) w = -min(r(Aw), clip(r)(Aw)), so w goes into the advantage
        adv = adv * data["rollout_is_weights"].float()
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    clip_c = float(config.get("clip_ratio_c", 3.0)) if o["lpreg_dual_clip"] else None
    mode, num_tokens, factor = global_scale(config.loss_agg_mode, mask, info)
    pg_loss, m = policy_loss_from_stats(
        stats, adv, data["old_log_probs"], mask, compat=o["lpreg_compat"], rho=o["lpreg_rho"], beta=o["lpreg_beta"],
        clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_c, loss_agg_mode=mode,
        kl_estimator=o["lpreg_kl_estimator"], selection_threshold=selection, num_tokens=num_tokens)
    pg_loss = pg_loss * factor
    metrics = Metric.from_dict({k: m[k] for k in _PG_METRICS}, aggregation=AggregationType.MEAN)
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
