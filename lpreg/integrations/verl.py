"""Lp-Reg as a verl plugin (verl 0.9.x): `actor_rollout_ref.actor.policy_loss.loss_mode=lpreg`.

Loaded by `import verl` through the entry point `[project.entry-points."verl.plugins"]`
(`lpreg = "lpreg.integrations.verl"`), in the driver and in every Ray worker. It

1. registers the policy loss `lpreg` (verl's registry hands a policy loss log-probs only, so
   the real work happens in the engine below; reached any other way it raises);
2. swaps verl's FSDP language-model engine (`FSDPEngineWithLMHead`, strategies fsdp and
   fsdp2) for a subclass that, only when the actor's loss mode is `lpreg`:
   - computes lpreg's per-token statistics (logp, proxy logp, kl, entropy) from the logits in
     `prepare_model_outputs` (remove-padding or padded, with Ulysses sequence parallelism),
     one fused pass instead of verl's log-softmax + entropy;
   - for `lpreg_compat=paper`, fixes the step-wide lowest-rho set from the old log-probs of
     the whole mini-batch, every micro-batch of every data-parallel rank
     (`lpreg.selection_threshold`), before the first micro-batch runs;
   - uses `lpreg_ppo_loss`, which mirrors verl's `ppo_loss` (global-batch normalisation,
     entropy bonus, reference KL, metrics) with the policy term from
     `lpreg.policy_loss.policy_loss_from_stats`;
3. provides `LpRegPolicyLossConfig`, verl's `PolicyLossConfig` plus the `lpreg_*` fields.

Hydra overrides (docs/integrations.md, "Use with verl"):

    actor_rollout_ref.actor.policy_loss._target_=lpreg.integrations.verl.LpRegPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=lpreg
    +actor_rollout_ref.actor.policy_loss.lpreg_compat=released  (and lpreg_rho, lpreg_beta, ...)

Not supported (an error names the setting): Megatron (vocab-parallel logits), verl's fused
kernels (`use_fused_kernels`: no logits come back), top-k distillation, the value head.
verl's dual clip (`clip_ratio_c`) is not applied: the Lp-Reg objective (docs/spec.md §3)
has none; with one update per rollout the ratio is 1 and it never acts.
"""

import functools
import math
from dataclasses import dataclass
from typing import Any, Dict, NoReturn, Optional

import torch
from torch import Tensor
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.core_algos import agg_loss, kl_penalty, register_policy_loss
from verl.utils import tensordict_utils as tu
from verl.utils.metric import AggregationType, Metric
from verl.workers.config import PolicyLossConfig
from verl.workers.engine import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils import losses as verl_losses
from verl.workers.utils.padding import no_padding_2_padding

from .._validate import check_mode_threshold
from ..loss_config import COMPATS, KL_ESTIMATORS
from ..policy_loss import policy_loss_from_stats
from ..selection import SelectionThreshold, selection_threshold
from ..token_stats import TokenStats, lpreg_token_stats

LOSS_MODE = "lpreg"
_STAT_KEYS = ("log_probs", "lpreg_proxy_log_probs", "lpreg_kl", "lpreg_entropy")


@dataclass
class LpRegPolicyLossConfig(PolicyLossConfig):
    """verl's PolicyLossConfig plus Lp-Reg's hyper-parameters (docs/spec.md §1, §3)."""

    lpreg_compat: str = "released"  # "released" (k3, per micro-batch) or "paper" (full KL, step-wide)
    lpreg_mode: str = "min_p"  # proxy filter: "min_p" (kappa) or "fixed" (tau)
    lpreg_threshold: float = 0.02  # kappa or tau
    lpreg_rho: float = 0.01  # fraction of lowest-probability tokens regularised
    lpreg_beta: float = 1.0  # weight of the Lp-Reg term (0: verl's vanilla PPO term)
    lpreg_kl_estimator: Optional[str] = None  # None: "full" for paper, "k3" for released

    def __post_init__(self) -> None:
        check_options(lpreg_options(self))


def lpreg_options(policy_loss: Any) -> Dict[str, Any]:
    """The lpreg_* settings of a policy-loss config (dataclass or DictConfig), with defaults."""
    defaults = {f: LpRegPolicyLossConfig.__dataclass_fields__[f].default for f in
                ("lpreg_compat", "lpreg_mode", "lpreg_threshold", "lpreg_rho", "lpreg_beta", "lpreg_kl_estimator")}
    get = policy_loss.get if hasattr(policy_loss, "get") else lambda k, d: getattr(policy_loss, k, d)
    return {k: get(k, v) for k, v in defaults.items()}


