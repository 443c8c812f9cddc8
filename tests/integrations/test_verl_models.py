"""loss_mode=lpreg with use_fused_kernels=True on models whose head is not a plain linear map or whose
backbone is wrapped: logit soft-capping / scaling (the fused kernels apply the model's transform), and
verl's LoRA (peft; supported).

Tiny models and configs are built here (no download). Tolerances of the LoRA comparison: those of
test_verl.py's fused-vs-logits comparison (the same two paths; LoRA adds the adapters' products,
the same fp32 operations on both paths): LOSS_ATOL = GRAD_RTOL = 2.3e-5.
"""

import os
import sys

import pytest

pytest.importorskip("verl", reason="verl is not installed here: run `bash .ci/integrations.sh verl` (own venv)")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import verl_runs as V  # noqa: E402
import verl_trainers as VT  # noqa: E402
from tiny_lm import save_tiny, tiny_tokenizer  # noqa: E402

LOSS_ATOL, GRAD_RTOL = 2.3e-5, 2.3e-5
TINY = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1)
SIZES = ["actor_rollout_ref.rollout.n=1", "data.train_batch_size=8", "trainer.n_gpus_per_node=1",
         "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
         "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2"]


def scaled_config(name):
    """(config of a tiny model whose logits are soft-capped or scaled, the setting that makes them so)."""
    import transformers as tf

    if name == "gemma2":
        return tf.Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=30.0), "final_logit_softcapping=30.0"
    if name == "cohere":
        return tf.CohereConfig(**TINY, logit_scale=0.0625), "logit_scale=0.0625"
    return tf.GraniteConfig(**TINY, logits_scaling=8.0), "logits_scaling=8.0"


def save_scaled(name, path):
    """A tiny model of the family `name` (random weights, lpreg's tiny tokenizer) saved at `path`."""
    from transformers import AutoModelForCausalLM

    from lpreg.integrations._verl_config import model_logit_transform

    config, setting = scaled_config(name)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    # spread logits (a random init is near uniform, where the proxy filters nothing and Lp-Reg selects
    # nothing): the head's raw logits x the model's scale of about 2.4 standard deviations
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.6 / model_logit_transform(config).scale)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return setting


@pytest.mark.parametrize("name", ["gemma2", "cohere", "granite"])
def test_model_logit_transform_reads_the_config(name):
    """The transform the fused engine applies comes from the model's config (no list of names):
    Gemma-2's soft-cap 30, Cohere's scale 1/16, Granite's 1/logits_scaling; a Llama is the identity."""
    from transformers import LlamaConfig

    from lpreg.integrations._verl_config import model_logit_transform

    config, _ = scaled_config(name)
    t = model_logit_transform(config)
    want = {"gemma2": (1.0, 30.0), "cohere": (0.0625, None), "granite": (0.125, None)}[name]
    assert t.scale == pytest.approx(want[0]) and t.softcap == want[1]
    assert model_logit_transform(LlamaConfig(**TINY)).is_identity and model_logit_transform(None).is_identity


@pytest.mark.parametrize("name", ["gemma2", "cohere", "granite"])
def test_scaled_logits_pass_validate_config(tmp_path, monkeypatch, name):
    """Gemma-2's soft-capping, Cohere's logit scale, Granite's logits scaling: main_ppo's
    validate_config accepts use_fused_kernels=True for them (they were refused before the fused
    kernels took the logit transform)."""
    config, _ = scaled_config(name)
    config.save_pretrained(tmp_path)
    base = VT.docs_overrides() + SIZES + [f"actor_rollout_ref.model.path={tmp_path}"]
    VT.main_ppo_runner(V.compose(base + ["actor_rollout_ref.model.use_fused_kernels=True"]), monkeypatch)


@pytest.mark.parametrize("name", ["gemma2", "cohere", "granite"])
def test_scaled_logits_fused_equal_the_logits_path(tmp_path, name):
    """A tiny Gemma-2 / Cohere / Granite trained with use_fused_kernels=True (hidden states x LM head
    with the model's logit transform) and with the model's own logits: the same losses and gradient
    norms over two mini-batches at beta = 1 (test_verl.py's fused-vs-logits tolerances)."""
    save_scaled(name, str(tmp_path))
    V.init(29587)
    case = dict(mini=4, lpreg_beta=1.0, lpreg_rho=0.5, lpreg_threshold=0.2)
    logits = V.run(str(tmp_path), case)
    fused = V.run(str(tmp_path), {**case, "fused": True})
    assert fused["steps"][0]["metrics"]["actor/lpreg_frac"] > 0
    for a, b in zip(logits["steps"], fused["steps"]):
        assert abs(a["loss"] - b["loss"]) <= LOSS_ATOL
        assert abs(a["grad_norm"] - b["grad_norm"]) <= GRAD_RTOL * abs(a["grad_norm"])


