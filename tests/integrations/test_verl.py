"""The lpreg verl plugin against the real verl (0.9.x): its FSDP engine on CPU (gloo), one rank.

Runs in its own environment: `bash .ci/integrations.sh verl`. Without verl installed (the
main environment) every test here is skipped. Two ranks: test_verl_dp2.py.

Tolerances, lpreg's loss against verl's own (beta = 0): both are fp32 sums over <= 48 response
tokens of clipped -A r terms whose log-probs come from verl's log-softmax and lpreg's kernel,
which round differently: each log-prob differs by a few ulp of the log-sum-exp (|lse| <= ~60 with
this model's spread logits: 4 * 60 * 6e-8 = 1.4e-5 at most, typically ~1e-7). Loss (a token mean
of |A| r <= 1.2 x 1.35 terms): LOSS_ATOL = 1.6 * 1.4e-5 ~ 2.3e-5 (seen <= 1e-7). Gradient norm,
relative: the same relative perturbation of each per-token gradient, summed: GRAD_RTOL = 2.3e-5
(seen <= 3e-7). Parameters after the AdamW steps: tolerances.adamw_excess, a bound from lr, the
step count and the two runs' measured gradient differences (no fixed number): AdamW divides each
gradient element by its own RMS, so an element with a ~0 gradient turns a last-bit difference
into a visible parameter difference; the bound accounts for exactly that.
"""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("verl", reason="verl is not installed here: run `bash .ci/integrations.sh verl` (own venv)")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import released_oracle as oracle  # noqa: E402
import tolerances  # noqa: E402
import verl_runs as V  # noqa: E402
from tiny_lm import save_tiny, tiny_model  # noqa: E402

import lpreg.integrations.verl as lpreg_verl  # noqa: E402

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "integrations.md")
LOSS_ATOL, GRAD_RTOL = 2.3e-5, 2.3e-5
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    V.init(29541)
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


def compare(a, b, label):
    """(max |loss diff|, max rel grad-norm diff, AdamW-bound excess) between two runs."""
    loss = max(abs(x["loss"] - y["loss"]) for x, y in zip(a["steps"], b["steps"]))
    grad = max(abs(x["grad_norm"] - y["grad_norm"]) / abs(x["grad_norm"]) for x, y in zip(a["steps"], b["steps"]))
    param = max((p - b["params"][k].reshape(p.shape)).abs().max().item() for k, p in a["params"].items())
    excess = tolerances.adamw_excess(a["params"], b["params"], [s["grads"] for s in a["steps"]],
                                     [s["grads"] for s in b["steps"]], [s["grad_norm"] for s in a["steps"]],
                                     [s["grad_norm"] for s in b["steps"]], lr=V.LR)
    print(f"{label}: loss abs {loss:.2e}, grad-norm rel {grad:.2e}, param abs {param:.2e}, "
          f"AdamW-bound excess {excess:.2e}; losses {[s['loss'] for s in a['steps']]}")
    tolerances.record(f"test_verl {label}", loss_abs=loss, loss_tol=LOSS_ATOL, grad_rel=grad, grad_tol=GRAD_RTOL,
                      param_abs=param, param_bound_excess=excess)
    return loss, grad, excess


