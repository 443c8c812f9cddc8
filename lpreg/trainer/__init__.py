"""The compact RLVR trainer (GRPO + Lp-Reg, and entropy-control baselines): the loop and its parts.

The loop is `loop.train`; `lpreg-train` (`lpreg/train.py`) is its command line. The instruments for
studying the method (the `sparks` task and its presets, the diversity metrics, the mechanism probe,
the sweep and its statistics) live beside it in `lpreg.experiments`, which this package never
imports: they register through the registration points below (`register_task`, `register_preset`,
`register_instrument`), and `lpreg-train` imports `lpreg.experiments` so that they do.

    loop.py           `train`: one step, top to bottom, then the figure and the end-of-run summary
    config.py         `TrainConfig`, presets (`PRESETS`, `register_preset`, `preset_config`), CLI / YAML
    setup.py          everything before the first step: accelerator, policy, task, warm start or
                      resume, optimizer, run files (`setup` -> `Run`)
    step.py           one step: `rollout`, `scoring_pass`, `update`, `step_metrics`, `held_out_eval`,
                      `write_logs`, `maybe_checkpoint`
    instruments.py    per-step measurements a study registers (`Instrument`, `register_instrument`):
                      before the update, into the metrics row, their own log and summary lines
    rollout.py        seeded per-prompt generation and packing (`generate_group`, `pack`, `RolloutBatch`)
    advantage.py      GRPO group advantages
    losses.py         the loss table `LOSSES` (Lp-Reg and the baselines: terms, step-wide choice,
                      off-policy default, label, sweep arms), `method_loss`, loss aggregation
    reward.py         math-verify rewards in a killable worker process (`RewardWorker`)
    problem.py        `Problem` (question, gold answer, warm-start target) and the plain prompt template
    tasks.py          built-in tasks (`TASKS`, `register_task`; arithmetic: `arithmetic_problems`)
    tokenizer.py      character-level tokenizer built in code (no download)
    data.py           local .jsonl / .parquet problem sets (`load_problems`)
    model.py          tiny Llama-style policy, `load_policy`, prompts, generation, SFT warm start
    sft.py            `python -m lpreg.trainer.sft`: warm-start and save a checkpoint
    evaluate.py       `lpreg-eval` / `python -m lpreg.trainer.evaluate`: avg@k, pass@k, maj@k; also the
                      trainer's held-out evaluation (`--eval-every`)
    checkpoint.py     atomic checkpoints and exact resume
    logging_utils.py  metrics.jsonl, samples.jsonl, plots, progress bar
    summary.py        a run in a few numbers, and the end-of-run summary `lpreg-train` prints
    compare.py, spark_value.py   deprecated `python -m` paths: each warns and runs its new home,
                      `python -m lpreg.experiments.compare` / `python -m lpreg.experiments.spark_value`

This file imports nothing on purpose: `import lpreg.trainer.tasks` must not pull in
transformers, and each caller imports only the modules it uses.
"""
