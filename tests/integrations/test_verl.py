"""The lpreg verl plugin against the real verl (0.9.x): its FSDP engine, on CPU (gloo, 1 rank).

Runs in its own environment: `bash .ci/integrations.sh verl`. Without verl installed (the
main environment) every test here is skipped.
"""

import functools
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("verl", reason="verl is not installed here: run `bash .ci/integrations.sh verl` (own venv)")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.integrations.tiny_lm import save_tiny
from tests.integrations.verl_cpu import use_cpu_platform

use_cpu_platform()

from verl import DataProto  # noqa: E402
from verl.trainer.config import CheckpointConfig  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.model import compute_position_id_with_mask  # noqa: E402
from verl.workers.config import ActorConfig, FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig  # noqa: E402
from verl.workers.engine import EngineRegistry  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

import lpreg.integrations.verl as lpreg_verl  # noqa: E402

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "integrations.md")
B, P, R = 8, 4, 6  # sequences, prompt and response length

# Float tolerances: both losses are fp32 sums over <= 48 response tokens of clipped -A r terms
# whose log-probs come from verl's log-softmax and lpreg's fused kernel (a few ulp apart,
# ~1e-7 relative each): loss ~1e-6 absolute at worst (seen ~1e-8), gradient norm ~1e-6
# relative (seen ~1e-7); AdamW (lr 1e-2) moves each parameter by ~lr per step, by an amount
# smooth in the gradient, so parameters agree to ~lr x 1e-5 (seen ~1e-8). ~10x margin each.
LOSS_ATOL, GRAD_RTOL, PARAM_ATOL = 1e-5, 1e-5, 1e-6
# Remove-padding vs padded layouts run different attention calls (packed vs padded sdpa), so
# the logits differ by ~1e-7 relative; AdamW's first steps divide each gradient element by its
# own magnitude, so an element with a tiny gradient moves by up to lr x (its relative error):
# seen 1.9e-6 after two steps at lr 1e-2. 10x margin.
PARAM_ATOL_LAYOUTS = 2e-5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29541", rank=0, world_size=1)
    return save_tiny(str(tmp_path_factory.mktemp("tiny")))


def make_engine(path, remove_padding):
    model_config = HFModelConfig(path=path, use_remove_padding=remove_padding,
                                 override_config={"attn_implementation": "sdpa"})
    # fp32 end to end (verl's default autocasts to bf16, where its log-probs are bf16-rounded)
    engine_config = FSDPEngineConfig(forward_only=False, strategy="fsdp2", model_dtype="fp32", use_torch_compile=False,
                                     mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32",
                                                      "buffer_dtype": "fp32"})
    engine = EngineRegistry.new(model_type="language_model", backend="fsdp2", model_config=model_config,
                                engine_config=engine_config, optimizer_config=FSDPOptimizerConfig(lr=1e-2),
                                checkpoint_config=CheckpointConfig())
    engine.initialize()
    return engine


