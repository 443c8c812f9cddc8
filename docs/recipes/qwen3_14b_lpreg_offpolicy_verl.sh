#!/usr/bin/env bash
# Lp-Reg, Qwen3-14B-Base, off-policy: 8 optimiser steps per rollout (256 prompts x 8 responses in
# mini-batches of 32 prompts); every step after the first trains against the proxy recorded at the
# rollout's old-log-prob pass (lpreg_proxy=rollout, the authors' minp_old_log_prob=True).
set -euo pipefail
source "$(dirname "$0")/qwen3_14b_lpreg_common.sh"
python3 -m verl.trainer.main_ppo "${LPREG_OVERRIDES[@]}" \
    actor_rollout_ref.actor.ppo_mini_batch_size=32 \
    trainer.project_name=lpreg trainer.experiment_name=qwen3_14b_lpreg_offpolicy "$@"
