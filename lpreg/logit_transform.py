"""The logit transform of scaled and soft-capped LM heads (docs/spec.md "The logit transform").

Some models do not emit the head's matmul x = h W^T (+ b) as their logits but a function of it:

    z = c tanh(s x / c)     with a soft-cap c (Gemma 2/3/4, nanochat, Mistral Large 4, ...)
    z = s x                 without one (Cohere: s = logit_scale; Granite: s = 1 / logits_scaling;
                            MiniCPM: s = dim_model_base / hidden_size; Falcon-H1: lm_head_multiplier)

Every lpreg op that reads logits takes `logit_scale` (s) and `logit_softcap` (c, or None) and
applies this map to the raw logits x, forward and backward (dz/dx = s (1 - tanh^2(s x / c)), or s),
before the temperature. `LogitTransform` is the validated pair; `logit_transform_from_config` reads
it from a transformers config. A model whose config does not describe its head (a remote-code
model, a subclass that edits its logits) gets the identity here; the adapters' head guard
(lpreg.integrations._head_guard) compares the fused log-probs against the model's own logits and
catches it.
"""

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from . import _validate

__all__ = ["LogitTransform", "logit_transform_from_config"]


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap * tanh(scale * x / softcap), or z = scale * x without a soft-cap.

    Args:
        scale: the multiplier s applied to the raw logits; finite and > 0.
        softcap: the tanh soft-cap c; None for none, else finite and > 0.

    Raises:
        ValueError: a scale or softcap out of range (the message names the argument and the value).
    """

    scale: float = 1.0
    softcap: Optional[float] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _validate.check_logit_scale(self.scale))
        object.__setattr__(self, "softcap", _validate.check_logit_softcap(self.softcap))

    @property
    def is_identity(self) -> bool:
        """True when z = x exactly (scale 1, no soft-cap)."""
        return self.scale == 1.0 and self.softcap is None

    def apply(self, x: Tensor) -> Tensor:
        """The transform of raw logits x (any shape), computed in x's dtype (the PyTorch reference).

        Args:
            x: raw logits, the head's matmul output.

        Returns:
            z, the logits the model emits, same shape and dtype.
        """
        if self.softcap is None:
            return x if self.scale == 1.0 else x * self.scale
        return torch.tanh(x * (self.scale / self.softcap)) * self.softcap


def _get(cfg: Any, name: str) -> Any:
    return getattr(cfg, name, None)


def _text_config(cfg: Any) -> Any:
    get = getattr(cfg, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except TypeError:  # older transformers: no `decoder` keyword
            return get()
    return cfg


# model_type prefixes whose `logits_scaling` multiplies the logits (MuP, HyperCLOVA X); every other
# model that has the attribute (Granite*, MiniCPM3) divides by it.
_MULTIPLYING_LOGITS_SCALING = ("hyperclovax",)


def _scale_of(cfg: Any, model_type: str) -> float:
    """The logit multiplier s a config describes (1.0 when none)."""
    if model_type.startswith("cohere") or model_type == "aya_vision":
        s = _get(cfg, "logit_scale")  # Cohere, Cohere2, Cohere2-MoE, Aya Vision: logits * logit_scale
        return 1.0 if s is None else float(s)
    if _get(cfg, "logits_scaling") is not None:
        s = float(_get(cfg, "logits_scaling"))
        return s if model_type.startswith(_MULTIPLYING_LOGITS_SCALING) else 1.0 / s
    if model_type.startswith("falcon_h1") and _get(cfg, "lm_head_multiplier") is not None:
        return float(_get(cfg, "lm_head_multiplier"))
    if model_type.startswith("muse_") and _get(cfg, "output_multiplier") is not None:
        return float(_get(cfg, "output_multiplier"))  # MuseSpark / MuseGlimmer: c tanh(mult x / c)
    if model_type.startswith("minicpm") and _get(cfg, "dim_model_base") is not None and _get(cfg, "scale_emb"):
        # remote-code MiniCPM (1/2): hidden / (hidden_size / dim_model_base) before the head
        return float(_get(cfg, "dim_model_base")) / float(_get(cfg, "hidden_size"))
    return 1.0


def _softcap_of(cfg: Any) -> Optional[float]:
    c = _get(cfg, "final_logit_softcapping")  # Gemma 2/3/4, nanochat, Mistral Large 4, Inkling2, ...
    if c is None:
        c = _get(cfg, "logits_soft_cap")  # RecurrentGemma
    return None if c is None else float(c)


def logit_transform_from_config(hf_config: Any) -> LogitTransform:
    """The logit transform a transformers config describes; the identity for any other model.

    Reads the text (decoder) configuration of a multimodal or encoder-decoder config. Families:
    Gemma 2/3/3n/4, VaultGemma, PaliGemma, T5Gemma, nanochat, Mistral Large 4, Inkling2
    (`final_logit_softcapping`), RecurrentGemma (`logits_soft_cap`); Cohere / Cohere2 / Aya Vision
    (`logit_scale`); Granite, GraniteMoe*, MiniCPM3 (1 / `logits_scaling`); HyperCLOVA X
    (`logits_scaling`); Falcon-H1 (`lm_head_multiplier`); MuseSpark (`output_multiplier` with its
    soft-cap); remote-code MiniCPM (`dim_model_base` / `hidden_size` when `scale_emb` is set).

    Args:
        hf_config: a `transformers.PretrainedConfig` (or any object with its attributes).

    Returns:
        The `LogitTransform` of the model's head.

    Raises:
        ValueError: the config holds an out-of-range scale or soft-cap.
    """
    text = _text_config(hf_config)
    model_type = str(_get(hf_config, "model_type") or _get(text, "model_type") or "")
    text_type = str(_get(text, "model_type") or model_type)
    scale = _scale_of(text, text_type)
    if scale == 1.0 and text is not hf_config:
        scale = _scale_of(hf_config, model_type)
    softcap = _softcap_of(text)
    if softcap is None and text is not hf_config:
        softcap = _softcap_of(hf_config)
    return LogitTransform(scale=scale, softcap=softcap)
