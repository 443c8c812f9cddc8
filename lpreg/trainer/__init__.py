"""The compact RLVR trainer (GRPO + Lp-Reg, and entropy-control baselines): the loop and its parts.

The loop is `loop.train`; `lpreg-train` (`lpreg/train.py`) is its command line. The trainer knows no
study: its task is a data split, a tokenizer and a reward. A study (lpreg.experiments) adds its tasks,
presets, options, output transforms and per-step instruments through the registration points below
(`tasks.register_task`, `registry.register_preset` / `register_option` / `register_lazy`,
`output_transform.register_output_transform`, `instruments.register_instrument`); this package never
imports it (tests/test_import_graph.py), and a test keeps study names out of it
(tests/test_trainer_no_study.py).

    loop.py           `train`: one step, top to bottom, then the figure and the end-of-run summary
    config.py         `TrainConfig`, the built-in presets, `preset_config`, CLI / YAML
    registry.py       the registration points of presets and options, and the lazy table of names
                      whose module registers them on first use
    presets.py        the trainer's main jobs (`--preset cpu-demo`)
    setup.py          everything before the first step: accelerator, policy, task, warm start or
                      resume, optimizer, run files (`setup` -> `Run`)
    rollout.py        seeded per-prompt generation and packing, and the step's rollout stage (`rollout`)
    scoring.py        the step's scoring pass (`scoring_pass` -> `StepPlan`)
    update.py         the step's update (`update`)
    step.py           the step's record: `step_metrics`, `start_eval`, `held_out_eval`, `write_logs`,
                      `maybe_checkpoint`
    ranks.py          cross-rank helpers (gathers, sums, full parameters for generation under FSDP)
    eval_cache.py     the hashed cache of the step-0 held-out evaluation (`--eval-start-cache`; the sweep's)
    instruments.py    per-step measurements a study registers (`Instrument`, `register_instrument`):
                      before the update, into the metrics row, their own log and summary lines
    advantage.py      GRPO group advantages
    losses.py         the loss table `LOSSES` (Lp-Reg and the baselines: terms, step-wide choice,
                      off-policy default, label, sweep arms), `method_loss`, loss aggregation
    reward.py         math-verify rewards in a killable worker process (`RewardWorker`)
    problem.py        `Problem` (question, gold answer, warm-start target) and the plain prompt template
    tasks.py          built-in tasks (`TASKS`, `register_task`, `register_warm_start_augment`;
                      arithmetic: `arithmetic_problems`)
    tokenizer.py      character-level tokenizer built in code (no download)
    data.py           local .jsonl / .parquet problem sets (`load_problems`, `load_problem_file`: every
                      skipped row reported with its line and reason)
    model.py          tiny Llama-style policy, `load_policy`, prompts, generation, SFT warm start
    output_transform.py  registered changes of the policy's output distribution, saved with checkpoints
    sft.py            `python -m lpreg.trainer.sft`: warm-start and save a checkpoint
    evaluate.py       `lpreg-eval` / `python -m lpreg.trainer.evaluate`: avg@k, pass@k, maj@k; also the
                      trainer's held-out evaluation (`--eval-every`)
    checkpoint.py     atomic checkpoints and exact resume
    logging_utils.py  metrics.jsonl, samples.jsonl, plots, progress bar
    summary.py        a run in a few numbers, and the end-of-run summary `lpreg-train` prints
    stats.py          the paired interval of the summary (and the bootstrap the sweep uses)
    compare.py        deprecated `python -m` path: warns and runs `python -m lpreg.experiments.compare`

This file imports nothing on purpose: `import lpreg.trainer.tasks` must not pull in
transformers, and each caller imports only the modules it uses.
"""
