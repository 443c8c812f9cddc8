#!/usr/bin/env bash
# Lp-Reg, Qwen3-14B-Base, on-policy: one optimiser step per rollout (256 prompts x 8 responses, one
# mini-batch of 256 prompts), the authors' hyper-parameters on 8 nodes x 8 GPUs. verl 0.9 + lpreg[verl].
set -euo pipefail
source "$(dirname "$0")/qwen3_14b_lpreg_common.sh"
python3 -m verl.trainer.main_ppo "${LPREG_OVERRIDES[@]}" \
    actor_rollout_ref.actor.ppo_mini_batch_size=256 \
    trainer.project_name=lpreg trainer.experiment_name=qwen3_14b_lpreg_onpolicy "$@"
