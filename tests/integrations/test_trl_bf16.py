"""LpRegGRPOTrainer's forwards under TRL's mixed precision, its old-log-prob forward, and its start-up
check of the LM head's FSDP2 unit (issue 23: findings 5, 9 and TRL's side of 2).

Runs in the TRL environment (`bash .ci/integrations.sh trl`); skipped where trl is not installed.
"""

import os
import sys
import types

import pytest

pytest.importorskip("trl", reason="trl is not installed here: run `bash .ci/integrations.sh trl` (own venv)")

import torch  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

import lpreg.integrations._trl_forward as fwd  # noqa: E402
import lpreg.integrations.trl as lpreg_trl  # noqa: E402
from lpreg.integrations.trl import LpRegGRPOConfig, LpRegGRPOTrainer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trl_runs  # noqa: E402
from tiny_lm import tiny_model, tiny_tokenizer  # noqa: E402


def train(case, tmp_path, **kw):
    trl_runs.no_shuffle()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    return trl_runs.train(case, tmp_path / f"run{len(list(tmp_path.iterdir()))}", **kw)


class AutocastSpy:
    """Wraps lpreg's two forward functions (the loss's statistics and the rollout record) and records,
    per call, (function, grad enabled, autocast enabled on CPU and its dtype)."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in ("token_stats", "rollout_record"):
            real = getattr(fwd, name)

            def spy(*args, _real=real, _name=name, **kwargs):
                self.calls.append((_name, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"),
                                   torch.get_autocast_dtype("cpu")))
                return _real(*args, **kwargs)

            monkeypatch.setattr(fwd, name, spy)


@pytest.mark.parametrize("fused", [True, False])
def test_bf16_forwards_run_under_trls_autocast(tmp_path, monkeypatch, fused):
    """bf16=True on CPU: every forward of lpreg's (the loss's, and with num_iterations = 2 the no-grad
    old-log-prob / rollout-record ones) runs under the autocast TRL runs its own under (before: 0 of
    the loss's forwards did)."""
    spy = AutocastSpy(monkeypatch)
    run = train(dict(loss_type="dapo", num_iterations=2, epsilon=0.02, bf16=True, lpreg_fused=fused,
                     lpreg_rho=0.5, lpreg_threshold=0.2), tmp_path)
    grad_calls = [c for c in spy.calls if c[1]]
    nograd_calls = [c for c in spy.calls if not c[1]]
    assert len(grad_calls) == 8  # 2 optimiser steps x 4 micro-batches
    assert nograd_calls and all(c[0] == "rollout_record" for c in nograd_calls)  # the rollout proxy's forward
    off = [c for c in spy.calls if not (c[2] and c[3] == torch.bfloat16)]
    assert not off, f"{len(off)} of {len(spy.calls)} lpreg forwards ran without bf16 autocast: {off}"
    assert all(h["loss"] == h["loss"] for h in run["logs"])  # finite-or-not, a loss that is not NaN


def rollout_with_logprobs(prompts, trainer):
    """The deterministic rollout, plus the sampler's own per-token log-probs (fp32, no autocast), as a
    vLLM rollout returns them for TRL's importance-sampling correction."""
    out = trl_runs.deterministic_rollout(prompts, trainer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    logprobs = []
    with torch.no_grad():
        for p, c in zip(out["prompt_ids"], out["completion_ids"]):
            x = torch.tensor([p + c])
            logits = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0].float()
            lp = torch.log_softmax(logits[len(p) - 1:-1] / trainer.temperature, -1)
            logprobs.append(lp.gather(-1, torch.tensor(c)[:, None])[:, 0].tolist())
    return {**out, "logprobs": logprobs}


class VllmStyle(LpRegGRPOTrainer):
    """TRL's vLLM importance-sampling path without vLLM: the rollout supplies the sampler's log-probs,
    and TRL computes old_per_token_logps and the importance-sampling ratio from them."""

    def __init__(self, *args, **kwargs):
        kwargs["rollout_func"] = rollout_with_logprobs
        super().__init__(*args, **kwargs)
        self.use_vllm, self.vllm_importance_sampling_correction = True, True
        self.vllm_importance_sampling_mode = "token_truncate"
        self.vllm_generation = types.SimpleNamespace(sync_weights=lambda: None)
        self._last_loaded_step = -1


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("setting", ["vllm_is", "off_policy"])
def test_current_proxy_on_supplied_old_logps_has_ratio_one_on_policy(tmp_path, monkeypatch, fused, setting):
    """lpreg_proxy="current" with bf16=True, where old_per_token_logps exist although the update is on
    the rollout's weights: vLLM-style importance sampling (on-policy), or the first optimiser step of a
    generation batch with num_iterations = 2. The loss's ratio exp(logp - old) is 1 there: the old
    log-probs come from the same forward, under the same autocast (before: TRL's bf16 forward against
    lpreg's fp32 one, a ratio off by ~1e-2)."""
    seen = []
    real = lpreg_trl.lpreg_regularize

    def loss(base, stats, adv, old, mask, **kw):
        seen.append((stats.logp.detach().clone(), None if old is None else old.clone(), mask > 0))
        return real(base, stats, adv, old, mask, **kw)

    monkeypatch.setattr(lpreg_trl, "lpreg_regularize", loss)
    case = dict(loss_type="bnpo", epsilon=0.2, bf16=True, lpreg_fused=fused, lpreg_proxy="current", lpreg_rho=0.5,
                lpreg_threshold=0.2)
    if setting == "vllm_is":
        run = train(case, tmp_path, trainer_cls=VllmStyle, )
        on_policy = seen  # every micro-batch: one optimiser step per generation batch
        assert all(h["sampling/importance_sampling_ratio/mean"] > 0 for h in run["logs"])  # TRL's IS path ran
    else:
        train({**case, "num_iterations": 2}, tmp_path)
        on_policy = seen[:4]  # the first optimiser step of the generation batch
    assert len(seen) == 8 and all(old is not None for _, old, _ in seen)
    for logp, old, valid in on_policy:
        ratio = torch.exp(logp - old)[valid]
        assert valid.any() and (ratio - 1).abs().max().item() <= 1e-6, (ratio - 1).abs().max().item()


def test_extra_forward_arguments_are_refused_not_ignored(tmp_path, monkeypatch):
    """TRL passes multimodal forward arguments to its old-log-prob forward; lpreg's forward, which
    records the rollout proxy, does not take them: a ValueError, not a silent fall-back to TRL's forward
    (which would record no proxy, and the current policy would be used as q without a word)."""
    args = LpRegGRPOConfig(**trl_runs.base_args(tmp_path, 1, num_iterations=2))
    trainer = LpRegGRPOTrainer(model=tiny_model(), reward_funcs=trl_runs.reward_len_a, args=args,
                               train_dataset=trl_runs.dataset(), processing_class=tiny_tokenizer())
    ids = torch.tensor([[3, 4, 5, 6, 7]])

    def generate(self, inputs):  # TRL's old-log-prob call, with an extra forward argument
        with torch.no_grad():
            return self._get_per_token_logps_and_entropies(self.model, ids, torch.ones_like(ids), 3, batch_size=1,
                                                           token_type_ids=torch.zeros_like(ids))

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", generate)
    with pytest.raises(ValueError, match=r"extra forward arguments \['token_type_ids'\]"):
        trainer._generate_and_score_completions({})


def test_lm_head_as_an_fsdp2_unit_of_its_own_is_refused_at_start_up():
    """TRL is spared finding 2 only because accelerate puts lm_head in one FSDP2 unit with the final norm,
    whose forward unshards it; a head alone in its unit would be read as a sharded DTensor whose
    full_tensor() gradient no rank reduces: refused before the first rollout (fused path), accepted by
    the logits path and by accelerate's grouping."""
    from torch.distributed.fsdp import FSDPModule

    model = tiny_model()
    fwd.check_head_unit(model, fused=True)  # not sharded at all
    head, norm = model.lm_head, model.model.norm

    def as_unit(module, group):  # what fully_shard(group) does to each of its modules
        if not isinstance(module, FSDPModule):
            module.__class__ = type(f"FSDP{type(module).__name__}", (FSDPModule, type(module)), {})
        state = types.SimpleNamespace(_modules=group)
        module._get_fsdp_state = lambda: state

    as_unit(head, (norm, head))  # accelerate 1.16: fully_shard([final_norm, lm_head])
    fwd.check_head_unit(model, fused=True)
    as_unit(head, (head,))  # a size-based policy, or fully_shard(lm_head)
    with pytest.raises(ValueError, match="lm_head is an FSDP2 unit of its own"):
        fwd.check_head_unit(model, fused=True)
    fwd.check_head_unit(model, fused=False)  # the model's own forward unshards its own unit


def test_a_sharded_head_whose_gradient_is_needed_is_refused():
    class FakeDTensor(torch.Tensor):
        def full_tensor(self):
            return self.as_subclass(torch.Tensor)

    w = torch.randn(3, 2).as_subclass(FakeDTensor).requires_grad_()
    with pytest.raises(ValueError, match="sharded FSDP2 DTensor"):
        fwd._full_for_grad(w, "weight")
    with torch.no_grad():
        assert type(fwd._full_for_grad(w, "weight")) is torch.Tensor  # no gradient: gathered
