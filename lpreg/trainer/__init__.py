"""The compact RLVR trainer (GRPO + Lp-Reg, and entropy-control baselines) and its components.

The loop itself is `lpreg/train.py` (`lpreg-train`); this package holds its parts.

    config.py         `TrainConfig`, presets (`PRESETS`, `register_preset`, `preset_config`), CLI / YAML
    setup.py          everything before the first step: accelerator, policy, task, warm start or
                      resume, optimizer, run files (`setup` -> `Run`)
    step.py           one step: `rollout`, `scoring_pass`, `update`, `step_metrics`, `held_out_eval`,
                      `write_logs`, `maybe_checkpoint`
    rollout.py        seeded per-prompt generation and packing (`generate_group`, `pack`, `RolloutBatch`)
    advantage.py      GRPO group advantages
    losses.py         the loss table `LOSSES` (Lp-Reg and the baselines: terms, step-wide choice,
                      off-policy default, label, sweep arms), `method_loss`, loss aggregation
    checkpoint.py     atomic checkpoints and exact resume
    logging_utils.py  metrics.jsonl, samples.jsonl, plots, progress bar
    problem.py        `Problem` (question, gold answer, warm-start target) and the plain prompt template
    tasks.py          built-in tasks (`TASKS`; arithmetic: `arithmetic_problems`)
    sparks.py         the `sparks` task of `--preset cpu-sparks`: a locally trained 3,000-token BPE
                      vocabulary (a noise tail) and a rare valuable "check" token
    diversity.py      per-step spark probability / usage and distinct answers per group
    tokenizer.py      character-level tokenizer built in code (no download)
    model.py          tiny Llama-style policy, `load_policy`, prompts, generation, SFT warm start
    sft.py            `python -m lpreg.trainer.sft`: warm-start and save a checkpoint
    reward.py         math-verify rewards in a killable worker process (`RewardWorker`)
    data.py           local .jsonl / .parquet problem sets (`load_problems`)
    evaluate.py       `lpreg-eval` / `python -m lpreg.trainer.evaluate`: avg@k, pass@k, maj@k; also the
                      trainer's held-out evaluation (`--eval-every`)
    compare.py        `python -m lpreg.trainer.compare`: arms x seeds on one preset, a band figure and a
                      JSON summary (the cpu-sparks sweep)

This file imports nothing on purpose: `import lpreg.trainer.tasks` must not pull in
transformers, and each caller imports only the modules it uses.
"""
