"""loss_mode=lpreg on verl's asynchronous and off-policy trainers (one rank, CPU): each records the
rollout proxy or refuses at start-up, naming the trainer and the setting.

Trainers: the one-step-off-policy trainer (verl.experimental.one_step_off_policy), the fully
asynchronous trainer (verl.experimental.fully_async_policy, a Ray actor class: the class its actor
runs), and the v1 trainers of trainer.v1.trainer_mode colocate_async / separate_async. Each is
started through its own start-up method (tests/integrations/verl_trainers.py `started`: lpreg's check,
then verl's body up to its first Ray call), and the legacy-based ones are driven through the
old-log-prob step their fit_step calls and their _update_actor with the stand-in workers of
test_verl_trainers.py. The v1 ones share PPOTrainer's pass, driven there.

Tolerances: a trainer built on RayPPOTrainer runs RayPPOTrainer's pass and update on the same rows:
its metrics equal RayPPOTrainer's to SAME = 1e-6 (as test_verl_trainers.py).
"""

import importlib
import os
import sys

import pytest

pytest.importorskip("verl", reason="verl is not installed here: run `bash .ci/integrations.sh verl` (own venv)")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import verl_runs as V  # noqa: E402
import verl_trainers as VT  # noqa: E402
from tiny_lm import save_tiny  # noqa: E402

SAME = 1e-6
LOGQ = "lpreg_rollout_logq"
PL = "actor_rollout_ref.actor.policy_loss"
TUNE = ["actor_rollout_ref.rollout.n=1", "trainer.n_gpus_per_node=1", "data.train_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2", "actor_rollout_ref.actor.optim.lr=0.01",
        f"{PL}.lpreg_rho=0.5", f"{PL}.lpreg_threshold=0.2"]
ON, OFF = "actor_rollout_ref.actor.ppo_mini_batch_size=8", "actor_rollout_ref.actor.ppo_mini_batch_size=4"
ASYNC = {"one_step_off": ("verl.experimental.one_step_off_policy.ray_trainer", "OneStepOffRayTrainer"),
         "fully_async": ("verl.experimental.fully_async_policy.fully_async_trainer", "FullyAsyncTrainer"),
         "colocate_async": ("verl.trainer.ppo.v1.trainer_colocate_async", "PPOTrainerColocateAsync"),
         "separate_async": ("verl.trainer.ppo.v1.trainer_separate_async", "PPOTrainerSeparateAsync")}
SYNC = {"v1_sync": ("verl.trainer.ppo.v1.trainer_sync", "PPOTrainerSync"),
        "ray_ppo": ("verl.trainer.ppo.ray_trainer", "RayPPOTrainer")}


def trainer_class(name):
    module, attr = {**ASYNC, **SYNC}[name]
    cls = getattr(importlib.import_module(module), attr)
    return cls.__ray_metadata__.modified_class if hasattr(cls, "__ray_metadata__") else cls  # the actor's class


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    V.init(29549)
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


def config(path, *more):
    return V.compose(VT.docs_overrides() + TUNE + [f"actor_rollout_ref.model.path={path}", *more])


def recipe(name):
    """The batch setting of each recipe: the fully-async rollouter asserts data.train_batch_size=0."""
    return ["data.train_batch_size=0"] if name == "fully_async" else []


@pytest.mark.parametrize("name", [*ASYNC, *SYNC])
def test_start_up_writes_the_decided_proxy(model_path, monkeypatch, name):
    """With batch sizes that make one optimiser step per rollout, the asynchronous trainers still
    decide lpreg_proxy='rollout' (their rollouts were sampled by an older policy) and the synchronous
    ones 'current'; the decision is written into the actor's policy-loss config the workers are
    built from, and the ActorConfig a worker builds carries it."""
    from verl.utils.config import omega_conf_to_dataclass

    cfg = config(model_path, ON, *recipe(name))
    assert cfg.actor_rollout_ref.actor.policy_loss.get("lpreg_proxy", None) is None
    trainer = VT.started(trainer_class(name), cfg, monkeypatch)
    want = "rollout" if name in ASYNC else "current"
    assert trainer.config.actor_rollout_ref.actor.policy_loss.lpreg_proxy == want
    assert omega_conf_to_dataclass(trainer.config.actor_rollout_ref.actor).policy_loss.lpreg_proxy == want


