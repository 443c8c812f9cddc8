"""Driver side of loss_mode=lpreg in verl: the rollout proxy recorded at the old-log-prob pass, and
the start-up checks that the trainer verl runs is one that records it.

The proxy. With `lpreg_proxy` "rollout" (default: whenever a rollout is trained on by more than
one optimiser step, train_batch_size > ppo_mini_batch_size or ppo_epochs > 1), the trainer's
`_compute_old_log_prob` adds a request to its worker call (a batch-level entry read by lpreg's
engine: no extra forward) and keeps the recorded proxy next to old_log_probs, so every
mini-batch and epoch of the rollout trains against it. verl 0.9 ships two trainers:

- `verl.trainer.ppo.v1.trainer_base.PPOTrainer` (main_ppo's default, trainer.use_v1=True, its
  subclass chosen by trainer.v1.trainer_mode): the request goes in the batch's `extra_info`;
  the worker's outputs (the proxy among them) are kept by verl's TransferQueue as it keeps
  log_probs; the wrapper moves them to the response layout of old_log_probs;
- `verl.trainer.ppo.ray_trainer.RayPPOTrainer` (trainer.use_v1=False): the request goes in the
  worker call's batch; the wrapper takes the proxy from the worker's output into the batch.

Both classes are wrapped when their module is imported (only the driver imports them). The
start-up check (`check_run`) runs in verl's `validate_config` (main_ppo calls it before Ray starts)
and again when the trainer initialises (`PPOTrainer.init`, `RayPPOTrainer.init_workers`), before
any rollout: for loss_mode=lpreg with a rollout proxy it raises, naming verl's version, when the
trainer that will run (verl's own choice for this config) does not call lpreg's wrapped
`_compute_old_log_prob`, and when algorithm.rollout_correction.bypass_mode=True skips that pass.
"""

import functools
import importlib.abc
import importlib.util
import json
import sys
from typing import Any, Optional

from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import no_padding_2_padding

from . import _proxy
from ._verl_config import check_model, is_lpreg, lpreg_options
from ._verl_engine import RECORD_KEY, record_spec

LEGACY = "verl.trainer.ppo.ray_trainer"  # RayPPOTrainer
V1 = "verl.trainer.ppo.v1.trainer_base"  # PPOTrainer, the base of main_ppo's default trainers
CONFIG = "verl.utils.config"  # validate_config
# per trainer module: (class, the method that calls _compute_old_log_prob, the start-up method)
_TRAINERS = {LEGACY: ("RayPPOTrainer", "fit", "init_workers"), V1: ("PPOTrainer", "_step_once", "init")}


def off_policy(config) -> bool:
    """Whether an actor update takes more than one optimiser step per rollout."""
    actor = config.actor_rollout_ref.actor
    return int(actor.get("ppo_epochs", 1)) > 1 or int(config.data.train_batch_size) > int(actor.ppo_mini_batch_size)


def wants_record(config) -> bool:
    actor = config.actor_rollout_ref.actor
    if not is_lpreg(actor):
        return False
    return _proxy.use_rollout(lpreg_options(actor.policy_loss)["lpreg_proxy"], off_policy(config))


def _verl_version() -> str:
    import verl

    return getattr(verl, "__version__", "unknown")