def check_options(o: Dict[str, Any]) -> None:
    if o["lpreg_compat"] not in COMPATS:
        raise ValueError(f"lpreg_compat must be one of {COMPATS}, got {o['lpreg_compat']!r}")
    check_mode_threshold(o["lpreg_mode"], o["lpreg_threshold"])
    if not (0 < float(o["lpreg_rho"]) <= 1):
        raise ValueError(f"lpreg_rho must be in (0, 1], got {o['lpreg_rho']!r}")
    if not (0 <= float(o["lpreg_beta"]) < math.inf):
        raise ValueError(f"lpreg_beta must be a finite number >= 0, got {o['lpreg_beta']!r}")
    if o["lpreg_kl_estimator"] not in (None, *KL_ESTIMATORS):
        raise ValueError(f"lpreg_kl_estimator must be None or one of {KL_ESTIMATORS}, got {o['lpreg_kl_estimator']!r}")


@register_policy_loss(LOSS_MODE)
def compute_policy_loss_lpreg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                              config=None, rollout_is_weights=None) -> NoReturn:
    """Registered so that verl accepts loss_mode=lpreg; the loss itself needs the logits."""
    raise NotImplementedError(
        "loss_mode=lpreg needs the logits, which only lpreg's FSDP engine passes on (strategy fsdp / fsdp2, "
        "installed by `import verl` when lpreg is installed). Megatron's vocab-parallel logits are not supported yet.")


# ---- the loss: verl's ppo_loss with the policy term from lpreg


def _global_scale(loss_agg_mode: str, mask: Tensor, info: Dict[str, Any]):
    """(lpreg loss_agg_mode, num_tokens, factor) so that factor x lpreg's loss = verl's agg_loss."""
    dp = info.get("dp_size") or 1
    if loss_agg_mode == "token-mean":
        n = info.get("batch_num_tokens")
        return "token-mean", (None if n is None else torch.tensor(float(n) / dp)), 1.0
    if loss_agg_mode == "token-sum":  # sum x dp: a token-mean over 1 / dp "tokens"
        return "token-mean", torch.tensor(1.0 / dp), 1.0
    if loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        # lpreg divides by the micro-batch's B rows; verl by global_batch_size / dp (or the
        # local count of non-empty rows)
        B = mask.shape[0]
        gbs = info.get("global_batch_size")
        rows = (float(gbs) / dp) if gbs is not None else float((mask.sum(-1) > 0).sum().clamp(min=1))
        factor = B / rows
        if loss_agg_mode == "seq-mean-token-sum-norm":
            scale = info.get("loss_scale_factor")
            factor /= scale if scale is not None else mask.shape[-1]
        mode = "seq-mean-token-mean" if loss_agg_mode == "seq-mean-token-mean" else "seq-mean-token-sum"
        return mode, None, factor
    raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not supported with loss_mode=lpreg")


def lpreg_ppo_loss(config, model_output, data, dp_group=None,
                   selection: Optional[SelectionThreshold] = None) -> tuple[torch.Tensor, dict]:
    """verl's `ppo_loss` (verl/workers/utils/losses.py) with Lp-Reg's policy term."""
    stats = TokenStats(*(no_padding_2_padding(model_output[k], data) for k in _STAT_KEYS))
    config.global_batch_info["dp_size"] = data["dp_size"]
    config.global_batch_info["batch_num_tokens"] = data["batch_num_tokens"]
    config.global_batch_info["global_batch_size"] = data["global_batch_size"]
    config.global_batch_info["loss_scale_factor"] = config.loss_scale_factor
    info = config.global_batch_info
    summed = (data["dp_size"] > 1 or data["batch_num_tokens"] is not None or data["global_batch_size"] is not None
              or config.loss_scale_factor is not None)
    aggregation = AggregationType.SUM if summed else AggregationType.MEAN

    fields = ["response_mask", "old_log_probs", "advantages"]
    fields += [k for k in ("rollout_is_weights", "ref_log_prob") if k in data]
    data = data.select(*fields).to_padded_tensor()
    mask = data["response_mask"].to(bool)
    adv = data["advantages"].float()
    if "rollout_is_weights" in data:
        # verl multiplies the clipped surrogate by the (detached, positive) weight w:
        # -min(rA, clip(r)A) w = -min(r(Aw), clip(r)(Aw)), so w goes into the advantage
        adv = adv * data["rollout_is_weights"].float()
    o = lpreg_options(config.policy_loss)
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    mode, num_tokens, factor = _global_scale(config.loss_agg_mode, mask, info)
    pg_loss, m = policy_loss_from_stats(
        stats, adv, data["old_log_probs"], mask, compat=o["lpreg_compat"], rho=o["lpreg_rho"], beta=o["lpreg_beta"],
        clip_low=clip_low, clip_high=clip_high, loss_agg_mode=mode, kl_estimator=o["lpreg_kl_estimator"],
        selection_threshold=selection, num_tokens=num_tokens)
    pg_loss = pg_loss * factor
    metrics = Metric.from_dict({k: m[k] for k in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/lpreg_kl",
                                                  "actor/lpreg_frac", "actor/lpreg_threshold")},
                               aggregation=AggregationType.MEAN)
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


