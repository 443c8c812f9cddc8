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
import importlib.abc
import importlib.util
import sys

from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import no_padding_2_padding

from . import _proxy
from ._verl_config import is_lpreg, lpreg_options
from ._verl_engine import RECORD_KEY, record_spec

_DRIVER = "verl.trainer.ppo.ray_trainer"


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


def _patch(module) -> None:
    trainer_cls = module.RayPPOTrainer
    original = trainer_cls._compute_old_log_prob
    if getattr(original, "_lpreg", False):
        return

    @functools.wraps(original)
    def _compute_old_log_prob(self, batch):
        return compute_old_log_prob_with_proxy(original, self, batch)

    _compute_old_log_prob._lpreg = True
    trainer_cls._compute_old_log_prob = _compute_old_log_prob


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches verl's driver module right after it is imported: only the driver imports it, and
    importing it here would pull Ray and the driver's web stack into every worker."""

    def find_spec(self, name, path=None, target=None):
        if name != _DRIVER:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)
            sys.meta_path[:] = [f for f in sys.meta_path if f is not self]

        spec.loader.exec_module = exec_and_patch
        return spec


def install_driver_hook() -> None:
    """Wrap RayPPOTrainer._compute_old_log_prob now if verl's driver module is loaded, else as soon as it is."""
    if _DRIVER in sys.modules:
        _patch(sys.modules[_DRIVER])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
