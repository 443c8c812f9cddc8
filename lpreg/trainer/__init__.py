"""The compact on-policy RLVR trainer (GRPO + Lp-Reg) and its components.

    tasks.py       built-in arithmetic task (`Problem`, `arithmetic_problems`)
    tokenizer.py   character-level tokenizer built in code (no download)
    model.py       tiny Qwen2-style policy, `load_policy`, prompt formatting, SFT warm start
    sft.py         `python -m lpreg.trainer.sft`: warm-start and save a checkpoint
    reward.py      math-verify rewards in a killable worker process (`RewardWorker`)
    data.py        local .jsonl / .parquet problem sets (`load_problems`)

This file imports nothing on purpose: `import lpreg.trainer.tasks` must not pull in
transformers or torch, and the trainer loop imports only what it uses.
"""