def test_import_verl_registers_the_plugin():
    """In a fresh interpreter: `import verl` alone loads lpreg through the entry point."""
    code = ("import verl\n"
            "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY\n"
            "from verl.workers.engine import EngineRegistry\n"
            "assert 'lpreg' in POLICY_LOSS_REGISTRY, sorted(POLICY_LOSS_REGISTRY)\n"
            "cls = EngineRegistry._engines['language_model']['fsdp2']['cuda']\n"
            "assert cls.__name__ == 'LpRegFSDPEngineWithLMHead', cls\n")
    # cwd elsewhere: from the repository root, `-c` would import ./lpreg (the source tree)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_plugin_import_failure_is_visible():
    """verl logs a failing plugin at DEBUG only; lpreg's plugin warns (and verl still imports)."""
    code = ("import sys\n"
            "sys.modules['verl.workers.engine.fsdp.transformer_impl'] = None  # an import that fails\n"
            "import verl\n"
            "from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY\n"
            "assert 'lpreg' not in POLICY_LOSS_REGISTRY\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RuntimeWarning: lpreg's verl plugin (loss_mode=lpreg) failed to load" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("compat,rmpad", [("released", True), ("paper", False)])
def test_beta0_reproduces_verl_vanilla_with_its_defaults(model_path, agg, compat, rmpad):
    """verl's defaults (dual clip clip_ratio_c = 3, clip 0.2), two mini-batches (the second one
    off-policy, against the rollout proxy): lpreg at beta = 0 is verl's vanilla loss."""
    case = dict(loss_agg_mode=agg, mini=4, remove_padding=rmpad)
    ref = V.run(model_path, {**case, "loss_mode": "vanilla"})
    ours = V.run(model_path, {**case, "lpreg_beta": 0.0, "lpreg_compat": compat, "lpreg_rho": 0.5})
    loss, grad, excess = compare(ref, ours, f"beta=0 {agg} {compat} rmpad={rmpad}")
    assert "actor/lpreg_frac" in ours["steps"][0]["metrics"]  # the lpreg engine really ran
    for k in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower"):  # verl's metrics, logged by lpreg too
        assert all(abs(x["metrics"][k] - y["metrics"][k]) <= 1e-6 for x, y in zip(ref["steps"], ours["steps"])), k
    assert ref["steps"][1]["metrics"]["actor/pg_clipfrac"] > 0  # the clip acted on the off-policy step
    assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and excess <= 0


def test_dual_clip_acts_and_is_verls(model_path):
    """Old log-probs lowered by U(0, 1) per token (ratios from 1 to e = 2.7, across clip_ratio_c =
    1.5): verl's dual clip caps the A < 0 tokens above it; lpreg's pg_clipfrac_lower (verl's own
    metric of its base loss) equals verl's and is > 0, the losses agree; with lpreg_dual_clip=False
    the loss is another (the Lp-Reg objective and the released code have no dual clip)."""
    case = dict(mini=4, clip_ratio_c=1.5, old_logp_shift=1.0)
    ref = V.run(model_path, {**case, "loss_mode": "vanilla"})
    ours = V.run(model_path, {**case, "lpreg_beta": 0.0})
    lower = [s["metrics"]["actor/pg_clipfrac_lower"] for s in ref["steps"]]
    assert lower[0] > 0 and lower == pytest.approx([s["metrics"]["actor/pg_clipfrac_lower"] for s in ours["steps"]])
    loss, grad, excess = compare(ref, ours, "dual clip: beta=0 vs vanilla")
    assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and excess <= 0
    off = V.run(model_path, {**case, "lpreg_beta": 0.0, "lpreg_dual_clip": False})
    assert off["steps"][0]["metrics"]["actor/pg_clipfrac_lower"] == 0
    assert abs(off["steps"][0]["loss"] - ours["steps"][0]["loss"]) > 1e-3  # without it the loss is another


@pytest.mark.parametrize("compat", ["released", "paper"])
def test_fused_kernels_and_layouts_agree(model_path, compat):
    """use_fused_kernels=True (hidden states x LM head, lpreg.fused_linear_token_stats), the logits
    path with remove-padding, and the padded layout: the same Lp-Reg loss (beta = 1, off-policy,
    rollout proxy). Parameters: the AdamW bound from the runs' own gradient differences."""
    case = dict(mini=4, lpreg_beta=1.0, lpreg_compat=compat, lpreg_rho=0.5, lpreg_threshold=0.2)
    packed = V.run(model_path, case)
    fused = V.run(model_path, {**case, "fused": True})
    padded = V.run(model_path, {**case, "remove_padding": False})
    m = packed["steps"][0]["metrics"]
    assert m["actor/lpreg_frac"] > 0 and m["actor/lpreg_kl"] > 0 and 0 < m["actor/lpreg_threshold"] <= 1, m
    for other, label in ((fused, "fused"), (padded, "padded")):
        loss, grad, excess = compare(packed, other, f"lpreg beta=1 {compat}: remove-padding vs {label}")
        assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and excess <= 0
    base = V.run(model_path, {**case, "lpreg_beta": 0.0})
    assert abs(base["steps"][0]["loss"] - packed["steps"][0]["loss"]) > 1e-6  # beta > 0 changes the loss


def test_rollout_proxy_is_recorded_and_used(model_path):
    """Off-policy, the old-log-prob pass records q (k3: log q(y); full KL: the sparse record) and
    the second mini-batch trains against it: with lpreg_proxy='current' its loss differs."""
    case = dict(mini=4, lpreg_beta=1.0, lpreg_rho=0.5, lpreg_threshold=0.2)
    released = V.run(model_path, case)
    paper = V.run(model_path, {**case, "lpreg_compat": "paper"})
    current = V.run(model_path, {**case, "lpreg_proxy": "current"})
    assert "lpreg_rollout_logq" in released["batch"].batch.keys()
    assert "lpreg_proxy_indices" not in released["batch"].batch.keys()
    assert {"lpreg_rollout_logq", "lpreg_proxy_indices", "lpreg_proxy_logq"} <= set(paper["batch"].batch.keys())
    assert "lpreg_rollout_logq" not in current["batch"].batch.keys()
    assert released["steps"][0]["loss"] == pytest.approx(current["steps"][0]["loss"], abs=LOSS_ATOL)
    assert abs(released["steps"][1]["loss"] - current["steps"][1]["loss"]) > 1e-4
    on_policy = V.run(model_path, {**case, "mini": V.B})  # one optimiser step per rollout: nothing recorded
    assert "lpreg_rollout_logq" not in on_policy["batch"].batch.keys()


def float64_logp(state, batch, rows):
    """(rows, R) float64 log p(y) and the (rows, R, V) logits of the response tokens, from `state`."""
    m = tiny_model().double()
    m.load_state_dict({k: v.double() for k, v in state.items()})
    b = batch.batch
    ids, mask, pos = b["input_ids"][rows], b["attention_mask"][rows], b["position_ids"][rows]
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, V.P - 1:-1]
    return oracle.label_logp(logits, b["responses"][rows]), logits