def _lpreg_config(loss_function) -> Optional[Any]:
    """The ActorConfig when `loss_function` is verl's ppo_loss (or ours) in loss mode lpreg."""
    if not isinstance(loss_function, functools.partial):
        return None
    if loss_function.func not in (verl_losses.ppo_loss, lpreg_ppo_loss):
        return None
    config = loss_function.keywords.get("config")
    if config is None or config.policy_loss.get("loss_mode", "vanilla") != LOSS_MODE:
        return None
    return config


# ---- the engine


class LpRegFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    """verl's FSDP LM engine; with loss_mode=lpreg its outputs and loss are lpreg's."""

    _lpreg_selections = None

    def forward_backward_batch(self, data, loss_function, forward_only=False):
        config = _lpreg_config(loss_function)
        if config is None or forward_only:
            return super().forward_backward_batch(data, loss_function, forward_only)
        o = lpreg_options(config.policy_loss)
        check_options(o)
        self._lpreg_selections = None
        if o["lpreg_compat"] == "paper":
            # the same split the base class is about to make (a deterministic function of data)
            tu.assign_non_tensor(data, sp_size=self.ulysses_sequence_parallel_size)
            micro, _ = prepare_micro_batches(data=data, dp_group=self.get_data_parallel_group(),
                                             same_micro_num_in_dp=True)
            padded = [mb.select("old_log_probs", "response_mask").to_padded_tensor() for mb in micro]
            self._lpreg_selections = list(selection_threshold(
                [p["old_log_probs"] for p in padded], [p["response_mask"] for p in padded], rho=o["lpreg_rho"],
                group=self.get_data_parallel_group()))
        try:
            return super().forward_backward_batch(data, functools.partial(lpreg_ppo_loss, config=config),
                                                  forward_only)
        finally:
            self._lpreg_selections = None

    def forward_step(self, micro_batch, loss_function, forward_only):
        if self._lpreg_selections and _lpreg_config(loss_function) is not None:
            loss_function = functools.partial(loss_function, selection=self._lpreg_selections.pop(0))
        return super().forward_step(micro_batch, loss_function, forward_only)

    def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
        config = _lpreg_config(logits_processor_func)
        if config is None:
            return super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        get = functools.partial(tu.get_non_tensor_data, data=micro_batch)
        for key in ("use_fused_kernels", "distillation_use_topk", "calculate_sum_pi_squared"):
            if get(key=key, default=False):
                raise NotImplementedError(f"{key}=True is not supported with loss_mode=lpreg (it needs the logits)")
        o = lpreg_options(config.policy_loss)
        input_ids = micro_batch["input_ids"]
        cu_seqlens = input_ids.offsets()
        if get(key="use_remove_padding", default=True):
            logits = output.logits.squeeze(0)  # (total_nnz [/ sp + pad], V)
            temperature = output_args["temperature_rmpad"].reshape(-1, 1)
        else:
            seq_lengths = cu_seqlens.diff()
            starts = torch.zeros_like(seq_lengths, dtype=torch.int64)
            padded = output.logits  # (bsz, max_len, V)
            logits = torch.cat(torch.nested.narrow(padded, 1, starts, seq_lengths, layout=torch.jagged).unbind())
            temperature = output_args["temperature"].float().repeat_interleave(seq_lengths.to(padded.device))[:, None]
        if hasattr(logits, "full_tensor"):  # tensor parallel: logits sharded on the vocabulary
            logits = logits.full_tensor()
        if not output_args.get("temperature_is_one", False):
            logits = logits / temperature.to(logits.device)  # per-token temperature, as verl applies it
        stats = lpreg_token_stats(logits, output_args["input_ids_rmpad_rolled"].reshape(-1), temperature=1.0,
                                  mode=o["lpreg_mode"], threshold=o["lpreg_threshold"])
        if get(key="use_remove_padding", default=True):  # gather across Ulysses ranks, drop the pad
            stats = TokenStats(*(self._gather_and_unpad_packed(t, output_args["pad_size"]) for t in stats))
        nested = [torch.nested.nested_tensor_from_jagged(t, cu_seqlens) for t in stats]
        out = dict(zip(_STAT_KEYS, nested))
        if get(key="calculate_entropy", default=False):
            out["entropy"] = nested[3]
        return out


def _install_engine() -> None:
    """Point every registry entry of verl's FSDP LM engine at the lpreg subclass (a no-op
    unless loss_mode=lpreg), for the devices verl registered and for CPU."""
    for backend, by_device in EngineRegistry._engines.get("language_model", {}).items():
        for key, cls in list(by_device.items()):
            if cls is FSDPEngineWithLMHead:
                by_device[key] = LpRegFSDPEngineWithLMHead
        if backend in ("fsdp", "fsdp2"):
            by_device.setdefault("cpu", LpRegFSDPEngineWithLMHead)


_install_engine()
assert core_algos.get_policy_loss_fn(LOSS_MODE) is compute_policy_loss_lpreg