def test_lora_fused_kernels_equal_the_logits_path(tmp_path):
    """verl's LoRA (model.lora_rank > 0: a peft model around the causal LM) with use_fused_kernels=True
    trains: off-policy, two mini-batches, the fused path's losses and gradient norms equal the logits
    path's, and the adapters moved (the second step's forward runs through trained adapters)."""
    V.init(29549)
    path = save_tiny(str(tmp_path / "tiny"))
    case = dict(mini=4, lpreg_beta=1.0, lpreg_rho=0.5, lpreg_threshold=0.2,
                model=dict(lora_rank=4, lora_alpha=8, target_modules="all-linear"))
    logits = V.run(path, case)
    fused = V.run(path, {**case, "fused": True})
    lora_b = [k for k in fused["params"] if "lora_B" in k]
    assert lora_b and all(fused["params"][k].abs().max() > 0 for k in lora_b)  # zero at init, trained here
    assert fused["steps"][0]["metrics"]["actor/lpreg_frac"] > 0
    for a, b in zip(logits["steps"], fused["steps"]):
        assert abs(a["loss"] - b["loss"]) <= LOSS_ATOL
        assert abs(a["grad_norm"] - b["grad_norm"]) <= GRAD_RTOL * abs(a["grad_norm"])
    assert len(fused["steps"]) == 2


def test_lora_on_the_head_refused(tmp_path):
    """A LoRA adapter on lm_head (the fused path reads the head's base weight only): refused by lpreg's
    start-up check (run by main_ppo's validate_config after verl's own checks, which on this machine
    stop LoRA configs first: no vLLM), naming target_modules. (verl 0.9.1's FSDP2 engine cannot
    build such a model at all: FSDP2 fails to wrap the peft-wrapped lm_head, so the engine's own
    refusal of a peft-wrapped head is not reachable here.)"""
    from lpreg.integrations._verl_driver import check_run

    path = save_tiny(str(tmp_path / "tiny"))
    lora = ["actor_rollout_ref.model.lora_rank=4", "actor_rollout_ref.model.target_modules=[q_proj,lm_head]",
            "actor_rollout_ref.model.use_fused_kernels=True"]
    with pytest.raises(ValueError, match=r"target_modules=\['q_proj', 'lm_head'\] puts a LoRA adapter on lm_head"):
        check_run(V.compose(VT.docs_overrides() + SIZES + [f"actor_rollout_ref.model.path={path}", *lora]))
    check_run(V.compose(VT.docs_overrides() + SIZES + [f"actor_rollout_ref.model.path={path}", *lora[:1],
                                                       "actor_rollout_ref.model.use_fused_kernels=True"]))


@pytest.mark.parametrize("name,param_dtype", [("gemma2", "fp32"), ("cohere", "fp32"), ("cohere", "bf16")])
def test_head_guard_catches_a_head_its_transform_does_not_describe(tmp_path, monkeypatch, name, param_dtype):
    """The head guard before the first fused step, in the engine verl builds: a model whose logit transform
    the fused path is made to miss (read as the identity, as for a model that edits its logits where no
    config says so) is refused, naming the model's class, in fp32 and under verl's default mixed-precision
    policy (bf16 matmuls behind fp32 master weights); with its transform it trains. (Under bf16 the
    tolerance is bf16's, 8 eps (1 + max |z / T|): it catches Cohere's 1/16 scale missed, not every small
    edit of the logits.)"""
    from lpreg import LogitTransform
    from lpreg.integrations import _verl_engine

    save_scaled(name, str(tmp_path))
    V.init(29593)
    case = dict(mini=4, lpreg_beta=1.0, lpreg_rho=0.5, lpreg_threshold=0.2, fused=True, param_dtype=param_dtype)
    assert len(V.run(str(tmp_path), case)["steps"]) == 2
    monkeypatch.setattr(_verl_engine, "logit_transform_from_config", lambda config: LogitTransform())
    cls = {"gemma2": "Gemma2ForCausalLM", "cohere": "CohereForCausalLM"}[name]
    with pytest.raises(RuntimeError, match=rf"does not reproduce {cls}'s logits"):
        V.run(str(tmp_path), case)
