"""Lp-Reg over every TRL 1.16 loss_type and option (lpreg.integrations._trl_losses), one process.

- lpreg_beta = 0: `LpRegGRPOTrainer(...).train()` equals `GRPOTrainer(...).train()` (loss, gradient norm,
  parameters after two SGD steps; tolerances of test_trl.py) for each loss type once and each option once.
- The released swap's re-implementation of TRL's per-token loss (`token_base_loss`, `aggregate`) equals
  TRL's own `_compute_loss` on a real micro-batch, value and gradient, for each token-level loss type,
  with delta and with vLLM importance-sampling weights.
- compat="released" over a sequence-ratio objective raises at construction, naming the option.
- lpreg_beta > 0: the trainer's loss of a micro-batch equals a float64 oracle (TRL's loss type in
  float64 + the released or paper Lp-Reg term, selection transcribed in released_oracle.py).
"""

import os
import sys
import types

import pytest

pytest.importorskip("trl", reason="trl is not installed here: run `bash .ci/integrations.sh trl` (own venv)")

import torch  # noqa: E402
from trl import GRPOTrainer  # noqa: E402

from lpreg.integrations import _trl_losses  # noqa: E402
from lpreg.integrations.trl import LpRegGRPOConfig, LpRegGRPOTrainer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import released_oracle as oracle  # noqa: E402
import trl_runs  # noqa: E402
from test_trl import GRAD_RTOL, LOSS_ATOL, Capture, compare, float64_logits, train  # noqa: E402
from test_trl_bf16 import VllmStyle, rollout_with_logprobs  # noqa: E402
from tiny_lm import tiny_model, tiny_tokenizer  # noqa: E402

# each loss type once (on- or off-policy, fused or not, both forms), then each option once
LOSS_TYPE_CASES = [
    dict(loss_type="cispo", num_iterations=2, epsilon_high=1.01, lpreg_compat="released", lpreg_fused=True),
    dict(loss_type="sapo", num_iterations=2, lpreg_compat="released", lpreg_fused=False),
    dict(loss_type="luspo", num_iterations=2, importance_sampling_level="sequence", lpreg_compat="paper",
         lpreg_fused=True),
    dict(loss_type="vespo", num_iterations=2, lpreg_compat="paper", lpreg_fused=True),
]
OPTION_CASES = [
    dict(loss_type="grpo", num_iterations=2, importance_sampling_level="sequence", lpreg_compat="paper",
         lpreg_fused=True),  # GSPO
    dict(loss_type="dapo", num_iterations=2, delta=1.001, lpreg_compat="released", lpreg_fused=True),
    dict(loss_type="bnpo", num_iterations=1, beta=0.04, lpreg_compat="released", lpreg_fused=True),  # reference KL
    dict(loss_type="grpo", num_iterations=2, top_entropy_quantile=0.5, lpreg_compat="paper", lpreg_fused=False),
    dict(loss_type="dapo", num_iterations=2, off_policy_mask_threshold=1e-4, lpreg_compat="released",
         lpreg_fused=True),
    dict(loss_type="sapo", num_iterations=2, entropy_coef=0.05, top_entropy_quantile=0.8, lpreg_compat="released",
         lpreg_fused=True),  # the entropy bonus on the 80/20 mask's tokens
]


def _label(case):
    return " ".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", LOSS_TYPE_CASES + OPTION_CASES, ids=_label)
def test_beta0_every_loss_type_and_option_is_trl(tmp_path, case):
    trl_case = {k: v for k, v in case.items() if not k.startswith("lpreg_")}
    base = dict(epsilon=0.02)
    ref = train({**base, **trl_case, "trainer": "trl"}, tmp_path)
    ours = train({**base, **case, "lpreg_beta": 0.0}, tmp_path)
    keys = sorted(k for k in ref["logs"][0] if k.startswith(("clip_ratio", "kl", "cispo", "vespo", "entropy",
                                                                "policy_loss")))
    loss, grad, excess, extra = compare(ref, ours, f"beta=0 {_label(case)}", keys)
    assert ref["logs"][0]["grad_norm"] > 1e-4  # a loss that trains
    assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and excess <= 0
    assert all(v <= LOSS_ATOL for v in extra.values()), extra  # TRL's own metrics, from lpreg's log-probs
    assert all(h["lpreg/selected"] == 0 for h in ours["logs"])  # beta = 0: Lp-Reg off


