"""LpRegGRPOTrainer against the real TRL (1.16.x), on CPU with a tiny local model.

Runs in its own environment: `bash .ci/integrations.sh trl`. Without trl installed (the
main environment) every test here is skipped.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("trl", reason="trl is not installed here: run `bash .ci/integrations.sh trl` (own venv)")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import lpreg.integrations.trl as lpreg_trl  # noqa: E402
from lpreg.integrations.trl import LpRegGRPOConfig, LpRegGRPOTrainer  # noqa: E402
from tests.integrations.tiny_lm import tiny_model, tiny_tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DOCS = os.path.join(ROOT, "docs", "integrations.md")

# Float tolerances. Both losses are fp32 sums over <= 48 tokens of -A r terms (|A| <= ~2) whose
# log-probs come from two different kernels (TRL's chunked log-softmax, lpreg's fused one):
# each log-prob differs by a few ulp (~1e-7 relative). Loss: compared absolutely, since an
# on-policy step has a loss of ~0 (seen: <= 3e-8; bound ~48 x 2 x 1e-7 = 1e-5). Gradient
# norm: relatively (seen: <= 3e-6, from per-sequence means over 1-token completions in grpo
# mode). Parameters after two SGD steps (lr 0.1, each moves them ~3e-2): seen <= 6e-7.
# About 5-10x margin on each.
LOSS_ATOL, GRAD_RTOL, PARAM_ATOL = 1e-5, 2e-5, 5e-6


def reward_len_a(completions, **kwargs):
    """Reward: 'a' count plus a character-code hash (so it varies within almost every group)."""
    return [float(c.count("a")) + float(sum(map(ord, c)) % 7) + 0.1 * len(c) for c in completions]


def dataset(n=8):
    return Dataset.from_dict({"prompt": ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"][:n]})


def common_args(tmp_path, **kw):
    """Two optimizer steps of 2 accumulated micro-batches of 4 completions (2 prompts x 4)."""
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                num_generations=4, max_completion_length=6, max_steps=2, learning_rate=0.1, optim="sgd",
                lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no",
                use_cpu=True, seed=7, temperature=1.0, bf16=False, disable_dropout=True,
                dataloader_num_workers=0)
    base.update(kw)
    return base


def train(trainer_cls, args):
    torch.manual_seed(0)
    trainer = trainer_cls(model=tiny_model(), reward_funcs=reward_len_a, args=args, train_dataset=dataset(),
                          processing_class=tiny_tokenizer())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    return logs, params


def compare(a, b, label):
    """(max abs loss diff, max rel grad-norm diff, max abs param diff) between two runs."""
    (la, pa), (lb, pb) = a, b
    assert len(la) == len(lb) == 2, (label, la, lb)
    loss = max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb))
    grad = max(abs(x["grad_norm"] - y["grad_norm"]) / max(abs(x["grad_norm"]), 1e-12) for x, y in zip(la, lb))
    param = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    moved = max((pa[k] - tiny_model().state_dict()[k]).abs().max().item() for k in pa)
    print(f"{label}: clip {[x.get('clip_ratio/region_mean') for x in la]} vs "
          f"{[y.get('clip_ratio/region_mean') for y in lb]}; loss abs {loss:.2e}, grad-norm rel {grad:.2e}, "
          f"param abs {param:.2e} (moved {moved:.2e}); "
          f"losses {[x['loss'] for x in la]} vs {[y['loss'] for y in lb]}")
    return loss, grad, param, moved


@pytest.mark.parametrize("loss_type,compat,fused", [("dapo", "released", True), ("bnpo", "paper", True),
                                                     ("grpo", "paper", False), ("dr_grpo", "released", False)])
def test_beta0_reproduces_trl(tmp_path, loss_type, compat, fused):
    """num_iterations=2: the second optimizer step re-uses the first step's completions with
    updated weights, so TRL's old log-probs, a ratio != 1 and its clipping are all exercised."""
    kw = dict(loss_type=loss_type, num_iterations=2, epsilon=0.02)
    trl_run = train(GRPOTrainer, GRPOConfig(**common_args(tmp_path, **kw)))
    ours = train(LpRegGRPOTrainer, LpRegGRPOConfig(**common_args(tmp_path, **kw), lpreg_beta=0.0,
                                                   lpreg_compat=compat, lpreg_fused=fused))
    loss, grad, param, moved = compare(trl_run, ours, f"beta=0 {loss_type} {compat} fused={fused}")
    assert moved > 1e-3  # the two steps really trained
    assert abs(trl_run[0][1]["loss"]) > 1e-4  # off-policy step: a loss that is not ~0
    assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and param <= PARAM_ATOL


