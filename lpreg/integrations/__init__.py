"""Drop-in Lp-Reg for training frameworks users already run.

- `lpreg.integrations.trl`: `LpRegGRPOConfig` / `LpRegGRPOTrainer`, subclasses of TRL's GRPO
  config and trainer (extra `lpreg[trl]`, trl 1.16.x).
- `lpreg.integrations.verl`: a verl plugin (entry point group `verl.plugins`) that makes
  `actor_rollout_ref.actor.policy_loss.loss_mode=lpreg` work (extra `lpreg[verl]`, verl 0.9.x).

Nothing here is imported by `import lpreg`: each module imports its framework, which the
core package does not depend on. docs/integrations.md shows both in use, docs/recipes/ the
authors' runs. Private modules, one job each: `_proxy` (the rollout-time proxy record, shared),
`_core` (the LossConfig the lpreg_* options are checked with), `_trl_forward` (the TRL model
forward -> statistics, sharded heads), `_verl_config` / `_verl_loss` / `_verl_engine` /
`_verl_driver` (verl's config checks, loss, engine and old-log-prob hook).
"""