def test_off_policy_rollout_proxy_equals_released_float64(model_path):
    """Off-policy (two mini-batches, one micro-batch each: the released code's per-micro-batch
    token-mean is then verl's global one), released form, no dual clip (the released loss has
    none): each step's loss equals the float64 transcription of the released code, q from the
    rollout-time logits. Bound: fp32 log-probs within 4 ulp of the largest |logit| (delta), each
    per-token term moving by (|A| r + beta |e^d - 1|) x 2 delta; that sum over the tokens / n."""
    case = dict(mini=4, micro=4, lpreg_beta=1.0, lpreg_rho=0.5, lpreg_threshold=0.2, lpreg_dual_clip=False,
                keep_states=True)
    run = V.run(model_path, case)
    batch = run["batch"]
    selected = 0
    for k, step in enumerate(run["steps"]):
        rows = torch.arange(4 * k, 4 * k + 4)
        logp, cur = float64_logp(step["state"], batch, rows)
        old, rollout = float64_logp(run["rollout_state"], batch, rows)
        labels, mask = batch.batch["responses"][rows], batch.batch["response_mask"][rows]
        tgt = oracle.minp_target_logp(rollout, labels, 0.2)
        adv = batch.batch["advantages"][rows]
        per_token, sel = oracle.released_token_losses(logp, old, tgt, adv, mask, clip_low=0.2, clip_high=0.2,
                                                      rho=0.5, beta=1.0)
        n = mask.sum().item()
        want = per_token.sum().item() / n
        delta = 4 * tolerances.EPS32 * max(cur.abs().max().item(), rollout.abs().max().item())
        d = (tgt - logp).clamp(max=20)
        sens = (adv.abs().double() * torch.exp(logp - old) + sel * (torch.exp(d) - 1).abs()) * (mask > 0)
        bound = 2 * delta * sens.sum().item() / n
        print(f"step {k}: loss {step['loss']:.8f} vs float64 {want:.8f}: {abs(step['loss'] - want):.2e} "
              f"(bound {bound:.1e}); selected {int(sel.sum())}")
        tolerances.record(f"test_verl released float64 oracle, step {k}", loss_abs=abs(step["loss"] - want),
                          loss_tol=bound, selected=int(sel.sum()))
        assert abs(step["loss"] - want) <= bound
        selected += int(sel.sum())
    assert selected >= 2