@pytest.mark.parametrize("compat", ["released", "paper"])
def test_beta_positive_logs_lpreg_metrics_and_fused_matches_unfused(tmp_path, compat):
    kw = dict(lpreg_beta=1.0, lpreg_rho=0.5, lpreg_compat=compat, lpreg_threshold=0.2)
    fused = train(LpRegGRPOTrainer, LpRegGRPOConfig(**common_args(tmp_path), lpreg_fused=True, lpreg_chunk_size=5,
                                                     **kw))
    unfused = train(LpRegGRPOTrainer, LpRegGRPOConfig(**common_args(tmp_path), lpreg_fused=False, **kw))
    for h in fused[0]:
        assert h["lpreg/frac"] > 0 and h["lpreg/kl"] > 0, h  # logged per step, TRL's way
        assert 0 < h["lpreg/threshold"] <= 1 and h["entropy"] > 0, h
    loss, grad, param, _ = compare(fused, unfused, f"fused vs unfused {compat}")
    assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and param <= PARAM_ATOL
    base = train(LpRegGRPOTrainer, LpRegGRPOConfig(**common_args(tmp_path), lpreg_fused=True,
                                                    **{**kw, "lpreg_beta": 0.0}))
    assert abs(base[0][0]["loss"] - fused[0][0]["loss"]) > 1e-6  # beta > 0 changes the loss


def test_paper_selection_is_exact_over_the_generation_batch(tmp_path, monkeypatch):
    """Every micro-batch applies the step threshold to its own current log-probs; the union of
    the per-micro-batch sets has exactly k = max(1, floor(rho n)) tokens of the generation batch."""
    seen = []
    real = lpreg_trl.policy_loss_from_stats

    def spy(stats, adv, old, mask, **kw):
        sel = kw["selection_threshold"]
        cur = stats.logp.detach() if old is None else old
        seen.append((sel.k, int(sel.mask(cur, mask > 0).sum()), int((mask > 0).sum()), sel.n_valid))
        return real(stats, adv, old, mask, **kw)

    monkeypatch.setattr(lpreg_trl, "policy_loss_from_stats", spy)
    train(LpRegGRPOTrainer, LpRegGRPOConfig(**common_args(tmp_path, max_steps=1), lpreg_compat="paper",
                                            lpreg_rho=0.3))
    assert len(seen) == 2  # one generation batch, two accumulated micro-batches
    assert seen[0][3] == seen[0][2] + seen[1][2]  # n: every valid token of the generation batch
    assert seen[0][0] == max(1, int(0.3 * seen[0][3])) == seen[0][1] + seen[1][1]


@pytest.mark.parametrize("setting,value", [("loss_type", "cispo"), ("importance_sampling_level", "sequence"),
                                           ("beta", 0.04), ("top_entropy_quantile", 0.5), ("entropy_coef", 0.01)])
def test_unsupported_settings_name_the_setting(tmp_path, setting, value):
    args = LpRegGRPOConfig(**common_args(tmp_path, **{setting: value}))
    with pytest.raises(ValueError, match=setting):
        LpRegGRPOTrainer(model=tiny_model(), reward_funcs=reward_len_a, args=args, train_dataset=dataset(),
                         processing_class=tiny_tokenizer())


