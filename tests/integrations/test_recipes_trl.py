"""docs/recipes/qwen3_14b_lpreg_trl.py, run for 2 optimiser steps on a tiny local model.

The recipe's configs are built as written (64 GPUs) and checked against the authors' settings;
then rebuilt with the sizes scaled down (1 process, 4 completions per micro-batch, 6 tokens,
generation by TRL's transformers backend: no vLLM on CPU, no eval set) and the ratio of
optimiser steps per rollout kept (on-policy 1, off-policy 2 here, 8 in the recipe), and trained
for 2 steps. Every lpreg_*, clip, loss_type and optimiser setting is the recipe's.
"""

import importlib.util
import os
import sys

import pytest

pytest.importorskip("trl", reason="trl is not installed here: run `bash .ci/integrations.sh trl` (own venv)")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trl_runs  # noqa: E402
from tiny_lm import tiny_model, tiny_tokenizer  # noqa: E402

from lpreg.integrations.trl import LpRegGRPOTrainer  # noqa: E402

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "recipes", "qwen3_14b_lpreg_trl.py")


def recipe():
    spec = importlib.util.spec_from_file_location("qwen3_14b_lpreg_trl", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,steps_per_rollout", [("onpolicy", 1), ("offpolicy", 8)])
def test_recipe_config_is_the_authors(tmp_path, name, steps_per_rollout):
    # use_cpu: TrainingArguments refuses bf16 without a GPU unless told it runs on CPU
    args = getattr(recipe(), f"{name}_config")(str(tmp_path), world_size=64, use_cpu=True)
    assert (args.lpreg_compat, args.lpreg_rho, args.lpreg_threshold, args.lpreg_beta) == ("released", 0.01, 0.02, 1.0)
    assert (args.epsilon, args.epsilon_high, args.beta, args.learning_rate) == (1.0, 9.0, 0.0, 1e-6)
    per_step = args.per_device_train_batch_size * 64 * args.gradient_accumulation_steps
    per_rollout = args.per_device_train_batch_size * 64 * args.steps_per_generation
    assert per_rollout == 256 * 8 and per_rollout // per_step == steps_per_rollout


@pytest.mark.parametrize("name", ["onpolicy", "offpolicy"])
def test_recipe_trains_two_steps(tmp_path, name):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    accum, per_rollout = (2, 2) if name == "onpolicy" else (1, 2)
    tiny = dict(num_generations=4, max_completion_length=6, max_steps=2, use_vllm=False, bf16=False,
                eval_strategy="no", report_to="none", save_strategy="no", use_cpu=True, seed=7)
    args = getattr(recipe(), f"{name}_config")(str(tmp_path), world_size=1, gradient_accumulation_steps=accum,
                                               steps_per_generation=per_rollout, **tiny)
    torch.manual_seed(0)
    trainer = LpRegGRPOTrainer(model=tiny_model(), reward_funcs=trl_runs.reward_len_a, args=args,
                               train_dataset=trl_runs.dataset(), processing_class=tiny_tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert trainer.lpreg_off_policy == (name == "offpolicy")
    # off-policy the generation batch carries the rollout proxy recorded at its old-log-prob forward
    assert ("lpreg_rollout_logq" in trainer._buffered_inputs[0]) == (name == "offpolicy")
