"""Driver side of loss_mode=lpreg in verl: the rollout proxy recorded at the old-log-prob pass, and
the start-up checks that the trainer verl runs is one that records it.

The proxy. With `lpreg_proxy` "rollout" the trainer's `_compute_old_log_prob` adds a request to
its worker call (a batch-level entry read by lpreg's engine: no extra forward); the engine returns
the record for response tokens only, in old_log_probs' jagged layout, and it travels with the
batch to every mini-batch and epoch of the update. Which trainers (docs/integrations.md,
"Asynchronous and off-policy trainers"):

- `verl.trainer.ppo.v1.trainer_base.PPOTrainer` (main_ppo's default, trainer.use_v1=True) and its
  subclasses PPOTrainerSync / PPOTrainerColocateAsync / PPOTrainerSeparateAsync
  (trainer.v1.trainer_mode): the request goes in the batch's `extra_info`; the worker's outputs,
  the record among them, go to TransferQueue with log_probs; the driver moves no record bytes;
- `verl.trainer.ppo.ray_trainer.RayPPOTrainer` (trainer.use_v1=False) and the trainers built on it,
  `SeparateRayPPOTrainer`, `OneStepOffRayTrainer` (verl.experimental.one_step_off_policy) and
  `FullyAsyncTrainer` (verl.experimental.fully_async_policy, whose _compute_old_log_prob restores
  the parameters of the last synchronisation and calls RayPPOTrainer's): the request goes in the
  worker call's batch; the record joins old_log_probs in the batch (padded as the legacy batch is,
  one vectorised copy).

The decision (`decide_proxy`), made once when the trainer starts and written into
actor_rollout_ref.actor.policy_loss.lpreg_proxy, so that every worker's loss sees it (a loss with
lpreg_proxy="rollout" and no record in its batch raises): the user's explicit value; else
"rollout" for the asynchronous trainers (one-step-off, fully async, v1 colocate_async /
separate_async: a rollout's tokens were sampled by an older policy, whatever the batch sizes) and
for a synchronous one whose update takes more than one optimiser step per rollout
(train_batch_size > ppo_mini_batch_size or ppo_epochs > 1); else "current".

The start-up check (`check_run`) runs in verl's `validate_config` (main_ppo and the one-step-off
recipe call it before any rollout; main_ppo's with the class its own selection builds) and when the
trainer starts (`PPOTrainer.init`, `RayPPOTrainer.init_workers`, `SeparateRayPPOTrainer.init_workers`,
and the async `FullyAsyncTrainer.init_workers`, which overrides it without super(): the class that
actually runs, before its workers exist; the fully-async recipe never calls validate_config). It
raises, naming the trainer and the setting, for distillation (verl routes the loss to
distillation_ppo_loss), for a rollout proxy when algorithm.rollout_correction.bypass_mode=True
skips the old-log-prob pass, and when the trainer does not call lpreg's wrapped
`_compute_old_log_prob` (naming verl's version).
"""

import functools
import importlib
import importlib.abc
import importlib.util
import inspect
import sys
from typing import Any, Callable, Dict, Optional

from verl.utils import tensordict_utils as tu

from . import _proxy
from ._verl_config import check_model, is_lpreg, lpreg_options
from ._verl_engine import RECORD_KEY, record_spec

LEGACY = "verl.trainer.ppo.ray_trainer"  # RayPPOTrainer
SEPARATE = "verl.experimental.separation.ray_trainer"  # SeparateRayPPOTrainer: one-step-off, fully async
FULLY_ASYNC = "verl.experimental.fully_async_policy.fully_async_trainer"  # FullyAsyncTrainer (a Ray actor)
V1 = "verl.trainer.ppo.v1.trainer_base"  # PPOTrainer, the base of main_ppo's default trainers
CONFIG = "verl.utils.config"  # validate_config
MAIN = "verl.trainer.main_ppo"  # main_ppo's own binding of validate_config
# per trainer module: (class, the method that calls _compute_old_log_prob, the start-up method); a
# subclass of a later entry takes that entry's step method
_TRAINERS = {LEGACY: ("RayPPOTrainer", "fit", "init_workers"),
             SEPARATE: ("SeparateRayPPOTrainer", "_fit_compute_log_prob", "init_workers"),
             V1: ("PPOTrainer", "_step_once", "init")}