def test_paper_selection_is_exact_over_the_mini_batch(model_path):
    """Two micro-batches of 4: the step threshold applied to each micro-batch's old log-probs
    selects exactly k = max(1, floor(rho n)) of the mini-batch's n response tokens."""
    seen = V.run(model_path, dict(lpreg_compat="paper", lpreg_rho=0.3, micro=4, record_selection=True))["selection"]
    assert len(seen) == 2
    n = seen[0][3] + seen[1][3]
    assert seen[0][1] == n and seen[0][0] == max(1, int(0.3 * n)) == seen[0][2] + seen[1][2]


@pytest.mark.parametrize("setting,value,match", [
    ("strategy", "megatron", "strategy='megatron'"), ("calculate_sum_pi_squared", True, "calculate_sum_pi_squared"),
    ("policy_loss.lpreg_rho", 2.0, "lpreg_rho"), ("policy_loss.lpreg_proxy", "old", "lpreg_proxy"),
    ("clip_ratio_c", 0.5, "clip_ratio_c")])
def test_config_errors_when_the_actor_config_is_built(setting, value, match):
    """Raised by verl's own config build (the driver's validate_config, each worker's init_model),
    before any rollout: here, building the ActorConfig dataclass verl builds."""
    kwargs = dict(strategy="fsdp2", rollout_n=1, ppo_micro_batch_size_per_gpu=2, ppo_mini_batch_size=8)
    policy = dict(loss_mode="lpreg")
    if setting.startswith("policy_loss."):
        policy[setting.split(".", 1)[1]] = value
        with pytest.raises(ValueError, match=match):
            V.ActorConfig(**kwargs, policy_loss=lpreg_verl.LpRegPolicyLossConfig(**policy))
        return
    with pytest.raises(ValueError, match=match):
        V.ActorConfig(**{**kwargs, setting: value}, policy_loss=lpreg_verl.LpRegPolicyLossConfig(**policy))


def overrides():
    """The Hydra overrides of the docs' "Use with verl" snippet, verbatim."""
    body = open(DOCS).read().split("## Use with verl", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [t for t in block.replace("\\\n", " ").split() if "=" in t and not t.startswith("python")]


def test_docs_overrides_compose_validate_and_train(model_path):
    """verl's own ppo_trainer config with the docs' overrides -> the driver's validate_config -> the
    actor config verl's worker builds (omega_conf_to_dataclass) -> one update of the lpreg engine;
    the same overrides plus an unsupported setting fail in validate_config, before any rollout."""
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    ours = overrides()
    assert any("loss_mode=lpreg" in o for o in ours), ours
    sizes = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
             "actor_rollout_ref.rollout.n=1", "data.train_batch_size=8", "trainer.n_gpus_per_node=1",
             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2"]
    cfg = V.compose(ours + sizes)
    validate_config(cfg, use_reference_policy=False, use_critic=False)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, lpreg_verl.LpRegPolicyLossConfig)
    assert actor.policy_loss.loss_mode == "lpreg"
    from hydra.errors import InstantiationException

    with pytest.raises((ValueError, InstantiationException), match="calculate_sum_pi_squared"):
        validate_config(V.compose(ours + sizes + ["actor_rollout_ref.actor.calculate_sum_pi_squared=True"]),
                        use_reference_policy=False, use_critic=False)
    engine = V.make_engine(model_path)
    td = V.left_right_2_no_padding(V.rollout_batch(model_path).union(
        V.DataProto.from_single_dict({"old_log_probs": torch.zeros(V.B, V.R)})).to_tensordict())
    V.tu.assign_non_tensor(td, global_batch_size=V.B, use_remove_padding=True, micro_batch_size_per_gpu=4,
                           use_dynamic_bsz=False)
    with engine.train_mode():
        res = engine.forward_backward_batch(td, V.lpreg_verl_loss(actor))
    assert "actor/lpreg_frac" in res["metrics"] and all(x == x for x in res["loss"])