class TrlVllmStyle(GRPOTrainer):
    """TRL's own trainer on test_trl_bf16's vLLM stand-in (the rollout supplies the sampler's log-probs; TRL
    computes old_per_token_logps and its importance-sampling ratio from them)."""

    def __init__(self, *args, **kwargs):
        kwargs["rollout_func"] = rollout_with_logprobs
        super().__init__(*args, **kwargs)
        self.use_vllm, self.vllm_importance_sampling_correction = True, True
        self.vllm_importance_sampling_mode = "token_truncate"
        self.vllm_generation = types.SimpleNamespace(sync_weights=lambda: None)
        self._last_loaded_step = -1


@pytest.mark.parametrize("loss_type,compat", [("bnpo", "released"), ("vespo", "paper")])
def test_beta0_vllm_importance_sampling_is_trl(tmp_path, loss_type, compat):
    """TRL's vLLM importance-sampling correction (stubbed on CPU) at beta = 0: TRL's own loss; vespo folds the
    ratio into its sequence weight, the others multiply the per-token loss by it."""
    case = dict(loss_type=loss_type, num_iterations=1, epsilon=0.02)
    ref = train({**case, "trainer": "trl"}, tmp_path, trainer_cls=TrlVllmStyle)
    ours = train({**case, "lpreg_beta": 0.0, "lpreg_compat": compat}, tmp_path, trainer_cls=VllmStyle)
    loss, grad, excess, _ = compare(ref, ours, f"beta=0 vLLM IS {loss_type}")
    assert all(h["sampling/importance_sampling_ratio/mean"] > 0 for h in ref["logs"] + ours["logs"])  # the IS path
    assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and excess <= 0


@pytest.mark.parametrize("setting,value", [("importance_sampling_level", "sequence"), ("loss_type", "luspo"),
                                           ("loss_type", "vespo")])
def test_released_refuses_sequence_ratio_objectives(tmp_path, setting, value):
    args = LpRegGRPOConfig(**trl_runs.base_args(tmp_path, 1, **{setting: value}), lpreg_compat="released")
    with pytest.raises(ValueError, match=f"{setting}.*lpreg_compat='paper'"):
        LpRegGRPOTrainer(model=tiny_model(), reward_funcs=trl_runs.reward_len_a, args=args,
                         train_dataset=trl_runs.dataset(), processing_class=tiny_tokenizer())


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """A trainer after two off-policy optimiser steps and its last micro-batch (ratio != 1)."""
    trl_runs.no_shuffle()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    Capture.records = []
    run = trl_runs.train(dict(loss_type="bnpo", num_iterations=2, epsilon=0.02, lpreg_beta=1.0, lpreg_rho=0.5,
                              lpreg_threshold=0.2, lpreg_fused=False),
                         tmp_path_factory.mktemp("cap"), trainer_cls=Capture)
    return run["trainer"], Capture.records


def _trl_logps(trainer, inputs):
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    return GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, att,
                                                          inputs["completion_ids"].shape[1])[0]


@pytest.mark.parametrize("loss_type,delta,weighted", [(lt, None, False) for lt in ("grpo", "bnpo", "dr_grpo", "dapo",
                                                                                  "sapo", "cispo")]
                         + [("dapo", 1.01, False), ("grpo", None, True), ("sapo", None, True)])
