"""The study's presets: the `sparks` task at CPU scale (registered with the trainer's `register_preset`
when `lpreg.experiments` is imported, as `lpreg-train` does).

    cpu-sparks   the sweep's default runs (6 arms x 3 seeds: `python -m lpreg.experiments.compare`)
    cpu-demo     README's main job: Lp-Reg on cpu-sparks, held-out pass@8 before and after, the mechanism probe
    cpu-sweep    the decisive sweep's runs (docs/cpu_sweep.md)
"""

PRESETS = {
    # Lp-Reg's mechanism at CPU scale (lpreg.experiments.sparks, docs/cpu_sparks_*): a 3,000-token
    # subword vocabulary (a noise tail), a rare valuable "check" token (8% of the hard items'
    # warm-start targets; after 900 warm-start steps p(check) is ~2% on held-out hard items, which it
    # solves 73% of the time against 41% answered directly); at lr 1e-3 (after a 10-step ramp) GRPO's
    # entropy halves within 40 steps (docs/cpu_sparks_pilot.md).
    # lpreg_rho 0.25: the released form's k = int(rho n_neg) over a step's A < 0 tokens, of which the
    # filtered tail samples cannot be selected, leaves dozens selected per step (docs/cpu_sparks_design.md).
    # The sweep (6 arms x 3 seeds) is `python -m lpreg.experiments.compare`.
    "cpu-sparks": dict(
        task="sparks", steps=80, hidden_size=128, num_layers=2, num_heads=4, warmup_steps=900, warmup_lr=3e-3,
        warmup_batch_size=32, warmup_eval_problems=64, n_problems=96, prompts_per_step=16, samples_per_prompt=8,
        max_new_tokens=16, lr=1e-3, micro_batch_size=128, eval_every=10, eval_problems=48, eval_k=8,
        lr_warmup_steps=10, lpreg_rho=0.25, save_every=0, keep_checkpoints=1, sample_every=10, torch_threads=1,
    ),
    # The README's main job, < 5 minutes on 2 CPU cores from a fresh clone, warm start included: the
    # cpu-sparks task and warm start (the same warm-start cache entry), 60 RL steps of Lp-Reg
    # (released form, rho 0.25: it selects tokens at every step), held-out pass@8 / avg@8 before the
    # first and after the last step, and the mechanism measured at steps 1, 30 and 60
    # (lpreg.experiments.mechanism). It ends with a summary in the terminal (lpreg.trainer.summary).
    "cpu-demo": dict(
        task="sparks", steps=60, hidden_size=128, num_layers=2, num_heads=4, warmup_steps=900, warmup_lr=3e-3,
        warmup_batch_size=32, warmup_eval_problems=64, n_problems=96, prompts_per_step=16, samples_per_prompt=8,
        max_new_tokens=16, lr=1e-3, micro_batch_size=128, eval_every=60, eval_start=True, eval_problems=64,
        eval_k=8, lr_warmup_steps=10, lpreg_rho=0.25, mechanism_every=30, save_every=0, keep_checkpoints=1,
        sample_every=10, torch_threads=1,
    ),
    # The decisive sweep's runs (python -m lpreg.experiments.compare --preset cpu-sweep, docs/cpu_sweep.md):
    # cpu-sparks with held-out pass@8 / avg@8 over 384 of the 513 test problems x 8 samples, before the
    # first and after the last step only (more problems rather than more evaluations).
    "cpu-sweep": dict(
        task="sparks", steps=80, hidden_size=128, num_layers=2, num_heads=4, warmup_steps=900, warmup_lr=3e-3,
        warmup_batch_size=32, warmup_eval_problems=64, n_problems=96, prompts_per_step=16, samples_per_prompt=8,
        max_new_tokens=16, lr=1e-3, micro_batch_size=128, eval_every=80, eval_start=True, eval_problems=384,
        eval_k=8, lr_warmup_steps=10, lpreg_rho=0.25, save_every=0, keep_checkpoints=1, sample_every=10,
        torch_threads=1,
    ),
}