@pytest.mark.parametrize("name", list(ASYNC))
def test_bypass_mode_refused_at_start_up_naming_the_trainer(model_path, monkeypatch, name):
    """algorithm.rollout_correction.bypass_mode=True skips the pass that records the proxy: each
    asynchronous trainer's start-up refuses it, naming the trainer's class and the setting; with
    lpreg_proxy='current' (the user's explicit choice) it starts, and 'current' is written."""
    bypass = ["algorithm.rollout_correction.bypass_mode=True", "actor_rollout_ref.rollout.calculate_log_probs=True"]
    cls = trainer_class(name)
    with pytest.raises(ValueError, match=rf"bypass_mode=True .*trainer .*{ASYNC[name][1]}"):
        VT.started(cls, config(model_path, ON, *recipe(name), *bypass), monkeypatch)
    trainer = VT.started(cls, config(model_path, ON, *recipe(name), *bypass, f"+{PL}.lpreg_proxy=current"),
                         monkeypatch)
    assert trainer.config.actor_rollout_ref.actor.policy_loss.lpreg_proxy == "current"


@pytest.mark.parametrize("name", ["one_step_off", "colocate_async"])
def test_distillation_refused_at_start_up(model_path, monkeypatch, name):
    """distillation.enabled=True routes verl's loss to distillation_ppo_loss, bypassing lpreg: refused
    at start-up, naming the setting and the trainer, before any worker exists."""
    cfg = config(model_path, ON, *recipe(name), "distillation.enabled=True")
    with pytest.raises(ValueError, match=rf"distillation\.enabled=True \(trainer .*{ASYNC[name][1]}\)"):
        VT.started(trainer_class(name), cfg, monkeypatch)


def test_distillation_refused_by_main_ppo_validate_config(model_path, monkeypatch):
    """main_ppo's validate_config (before Ray starts) refuses distillation with loss_mode=lpreg."""
    with pytest.raises(ValueError, match=r"distillation\.enabled=True"):
        VT.main_ppo_runner(config(model_path, ON, "distillation.enabled=True"), monkeypatch)


@pytest.mark.parametrize("name", ["one_step_off", "fully_async"])
def test_legacy_based_async_trainer_records_and_trains_as_ray_ppo(model_path, monkeypatch, name):
    """The one-step-off and fully-async trainers: started (lpreg_proxy='rollout' written), their own
    old-log-prob step (the fully-async one saves the parameter version it recomputes with) records
    the proxy in the batch, in old_log_probs' padded response layout, and their update trains against
    it exactly as RayPPOTrainer does on the same batch."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.utils.config import omega_conf_to_dataclass

    VT.patch_worker_device(monkeypatch)
    trainer = VT.started(trainer_class(name), config(model_path, OFF), monkeypatch)
    if name == "fully_async":
        trainer.local_trigger_step = 1
    actor = omega_conf_to_dataclass(trainer.config.actor_rollout_ref.actor)
    assert actor.policy_loss.lpreg_proxy == "rollout"
    torch.manual_seed(0)
    ours = VT.run_separate(trainer, V.make_engine(model_path, lr=actor.optim.lr), actor, V.rollout_batch(model_path))
    record = ours.batch.batch[LOGQ]
    assert record.shape == ours.batch.batch["old_log_probs"].shape and record.dtype == torch.float32
    mask = ours.batch.batch["response_mask"].bool()
    assert torch.isfinite(record[mask]).any() and (record[~mask] == 0).all()
    if name == "fully_async":
        assert ours.calls == [("save", 1)]
    assert ours.metrics["actor/lpreg_frac"] > 0

    legacy = VT.started(RayPPOTrainer, config(model_path, OFF), monkeypatch)
    assert legacy.config.actor_rollout_ref.actor.policy_loss.lpreg_proxy == "rollout"
    torch.manual_seed(0)
    ref = VT.run_legacy(legacy, V.make_engine(model_path, lr=actor.optim.lr), actor, V.rollout_batch(model_path))
    assert torch.equal(ref.batch.batch[LOGQ], record)
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/lpreg_kl", "actor/lpreg_frac"):
        assert abs(ref.metrics[key] - ours.metrics[key]) <= SAME * max(1.0, abs(ours.metrics[key])), key


def _v1_run(trainer, path, monkeypatch, tq):
    from verl.utils.config import omega_conf_to_dataclass

    VT.patch_worker_device(monkeypatch)
    actor = omega_conf_to_dataclass(trainer.config.actor_rollout_ref.actor)
    torch.manual_seed(0)
    return VT.run_v1(trainer, V.make_engine(path, lr=actor.optim.lr), actor, V.rollout_batch(path), tq)


def _response_layout(rows):
    """The record sits in TransferQueue in old_log_probs' layout: one entry per response token."""
    assert rows[LOGQ].offsets().diff().tolist() == rows["old_log_probs"].offsets().diff().tolist()
    assert rows[LOGQ].offsets().diff().tolist() == rows["response_mask"].offsets().diff().tolist()
    assert rows[LOGQ].dtype == torch.float32 and torch.isfinite(rows[LOGQ].values()).any()