def test_reimplemented_base_is_trl(captured, loss_type, delta, weighted):
    """token_base_loss x TRL's weights, aggregated by `aggregate` / accumulation, equals TRL's _compute_loss on
    the same micro-batch with the same weights (value and gradient of every parameter)."""
    trainer, records = captured
    inputs, state, _, _ = records[-1]
    inputs = dict(inputs)
    trainer.model.load_state_dict(state)
    saved = (trainer.loss_type, trainer.args.delta, trainer.use_vllm, trainer.vllm_importance_sampling_correction,
             trainer.epsilon_high)
    trainer.loss_type, trainer.args.delta = loss_type, delta
    if loss_type == "cispo":
        trainer.epsilon_high = 1.01  # CISPO's cap, binding at some tokens of this micro-batch
    mask = inputs["completion_mask"]
    w = None
    if weighted:  # TRL's vLLM importance sampling (stubbed: the flags and a weight tensor; TRL's own code reads them)
        g = torch.Generator().manual_seed(5)
        w = torch.rand(mask.shape, generator=g) * 2
        w[torch.rand(w.shape, generator=g) < 0.3] = 0.0
        inputs[_IS_KEY] = w
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    try:
        trainer.model.zero_grad()
        want = GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
        want.backward()
        g_want = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
        trainer.model.zero_grad()
        logp = _trl_logps(trainer, inputs)
        old = inputs.get("old_per_token_logps")
        adv = inputs["advantages"][:, None]
        base = _trl_losses.token_base_loss(loss_type, logp, logp.detach() if old is None else old, adv,
                                           epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high,
                                           delta=delta, sapo_temperature_pos=trainer.args.sapo_temperature_pos,
                                           sapo_temperature_neg=trainer.args.sapo_temperature_neg)
        if w is not None:
            base = base * w
        normalizer = None
        if loss_type in ("dapo", "cispo"):
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) * trainer.current_gradient_accumulation_steps \
                / trainer.args.steps_per_generation
        got = _trl_losses.aggregate(base, mask, loss_type=loss_type,
                                    max_completion_length=trainer.max_completion_length, normalizer=normalizer)
        if normalizer is None:
            got = got / trainer.current_gradient_accumulation_steps
        got.backward()
        g_got = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    finally:
        (trainer.loss_type, trainer.args.delta, trainer.use_vllm, trainer.vllm_importance_sampling_correction,
         trainer.epsilon_high) = saved
        trainer.model.zero_grad()
    assert abs(float(got) - float(want)) <= 1e-7 * max(1.0, abs(float(want))), (float(got), float(want))
    assert g_got.keys() == g_want.keys()
    for k in g_want:
        torch.testing.assert_close(g_got[k], g_want[k], rtol=1e-5, atol=1e-7)
    assert any(v.abs().max() > 0 for v in g_want.values())


_IS_KEY = "importance_sampling_ratio"