# ---- Lp-Reg over every verl policy loss (lpreg_base_loss_mode; docs/spec.md, "Lp-Reg over any base objective")

BASES = ("bypass_mode", "cispo", "clip_cov", "dppo_kl", "dppo_tv", "dro", "geo_mean", "gpg", "gspo", "kl_cov", "sapo",
         "vanilla")
# each base's own settings, so that its special terms act on this batch (clip_cov's covariance band and
# kl_cov's share wide enough to hit tokens; DRO needs its beta)
BASE_POLICY = {"dro": dict(dro_beta=0.5), "clip_cov": dict(clip_cov_ratio=0.2, clip_cov_lb=0.0, clip_cov_ub=50.0),
               "kl_cov": dict(kl_cov_ratio=0.2)}


def test_bases_are_every_policy_loss_verl_registers():
    """A policy loss a new verl registers fails here until its composition is decided."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    assert sorted(k for k in POLICY_LOSS_REGISTRY if k != "lpreg") == list(BASES)


# bypass mode's other loss type, with its token-level importance weights and rejection sampling acting
BYPASS_REINFORCE = dict(rollout_correction=dict(loss_type="reinforce", rollout_is="token", rollout_is_threshold=1.3,
                                                rollout_rs="token_k1", rollout_rs_threshold=1.3))


@pytest.mark.parametrize("base,policy", [(b, BASE_POLICY.get(b, {})) for b in BASES]
                         + [("bypass_mode", BYPASS_REINFORCE)], ids=list(BASES) + ["bypass_mode-reinforce"])
def test_beta0_equals_verls_own_loss_for_each_base(model_path, base, policy):
    """lpreg_base_loss_mode=<base> at beta = 0 against verl's own loss_mode=<base>: two mini-batches,
    the second off-policy with ratios spread by old_logp_shift so the clips, gates and masks act; the
    loss, gradient norm and parameters after both AdamW steps agree, and so do verl's own metrics."""
    from lpreg.integrations._verl_config import SEQUENCE_RATIO

    case = dict(mini=4, old_logp_shift=0.5, policy=policy)
    ref = V.run(model_path, {**case, "loss_mode": base})
    compat = "paper" if base in SEQUENCE_RATIO else "released"
    ours = V.run(model_path, {**case, "lpreg_base_loss_mode": base, "lpreg_beta": 0.0, "lpreg_compat": compat,
                              "lpreg_rho": 0.5})
    loss, grad, excess = compare(ref, ours, f"beta=0 {base} {compat}")
    assert "actor/lpreg_selected" in ours["steps"][0]["metrics"]  # the lpreg engine really ran
    for k in ref["steps"][0]["metrics"]:
        if k.startswith("actor/") and k not in ("actor/pg_loss",):
            assert ref["steps"][1]["metrics"][k] == pytest.approx(ours["steps"][1]["metrics"][k], abs=1e-5), k
    assert abs(ref["steps"][1]["loss"]) > 1e-5
    assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and excess <= 0