@pytest.mark.parametrize("field,value", [("lpreg_compat", "both"), ("lpreg_rho", 0.0), ("lpreg_beta", -1.0),
                                         ("lpreg_threshold", 1.5), ("lpreg_chunk_size", 0)])
def test_bad_lpreg_fields_raise(tmp_path, field, value):
    with pytest.raises(ValueError, match=field.replace("lpreg_", "") if field == "lpreg_threshold" else field):
        LpRegGRPOConfig(**common_args(tmp_path), **{field: value})


def snippet(section):
    """The first ```python block after the heading `section` in docs/integrations.md."""
    text = open(DOCS).read()
    body = text.split(f"## {section}", 1)[1]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_docs_snippet_runs_verbatim(tmp_path, monkeypatch):
    """The docs' copy-paste snippet, verbatim, with the tiny model and data; the config it
    builds is shrunk to 1 optimizer step of tiny batches (sizes only: every lpreg_* setting and
    the loss type stay the snippet's)."""
    monkeypatch.chdir(tmp_path)
    small = {k: v for k, v in common_args(tmp_path, max_steps=1).items() if k != "output_dir"}
    built = []

    def shrunk_config(**kw):
        built.append(kw)
        return LpRegGRPOConfig(**{**kw, **small})

    monkeypatch.setattr(lpreg_trl, "LpRegGRPOConfig", shrunk_config)
    namespace = {"model": tiny_model(), "tokenizer": tiny_tokenizer(), "train_dataset": dataset(),
                 "reward_func": reward_len_a}
    exec(compile(snippet("Use with TRL"), "docs/integrations.md", "exec"), namespace)
    assert built and built[0]["lpreg_beta"] == 1.0  # the snippet's own settings reached the trainer
    logs = [h for h in namespace["trainer"].state.log_history if "lpreg/frac" in h]
    assert len(logs) == 1 and logs[0]["loss"] == logs[0]["loss"]  # one step, a loss that is not NaN


TWO_PROCESS = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.append({root!r})  # appended: the installed lpreg stays ahead of the source tree
    from tests.integrations import test_trl as t
    from lpreg.integrations.trl import LpRegGRPOConfig, LpRegGRPOTrainer
    import lpreg.integrations.trl as m
    seen = []
    real = m.policy_loss_from_stats
    def spy(stats, adv, old, mask, **kw):
        sel = kw["selection_threshold"]
        seen.append([sel.k, int(sel.mask(stats.logp.detach(), mask > 0).sum())])
        return real(stats, adv, old, mask, **kw)
    m.policy_loss_from_stats = spy
    args = LpRegGRPOConfig(**t.common_args({out!r}, max_steps=2), lpreg_compat="paper", lpreg_rho=0.3,
                           lpreg_threshold=0.2)
    logs, params = t.train(LpRegGRPOTrainer, args)
    rank = int(os.environ["RANK"])
    flat = torch.cat([p.reshape(-1) for p in params.values()]).tolist()
    json.dump({{"seen": seen, "params": flat, "logs": logs}}, open(os.path.join({out!r}, f"rank{{rank}}.json"), "w"))
""")


def test_two_process_gloo(tmp_path):
    """torchrun, 2 CPU processes (gloo): the ranks stay in sync (DDP through the forward
    redirection) and the paper selection counts k over both ranks' tokens."""
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS.format(root=ROOT, out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1))
    assert r0["params"] == r1["params"]  # DDP averaged the gradients: bitwise the same parameters
    assert r0["logs"][0]["lpreg/frac"] > 0
    for step in range(2):  # per step: both micro-batches of both ranks add up to the global k
        mine = r0["seen"][2 * step:2 * step + 2] + r1["seen"][2 * step:2 * step + 2]
        assert sum(s[1] for s in mine) == mine[0][0], mine