def make_batch(path, seed=1, micro=4, remove_padding=True):
    """A left-padded prompt / right-padded response batch; old log-probs = the model's own
    plus noise in [-0.3, 0.3] (ratios 0.74..1.35: PPO clipping acts, verl's dual clip, at 3, not)."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(2, 40, (B, P), generator=g)
    mask = torch.ones(B, P + R, dtype=torch.long)
    mask[0, :2] = 0
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    torch.manual_seed(seed)  # responses sampled from the model: their p_y are mostly in the proxy's kept set
    with torch.no_grad():
        input_ids = hf.generate(prompts, attention_mask=mask[:, :P], do_sample=True, max_new_tokens=R,
                                min_new_tokens=R, pad_token_id=0, eos_token_id=1)
        mask[1, -2:] = 0
        mask[3, -5:] = 0
        logits = hf(input_ids, attention_mask=mask).logits[:, P - 1:-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[:, P:, None])[..., 0]
    old = logp + (torch.rand(B, R, generator=g) - 0.5) * 0.6
    data = DataProto.from_single_dict(
        {"input_ids": input_ids, "prompts": input_ids[:, :P], "attention_mask": mask,
         "position_ids": compute_position_id_with_mask(mask), "responses": input_ids[:, P:],
         "response_mask": mask[:, P:], "advantages": torch.randn(B, R, generator=g).sign() * torch.rand(B, 1,
                                                                                                      generator=g),
         "old_log_probs": old},
        meta_info={"temperature": 1.0, "global_token_num": mask.sum(-1).tolist()})
    td = left_right_2_no_padding(data.to_tensordict())
    tu.assign_non_tensor(td, global_batch_size=B, use_remove_padding=remove_padding, micro_batch_size_per_gpu=micro,
                         use_dynamic_bsz=False)
    return td


def actor_config(loss_mode="vanilla", loss_agg_mode="token-mean", clip_ratio_c=3.0, **lpreg):
    from verl.workers.config import PolicyLossConfig

    policy_loss = (lpreg_verl.LpRegPolicyLossConfig(loss_mode=loss_mode, **lpreg) if loss_mode == "lpreg"
                   else PolicyLossConfig(loss_mode=loss_mode))
    return ActorConfig(strategy="fsdp2", rollout_n=1, ppo_micro_batch_size_per_gpu=4, ppo_mini_batch_size=B,
                       clip_ratio=0.2, clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode,
                       policy_loss=policy_loss)


def params(engine):
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in engine.module.state_dict().items()}


def two_steps(path, config, remove_padding=True):
    """Two optimizer steps on the same batch: [(loss, grad_norm, metrics)] and the parameters."""
    torch.manual_seed(0)
    engine = make_engine(path, remove_padding)
    out = []
    with engine.train_mode():
        for _ in range(2):
            engine.optimizer_zero_grad()
            res = engine.forward_backward_batch(make_batch(path, remove_padding=remove_padding),
                                                loss_function=functools.partial(ppo_loss, config=config))
            grad_norm = engine.optimizer_step()
            out.append((sum(res["loss"]) if isinstance(res["loss"], list) else float(res["loss"]),
                        float(grad_norm), res["metrics"]))
    return out, params(engine)


def metric(metrics, key):
    """A verl metric (a Metric aggregator, or a list of per-micro-batch values) as one float."""
    v = metrics[key]
    if hasattr(v, "aggregate"):
        v = v.aggregate()
    if isinstance(v, (list, tuple)):
        v = sum(float(x) for x in v) / len(v)
    return float(v)


def compare(a, b, label):
    (ra, pa), (rb, pb) = a, b
    loss = max(abs(x[0] - y[0]) for x, y in zip(ra, rb))
    grad = max(abs(x[1] - y[1]) / max(abs(x[1]), 1e-12) for x, y in zip(ra, rb))
    param = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    print(f"{label}: loss abs {loss:.2e}, grad-norm rel {grad:.2e}, param abs {param:.2e}; "
          f"losses {[x[0] for x in ra]} vs {[y[0] for y in rb]}, grad norms {[x[1] for x in ra]}")
    return loss, grad, param


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


@pytest.mark.parametrize("loss_agg_mode,compat,remove_padding", [
    ("token-mean", "released", True), ("seq-mean-token-mean", "paper", True),
    ("seq-mean-token-sum-norm", "released", False), ("token-mean", "paper", False)])
def test_beta0_reproduces_verl_vanilla(model_path, loss_agg_mode, compat, remove_padding):
    # verl's dual clip (a constant -clip_ratio_c A once r > clip_ratio_c on A < 0 tokens) is
    # not part of Lp-Reg's objective; after one AdamW step at lr 1e-2 some ratios pass 3, so
    # the reference runs with it out of reach (see docs/integrations.md)
    ref = two_steps(model_path, actor_config("vanilla", loss_agg_mode, clip_ratio_c=1e9), remove_padding)
    ours = two_steps(model_path, actor_config("lpreg", loss_agg_mode, lpreg_beta=0.0, lpreg_compat=compat,
                                              lpreg_rho=0.5), remove_padding)
    loss, grad, param = compare(ref, ours, f"beta=0 {loss_agg_mode} {compat} rmpad={remove_padding}")
    assert metric(ref[0][0][2], "actor/pg_clipfrac") > 0  # the clip really acted
    assert "actor/lpreg_frac" in ours[0][0][2]  # and the lpreg engine really ran
    assert abs(ref[0][1][1] - ref[0][0][1]) > 1e-3  # step 1 moved the weights: step 2's gradient differs
    assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and param <= PARAM_ATOL


@pytest.mark.parametrize("compat", ["released", "paper"])
def test_beta_positive_metrics_and_both_layouts_agree(model_path, compat):
    cfg = actor_config("lpreg", lpreg_beta=1.0, lpreg_compat=compat, lpreg_rho=0.5, lpreg_threshold=0.2)
    packed = two_steps(model_path, cfg, remove_padding=True)
    padded = two_steps(model_path, cfg, remove_padding=False)
    m = {k: metric(packed[0][0][2], k) for k in ("actor/lpreg_frac", "actor/lpreg_kl", "actor/lpreg_threshold")}
    assert m["actor/lpreg_frac"] > 0 and m["actor/lpreg_kl"] > 0 and 0 < m["actor/lpreg_threshold"] <= 1, m
    loss, grad, param = compare(packed, padded, f"lpreg beta=1 {compat}: remove-padding vs padded")
    assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and param <= PARAM_ATOL_LAYOUTS
    base = two_steps(model_path, actor_config("lpreg", lpreg_beta=0.0, lpreg_compat=compat, lpreg_rho=0.5,
                                              lpreg_threshold=0.2))
    assert abs(base[0][0][0] - packed[0][0][0]) > 1e-6  # beta > 0 changes the loss


def test_paper_selection_is_exact_over_the_mini_batch(model_path, monkeypatch):
    """Two micro-batches of 4: the step threshold applied to each micro-batch's old log-probs
    selects exactly k = max(1, floor(rho n)) of the mini-batch's n response tokens."""
    seen = []
    real = lpreg_verl.policy_loss_from_stats

    def spy(stats, adv, old, mask, **kw):
        sel = kw["selection_threshold"]
        seen.append((sel.k, sel.n_valid, int(sel.mask(old, mask > 0).sum()), int((mask > 0).sum())))
        return real(stats, adv, old, mask, **kw)

    monkeypatch.setattr(lpreg_verl, "policy_loss_from_stats", spy)
    engine = make_engine(model_path, True)
    with engine.train_mode():
        engine.forward_backward_batch(make_batch(model_path), functools.partial(
            ppo_loss, config=actor_config("lpreg", lpreg_compat="paper", lpreg_rho=0.3)))
    assert len(seen) == 2
    n = seen[0][3] + seen[1][3]
    assert seen[0][1] == n and seen[0][0] == max(1, int(0.3 * n)) == seen[0][2] + seen[1][2]