@pytest.mark.parametrize("policy,match", [
    (dict(lpreg_base_loss_mode="gspo"), r"lpreg_base_loss_mode='gspo' with lpreg_compat='released'.*paper"),
    (dict(lpreg_base_loss_mode="geo_mean"), r"lpreg_base_loss_mode='geo_mean' with lpreg_compat='released'.*paper"),
    (dict(lpreg_base_loss_mode="lpreg"), r"lpreg_base_loss_mode must be one of verl's registered policy losses"),
    (dict(lpreg_base_loss_mode="ppo"), r"lpreg_base_loss_mode must be one of .*'vanilla'.*got 'ppo'"),
    (dict(lpreg_base_loss_mode="dro", lpreg_compat="paper"), r"policy_loss.dro_beta > 0"),
    (dict(lpreg_base_loss_mode="kl_cov", kl_cov_ratio=0.0), r"policy_loss.kl_cov_ratio > 0"),
    (dict(lpreg_base_loss_mode="sapo", lpreg_dual_clip=False), r"lpreg_dual_clip=False .*'sapo' has none"),
    (dict(lpreg_fp32_head="yes"), r"lpreg_fp32_head must be True or False, got 'yes'")])
def test_base_loss_mode_refusals_at_construction(policy, match):
    """A base that cannot compose raises when the policy-loss config is built, naming the option."""
    with pytest.raises(ValueError, match=match):
        lpreg_verl.LpRegPolicyLossConfig(loss_mode="lpreg", **policy)
    assert lpreg_verl.LpRegPolicyLossConfig(loss_mode="lpreg", lpreg_base_loss_mode="gspo", lpreg_compat="paper")


@pytest.mark.parametrize("base,compat", [("vanilla", "released"), ("sapo", "released"), ("dppo_tv", "released"),
                                         ("gspo", "paper"), ("vanilla", "paper")])
def test_beta1_equals_float64_oracle(model_path, base, compat):
    """Lp-Reg at beta = 1 over verl's base (k3, q from the rollout-time logits): each step's loss (two
    mini-batches of one micro-batch, the second off-policy) equals verl_base_oracle's float64 loss
    from the weights that step saw, aggregated as the base aggregates (token-mean; SAPO its own
    seq-mean-token-mean). Bound: as test_off_policy_rollout_proxy_equals_released_float64, each
    token's sensitivity to its log-probs |A| r (1 + |log p|) + S |e^d - 1| (dppo's log p factor)."""
    import verl_base_oracle as bo

    case = dict(mini=4, micro=4, lpreg_base_loss_mode=base, lpreg_compat=compat, lpreg_beta=1.0, lpreg_rho=0.5,
                lpreg_threshold=0.2, lpreg_kl_estimator="k3", keep_states=True)
    run = V.run(model_path, case)
    batch = run["batch"]
    selected = 0
    for k, step in enumerate(run["steps"]):
        rows = torch.arange(4 * k, 4 * k + 4)
        logp, cur = float64_logp(step["state"], batch, rows)
        old, rollout = float64_logp(run["rollout_state"], batch, rows)
        labels, mask = batch.batch["responses"][rows], batch.batch["response_mask"][rows]
        tgt = oracle.minp_target_logp(rollout, labels, 0.2)
        adv = batch.batch["advantages"][rows].double()
        per_token, sel = bo.lpreg_tokens(base, compat, logp, old, tgt, adv, mask, rho=0.5, beta=1.0, eps=0.2, c=3.0)
        m = (mask > 0).double()
        if base == "sapo":  # seq-mean-token-mean over the mini-batch's rows
            want = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).sum().item() / 4
            n = 4 * m.sum(-1).min().item()
        else:
            n = m.sum().item()
            want = per_token.sum().item() / n
        delta = 4 * tolerances.EPS32 * max(cur.abs().max().item(), rollout.abs().max().item())
        d = (tgt - logp).clamp(max=20)
        sens = (adv.abs() * torch.exp(logp - old) * (1 + logp.abs()) + sel * (torch.exp(d) - 1).abs()) * m
        bound = 2 * delta * sens.sum().item() / n
        print(f"{base} {compat} step {k}: loss {step['loss']:.8f} vs float64 {want:.8f}: "
              f"{abs(step['loss'] - want):.2e} (bound {bound:.1e}); selected {int(sel.sum())}")
        tolerances.record(f"test_verl {base} {compat} float64 oracle, step {k}", loss_abs=abs(step["loss"] - want),
                          loss_tol=bound, selected=int(sel.sum()))
        assert abs(step["loss"] - want) <= bound
        selected += int(sel.sum())
    assert selected >= 2


