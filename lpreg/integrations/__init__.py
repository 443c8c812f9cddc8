"""Drop-in Lp-Reg for training frameworks users already run.

- `lpreg.integrations.trl`: `LpRegGRPOConfig` / `LpRegGRPOTrainer`, subclasses of TRL's GRPO
  config and trainer (extra `lpreg[trl]`, trl 1.16.x).
- `lpreg.integrations.verl`: a verl plugin (entry point group `verl.plugins`) that makes
  `actor_rollout_ref.actor.policy_loss.loss_mode=lpreg` work (extra `lpreg[verl]`, verl 0.9.x).

Nothing here is imported by `import lpreg`: each module imports its framework, which the
core package does not depend on. docs/integrations.md shows both in use.
"""
