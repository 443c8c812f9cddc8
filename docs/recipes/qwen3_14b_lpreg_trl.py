"""Lp-Reg, Qwen3-14B-Base, the authors' hyper-parameters as `LpRegGRPOConfig`s (TRL 1.16 + lpreg[trl]).

    from qwen3_14b_lpreg_trl import onpolicy_config, offpolicy_config
    args = offpolicy_config("out/qwen3_14b_lpreg_offpolicy", world_size=64)
    trainer = LpRegGRPOTrainer(model="Qwen/Qwen3-14B-Base", reward_funcs=math_reward, args=args,
                               train_dataset=dapo_math_17k)

Batch arithmetic (the authors' 256 prompts x 8 responses per rollout, on 64 GPUs): a generation
batch is per_device_train_batch_size x world_size x steps_per_generation completions and an
optimiser step takes per_device_train_batch_size x world_size x gradient_accumulation_steps.
    on-policy   2048 completions per optimiser step, one step per rollout
    off-policy  256 completions (32 prompts) per optimiser step, 8 steps per rollout: every step
                after the first trains against the proxy recorded at the rollout (lpreg_proxy)
docs/recipes/README.md lists each of the authors' settings, its TRL counterpart, and what TRL
cannot express.
"""

from lpreg.integrations.trl import LpRegGRPOConfig

PROMPTS_PER_ROLLOUT, RESPONSES_PER_PROMPT = 256, 8
PER_DEVICE = 4  # completions per micro-batch and GPU (the authors packed by tokens, 30720 per GPU)


def common(output_dir: str, **overrides) -> dict:
    """The settings both recipes share."""
    args = dict(
        output_dir=output_dir,
        # Lp-Reg: the released form, k3 at the sampled token, per micro-batch selection among A < 0 tokens
        lpreg_compat="released", lpreg_mode="min_p", lpreg_threshold=0.02, lpreg_rho=0.01, lpreg_beta=1.0,
        lpreg_proxy="rollout", lpreg_fused=True,
        # the clipped surrogate: ratio in [1 - 1.0, 1 + 9.0]; no reference KL, no entropy bonus
        epsilon=1.0, epsilon_high=9.0, beta=0.0, entropy_coef=0.0,
        loss_type="dapo",  # token mean over the optimiser step's tokens, as verl's token-mean
        num_generations=RESPONSES_PER_PROMPT, max_completion_length=8192,
        temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        num_train_epochs=15, num_iterations=1, bf16=True, gradient_checkpointing=True,
        use_vllm=True, vllm_importance_sampling_correction=False,  # the released trainer has no IS correction
        save_steps=64, eval_strategy="steps", eval_steps=8, report_to=["wandb"], logging_steps=1,
        per_device_train_batch_size=PER_DEVICE,
    )
    args.update(overrides)
    return args


def onpolicy_config(output_dir: str, world_size: int = 64, **overrides) -> LpRegGRPOConfig:
    """One optimiser step per rollout of 256 prompts x 8 responses."""
    accum = PROMPTS_PER_ROLLOUT * RESPONSES_PER_PROMPT // (PER_DEVICE * world_size)
    return LpRegGRPOConfig(**common(output_dir, **{"gradient_accumulation_steps": accum,
                                                   "steps_per_generation": accum, **overrides}))


def offpolicy_config(output_dir: str, world_size: int = 64, **overrides) -> LpRegGRPOConfig:
    """Eight optimiser steps of 32 prompts x 8 responses per rollout of 256 prompts."""
    accum = 32 * RESPONSES_PER_PROMPT // (PER_DEVICE * world_size)
    per_rollout = PROMPTS_PER_ROLLOUT * RESPONSES_PER_PROMPT // (PER_DEVICE * world_size)
    return LpRegGRPOConfig(**common(output_dir, **{"gradient_accumulation_steps": max(accum, 1),
                                                   "steps_per_generation": per_rollout, **overrides}))