@pytest.mark.parametrize("name", ["colocate_async", "separate_async"])
def test_v1_async_trainer_records_and_trains_as_v1_sync(model_path, monkeypatch, name):
    """v1 colocate_async / separate_async with one optimiser step per rollout: started, they record
    (lpreg_proxy='rollout' written), their own _compute_old_log_prob (separate_async's restores the
    last synchronised parameters around it) puts the record in TransferQueue (in memory here) in
    old_log_probs' layout, and their update equals the sync trainer's with lpreg_proxy='rollout'."""
    trainer = VT.started(trainer_class(name), config(model_path, ON), monkeypatch)
    if name == "separate_async":
        trainer.local_trigger_step = 0
    tq = VT.FakeTQ()
    tq.install(monkeypatch)
    ours = _v1_run(trainer, model_path, monkeypatch, tq)
    _response_layout(ours.rows)
    if name == "separate_async":
        assert getattr(trainer.actor_rollout_wg, "calls", []) == [("save", 0)]
    sync = VT.started(trainer_class("v1_sync"), config(model_path, ON, f"+{PL}.lpreg_proxy=rollout"), monkeypatch)
    tq = VT.FakeTQ()
    tq.install(monkeypatch)
    ref = _v1_run(sync, model_path, monkeypatch, tq)
    assert torch.equal(ref.rows[LOGQ].values(), ours.rows[LOGQ].values())
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/lpreg_kl", "actor/lpreg_frac"):
        assert abs(ref.metrics[key] - ours.metrics[key]) <= SAME * max(1.0, abs(ours.metrics[key])), key


@pytest.mark.slow
@pytest.mark.parametrize("compat", ["released", "paper"])
def test_v1_records_through_transfer_queue_controller(model_path, monkeypatch, compat):
    """The default v1 trainer, off-policy, with TransferQueue's own controller and storage (Ray
    actors, local Ray): the worker's record goes through TransferQueue's put / get, its dtype and
    shape checks included, in old_log_probs' response layout (paper: the sparse top-k record too),
    and the update trains against it."""
    import ray
    import transfer_queue as tq

    cfg = config(model_path, OFF, f"{PL}.lpreg_compat={compat}",
                 f"{PL}.lpreg_threshold={0.2 if compat == 'released' else 0.02}")
    monkeypatch.setenv("RAY_raylet_start_wait_time_s", "600")  # a loaded 2-core machine starts Ray slowly
    # logical CPUs (scheduling slots): TransferQueue's controller and each of its storage units (verl's
    # config: 8) take one
    ray.init(num_cpus=16, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        tq.init(cfg.transfer_queue)
        trainer = VT.started(trainer_class("v1_sync"), cfg, monkeypatch)
        assert trainer.config.actor_rollout_ref.actor.policy_loss.lpreg_proxy == "rollout"
        ours = _v1_run(trainer, model_path, monkeypatch, tq)
        _response_layout(ours.rows)
        if compat == "paper":
            idx = ours.rows["lpreg_proxy_indices"]
            assert idx.dtype == torch.int32
            assert idx.offsets().diff().tolist() == ours.rows[LOGQ].offsets().diff().tolist()
        assert ours.metrics["actor/lpreg_frac"] > 0
    finally:
        tq.close()
        ray.shutdown()
