"""verl configuration of loss_mode=lpreg: the policy-loss config, and the checks run when the
actor's config is built (the driver's validate_config and each worker's init_model), so that a
setting the lpreg engine cannot serve fails before the first rollout, not after it."""

import functools
from dataclasses import dataclass
from typing import Any, Dict, Optional

from verl.workers.config import ActorConfig, PolicyLossConfig

from . import _proxy
from ._core import loss_config

LOSS_MODE = "lpreg"
STRATEGIES = ("fsdp", "fsdp2")


@dataclass
class LpRegPolicyLossConfig(PolicyLossConfig):
    """verl's PolicyLossConfig plus Lp-Reg's hyper-parameters (docs/spec.md §1, §3)."""

    lpreg_compat: str = "released"  # "released" (k3, per micro-batch) or "paper" (full KL, step-wide)
    lpreg_mode: str = "min_p"  # proxy filter: "min_p" (kappa) or "fixed" (tau)
    lpreg_threshold: float = 0.02  # kappa or tau
    lpreg_rho: float = 0.01  # fraction of lowest-probability tokens regularised
    lpreg_beta: float = 1.0  # weight of the Lp-Reg term (0: verl's vanilla PPO term)
    lpreg_kl_estimator: Optional[str] = None  # None: "full" for paper, "k3" for released
    # where q comes from: "rollout" (recorded at the old-log-prob pass), "current", or None: rollout
    # when a rollout is trained on by more than one optimiser step (several mini-batches or epochs)
    lpreg_proxy: Optional[str] = None
    lpreg_proxy_topk: int = 64  # entries of the sparse rollout proxy (full KL only)
    # verl's dual clip (actor.clip_ratio_c) as verl's vanilla loss applies it; False: none, as in the
    # Lp-Reg objective and the released code
    lpreg_dual_clip: bool = True

    def __post_init__(self) -> None:
        check_options(lpreg_options(self))


_FIELDS = LpRegPolicyLossConfig.__dataclass_fields__
_DEFAULTS = {f: _FIELDS[f].default for f in _FIELDS if f.startswith("lpreg_")}


def lpreg_options(policy_loss: Any) -> Dict[str, Any]:
    """The lpreg_* settings of a policy-loss config (dataclass or DictConfig), with defaults."""
    get = policy_loss.get if hasattr(policy_loss, "get") else lambda k, d: getattr(policy_loss, k, d)
    return {k: get(k, v) for k, v in _DEFAULTS.items()}


def check_options(o: Dict[str, Any]) -> None:
    loss_config(o)
    _proxy.check_source(o["lpreg_proxy"], "lpreg_proxy")
    _proxy.check_topk(o["lpreg_proxy_topk"], "lpreg_proxy_topk")
    if not isinstance(o["lpreg_dual_clip"], bool):
        raise ValueError(f"lpreg_dual_clip must be True or False, got {o['lpreg_dual_clip']!r}")


def is_lpreg(actor_config: Any) -> bool:
    policy_loss = actor_config.get("policy_loss", None) if hasattr(actor_config, "get") else None
    return policy_loss is not None and policy_loss.get("loss_mode", "vanilla") == LOSS_MODE


def check_actor(actor: Any) -> None:
    """Raise ValueError naming the first actor setting loss_mode=lpreg cannot serve."""
    o = lpreg_options(actor.policy_loss)
    check_options(o)
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


# hf config attributes that make a model's logits something other than h @ W.T + b
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def scaled_logits(hf_config: Any) -> Optional[str]:
    """'this model (...) sets name=value' when its logits are soft-capped or scaled (Gemma-2/3's
    final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling, ...), else None."""
    if hf_config is None:
        return None
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    for name in SCALED_LOGITS:
        value = getattr(text, name, None)
        if value is not None and value != 1:
            return f"this model ({type(hf_config).__name__}) sets {name}={value!r}"
    return None


def check_model(model: Any) -> None:
    """Raise ValueError when actor_rollout_ref.model (a DictConfig) asks for lpreg's fused path
    (use_fused_kernels=True) on a model whose logits are not h @ W.T + b, or with a LoRA adapter on
    lm_head. Reads the model's config.json (as verl's HFModelConfig does), with verl's
    override_config applied."""
    if not model.get("use_fused_kernels", False):
        return
    targets = model.get("target_modules", None)
    if int(model.get("lora_rank", 0) or 0) > 0 and not isinstance(targets, str) and "lm_head" in (targets or ()):
        raise ValueError(f"actor_rollout_ref.model.use_fused_kernels=True with loss_mode=lpreg reads the LM head's "
                         f"weight, but actor_rollout_ref.model.target_modules={list(targets)!r} puts a LoRA adapter "
                         f"on lm_head: drop it, or set actor_rollout_ref.model.use_fused_kernels=False")
    from transformers import AutoConfig
    from verl.utils.fs import copy_to_local

    path = model.get("hf_config_path", None) or model.get("path")
    hf_config = AutoConfig.from_pretrained(copy_to_local(path, use_shm=model.get("use_shm", False)),
                                           trust_remote_code=model.get("trust_remote_code", False))
    for key, value in (model.get("override_config", None) or {}).items():
        if not hasattr(value, "items"):
            setattr(hf_config, key, value)
    reason = scaled_logits(hf_config)
    if reason:
        raise ValueError(f"actor_rollout_ref.model.use_fused_kernels=True with loss_mode=lpreg computes the logits as "
                         f"h @ W.T + b; {reason} (model path {path!r}): set "
                         f"actor_rollout_ref.model.use_fused_kernels=False")


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