def _name(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _bypass(config) -> bool:
    algorithm = config.get("algorithm", None) if hasattr(config, "get") else getattr(config, "algorithm", None)
    corr = algorithm.get("rollout_correction", None) if algorithm is not None else None
    return bool(corr and corr.get("bypass_mode", False))


def _why_record(config) -> str:
    o = lpreg_options(config.actor_rollout_ref.actor.policy_loss)
    actor = config.actor_rollout_ref.actor
    return (f"lpreg_proxy={o['lpreg_proxy']!r} with data.train_batch_size={config.data.train_batch_size}, "
            f"ppo_mini_batch_size={actor.ppo_mini_batch_size}, ppo_epochs={actor.get('ppo_epochs', 1)}")


def selected_trainer_class(config):
    """The trainer class verl 0.9's `main_ppo` runs for `config`: with trainer.use_v1 (the default)
    TaskRunnerV1 runs `get_trainer_cls(trainer.v1.trainer_mode)`, else main_ppo_v0's RayPPOTrainer."""
    trainer = config.trainer
    if "use_v1" not in trainer:
        raise RuntimeError(f"verl {_verl_version()}: lpreg's verl adapter chooses the trainer as verl 0.9's main_ppo "
                           f"does (trainer.use_v1); this config has no trainer.use_v1, so the trainer that will run "
                           f"and its old-log-prob pass are unknown")
    if trainer.use_v1:
        from verl.trainer.ppo.v1 import get_trainer_cls

        return get_trainer_cls(trainer.v1.trainer_mode)
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    return RayPPOTrainer


def _records(cls) -> Optional[str]:
    """None when the trainer `cls` runs lpreg's wrapped _compute_old_log_prob from its step loop,
    else why not. An override that calls super()._compute_old_log_prob (verl's separate_async
    trainer) counts as running the wrapped one."""
    caller = None
    for module, (base, step, _) in _TRAINERS.items():
        base_cls = getattr(sys.modules.get(module), base, None)
        if base_cls is not None and issubclass(cls, base_cls):
            caller = step
    if caller is None:
        return (f"it is neither {LEGACY}.RayPPOTrainer nor a subclass of {V1}.PPOTrainer (the trainers whose "
                f"old-log-prob pass lpreg wraps)")
    code = getattr(getattr(cls, caller, None), "__code__", None)
    if code is None or "_compute_old_log_prob" not in code.co_names:
        return f"its {caller} does not call _compute_old_log_prob"
    for klass in cls.__mro__:
        fn = klass.__dict__.get("_compute_old_log_prob")
        if fn is None:
            continue
        if getattr(fn, "_lpreg", False):
            return None
        names = getattr(getattr(fn, "__code__", None), "co_names", ())
        if "super" in names and "_compute_old_log_prob" in names:
            continue  # delegates to the next class's
        return f"{_name(klass)}._compute_old_log_prob replaces lpreg's wrapped one"
    return "no class in its MRO has lpreg's wrapped _compute_old_log_prob (lpreg's driver hook did not run)"


def check_run(config, trainer_cls=None) -> None:
    """Raise, before any rollout, when loss_mode=lpreg cannot get its rollout proxy in this run."""
    actor = config.actor_rollout_ref.actor
    if not is_lpreg(actor):
        return
    check_model(config.actor_rollout_ref.model)
    if not wants_record(config):
        return
    if _bypass(config):
        raise ValueError(f"algorithm.rollout_correction.bypass_mode=True skips the actor's old-log-prob pass, where "
                         f"loss_mode=lpreg records the rollout proxy it needs here ({_why_record(config)}); set "
                         f"algorithm.rollout_correction.bypass_mode=False, or lpreg_proxy='current' (q from the "
                         f"policy being trained)")
    cls = trainer_cls if trainer_cls is not None else selected_trainer_class(config)
    why = _records(cls)
    if why is not None:
        raise RuntimeError(f"verl {_verl_version()}: loss_mode=lpreg records the rollout proxy ({_why_record(config)}) "
                           f"in the old-log-prob pass of {LEGACY}.RayPPOTrainer or {V1}.PPOTrainer; this run's "
                           f"trainer is {_name(cls)}, and {why}. Without the record the off-policy updates would use "
                           f"the current policy as q; lpreg_proxy='current' runs without it")


# ---- the old-log-prob pass of each trainer


def legacy_compute_old_log_prob(original, trainer, batch):
    """RayPPOTrainer: `original(trainer, batch)` with the rollout proxy recorded by the same worker call."""
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
    _require(seen.get("out"))
    for key in (_proxy.ROLLOUT_LOGQ, *_proxy.SPARSE_KEYS):
        value = tu.get(seen["out"], key)
        if value is not None:
            value = no_padding_2_padding(value, seen["td"])
            old_log_prob.batch[key] = value.float() if value.is_floating_point() else value
    return old_log_prob, mfu


def v1_compute_old_log_prob(original, trainer, batch, metrics):
    """v1 PPOTrainer: the request rides in the batch's extra_info (verl hands it to the worker as a
    batch-level entry); the worker's outputs go to TransferQueue with log_probs; the proxy is then
    moved to old_log_probs' layout (response tokens only), as verl moves log_probs."""
    if not wants_record(trainer.config):
        return original(trainer, batch, metrics)
    if _bypass(trainer.config):  # check_run refuses this at start-up
        raise ValueError("algorithm.rollout_correction.bypass_mode=True skips the old-log-prob pass that records "
                         "lpreg's rollout proxy")
    import transfer_queue as tq
    from tensordict import TensorDict
    from verl.workers.utils.padding import response_from_nested

    spec = record_spec(trainer.config.actor_rollout_ref.actor.policy_loss)
    batch.extra_info[RECORD_KEY] = spec
    out = None
    try:
        out = original(trainer, batch, metrics)
    finally:  # the request is for this pass only (the ref, critic and update passes reuse the batch)
        for meta in (batch, out):
            if getattr(meta, "extra_info", None):
                meta.extra_info.pop(RECORD_KEY, None)
    keys = [_proxy.ROLLOUT_LOGQ, *(_proxy.SPARSE_KEYS if json.loads(spec)["sparse"] else ())]
    if getattr(out, "fields", None) is not None and _proxy.ROLLOUT_LOGQ not in out.fields:
        _require(None)
    data = tq.kv_batch_get(keys=out.keys, partition_id=out.partition_id, select_fields=[*keys, "response_mask"])
    _require(data)
    moved = {}
    for key in keys:
        value = response_from_nested(data[key], data["response_mask"])
        moved[key] = value.float() if value.is_floating_point() else value
    tq.kv_batch_put(keys=out.keys, partition_id=out.partition_id, fields=TensorDict(moved, batch_size=len(out.keys)))
    return out


def _require(output) -> None:
    if output is None or _proxy.ROLLOUT_LOGQ not in output.keys():
        raise RuntimeError(f"verl {_verl_version()}: the actor's old-log-prob pass returned no rollout proxy "
                           f"({_proxy.ROLLOUT_LOGQ}) although lpreg asked for one: the actor's engine is not lpreg's "
                           f"(actor strategy fsdp / fsdp2, lpreg installed in every Ray worker's environment)")


# ---- installing the wrappers


def _wrap(cls, name, make):
    original = cls.__dict__[name]
    if getattr(original, "_lpreg", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._lpreg = True
    setattr(cls, name, wrapper)


def _patch_trainer(module) -> None:
    cls = getattr(module, _TRAINERS[module.__name__][0])
    start = _TRAINERS[module.__name__][2]
    if module.__name__ == V1:
        _wrap(cls, "_compute_old_log_prob",
              lambda f: lambda self, batch, metrics: v1_compute_old_log_prob(f, self, batch, metrics))
    else:
        _wrap(cls, "_compute_old_log_prob", lambda f: lambda self, batch: legacy_compute_old_log_prob(f, self, batch))

    def make_start(f):
        def start_and_check(self, *args, **kwargs):
            check_run(self.config, type(self))  # before the workers, the rollout servers and any rollout
            return f(self, *args, **kwargs)
        return start_and_check

    _wrap(cls, start, make_start)


def _patch_config(module) -> None:
    def make(f):
        def validate_config(config, *args, **kwargs):
            out = f(config, *args, **kwargs)
            check_run(config)
            return out
        return validate_config

    original = module.validate_config
    if not getattr(original, "_lpreg", False):
        wrapper = functools.wraps(original)(make(original))
        wrapper._lpreg = True  # type: ignore[attr-defined]  # a marker: patched once
        module.validate_config = wrapper


_PATCHES = {LEGACY: _patch_trainer, V1: _patch_trainer, CONFIG: _patch_config}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches verl's trainer modules right after they are imported: only the driver imports them,
    and importing them here would pull Ray, TransferQueue and the driver's web stack into every worker."""

    def find_spec(self, name, path=None, target=None):
        if name not in _PATCHES or name in sys.modules:
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
            _PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


def install_driver_hook() -> None:
    """Wrap the trainers' old-log-prob passes and verl's validate_config now for the modules already
    imported, and the others as soon as they are."""
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def patched(obj: Any) -> bool:
    """Whether `obj` (a function) is one of lpreg's wrappers."""
    return bool(getattr(obj, "_lpreg", False))
