"""lpreg.logit_transform: the validated transform, and each family's config mapping checked against the
model's own forward logits (tiny configs built locally, random weights, no download)."""

import math

import pytest
import torch

from lpreg import LogitTransform, logit_transform_from_config

transformers = pytest.importorskip("transformers")

_TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16, max_position_embeddings=64)

# (config class, model class, family-specific config values); each config must give a non-identity transform
# except Llama (the control).
FAMILIES = [
    ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=2.0), None, 2.0),
    ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(final_logit_softcapping=1.5), None, 1.5),
    ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.0625), 0.0625, None),
    ("Cohere2Config", "Cohere2ForCausalLM", dict(logit_scale=0.25), 0.25, None),
    ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=8.0), 1 / 8.0, None),
    ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(logits_scaling=4.0, num_local_experts=2,
                                                       num_experts_per_tok=1), 1 / 4.0, None),
    ("FalconH1Config", "FalconH1ForCausalLM", dict(lm_head_multiplier=0.5), 0.5, None),
    ("MiniCPM3Config", "MiniCPM3ForCausalLM", dict(dim_model_base=8, scale_emb=12, q_lora_rank=16, kv_lora_rank=8,
                                                   num_key_value_heads=2,
                                                   qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
     8 / 32, None),
    ("NanoChatConfig", "NanoChatForCausalLM", dict(final_logit_softcapping=3.0), None, 3.0),
    ("LlamaConfig", "LlamaForCausalLM", {}, None, None),
]


def _build(config_name, model_name, extra):
    if not hasattr(transformers, config_name) or not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    torch.manual_seed(0)
    cfg = getattr(transformers, config_name)(**{**_TINY, **extra})
    model = getattr(transformers, model_name)(cfg).float().eval()
    with torch.no_grad():  # random weights large enough that the soft-cap bends the logits
        model.get_output_embeddings().weight.normal_(0.0, 1.0)
    return cfg, model


@pytest.mark.parametrize("config_name, model_name, extra, scale, softcap", FAMILIES, ids=[f[1] for f in FAMILIES])
def test_config_mapping_matches_the_models_own_logits(config_name, model_name, extra, scale, softcap):
    cfg, model = _build(config_name, model_name, extra)
    transform = logit_transform_from_config(cfg)
    assert transform.scale == pytest.approx(1.0 if scale is None else scale)
    assert transform.softcap == softcap
    ids = torch.randint(0, _TINY["vocab_size"], (2, 5))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        h = model.model(input_ids=ids).last_hidden_state
        head = model.get_output_embeddings()
        raw = h @ head.weight.T
        if getattr(head, "bias", None) is not None:
            raw = raw + head.bias
    ours = transform.apply(raw)
    assert torch.allclose(ours, logits, rtol=1e-5, atol=1e-5), (ours - logits).abs().max()
    if not transform.is_identity:  # the mapping matters: the raw matmul is not the model's logits
        assert not torch.allclose(raw, logits, rtol=1e-3, atol=1e-3)


def test_apply_formula_and_saturation():
    x = torch.tensor([-math.inf, -1e6, -3.0, 0.0, 2.0, 1e6, math.inf, math.nan], dtype=torch.float64)
    z = LogitTransform(scale=2.0, softcap=5.0).apply(x)
    expect = 5.0 * torch.tanh(2.0 * x / 5.0)
    assert torch.allclose(z[:-1], expect[:-1], rtol=1e-15, atol=0)
    assert z[0] == -5.0 and z[6] == 5.0 and torch.isnan(z[-1])
    assert torch.equal(LogitTransform(scale=0.5).apply(x[1:-1]), 0.5 * x[1:-1])
    assert LogitTransform().is_identity and LogitTransform().apply(x) is x


@pytest.mark.parametrize("kwargs, name", [
    (dict(scale=0.0), "logit_scale"), (dict(scale=-1.0), "logit_scale"), (dict(scale=math.nan), "logit_scale"),
    (dict(scale=math.inf), "logit_scale"), (dict(softcap=0.0), "logit_softcap"), (dict(softcap=-2.0), "logit_softcap"),
    (dict(softcap=math.nan), "logit_softcap"), (dict(softcap=math.inf), "logit_softcap"),
])
def test_bad_values_are_refused_naming_argument_and_value(kwargs, name):
    with pytest.raises(ValueError, match=name) as err:
        LogitTransform(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(err.value)


def test_unknown_config_is_identity():
    class Remote:  # a remote-code config with no transform attribute
        model_type = "my_remote_model"
        hidden_size = 32

    assert logit_transform_from_config(Remote()).is_identity


def test_multimodal_and_remote_minicpm_configs():
    if hasattr(transformers, "Gemma3Config"):
        cfg = transformers.Gemma3Config(text_config=dict(final_logit_softcapping=30.0))
        assert logit_transform_from_config(cfg) == LogitTransform(softcap=30.0)

    class MiniCPM:  # openbmb/MiniCPM-2B's remote-code config: hidden / (hidden_size / dim_model_base)
        model_type = "minicpm"
        hidden_size = 2304
        dim_model_base = 256
        scale_emb = 12

    assert logit_transform_from_config(MiniCPM()).scale == pytest.approx(256 / 2304)
