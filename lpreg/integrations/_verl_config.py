"""verl configuration of loss_mode=lpreg: the policy-loss config, and the checks run when the
actor's config is built (the driver's validate_config and each worker's init_model), so that a
setting the lpreg engine cannot serve fails before the first rollout, not after it."""

import functools
from dataclasses import dataclass
from typing import Any, Dict, Optional

from verl.trainer.ppo import core_algos
from verl.workers.config import ActorConfig, PolicyLossConfig

from ..logit_transform import LogitTransform, logit_transform_from_config
from . import _proxy
from ._core import loss_config

LOSS_MODE = "lpreg"
STRATEGIES = ("fsdp", "fsdp2")
# verl's policy losses whose ratio is the sequence's (one ratio per response): no token ratio to
# un-clip, so only the paper form composes with them (docs/spec.md, "Lp-Reg over any base objective")
SEQUENCE_RATIO = ("gspo", "geo_mean")
# the base losses whose released-form surrogate lpreg knows (_verl_loss.released_surrogate)
RELEASED_BASES = ("vanilla", "bypass_mode", "dppo_tv", "dppo_kl", "sapo", "clip_cov", "kl_cov", "cispo", "gpg",
                  "dro")


@dataclass
class LpRegPolicyLossConfig(PolicyLossConfig):
    """verl's PolicyLossConfig plus Lp-Reg's hyper-parameters (docs/spec.md §1, §3)."""

    lpreg_compat: str = "released"  # "released" (k3, per micro-batch) or "paper" (full KL, step-wide)
    lpreg_mode: str = "min_p"  # proxy filter: "min_p" (kappa) or "fixed" (tau)
    lpreg_threshold: float = 0.02  # kappa or tau
    lpreg_rho: float = 0.01  # fraction of lowest-probability tokens regularised
    lpreg_beta: float = 1.0  # weight of the Lp-Reg term (0: the base loss exactly)
    lpreg_kl_estimator: Optional[str] = None  # None: "full" for paper, "k3" for released
    # where q comes from: "rollout" (recorded at the old-log-prob pass), "current", or None: rollout
    # when a rollout is trained on by more than one optimiser step (several mini-batches or epochs)
    lpreg_proxy: Optional[str] = None
    lpreg_proxy_topk: int = 64  # entries of the sparse rollout proxy (full KL only)
    # verl's dual clip (actor.clip_ratio_c) as the vanilla / bypass_mode base applies it, kept by the
    # released form's swapped tokens; False: none (in the base or the swap), as in the Lp-Reg
    # objective and the released code. Only these two bases have it.
    lpreg_dual_clip: bool = True
    # the policy loss Lp-Reg sits on: any loss in verl's registry (verl computes and aggregates it)
    lpreg_base_loss_mode: str = "vanilla"
    # the fused untied head's matmul in fp32 (over the policy's head weights) instead of FSDP2's compute
    # dtype (bf16 by default), as TRL's cast_lm_head_to_fp32 does
    lpreg_fp32_head: bool = False

    def __post_init__(self) -> None:
        check_options(lpreg_options(self), self)


_FIELDS = LpRegPolicyLossConfig.__dataclass_fields__
_DEFAULTS = {f: _FIELDS[f].default for f in _FIELDS if f.startswith("lpreg_")}


def lpreg_options(policy_loss: Any) -> Dict[str, Any]:
    """The lpreg_* settings of a policy-loss config (dataclass or DictConfig), with defaults."""
    get = policy_loss.get if hasattr(policy_loss, "get") else lambda k, d: getattr(policy_loss, k, d)
    return {k: get(k, v) for k, v in _DEFAULTS.items()}


def check_options(o: Dict[str, Any], policy_loss: Any = None) -> None:
    """Raise ValueError naming the first lpreg_* option (or the base loss's own option, read from
    `policy_loss` when given) that loss_mode=lpreg cannot serve."""
    cfg = loss_config(o)
    check_base_loss_mode(o["lpreg_base_loss_mode"], cfg.compat, policy_loss)
    _proxy.check_source(o["lpreg_proxy"], "lpreg_proxy")
    _proxy.check_topk(o["lpreg_proxy_topk"], "lpreg_proxy_topk")
    if not isinstance(o["lpreg_fp32_head"], bool):
        raise ValueError(f"lpreg_fp32_head must be True or False, got {o['lpreg_fp32_head']!r}")
    if not isinstance(o["lpreg_dual_clip"], bool):
        raise ValueError(f"lpreg_dual_clip must be True or False, got {o['lpreg_dual_clip']!r}")
    if not o["lpreg_dual_clip"] and o["lpreg_base_loss_mode"] not in ("vanilla", "bypass_mode"):
        raise ValueError(f"lpreg_dual_clip=False turns off verl's dual clip (clip_ratio_c), which only the vanilla "
                         f"and bypass_mode bases have; lpreg_base_loss_mode={o['lpreg_base_loss_mode']!r} has none "
                         f"(drop lpreg_dual_clip)")


