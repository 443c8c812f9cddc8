"""The compact on-policy RLVR trainer (GRPO + Lp-Reg) and its components.

The loop itself is `lpreg/train.py` (`lpreg-train`); this package holds its parts.

    tasks.py       built-in arithmetic task (`Problem`, `arithmetic_problems`)
    tokenizer.py   character-level tokenizer built in code (no download)
    model.py       tiny Llama-style policy, `load_policy`, prompts, generation, SFT warm start
    sft.py         `python -m lpreg.trainer.sft`: warm-start and save a checkpoint
    reward.py      math-verify rewards in a killable worker process (`RewardWorker`)
    data.py        local .jsonl / .parquet problem sets (`load_problems`)
    config.py, rollout.py, advantage.py, losses.py, checkpoint.py, logging_utils.py:
                   the loop's configuration and steps

This file imports nothing on purpose: `import lpreg.trainer.tasks` must not pull in
transformers, and each caller imports only the modules it uses.
"""
