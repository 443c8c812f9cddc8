"""The head guard of the fused paths: lpreg's fused log-probs against the model's own logits, once.

The fused paths never form the model's logits: they read the backbone's last hidden state h and the
output embedding W and compute z = transform(h W^T + b) chunk by chunk, with the transform a config
describes (`lpreg.logit_transform_from_config`). A head that computes its logits some other way (remote
code, a subclass that edits the logits in forward(), a transform no config attribute names) would
train on wrong statistics without a word. Before the first fused step, `check_fused_head` runs the
model's own forward on a few tokens and compares

    fused      log softmax(transform(h W^T + b) / T)_y     (lpreg.fused_linear_token_stats)
    model      log softmax(forward().logits / T)_y

at the sampled labels y (the next input tokens); a difference beyond the dtype's tolerance raises.

Tolerance: both sides round the logits of the head's dtype (the model's head emits them in that
dtype; the fused chunk keeps fp32 products of the same operands), so a log-prob moves by a few
roundings of the largest |z / T| (the log-sum-exp and z_y): tol = 8 eps(dtype) (1 + max |z / T|),
eps = 2^-23 (fp32), 2^-7 (bf16), 2^-10 (fp16), for the coarsest of the head's, the logits' and autocast's
dtype (under bf16 autocast an fp32 head multiplies in bf16). Framework-free: any Hugging Face causal LM (a PEFT
wrapper is read through get_base_model()); TRL and verl call it inside the wrapped model's forward.
"""

from typing import Any, Optional

import torch
from torch import Tensor

from ..fused_linear import fused_linear_token_stats
from ..logit_transform import LogitTransform

__all__ = ["check_fused_head", "head_tolerance"]


def head_tolerance(dtype: torch.dtype, max_abs_logit: float) -> float:
    """The guard's tolerance on a log-prob: 8 eps(dtype) (1 + max |z / T|) (see the module docstring)."""
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else torch.finfo(torch.float32).eps
    return 8.0 * eps * (1.0 + max_abs_logit)


@torch.no_grad()
def check_fused_head(model: Any, input_ids: Tensor, attention_mask: Tensor, transform: LogitTransform, *,
                     temperature: float = 1.0, n_tokens: int = 8,
                     compute_dtype: Optional[torch.dtype] = None) -> None:
    """Compare the fused per-token log-probs of a few tokens with the model's own forward().logits.

    Args:
        model: a Hugging Face causal LM (or a PEFT model over one): `get_output_embeddings()`, a
            `base_model` backbone returning `last_hidden_state`, and a forward returning `.logits`.
        input_ids: (B, S) token ids; the first row is read.
        attention_mask: (B, S), 1 where a token is real.
        transform: the logit transform the fused path applies (`lpreg.logit_transform_from_config`).
        temperature: the sampling temperature T (> 0) both sides divide by.
        n_tokens: how many of the last real positions of the row to compare (>= 1).
        compute_dtype: the dtype the model's forward multiplies in when neither its weights nor its
            logits show it (an FSDP2 mixed-precision policy: fp32 master weights, bf16 matmuls, fp32
            outputs); the tolerance follows the coarsest of it, the head's, the logits' and autocast's.

    Raises:
        ValueError: n_tokens < 1, temperature <= 0, or a row with fewer than 2 real tokens.
        RuntimeError: the fused log-probs differ from the model's by more than the tolerance; the message
            names the model class, the largest difference and the tolerance.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be an int >= 1, got {n_tokens!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    ids = input_ids[:1][attention_mask[:1] > 0][None]  # the real tokens of the first row, no padding
    if ids.shape[1] < 2:
        raise ValueError(f"check_fused_head needs a row with >= 2 real tokens, got {ids.shape[1]}")
    ones = torch.ones_like(ids)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    n = min(n_tokens, ids.shape[1] - 1)
    labels = ids[:, -n:]
    # the model's own logits at the n positions predicting the last n tokens
    raw = base(input_ids=ids, attention_mask=ones, use_cache=False).logits[:, -n - 1:-1]
    logits = raw.float()
    want = torch.log_softmax(logits / temperature, -1).gather(-1, labels[..., None])[..., 0]
    h = base.base_model(input_ids=ids, attention_mask=ones, use_cache=False).last_hidden_state[:, -n - 1:-1]
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):  # a sharded (FSDP2) head, read whole for this no-grad check
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None and hasattr(bias, "full_tensor") else bias
    stats = fused_linear_token_stats(h.to(weight.dtype), weight, labels, bias=bias, temperature=temperature,
                                     logit_scale=transform.scale, logit_softcap=transform.softcap)
    got = stats.logp.float()
    diff = (got - want).abs().max().item()
    # the coarsest of the head's dtype, the logits' and autocast's (an fp32 head under bf16 autocast multiplies
    # in bf16 and may return fp32 logits)
    dtypes = [head.weight.dtype, raw.dtype] + ([compute_dtype] if compute_dtype is not None else [])
    if torch.is_autocast_enabled(raw.device.type):
        dtypes.append(torch.get_autocast_dtype(raw.device.type))
    dtype = max(dtypes, key=lambda d: torch.finfo(d).eps if d.is_floating_point else 0.0)
    tol = head_tolerance(dtype, (logits / temperature).abs().max().item())
    name = getattr(base, "lpreg_model_name", type(base).__name__)  # a wrapper may name what it wraps
    if not diff <= tol:  # NaN fails too
        raise RuntimeError(
            f"lpreg's fused head does not reproduce {name}'s logits: the fused log-probs of {n} tokens "
            f"differ from log_softmax(forward().logits / T) by up to {diff:.3g} (tolerance {tol:.3g} for "
            f"{dtype}) with the logit transform {transform} read from the config. The model computes its "
            f"logits in a way its config does not describe (remote code, a subclass editing the logits); use the "
            f"logits path (TRL: lpreg_fused=False; verl: use_fused_kernels=False)")
