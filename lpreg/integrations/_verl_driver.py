"""Driver side of the rollout proxy in verl: the old-log-prob pass records q, the batch keeps it.

verl's `RayPPOTrainer._compute_old_log_prob` asks the actor workers for log-probs and entropies
and keeps those two outputs. When loss_mode=lpreg and the proxy comes from the rollout
(`lpreg_proxy`, default: whenever a rollout is trained on by more than one optimiser step,
train_batch_size > ppo_mini_batch_size or ppo_epochs > 1), the wrapper below adds a request to
that same call (a non-tensor batch entry read by lpreg's engine: no extra forward) and moves
the recorded proxy into the batch next to old_log_probs, so every mini-batch and epoch of the
rollout trains against it.
"""

import functools
import warnings

from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import no_padding_2_padding

from . import _proxy
from ._verl_config import is_lpreg, lpreg_options
from ._verl_engine import RECORD_KEY, record_spec


def off_policy(config) -> bool:
    """Whether an actor update takes more than one optimiser step per rollout."""
    actor = config.actor_rollout_ref.actor
    return int(actor.get("ppo_epochs", 1)) > 1 or int(config.data.train_batch_size) > int(actor.ppo_mini_batch_size)


def wants_record(config) -> bool:
    actor = config.actor_rollout_ref.actor
    if not is_lpreg(actor):
        return False
    return _proxy.use_rollout(lpreg_options(actor.policy_loss)["lpreg_proxy"], off_policy(config))


def compute_old_log_prob_with_proxy(original, trainer, batch):
    """`original(trainer, batch)` with the rollout proxy recorded by the same worker call."""
    if not wants_record(trainer.config):
        return original(trainer, batch)
    wg = trainer.actor_rollout_wg
    real = wg.compute_log_prob
    seen = {}

    def compute_log_prob(td):
        seen["td"], seen["out"] = td, real(td)
        return seen["out"]

    batch.meta_info[RECORD_KEY] = record_spec(trainer.config.actor_rollout_ref.actor.policy_loss)
    wg.compute_log_prob = compute_log_prob
    try:
        old_log_prob, mfu = original(trainer, batch)
    finally:
        wg.compute_log_prob = real
        batch.meta_info.pop(RECORD_KEY, None)
    for key in (_proxy.ROLLOUT_LOGQ, *_proxy.SPARSE_KEYS):
        value = tu.get(seen["out"], key)
        if value is not None:
            value = no_padding_2_padding(value, seen["td"])
            old_log_prob.batch[key] = value.float() if value.is_floating_point() else value
    return old_log_prob, mfu


def install_driver_hook() -> None:
    try:  # the driver's module: its optional dependencies (cachetools, fastapi, uvicorn) may be absent
        from verl.trainer.ppo.ray_trainer import RayPPOTrainer  # in a worker-only environment
    except ImportError as exc:
        warnings.warn(f"lpreg cannot record the rollout proxy in this process (verl.trainer.ppo.ray_trainer: {exc}); "
                      "a driver started here would train against the current policy's proxy", RuntimeWarning,
                      stacklevel=2)
        return
    original = RayPPOTrainer._compute_old_log_prob
    if getattr(original, "_lpreg", False):
        return

    @functools.wraps(original)
    def _compute_old_log_prob(self, batch):
        return compute_old_log_prob_with_proxy(original, self, batch)

    _compute_old_log_prob._lpreg = True
    RayPPOTrainer._compute_old_log_prob = _compute_old_log_prob