# trainers whose rollouts were sampled by an older policy than the one the update starts from
ASYNC_TRAINERS = ("verl.experimental.one_step_off_policy.ray_trainer.OneStepOffRayTrainer",
                  "verl.experimental.fully_async_policy.fully_async_trainer.FullyAsyncTrainer",
                  "verl.trainer.ppo.v1.trainer_colocate_async.PPOTrainerColocateAsync",
                  "verl.trainer.ppo.v1.trainer_separate_async.PPOTrainerSeparateAsync")
V1_SYNC = "verl.trainer.ppo.v1.trainer_sync.PPOTrainerSync"


def off_policy(config) -> bool:
    """Whether an actor update takes more than one optimiser step per rollout."""
    actor = config.actor_rollout_ref.actor
    return int(actor.get("ppo_epochs", 1)) > 1 or int(config.data.train_batch_size) > int(actor.ppo_mini_batch_size)


def _mro_names(cls) -> set:
    return {_name(k) for k in getattr(cls, "__mro__", ())}


def asynchronous(cls) -> bool:
    """Whether the trainer `cls` trains on rollouts sampled by an older policy than the update's own:
    verl's one-step-off-policy and fully-async trainers, the v1 trainers other than PPOTrainerSync."""
    names = _mro_names(cls)
    if any(n in names for n in ASYNC_TRAINERS):
        return True
    return f"{V1}.PPOTrainer" in names and V1_SYNC not in names


def decide_proxy(config, trainer_cls=None) -> str:
    """"rollout" or "current": the user's lpreg_proxy, else the rule of the module docstring."""
    source = lpreg_options(config.actor_rollout_ref.actor.policy_loss)["lpreg_proxy"]
    if source is not None:
        return source
    if trainer_cls is not None and asynchronous(trainer_cls):
        return "rollout"
    return "rollout" if off_policy(config) else "current"


def wants_record(config, trainer_cls=None) -> bool:
    actor = config.actor_rollout_ref.actor
    if not is_lpreg(actor):
        return False
    return decide_proxy(config, trainer_cls) == "rollout"


def _verl_version() -> str:
    import verl

    return getattr(verl, "__version__", "unknown")


def _name(cls) -> str:
    cls = getattr(cls, "__ray_actor_class__", cls)  # a Ray actor's class: the class it was made from
    return f"{cls.__module__}.{cls.__qualname__}"


def _bypass(config) -> bool:
    algorithm = config.get("algorithm", None) if hasattr(config, "get") else getattr(config, "algorithm", None)
    corr = algorithm.get("rollout_correction", None) if algorithm is not None else None
    return bool(corr and corr.get("bypass_mode", False))


def _distillation(config) -> bool:
    dist = config.get("distillation", None) if hasattr(config, "get") else getattr(config, "distillation", None)
    return bool(dist is not None and dist.get("enabled", False))