def check_base_loss_mode(base: Any, compat: str, policy_loss: Any = None) -> None:
    """lpreg_base_loss_mode must name a policy loss in verl's registry (not lpreg itself), and the
    released form needs a token ratio (refused for the sequence-ratio losses, with the paper form
    offered) and a surrogate lpreg knows for that base."""
    registered = sorted(k for k in core_algos.POLICY_LOSS_REGISTRY if k != LOSS_MODE)
    if not isinstance(base, str) or base not in registered:
        raise ValueError(f"lpreg_base_loss_mode must be one of verl's registered policy losses {registered}, "
                         f"got {base!r}")
    if compat == "released" and base in SEQUENCE_RATIO:
        raise ValueError(f"lpreg_base_loss_mode={base!r} with lpreg_compat='released': {base} has one ratio per "
                         f"sequence, not per token, so the released form's swap of a selected token to the raw "
                         f"token-ratio surrogate -A r does not exist for it; use lpreg_compat='paper' (the base loss "
                         f"plus beta S D, aggregated as {base} aggregates)")
    if compat == "released" and base not in RELEASED_BASES:
        raise ValueError(f"lpreg_base_loss_mode={base!r} with lpreg_compat='released': lpreg knows the released "
                         f"form's surrogate (-A r with the base's upper caps) for {list(RELEASED_BASES)} only; use "
                         f"lpreg_compat='paper', which composes with any registered policy loss")
    get = (policy_loss.get if hasattr(policy_loss, "get") else lambda k, d=None: getattr(policy_loss, k, d)) \
        if policy_loss is not None else (lambda k, d=None: d)
    if base == "dro" and not (isinstance(get("dro_beta", None), (int, float)) and get("dro_beta", None) > 0):
        raise ValueError(f"lpreg_base_loss_mode='dro' needs policy_loss.dro_beta > 0 (DRO's quadratic log-ratio "
                         f"penalty), got dro_beta={get('dro_beta', None)!r}")
    for name, key in (("clip_cov", "clip_cov_ratio"), ("kl_cov", "kl_cov_ratio")):
        value = get(key, None)
        if base == name and value is not None and not value > 0:
            raise ValueError(f"lpreg_base_loss_mode={name!r} needs policy_loss.{key} > 0, got {value!r}")


def is_lpreg(actor_config: Any) -> bool:
    policy_loss = actor_config.get("policy_loss", None) if hasattr(actor_config, "get") else None
    return policy_loss is not None and policy_loss.get("loss_mode", "vanilla") == LOSS_MODE


def check_actor(actor: Any) -> None:
    """Raise ValueError naming the first actor setting loss_mode=lpreg cannot serve."""
    o = lpreg_options(actor.policy_loss)
    check_options(o, actor.policy_loss)
    strategy = actor.get("strategy", None)
    if strategy not in STRATEGIES:
        raise ValueError(f"actor strategy={strategy!r} is not supported with loss_mode=lpreg (its engine does not "
                         f"hand the logits or hidden states to the loss); use one of {STRATEGIES}")
    for name in ("calculate_sum_pi_squared", "use_prefix_grouper"):
        if actor.get(name, False):
            raise ValueError(f"{name}=True is not supported with loss_mode=lpreg; set {name}=False")
    if o["lpreg_dual_clip"] and not float(actor.get("clip_ratio_c", 3.0)) > 1:
        raise ValueError(f"clip_ratio_c must be > 1 for the dual clip (lpreg_dual_clip=True), "
                         f"got {actor.get('clip_ratio_c')!r}")
    sp = actor.get("ulysses_sequence_parallel_size", 1) or 1
    if sp > 1 and o["lpreg_proxy"] != "current" and loss_config(o).kl_estimator == "full":
        raise ValueError(f"the sparse rollout proxy (the full KL: lpreg_compat={o['lpreg_compat']!r}, "
                         f"lpreg_kl_estimator={o['lpreg_kl_estimator']!r}) is not supported with "
                         f"ulysses_sequence_parallel_size={sp}; use lpreg_kl_estimator='k3' or lpreg_proxy='current'")


def model_logit_transform(hf_config: Any) -> LogitTransform:
    """The logit transform of the model whose transformers config is `hf_config` (lpreg's fused
    kernels apply it after the LM head's matmul, before the temperature): Gemma's soft-cap, Cohere's
    logit_scale, Granite's logits_scaling, ... (`lpreg.logit_transform_from_config`); the identity
    for None or a model whose config describes none (the head guard catches a head that changes
    its logits in a way no config field says).

    Args:
        hf_config: a `transformers.PretrainedConfig` (the FSDP module's `.config`), or None.

    Returns:
        The `lpreg.LogitTransform` to pass to the fused ops as logit_scale / logit_softcap.
    """
    return LogitTransform() if hf_config is None else logit_transform_from_config(hf_config)


def check_model(model: Any) -> None:
    """Raise ValueError when actor_rollout_ref.model (a DictConfig) asks for lpreg's fused path
    (use_fused_kernels=True) with a LoRA adapter on lm_head (the fused path reads the head's weight).
    Scaled and soft-capped heads run fused (`model_logit_transform`)."""
    if not model.get("use_fused_kernels", False):
        return
    targets = model.get("target_modules", None)
    if int(model.get("lora_rank", 0) or 0) > 0 and not isinstance(targets, str) and "lm_head" in (targets or ()):
        raise ValueError(f"actor_rollout_ref.model.use_fused_kernels=True with loss_mode=lpreg reads the LM head's "
                         f"weight, but actor_rollout_ref.model.target_modules={list(targets)!r} puts a LoRA adapter "
                         f"on lm_head: drop it, or set actor_rollout_ref.model.use_fused_kernels=False")


def install_actor_check() -> None:
    """Run `check_actor` whenever verl builds an ActorConfig (every strategy's __post_init__ calls
    ActorConfig.__post_init__) with loss_mode=lpreg."""
    original = ActorConfig.__post_init__
    if getattr(original, "_lpreg", False):
        return

    @functools.wraps(original)
    def __post_init__(self):
        original(self)
        if is_lpreg(self):
            check_actor(self)

    __post_init__._lpreg = True  # type: ignore[attr-defined]  # a marker: patched once
    ActorConfig.__post_init__ = __post_init__
