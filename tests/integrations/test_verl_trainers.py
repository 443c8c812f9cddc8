"""loss_mode=lpreg on the trainer `main_ppo` runs: verl's own choice of trainer for the docs' command,
its own old-log-prob pass and update, the rollout proxy, and the start-up checks (one rank, CPU).

The trainer comes from verl's own selection code (tests/integrations/verl_trainers.py: main_ppo's
`main`, then TaskRunnerV1's `run`, stopped inside the trainer's init): with verl 0.9.1's defaults
(trainer.use_v1=True, trainer.v1.trainer_mode=sync) the v1 PPOTrainerSync. A change of verl's
default changes the class these tests train with. RayPPOTrainer (trainer.use_v1=False) is run too.
Only the worker group (verl's worker methods on this process), TransferQueue (in memory) and the
rollout (HF generate) are stand-ins.

Tolerances: the v1 and the legacy trainer run the same engine, worker methods and loss on the
same rows in the same micro-batches: their metrics agree to SAME = 1e-6 (fp32 reductions of the
same values; seen: equal). "Differs" (the rollout proxy against the current policy's, on the
second, off-policy mini-batch) is checked against 1e-4, 100 x SAME.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("verl", reason="verl is not installed here: run `bash .ci/integrations.sh verl` (own venv)")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import verl_runs as V  # noqa: E402
import verl_trainers as VT  # noqa: E402
from tiny_lm import save_tiny  # noqa: E402

SAME, DIFFERS = 1e-6, 1e-4
LOGQ = "lpreg_rollout_logq"
# the docs' command at tiny sizes: 8 prompts x 1 response, micro-batches of 2, lr 1e-2; rho and the
# filter loose enough that Lp-Reg selects tokens (rho = 0.01 selects none among ~40 tokens)
TUNE = ["actor_rollout_ref.rollout.n=1", "data.train_batch_size=8", "trainer.n_gpus_per_node=1",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2", "actor_rollout_ref.actor.optim.lr=0.01",
        "actor_rollout_ref.actor.policy_loss.lpreg_rho=0.5", "actor_rollout_ref.actor.policy_loss.lpreg_threshold=0.2"]
OFF, ON = "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_mini_batch_size=8"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    V.init(29547)
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


def config(path, *more):
    return V.compose(VT.docs_overrides() + TUNE + [f"actor_rollout_ref.model.path={path}", *more])


def train(trainer, path, monkeypatch):
    """One rollout batch through `trainer`'s own _compute_old_log_prob and _update_actor; the actor's
    config built from the trainer's, as verl's worker builds it."""
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.utils.config import omega_conf_to_dataclass

    VT.patch_worker_device(monkeypatch)
    actor = omega_conf_to_dataclass(trainer.config.actor_rollout_ref.actor)
    torch.manual_seed(0)
    engine = V.make_engine(path, lr=actor.optim.lr)
    batch = V.rollout_batch(path)
    if isinstance(trainer, RayPPOTrainer):
        return VT.run_legacy(trainer, engine, actor, batch)
    tq = VT.FakeTQ()
    tq.install(monkeypatch)
    return VT.run_v1(trainer, engine, actor, batch, tq)


def test_import_verl_wraps_the_trainers_main_ppo_runs():
    """In a fresh interpreter: after `import verl`, the old-log-prob pass and the start-up method of
    both trainers verl ships, and the validate_config main_ppo calls, are lpreg's wrappers."""
    code = ("import verl\n"
            "from verl.trainer import main_ppo\n"
            "from verl.trainer.ppo.v1 import PPOTrainer\n"
            "from verl.trainer.ppo.ray_trainer import RayPPOTrainer\n"
            "fns = [PPOTrainer._compute_old_log_prob, PPOTrainer.init, RayPPOTrainer._compute_old_log_prob,\n"
            "       RayPPOTrainer.init_workers, main_ppo.validate_config]\n"
            "assert all(getattr(f, '_lpreg', False) for f in fns), [getattr(f, '_lpreg', False) for f in fns]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("compat", ["released", "paper"])
def test_default_trainer_records_the_rollout_proxy_off_policy(model_path, monkeypatch, compat):
    """The docs' command, off-policy (train_batch_size 8 > ppo_mini_batch_size 4: two optimiser steps
    per rollout): the trainer verl selects records q in its old-log-prob pass (TransferQueue keeps it,
    in old_log_probs' response layout; the paper form's full KL: also the sparse top-k record), the
    update trains against it (its loss differs from lpreg_proxy=current's), and it equals
    RayPPOTrainer's run of the same batch."""
    from verl.trainer.ppo.v1 import PPOTrainer

    # the paper form's KL reads q over the kept set: min-p's default kappa = 0.02 keeps several tokens (at
    # 0.2 mostly the top one, whose KL is the same against any q)
    form = (f"actor_rollout_ref.actor.policy_loss.lpreg_compat={compat}",
            f"actor_rollout_ref.actor.policy_loss.lpreg_threshold={0.2 if compat == 'released' else 0.02}")
    cfg = config(model_path, OFF, *form)
    trainer = VT.selected_trainer(cfg, monkeypatch)
    print(f"main_ppo's trainer for the docs' command: {type(trainer).__module__}.{type(trainer).__qualname__}")
    ours = train(trainer, model_path, monkeypatch)
    if isinstance(trainer, PPOTrainer):
        rows = ours.rows
        assert LOGQ in rows.keys()
        assert rows[LOGQ].offsets().diff().tolist() == rows["response_mask"].offsets().diff().tolist()
        assert torch.isfinite(rows[LOGQ].values()).any()
        assert ("lpreg_proxy_indices" in rows.keys()) == (compat == "paper")
        if compat == "paper":
            assert rows["lpreg_proxy_indices"].offsets().diff().tolist() == rows[LOGQ].offsets().diff().tolist()
        assert "lpreg_record" not in (ours.meta.extra_info or {})
    m = ours.metrics
    assert m["actor/lpreg_frac"] > 0 and m["actor/pg_loss"] == m["actor/pg_loss"], m

    current = train(VT.selected_trainer(config(model_path, OFF, *form, "+actor_rollout_ref.actor.policy_loss."
                                                                       "lpreg_proxy=current"), monkeypatch),
                    model_path, monkeypatch)
    if isinstance(trainer, PPOTrainer):
        assert LOGQ not in current.rows.keys()
    assert abs(current.metrics["actor/pg_loss"] - m["actor/pg_loss"]) > DIFFERS  # the second step's q differs

    legacy = train(VT.legacy_trainer(config(model_path, OFF, *form, "trainer.use_v1=False")), model_path, monkeypatch)
    assert LOGQ in legacy.batch.batch.keys()
    keys = ("actor/pg_loss", "actor/loss", "actor/grad_norm", "actor/lpreg_kl", "actor/lpreg_frac")
    print(f"{compat}: v1 vs RayPPOTrainer, max |diff| {max(abs(legacy.metrics[k] - m[k]) for k in keys):.1e}; "
          f"rollout vs current q, pg_loss {abs(current.metrics['actor/pg_loss'] - m['actor/pg_loss']):.1e}")
    for key in keys:
        assert abs(legacy.metrics[key] - m[key]) <= SAME * max(1.0, abs(m[key])), (key, legacy.metrics[key], m[key])


def test_default_trainer_on_policy_records_nothing(model_path, monkeypatch):
    """On-policy (one optimiser step per rollout) the trainer verl selects records no proxy, trains,
    and equals RayPPOTrainer on the same batch."""
    from verl.trainer.ppo.v1 import PPOTrainer

    cfg = config(model_path, ON)
    trainer = VT.selected_trainer(cfg, monkeypatch)
    ours = train(trainer, model_path, monkeypatch)
    if isinstance(trainer, PPOTrainer):
        assert LOGQ not in ours.rows.keys()
    legacy = train(VT.legacy_trainer(config(model_path, ON, "trainer.use_v1=False")), model_path, monkeypatch)
    assert LOGQ not in legacy.batch.batch.keys()
    assert ours.metrics["actor/lpreg_frac"] > 0
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/lpreg_kl"):
        assert abs(legacy.metrics[key] - ours.metrics[key]) <= SAME * max(1.0, abs(ours.metrics[key])), key


def _override_without_super(base):
    class OverridesOldLogProb(base):
        def _compute_old_log_prob(self, batch, metrics):  # a trainer that does its own pass
            return batch

    return OverridesOldLogProb


class NotAVerlTrainer:
    def __init__(self, config):
        self.config = config


@pytest.mark.parametrize("kind", ["override", "unrelated"])
def test_start_up_check_raises_for_another_trainer(model_path, monkeypatch, kind):
    """A trainer other than the ones lpreg wraps stands in for verl's default (trainer.v1.trainer_mode's
    registry entry): main_ppo's validate_config raises, naming verl's version and what lpreg expects,
    before Ray starts; so does the trainer's own init, before any worker or rollout. On-policy (no
    proxy to record) both run."""
    import verl
    from verl.trainer.ppo.v1 import trainer_base

    cfg = config(model_path, OFF)
    mode = cfg.trainer.v1.trainer_mode
    default = trainer_base.get_trainer_cls(mode)
    runner, handed_on = VT.main_ppo_runner(cfg, monkeypatch)  # verl's default: passes
    other = _override_without_super(default) if kind == "override" else NotAVerlTrainer
    monkeypatch.setitem(trainer_base.TRAINER_REGISTRY, mode, other)
    match = rf"verl {verl.__version__}: .*RayPPOTrainer or .*PPOTrainer.*{other.__qualname__}"
    with pytest.raises(RuntimeError, match=match):
        VT.main_ppo_runner(config(model_path, OFF), monkeypatch)
    if kind == "override":
        with pytest.raises(RuntimeError, match=match):
            VT.v1_trainer(runner, handed_on, monkeypatch)  # the trainer's init checks its own class
    VT.main_ppo_runner(config(model_path, ON), monkeypatch)
    assert trainer_base.get_trainer_cls(mode) is other


def test_bypass_mode_is_refused_at_start_up(model_path, monkeypatch):
    """algorithm.rollout_correction.bypass_mode=True skips the old-log-prob pass, where the rollout
    proxy is recorded: off-policy it is refused by main_ppo's validate_config, naming the setting;
    with lpreg_proxy=current, or on-policy, it runs."""
    bypass = ["algorithm.rollout_correction.bypass_mode=True", "actor_rollout_ref.rollout.calculate_log_probs=True"]
    with pytest.raises(ValueError, match=r"algorithm\.rollout_correction\.bypass_mode=True .*lpreg_proxy=None"):
        VT.main_ppo_runner(config(model_path, OFF, *bypass), monkeypatch)
    VT.main_ppo_runner(config(model_path, OFF, *bypass, "+actor_rollout_ref.actor.policy_loss.lpreg_proxy=current"),
                       monkeypatch)
    VT.main_ppo_runner(config(model_path, ON, *bypass), monkeypatch)
