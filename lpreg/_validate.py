"""Argument checks for the public API: every error names the argument and the value."""

import math

import torch

from . import _backends

MODES = ("min_p", "fixed")
REDUCTIONS = ("none", "mean", "sum")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_logits(logits, name="logits", allow_empty=False):
    """allow_empty: a vocabulary-parallel shard may hold no column (torch.chunk's last blocks)."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float tensor (float32, bfloat16, float16), got dtype {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError(f"{name} must have shape (..., V), got a 0-d tensor")
    if logits.shape[-1] == 0 and not allow_empty:
        raise ValueError(f"{name} must have a non-empty vocabulary dimension V, got shape {tuple(logits.shape)}")


def check_temperature(temperature):
    t = float(temperature)
    if not (t > 0) or math.isinf(t):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def check_mode_threshold(mode, threshold):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    th = float(threshold)
    if mode == "min_p" and not (0 < th <= 1):
        raise ValueError(f"threshold must be in (0, 1] for mode='min_p', got {threshold!r}")
    if mode == "fixed" and not (0 < th < 1):
        raise ValueError(f"threshold must be in (0, 1) for mode='fixed', got {threshold!r}")
    return th


def check_backend(backend):
    names = _backends.names()  # the registry, read live: a registered backend is valid at once
    if backend not in names:
        raise ValueError(f"backend must be one of {names}, got {backend!r}")


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_proxy_logits(proxy_logits, logits, allow_empty=False):
    """allow_empty: the proxy of an empty vocabulary-parallel shard is empty too."""
    if proxy_logits is None:
        return
    check_logits(proxy_logits, "proxy_logits", allow_empty=allow_empty)
    if proxy_logits.shape != logits.shape:
        raise ValueError(
            f"proxy_logits must have the shape of logits {tuple(logits.shape)}, got {tuple(proxy_logits.shape)}"
        )
    if proxy_logits.device != logits.device:
        raise ValueError(f"proxy_logits must be on {logits.device}, got {proxy_logits.device}")


def check_labels(labels, logits, ignore_index):
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels must be on {logits.device}, got {labels.device}")


def check_label_range(labels, V, ignore_index):
    """Values in [0, V) or ignore_index. Called inside the custom op, which runs eagerly even
    in a compiled graph, so the check holds under torch.compile too."""
    if labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= V)) & (labels != ignore_index)
    if bool(bad.any()):  # one host sync: the price of a clear error instead of a wild read
        value = labels[bad].flatten()[0].item()
        raise ValueError(f"labels must be in [0, {V}) or ignore_index={ignore_index}, got {value}")


def check_index_range(indices, V, name="proxy.indices"):
    """Vocabulary indices in [0, V): an error, never a silent clamp or a wild read (one host sync)."""
    if indices.numel() == 0:
        return
    out = (indices < 0) | (indices >= V)
    if bool(out.any()):
        raise ValueError(f"{name} must be in [0, {V}), got {indices[out][0].item()}")


def check_logit_scale(logit_scale):
    """The logit multiplier s of the logit transform (lpreg.logit_transform): finite and > 0."""
    if isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float)):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    s = float(logit_scale)
    if not (s > 0) or math.isinf(s):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    return s


def check_logit_softcap(logit_softcap):
    """The tanh soft-cap c of the logit transform: None (no soft-cap), or finite and > 0."""
    if logit_softcap is None:
        return None
    if isinstance(logit_softcap, bool) or not isinstance(logit_softcap, (int, float)):
        raise ValueError(f"logit_softcap must be None or a finite number > 0, got {logit_softcap!r}")
    c = float(logit_softcap)
    if not (c > 0) or math.isinf(c):
        raise ValueError(f"logit_softcap must be None or a finite number > 0, got {logit_softcap!r}")
    return c