def _why_record(config, trainer_cls=None) -> str:
    o = lpreg_options(config.actor_rollout_ref.actor.policy_loss)
    actor = config.actor_rollout_ref.actor
    trainer = "" if trainer_cls is None else f"trainer {_name(trainer_cls)}, "
    return (f"{trainer}lpreg_proxy={o['lpreg_proxy']!r} with data.train_batch_size={config.data.train_batch_size}, "
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


def _unwrap(fn):
    """A method without the decorators around it (Ray's tracing wrappers on an actor class's methods),
    stopping at lpreg's own wrapper."""
    return None if fn is None else inspect.unwrap(fn, stop=lambda f: getattr(f, "_lpreg", False))


def _records(cls) -> Optional[str]:
    """None when the trainer `cls` runs lpreg's wrapped _compute_old_log_prob from its step loop,
    else why not. An override that calls super()._compute_old_log_prob (verl's separate_async and
    fully-async trainers) counts as running the wrapped one."""
    caller = None
    for module, (base, step, _) in _TRAINERS.items():
        base_cls = getattr(sys.modules.get(module), base, None)
        if isinstance(base_cls, type) and isinstance(cls, type) and issubclass(cls, base_cls):
            caller = step
    if caller is None:
        return (f"it is neither {LEGACY}.RayPPOTrainer nor a subclass of {V1}.PPOTrainer (the trainers whose "
                f"old-log-prob pass lpreg wraps)")
    code = getattr(_unwrap(getattr(cls, caller, None)), "__code__", None)
    if code is None or "_compute_old_log_prob" not in code.co_names:
        return f"its {caller} does not call _compute_old_log_prob"
    for klass in cls.__mro__:
        fn = _unwrap(klass.__dict__.get("_compute_old_log_prob"))
        if fn is None:
            continue
        if getattr(fn, "_lpreg", False):
            return None
        names = getattr(getattr(fn, "__code__", None), "co_names", ())
        if "super" in names and "_compute_old_log_prob" in names:
            continue  # delegates to the next class's
        return f"{_name(klass)}._compute_old_log_prob replaces lpreg's wrapped one"
    return "no class in its MRO has lpreg's wrapped _compute_old_log_prob (lpreg's driver hook did not run)"


def check_run(config, trainer_cls=None, *, write: bool = False) -> Optional[str]:
    """Raise, before any rollout, when loss_mode=lpreg cannot run as configured with the trainer
    `trainer_cls` (None: not known yet, the class-free checks only). With `write`, the decided
    lpreg_proxy is written into actor_rollout_ref.actor.policy_loss. Returns the decision (None
    without loss_mode=lpreg)."""
    actor = config.actor_rollout_ref.actor
    if not is_lpreg(actor):
        return None
    trainer = "" if trainer_cls is None else f" (trainer {_name(trainer_cls)})"
    if _distillation(config):
        raise ValueError(f"distillation.enabled=True{trainer}: verl then trains with its distillation_ppo_loss, "
                         f"which bypasses loss_mode=lpreg; set distillation.enabled=False or use another loss_mode")
    check_model(config.actor_rollout_ref.model)
    decided = decide_proxy(config, trainer_cls)
    if decided == "rollout":
        if _bypass(config):
            raise ValueError(f"algorithm.rollout_correction.bypass_mode=True skips the actor's old-log-prob pass, "
                             f"where loss_mode=lpreg records the rollout proxy it needs here "
                             f"({_why_record(config, trainer_cls)}); set algorithm.rollout_correction.bypass_mode="
                             f"False, or lpreg_proxy='current' (q from the policy being trained)")
        if trainer_cls is not None:
            why = _records(trainer_cls)
            if why is not None:
                raise RuntimeError(
                    f"verl {_verl_version()}: loss_mode=lpreg records the rollout proxy "
                    f"({_why_record(config, trainer_cls)}) in the old-log-prob pass of {LEGACY}.RayPPOTrainer or "
                    f"{V1}.PPOTrainer; this run's trainer is {_name(trainer_cls)}, and {why}. Without the record "
                    f"the off-policy updates would use the current policy as q; lpreg_proxy='current' runs without it")
    if write:
        open_dict = importlib.import_module("omegaconf").open_dict  # verl's config library

        policy_loss = actor.policy_loss
        with open_dict(policy_loss):
            policy_loss.lpreg_proxy = decided
    return decided


# ---- the old-log-prob pass of each trainer


def padded_responses(value, width: int):
    """A jagged (B, len_b, *) record -> (B, width, *) zero-padded, RayPPOTrainer's response layout:
    one scatter of the values, no Python loop over sequences."""
    import torch

    offsets = value.offsets()
    lens = offsets.diff()
    values = value.values()
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=values.device), lens.to(values.device))
    pos = torch.arange(values.shape[0], device=values.device) - offsets[:-1].to(values.device)[seq]
    out = values.new_zeros((lens.numel(), width, *values.shape[1:]))
    out[seq, pos] = values
    return out


def legacy_compute_old_log_prob(original, trainer, batch):
    """RayPPOTrainer (and the trainers built on it): `original(trainer, batch)` with the rollout proxy
    recorded by the same worker call; the engine returns it for response tokens only, and it joins
    old_log_probs in the batch in the legacy trainer's padded response layout."""
    if not wants_record(trainer.config, type(trainer)):
        return original(trainer, batch)
    if _bypass(trainer.config):  # check_run refuses this at start-up
        raise ValueError("algorithm.rollout_correction.bypass_mode=True skips the old-log-prob pass that records "
                         "lpreg's rollout proxy")
    wg = trainer.actor_rollout_wg
    real = wg.compute_log_prob
    seen = {}

    def compute_log_prob(td):
        seen["out"] = real(td)
        return seen["out"]

    batch.meta_info[RECORD_KEY] = record_spec(trainer.config.actor_rollout_ref.actor.policy_loss)
    wg.compute_log_prob = compute_log_prob
    try:
        old_log_prob, mfu = original(trainer, batch)
    finally:
        wg.compute_log_prob = real
        batch.meta_info.pop(RECORD_KEY, None)
    _require(seen.get("out"))
    width = batch.batch["responses"].shape[1]
    for key in (_proxy.ROLLOUT_LOGQ, *_proxy.SPARSE_KEYS):
        value = tu.get(seen["out"], key)
        if value is not None:
            old_log_prob.batch[key] = padded_responses(value, width) if value.is_nested else value
    return old_log_prob, mfu