def _oracle(inputs, state, rollout_state, trainer, *, loss_type, compat, rho, beta, kappa):
    """The micro-batch's loss in float64: TRL's per-token base (the transcription pinned above) + the Lp-Reg
    term, aggregated as TRL aggregates loss_type; and the selection."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    C = inputs["completion_ids"].shape[1]
    labels, mask = inputs["completion_ids"], inputs["completion_mask"]
    rollout, current = float64_logits(rollout_state, ids, att, C), float64_logits(state, ids, att, C)
    logp, old = oracle.label_logp(current, labels), oracle.label_logp(rollout, labels)
    tgt = oracle.minp_target_logp(rollout, labels, kappa)
    adv = inputs["advantages"].double()[:, None].expand_as(logp)
    a = trainer.args
    base = _trl_losses.token_base_loss(loss_type, logp, old, adv, epsilon_low=trainer.epsilon_low,
                                       epsilon_high=trainer.epsilon_high, delta=a.delta,
                                       sapo_temperature_pos=a.sapo_temperature_pos,
                                       sapo_temperature_neg=a.sapo_temperature_neg)
    surrogate = base if loss_type == "cispo" else -adv * torch.exp(logp - old)
    per_token, sel = oracle.regularized_token_losses(base, surrogate, logp, tgt, adv, mask, compat=compat, rho=rho,
                                                     beta=beta, old_logp=old)
    normalizer = None
    if loss_type in ("dapo", "cispo"):
        accum = trainer.current_gradient_accumulation_steps
        normalizer = inputs["num_items_in_batch"].double().clamp(min=1.0) * accum / a.steps_per_generation
    loss = _trl_losses.aggregate(per_token, mask, loss_type=loss_type,
                                 max_completion_length=trainer.max_completion_length, normalizer=normalizer)
    return float(loss if normalizer is not None else loss / trainer.current_gradient_accumulation_steps), sel


@pytest.mark.parametrize("loss_type,compat", [("sapo", "released"), ("cispo", "released"), ("grpo", "paper")])
def test_beta_positive_equals_float64_oracle(tmp_path, loss_type, compat):
    """Off-policy, k3 against the rollout proxy (lpreg_kl_estimator='k3' in both forms, so the oracle reads
    log q(y) only): every micro-batch's loss equals the float64 oracle within 5e-5 and Lp-Reg selected tokens.
    Tolerance: fp32 log-probs of logits up to ~60 are off by a few ulp of the log-sum-exp (~4e-6); a
    per-token term moves by (|A| r + beta |e^d - 1|, <= ~12) times that, and the loss is their mean: <= 5e-5.
    One token selected differently would move it by beta k3 / n ~ 1e-3 or more."""
    Capture.records = []
    args = dict(loss_type=loss_type, num_iterations=2, epsilon=0.2, lpreg_beta=1.0, lpreg_rho=0.5,
                lpreg_threshold=0.2, lpreg_fused=True, lpreg_compat=compat, lpreg_kl_estimator="k3")
    if compat == "paper":  # one micro-batch per generation batch: the step-wide selection is the micro-batch's
        args.update(steps_per_generation=1, gradient_accumulation_steps=1, per_device_train_batch_size=16)
    run = train(args, tmp_path, trainer_cls=Capture)
    trainer = run["trainer"]
    selected = 0
    for inputs, state, rollout_state, loss in Capture.records:
        want, sel = _oracle(inputs, state, rollout_state, trainer, loss_type=loss_type, compat=compat, rho=0.5,
                            beta=1.0, kappa=0.2)
        print(f"{loss_type} {compat}: {loss:.8f} vs float64 {want:.8f} ({abs(loss - want):.1e}), "
              f"selected {int(sel.sum())}")
        assert abs(loss - want) <= 5e-5
        selected += int(sel.sum())
    assert selected >= 2


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_mechanism_metrics_pooled_exactly_over_micro_batches(tmp_path, loss_type):
    """lpreg/* over a logging window of 4 micro-batches (one process) equals one mechanism_metrics call on the
    concatenation of the micro-batches' LossTerms (the exact pool, not TRL's mean of per-micro-batch values)."""
    import lpreg
    import lpreg.integrations.trl as lt

    seen = []
    real = lt.lpreg_regularize

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append((out, args[4] > 0))
        return out

    lt.lpreg_regularize = spy
    try:
        run = train(dict(loss_type=loss_type, num_iterations=1, max_steps=1, lpreg_beta=1.0, lpreg_rho=0.3,
                         lpreg_threshold=0.2, lpreg_compat="released"), tmp_path)
    finally:
        lt.lpreg_regularize = real
    log = [h for h in run["trainer"].state.log_history if "lpreg/selected" in h][0]
    assert len(seen) == 4
    sums = [lpreg.mechanism_sums(t, v) for t, v in seen]
    pooled = lpreg.mechanism_metrics({k: sum(s[k] for s in sums) for k in sums[0]})
    for k in ("candidates", "filtered_frac", "selected", "kept_mass", "push", "p_y"):
        assert log[f"lpreg/{k}"] == pytest.approx(float(pooled[f"lpreg_{k}"]), rel=1e-6, abs=1e-9), k
    assert log["lpreg/selected"] > 0
    per_call = [float(lpreg.mechanism_metrics(s)["lpreg_kept_mass"]) for s in sums if float(s["selected"]) > 0]
    print(f"{loss_type}: pooled kept mass {log['lpreg/kept_mass']:.6f}, per micro-batch {per_call}")
    n_valid = sum(int(v.sum()) for _, v in seen)
    assert log["lpreg/frac"] == pytest.approx(log["lpreg/selected"] / n_valid, rel=1e-6)
