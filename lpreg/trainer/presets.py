"""The trainer's own main jobs (`--preset NAME`), registered through `lpreg.trainer.registry.register_preset`.

lpreg.trainer.config imports this module, so every preset here is a `--preset` choice. It must not import
lpreg.trainer.config (that would be a cycle).

    cpu-demo   README's main job: the trainer's built-in arithmetic task, an SFT warm start, then Lp-Reg
               RL; held-out accuracy before the first and after the last step, paired over problems.
               Its plan, its settings' reasons and its measured results: docs/research/cpu_demo_plan.md.

The study's presets are not here: they live with the study in lpreg.experiments (lpreg.train.STUDY_NAMES
lists them).
"""

from lpreg.trainer.registry import register_preset

# cpu-demo (plan 2 of docs/research/cpu_demo_plan.md): what each setting is, and where it departs from the paper.
# - task: the trainer's own arithmetic (a+b, a-b), operands <= 39: 2,869 training and 331 test problems,
#   disjoint by a hash of the question; RL draws from 2,000 training problems, the held-out evaluation
#   takes 320 test problems x 32 samples at T = 1, before the first step and after the last.
# - model: the tiny character-level Llama (128 wide, 2 layers, 0.44M parameters), warm-started by 1,500
#   SFT steps of batch 64 on the training split (the paper starts from a pretrained 1.5B-14B model; none
#   fits a CPU minute).
# - RL: 50 steps of 128 prompts x 8 samples, one on-policy update per rollout in one micro-batch, T = 1,
#   AdamW at a constant lr 2e-4 (the paper: 1e-6 for a 1.5B model; at 5e-4 and 1e-3 RL lowered held-out
#   accuracy in the pilots, GRPO too), grad clip 1.0. With 32 prompts per step (plan 1) no harmless lr
#   moved held-out accuracy in 100 steps.
# - Lp-Reg: the released form, min-p kappa 0.02 and beta 1 as in the paper; rho 0.05, 5 times the paper's
#   0.01: the released form takes the int(rho n_neg) lowest-p_y of a micro-batch's ~600-1,300
#   negative-advantage tokens and the min-p filter drops most of those, so at 0.01 it selected on 86% of
#   steps in a pilot; the paper's 1% of ~10^6 tokens per step has no such lower limit.
register_preset(
    "cpu-demo",
    task="arithmetic", max_operand=39, n_problems=2000, hidden_size=128, num_layers=2, num_heads=4,
    warmup_steps=1500, warmup_lr=3e-3, warmup_batch_size=64, warmup_eval_problems=64,
    steps=50, prompts_per_step=128, samples_per_prompt=8, max_new_tokens=6, temperature=1.0,
    lr=2e-4, lr_warmup_steps=0, micro_batch_size=1024, loss="lpreg", lpreg_compat="released",
    lpreg_threshold=0.02, lpreg_beta=1.0, lpreg_rho=0.05,
    eval_every=50, eval_start=True, eval_problems=320, eval_k=32,
    save_every=0, keep_checkpoints=1, sample_every=10, torch_threads=1,
)