def v1_compute_old_log_prob(original, trainer, batch, metrics):
    """v1 PPOTrainer: the request rides in the batch's extra_info (verl hands it to the worker as a
    batch-level entry); the worker's outputs, the record among them in old_log_probs' response
    layout, go to TransferQueue with log_probs. The driver reads only the returned metadata."""
    if not wants_record(trainer.config, type(trainer)):
        return original(trainer, batch, metrics)
    if _bypass(trainer.config):  # check_run refuses this at start-up
        raise ValueError("algorithm.rollout_correction.bypass_mode=True skips the old-log-prob pass that records "
                         "lpreg's rollout proxy")
    batch.extra_info[RECORD_KEY] = record_spec(trainer.config.actor_rollout_ref.actor.policy_loss)
    out = None
    try:
        out = original(trainer, batch, metrics)
    finally:  # the request is for this pass only (the ref, critic and update passes reuse the batch)
        for meta in (batch, out):
            if getattr(meta, "extra_info", None):
                meta.extra_info.pop(RECORD_KEY, None)
    fields = getattr(out, "fields", None)
    if fields is None or _proxy.ROLLOUT_LOGQ not in fields:
        _require(None)
    return out


def _require(output) -> None:
    if output is None or _proxy.ROLLOUT_LOGQ not in output.keys():  # a TensorDict, or None
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


def _make_start(f):
    def check(self):
        # the class that runs, before its workers, rollout servers and any rollout; the decision is
        # written into the config the workers are built from
        check_run(self.config, type(self), write=True)

    if inspect.iscoroutinefunction(_unwrap(f)):  # FullyAsyncTrainer.init_workers (a Ray actor's async method)
        async def start_and_check_async(self, *args, **kwargs):
            check(self)
            out = f(self, *args, **kwargs)
            return await out if inspect.isawaitable(out) else out
        return start_and_check_async

    def start_and_check(self, *args, **kwargs):
        check(self)
        return f(self, *args, **kwargs)
    return start_and_check


def _patch_fully_async(module) -> None:
    """FullyAsyncTrainer overrides init_workers (async, no super()) and is a Ray actor class: the
    start-up check wraps the method on the class Ray instantiates (its tracing wrappers included)
    and on the class it was made from."""
    actor = module.FullyAsyncTrainer
    modified = getattr(getattr(actor, "__ray_metadata__", None), "modified_class", None)
    for cls in (modified, getattr(modified, "__ray_actor_class__", None), actor):
        if isinstance(cls, type) and "init_workers" in cls.__dict__:
            _wrap(cls, "init_workers", _make_start)


def _patch_trainer(module) -> None:
    cls = getattr(module, _TRAINERS[module.__name__][0])
    start = _TRAINERS[module.__name__][2]
    if module.__name__ == V1:
        _wrap(cls, "_compute_old_log_prob",
              lambda f: lambda self, batch, metrics: v1_compute_old_log_prob(f, self, batch, metrics))
    elif module.__name__ == LEGACY:
        _wrap(cls, "_compute_old_log_prob", lambda f: lambda self, batch: legacy_compute_old_log_prob(f, self, batch))
    _wrap(cls, start, _make_start)  # SeparateRayPPOTrainer.init_workers does not call RayPPOTrainer's


def _patch_validate(module, with_class: bool) -> None:
    """verl's validate_config (`module`'s binding): the class-free checks; main_ppo's own binding
    also checks the class main_ppo's selection builds (selected_trainer_class)."""
    original = module.validate_config
    if getattr(original, "_lpreg_class", False) or (getattr(original, "_lpreg", False) and not with_class):
        return
    inner = getattr(original, "__wrapped__", original) if getattr(original, "_lpreg", False) else original

    def make(f):
        def validate_config(config, *args, **kwargs):
            out = f(config, *args, **kwargs)
            check_run(config, selected_trainer_class(config) if with_class and is_lpreg(
                config.actor_rollout_ref.actor) else None)
            return out
        return validate_config

    wrapper = functools.wraps(inner)(make(inner))
    wrapper._lpreg = True  # type: ignore[attr-defined]  # a marker: patched once
    wrapper._lpreg_class = with_class  # type: ignore[attr-defined]
    module.validate_config = wrapper


_PATCHES: Dict[str, Callable[[Any], None]] = {
    LEGACY: _patch_trainer, SEPARATE: _patch_trainer, V1: _patch_trainer, FULLY_ASYNC: _patch_fully_async,
    CONFIG: functools.partial(_patch_validate, with_class=False),
    MAIN: functools.partial(_patch_validate, with_class=True)}


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
