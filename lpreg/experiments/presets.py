"""The study's presets: the `sparks` task at CPU scale (registered with the trainer's `register_preset`
when `lpreg.experiments` is imported, as `lpreg-train` does).

    cpu-sparks   the sweep's default runs (6 arms x 3 seeds: `python -m lpreg.experiments.compare`)
    cpu-sweep    the decisive sweep's runs (docs/research/cpu_sweep.md)
    cpu-sparks-demo  the earlier main job (Lp-Reg on cpu-sparks): the out-of-regime control

and the `noisy-sparks` task (lpreg.experiments.noisy_sparks, docs/research/cpu_regime_plan.md): a fixed output
floor of 25% (the output transform "output_floor", saved with checkpoints), rho 0.5 (the paper: 0.01):

    noisy-sparks-demo  the study's former main job (it was `cpu-demo`): Lp-Reg on noisy-sparks, held-out
                       pass@8 / avg@8 before and after, the mechanism probe
    cpu-regime-sweep   the pre-registered sweep's runs (docs/research/cpu_regime_plan.md)

These are study presets, not the trainer's main job (lpreg/trainer/presets.py): each departs from the
paper's setting as its comment says.
"""

from lpreg.experiments import output_floor
from lpreg.experiments.noisy_sparks import FLOOR

# the noisy-sparks runs' shared settings (noisy-sparks-demo, cpu-regime-sweep; docs/research/cpu_regime_plan.md). lr
# 5e-4, constant as in the paper (no ramp), and max_new_tokens 24 (a worked answer with its random tokens)
# were chosen by the pilots (docs/research/cpu_regime_pilots.md).
# lpreg_rho 0.5, not the paper's 0.01: the released form takes the k = int(rho n_neg) lowest-p_y of a
# call's few hundred negative-advantage tokens (0.01 gives k <= 3, and nothing when k <= 1), and a quarter
# or more of those tokens are sampled noise, the lowest of all and filtered by min-p; rho must reach past
# them to the rare kept tokens. The paper's 1% of ~10^6 tokens per step reaches past a far thinner
# share of noise. kappa 0.02 and beta 1 are the paper's.
NOISY_SPARKS = dict(
    task="noisy-sparks", hidden_size=128, num_layers=2, num_heads=4, warmup_steps=900, warmup_lr=3e-3,
    warmup_batch_size=32, warmup_eval_problems=64, n_problems=100_000, prompts_per_step=16, samples_per_prompt=8,
    max_new_tokens=24, lr=5e-4, micro_batch_size=128, eval_k=8, lr_warmup_steps=0, lpreg_rho=0.5, save_every=0,
    keep_checkpoints=1, sample_every=10, torch_threads=1, output_transform=output_floor.spec(FLOOR),
)

PRESETS = {
    # Lp-Reg's mechanism at CPU scale (lpreg.experiments.sparks, docs/research/cpu_sparks_*): a 3,000-token
    # subword vocabulary (a noise tail), a rare valuable "check" token (8% of the hard items'
    # warm-start targets; after 900 warm-start steps p(check) is ~2% on held-out hard items, which it
    # solves 73% of the time against 41% answered directly); at lr 1e-3 (after a 10-step ramp) GRPO's
    # entropy halves within 40 steps (docs/research/cpu_sparks_pilot.md).
    # lpreg_rho 0.25: the released form's k = int(rho n_neg) over a step's A < 0 tokens, of which the
    # filtered tail samples cannot be selected, leaves dozens selected per step (docs/research/cpu_sparks_design.md).
    # The sweep (6 arms x 3 seeds) is `python -m lpreg.experiments.compare`.
    "cpu-sparks": dict(
        task="sparks", steps=80, hidden_size=128, num_layers=2, num_heads=4, warmup_steps=900, warmup_lr=3e-3,
        warmup_batch_size=32, warmup_eval_problems=64, n_problems=96, prompts_per_step=16, samples_per_prompt=8,
        max_new_tokens=16, lr=1e-3, micro_batch_size=128, eval_every=10, eval_problems=48, eval_k=8,
        lr_warmup_steps=10, lpreg_rho=0.25, save_every=0, keep_checkpoints=1, sample_every=10, torch_threads=1,
    ),
    # The earlier main job, kept as the out-of-regime control (docs/research/cpu_results.md): the cpu-sparks
    # task and warm start (the same warm-start cache entry), 60 RL steps of Lp-Reg (released form,
    # rho 0.25: it selects tokens at every step), held-out pass@8 / avg@8 before the first and after the
    # last step, and the mechanism measured at steps 1, 30 and 60 (lpreg.experiments.mechanism). Its
    # proxy keeps ~99% of the mass where Lp-Reg selects, and RL overfits the 96 recurring problems.
    "cpu-sparks-demo": dict(
        task="sparks", steps=60, hidden_size=128, num_layers=2, num_heads=4, warmup_steps=900, warmup_lr=3e-3,
        warmup_batch_size=32, warmup_eval_problems=64, n_problems=96, prompts_per_step=16, samples_per_prompt=8,
        max_new_tokens=16, lr=1e-3, micro_batch_size=128, eval_every=60, eval_start=True, eval_problems=64,
        eval_k=8, lr_warmup_steps=10, lpreg_rho=0.25, mechanism_every=30, save_every=0, keep_checkpoints=1,
        sample_every=10, torch_threads=1,
    ),
    # The decisive sweep's runs (python -m lpreg.experiments.compare --preset cpu-sweep, docs/research/cpu_sweep.md):
    # cpu-sparks with held-out pass@8 / avg@8 over 384 of the 513 test problems x 8 samples, before the
    # first and after the last step only (more problems rather than more evaluations).
    "cpu-sweep": dict(
        task="sparks", steps=80, hidden_size=128, num_layers=2, num_heads=4, warmup_steps=900, warmup_lr=3e-3,
        warmup_batch_size=32, warmup_eval_problems=64, n_problems=96, prompts_per_step=16, samples_per_prompt=8,
        max_new_tokens=16, lr=1e-3, micro_batch_size=128, eval_every=80, eval_start=True, eval_problems=384,
        eval_k=8, lr_warmup_steps=10, lpreg_rho=0.25, save_every=0, keep_checkpoints=1, sample_every=10,
        torch_threads=1,
    ),
    # The study's former main job (lpreg.experiments.noisy_sparks, docs/research/cpu_regime_plan.md): Lp-Reg
    # (released form, rho 0.5) on noisy-sparks, whose policy has a fixed output floor of 25% of its mass
    # spread over the 3,000-token vocabulary (a constant added to the model's output, not learned; it also
    # rules out entropy collapse), so the min-p proxy (kappa 0.02) keeps ~0.74 of the mass where Lp-Reg
    # selects; RL draws from the whole ~8,000-problem training split. Held-out pass@8 / avg@8 before the
    # first and after the last step, the mechanism at steps 1, 20, 40 and 60.
    "noisy-sparks-demo": dict(NOISY_SPARKS, steps=60, eval_every=60, eval_start=True, eval_problems=64,
                              mechanism_every=20),
    # The pre-registered sweep's runs (docs/research/cpu_regime_plan.md): noisy-sparks-demo's task and settings,
    # held-out pass@8 / avg@8 over 384 of the test problems x 8 samples, before the first and after the last step.
    "cpu-regime-sweep": dict(NOISY_SPARKS, steps=60, eval_every=60, eval_start=True, eval_problems=384),
}