def pooled_from_terms(terms):
    """The mechanism metrics of one computation over every recorded micro-batch's per-token terms."""
    from lpreg import mechanism_metrics, mechanism_sums

    sums = None
    for t, valid in terms:
        s = mechanism_sums(t, valid)
        s["kl"], s["valid"] = t.divergence.detach().sum().double(), valid.double().sum()
        sums = {k: v.double() for k, v in s.items()} if sums is None else {k: sums[k] + v for k, v in s.items()}
    out = {f"actor/{k}": float(v) for k, v in mechanism_metrics(sums).items()}
    out["actor/lpreg_kl"] = float(sums["kl"] / sums["selected"].clamp(min=1))
    out["actor/lpreg_frac"] = float(sums["selected"] / sums["valid"])
    return out


MECHANISM = ("actor/lpreg_candidates", "actor/lpreg_filtered_frac", "actor/lpreg_selected", "actor/lpreg_kept_mass",
             "actor/lpreg_push", "actor/lpreg_p_y", "actor/lpreg_kl", "actor/lpreg_frac")


@pytest.mark.parametrize("compat", ["released", "paper"])
def test_mechanism_metrics_exact_over_micro_batches(model_path, compat):
    """One optimiser step over four micro-batches: the logged actor/lpreg_* (verl's metric reduction
    after lpreg's pooling) equal one computation over all four micro-batches' per-token terms, and the
    mean of the per-micro-batch ratios (what verl's MEAN would log) is a different number."""
    run = V.run(model_path, dict(mini=V.B, micro=2, lpreg_compat=compat, lpreg_beta=1.0, lpreg_rho=0.5,
                                 lpreg_threshold=0.2, record_terms=True))
    assert len(run["terms"]) == 4
    logged, want = run["steps"][0]["metrics"], pooled_from_terms(run["terms"])
    print({k: (logged[k], want[k]) for k in MECHANISM})
    for k in MECHANISM:
        assert logged[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), k
    assert want["actor/lpreg_selected"] >= 2 and 0 < want["actor/lpreg_kept_mass"] <= 1
    assert want["actor/lpreg_push"] == pytest.approx(float(sum(
        ((1 / t.kept_mass - 1) * (t.selected & v)).nan_to_num().sum() for t, v in run["terms"])) /
        want["actor/lpreg_selected"], rel=1e-5)
    naive = sum(pooled_from_terms([t])["actor/lpreg_kept_mass"] for t in run["terms"]) / 4
    assert abs(naive - want["actor/lpreg_kept_mass"]) > 1e-6


def test_docs_base_loss_mode_snippet_composes_and_validates():
    """The docs' "Base loss modes" overrides on top of the main snippet: verl's own config composes,
    validates, and the worker's actor config carries the base loss mode; the released form with gspo
    fails in validate_config, naming the option."""
    from hydra.errors import InstantiationException
    from verl.utils.config import omega_conf_to_dataclass, validate_config

    body = open(DOCS).read().split("### Base loss modes", 1)[1]
    snippet = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    extra = [t for t in snippet.replace("\\\n", " ").split() if "=" in t]
    assert any(t.endswith("lpreg_base_loss_mode=gspo") for t in extra), extra
    sizes = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
             "actor_rollout_ref.rollout.n=1", "data.train_batch_size=8", "trainer.n_gpus_per_node=1",
             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2"]
    main = [o for o in overrides() if "lpreg_compat" not in o]
    cfg = V.compose(main + extra + sizes)
    validate_config(cfg, use_reference_policy=False, use_critic=False)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert (actor.policy_loss.lpreg_base_loss_mode, actor.policy_loss.lpreg_compat) == ("gspo", "paper")
    released = [o.replace("lpreg_compat=paper", "lpreg_compat=released") for o in extra]
    with pytest.raises((ValueError, InstantiationException), match="lpreg_base_loss_mode='gspo'"):
        validate_config(V.compose(main + released + sizes), use_reference_policy=False, use_critic=False)
