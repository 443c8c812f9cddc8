"""backend="cpu" / "cuda": the compiled extension `lpreg._C` (csrc/).

The extension registers two ops, `torch.ops.lpreg_C.token_stats_fwd` and `..._bwd` (C++
kernels for CPU tensors, CUDA kernels when it was built with CUDA), with the row-statistics
contract documented in `lpreg.kernels.token_stats`. This module loads it lazily (an import of
lpreg never needs it), registers the ops' fake (meta) implementations so that torch.compile
and `torch.library.opcheck` can trace them, and exposes the backend functions with the
signatures of `lpreg._token_stats_torch_backend`.
"""

import functools

import torch

from ._contract import TOKEN_STATS_WIDTH as ROW_STATS_WIDTH  # csrc/row_stats.h: kRowStatsWidth
from ._contract import fake_grad, fake_row_outputs


@functools.lru_cache(maxsize=None)
def _load():
    """Import lpreg._C once; return the module, or None when it is missing (the caller, the
    backend registry, warns once and falls back)."""
    try:
        from . import _C
    except ImportError as exc:
        _load_error.append(str(exc))
        return None
    _register_fakes()
    return _C


_load_error = []


def _register_fakes():
    @torch.library.register_fake("lpreg_C::token_stats_fwd")
    def _fwd_fake(logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index):
        return fake_row_outputs(logits, ROW_STATS_WIDTH)

    @torch.library.register_fake("lpreg_C::token_stats_bwd")
    def _bwd_fake(logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy, inv_temperature, ignore_index):
        return fake_grad(logits)


def available(device_type: str) -> bool:
    """cpu: the extension loads; cuda: it was built with CUDA and a CUDA device is present."""
    mod = _load()
    if mod is None:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(mod.with_cuda) and torch.cuda.is_available()
    return False


def _ops():
    if _load() is None:
        raise RuntimeError(
            f"lpreg: backend 'cpu'/'cuda' needs the compiled extension lpreg._C, which did not load: {_load_error}"
        )
    return torch.ops.lpreg_C


def token_stats_forward(logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index):
    """logits/proxy: (N, V) unit-stride rows; labels: (N,) int64 or None.

    Returns (logp, proxy_logp, kl, entropy, row_stats): (N,) fp32 x4 and (N, 5) fp32.
    """
    labels = None if labels is None else labels.long()
    return tuple(_ops().token_stats_fwd(
        logits, labels, proxy, float(inv_temperature), bool(fixed), float(log_threshold), int(ignore_index)
    ))


def token_stats_backward(logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy, inv_temperature, ignore_index):
    """g_*: (N,) or None. Returns grad_logits (N, V) in logits.dtype."""
    labels = None if labels is None else labels.long()
    if labels is None:
        g_logp = None  # logp is not defined without a sampled token (the op rejects it)
    return _ops().token_stats_bwd(
        logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy, float(inv_temperature), int(ignore_index)
    )
