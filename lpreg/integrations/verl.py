"""Lp-Reg as a verl plugin (verl 0.9.x): `actor_rollout_ref.actor.policy_loss.loss_mode=lpreg`.

Loaded by `import verl` through the entry point `[project.entry-points."verl.plugins"]`
(`lpreg = "lpreg.integrations.verl"`), in the driver and in every Ray worker. It

1. registers the policy loss `lpreg` (verl's registry hands a policy loss log-probs only, so
   the real work happens in the engine; reached any other way it raises);
2. swaps verl's FSDP language-model engine (`FSDPEngineWithLMHead`, strategies fsdp and fsdp2)
   for lpreg's (`_verl_engine`): with loss_mode=lpreg its per-token outputs are lpreg's
   statistics, from the logits or, with use_fused_kernels=True, from the hidden states and the
   LM head (`lpreg.fused_linear_token_stats`), and its loss is `lpreg_ppo_loss` (`_verl_loss`:
   verl's ppo_loss with the policy term from `lpreg.policy_loss_from_stats`, verl's global-batch
   normalisation for every loss_agg_mode, verl's dual clip `clip_ratio_c` unless
   lpreg_dual_clip=False); for lpreg_compat=paper it fixes the step-wide lowest-rho set of each
   mini-batch over every micro-batch and data-parallel rank before the first micro-batch;
3. records the rollout proxy at the actor's old-log-prob pass, for response tokens only, and keeps
   it with the batch when a rollout is trained on off-policy (`_verl_driver`, lpreg_proxy): in every
   trainer verl 0.9 ships (the v1 PPOTrainer of main_ppo's default and its sync / colocate_async /
   separate_async modes, RayPPOTrainer, the one-step-off-policy and fully-async trainers), the
   decision taken from the trainer class that runs and written into the actor's config;
4. checks each actor config with loss_mode=lpreg when verl builds it (`_verl_config`): in the
   driver's validate_config and in each worker's init_model, before any rollout; and, at start-up
   (validate_config, the trainer's own start-up method), that the trainer records the proxy, that
   rollout-correction bypass mode does not skip it, and that distillation is off;
5. provides `LpRegPolicyLossConfig`, verl's `PolicyLossConfig` plus the `lpreg_*` fields.

Hydra overrides (docs/integrations.md, "Use with verl"):

    actor_rollout_ref.actor.policy_loss._target_=lpreg.integrations.verl.LpRegPolicyLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=lpreg
    +actor_rollout_ref.actor.policy_loss.lpreg_compat=released  (and lpreg_rho, lpreg_beta, ...)

Not supported (an error names the setting when the actor config is built): strategies other
than fsdp / fsdp2 (Megatron's logits are vocab-parallel), calculate_sum_pi_squared, the prefix
grouper, top-k distillation, and the sparse rollout proxy with Ulysses sequence parallelism; at
start-up: algorithm.rollout_correction.bypass_mode=True with a rollout proxy, distillation.enabled=True,
and a trainer whose step does not reach lpreg's old-log-prob pass. Scaled or soft-capped logits
(Gemma-2/3, Cohere, Granite) run fused with the model's logit transform.

verl loads plugins inside `try: ... except Exception: logger.debug(...)`, which would hide a
failure; this module reports its own failure as a RuntimeWarning before re-raising it.
"""

import warnings

try:
    from verl.trainer.ppo import core_algos as _core_algos

    from ._verl_config import LOSS_MODE, LpRegPolicyLossConfig, check_actor, install_actor_check, lpreg_options
    from ._verl_driver import install_driver_hook
    from ._verl_engine import LpRegFSDPEngineWithLMHead, install_engine, loss_actor_config
    from ._verl_loss import global_scale, lpreg_ppo_loss
except Exception as exc:  # noqa: BLE001 - reported, then re-raised for verl's plugin loader
    warnings.warn(f"lpreg's verl plugin (loss_mode=lpreg) failed to load and is not installed: "
                  f"{type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)
    raise

__all__ = ["LOSS_MODE", "LpRegPolicyLossConfig", "LpRegFSDPEngineWithLMHead", "lpreg_ppo_loss", "global_scale",
           "check_actor", "lpreg_options", "loss_actor_config", "compute_policy_loss_lpreg"]


@_core_algos.register_policy_loss(LOSS_MODE)
def compute_policy_loss_lpreg(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean",
                              config=None, rollout_is_weights=None):
    """Registered so that verl accepts loss_mode=lpreg; the loss itself needs the logits."""
    raise NotImplementedError(
        "loss_mode=lpreg needs the logits or hidden states, which only lpreg's FSDP engine passes on (strategy "
        "fsdp / fsdp2, installed by `import verl` when lpreg is installed). Megatron's vocab-parallel logits are "
        "not supported.")


install_engine()
install_actor_check()
install_driver_hook()
assert _core_algos.get_policy_loss_fn(LOSS_MODE) is compute_policy_loss_lpreg