def test_unsupported_paths_raise(model_path):
    with pytest.raises(NotImplementedError, match="Megatron"):
        lpreg_verl.compute_policy_loss_lpreg(None, None, None, None)
    with pytest.raises(ValueError, match="lpreg_rho"):
        lpreg_verl.LpRegPolicyLossConfig(loss_mode="lpreg", lpreg_rho=2.0)
    engine = make_engine(model_path, True)
    td = make_batch(model_path)
    tu.assign_non_tensor(td, use_fused_kernels=True)
    with engine.train_mode(), pytest.raises(NotImplementedError, match="use_fused_kernels"):
        engine.forward_backward_batch(td, functools.partial(ppo_loss, config=actor_config("lpreg")))


def overrides():
    """The Hydra overrides of the docs' "Use with verl" snippet, verbatim."""
    body = open(DOCS).read().split("## Use with verl", 1)[1]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [t for t in block.replace("\\\n", " ").split() if "=" in t and not t.startswith("python")]


def test_docs_overrides_compose_and_train(model_path):
    """verl's own ppo_trainer config with the docs' overrides -> the actor config verl's worker
    builds (omega_conf_to_dataclass) -> one forward-backward of the lpreg engine."""
    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    conf_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    ours = overrides()
    assert any("loss_mode=lpreg" in o for o in ours), ours
    with initialize_config_dir(config_dir=conf_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=ours + [
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
            "actor_rollout_ref.rollout.n=1"])
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor.policy_loss, lpreg_verl.LpRegPolicyLossConfig)
    assert actor.policy_loss.loss_mode == "lpreg"
    engine = make_engine(model_path, True)
    with engine.train_mode():
        res = engine.forward_backward_batch(make_batch(model_path), functools.partial(ppo_loss, config=actor))
    assert "actor/lpreg_frac" in res["metrics"] and all(x == x for x in res["loss"])
