"""backend="cpu" / "cuda": the compiled extension `lpreg._C` (csrc/).

The extension registers two ops, `torch.ops.lpreg_C.token_stats_fwd` and `..._bwd` (C++
kernels for CPU tensors, CUDA kernels when it was built with CUDA), with the row-statistics
contract documented in `lpreg.kernels.token_stats`. This module loads it lazily (an import of
lpreg never needs it), registers the ops' fake (meta) implementations so that torch.compile
and `torch.library.opcheck` can trace them, and exposes the backend functions with the
signatures of `lpreg._token_stats_torch_backend`.
"""

import functools
import os
from typing import List

import torch

# PASS1_WIDTH, PASS2_WIDTH: csrc/row_partials.h
from ._contract import PASS1_WIDTH, PASS2_WIDTH, fake_grad, fake_row_outputs, transform_constants
from ._contract import TOKEN_STATS_WIDTH as ROW_STATS_WIDTH  # csrc/row_stats.h: kRowStatsWidth


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


_load_error: List[str] = []


def _register_fakes():
    @torch.library.register_fake("lpreg_C::token_stats_fwd")
    def _fwd_fake(logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index, softcap=0.0):
        return fake_row_outputs(logits, ROW_STATS_WIDTH)

    @torch.library.register_fake("lpreg_C::token_stats_bwd")
    def _bwd_fake(logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy, inv_temperature, ignore_index,
                  vocab_offset=0, softcap=0.0):
        return fake_grad(logits)

    @torch.library.register_fake("lpreg_C::token_stats_shard_pass1")
    def _pass1_fake(logits, labels, proxy, inv_temperature, fixed, ignore_index, softcap=0.0):
        return logits.new_empty((logits.shape[0], PASS1_WIDTH), dtype=torch.float32)

    @torch.library.register_fake("lpreg_C::token_stats_shard_pass2")
    def _pass2_fake(logits, labels, proxy, inv_temperature, cutoff, max_y, argmax, ignore_index, softcap=0.0):
        return logits.new_empty((logits.shape[0], PASS2_WIDTH), dtype=torch.float32)


# setup.py writes this file beside the extension when its build fails and the install goes on without it
BUILD_FAILURE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_build_failed.txt")
RETRY = ("rebuild it against this torch, with the compiler's errors shown: "
         "LPREG_REQUIRE_EXT=1 pip install -v --no-build-isolation -e .")


def unavailable_reason(device_type: str) -> str:
    """Why the compiled backend for `device_type` cannot run here ("" when it can)."""
    if available(device_type):
        return ""
    if _load() is None:
        if os.path.exists(BUILD_FAILURE_FILE):
            with open(BUILD_FAILURE_FILE) as f:
                return f"lpreg._C was not built: {f.read().strip()}"
        return f"lpreg._C does not load ({'; '.join(_load_error)}); {RETRY}"
    if device_type == "cuda":
        if not _load().with_cuda:
            return "lpreg._C was built without CUDA (no CUDA torch or CUDA_HOME at build time, or LPREG_SKIP_CUDA=1)"
        return "no CUDA device is available"
    return f"no compiled backend for {device_type!r} tensors"


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


def token_stats_forward(logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index, logit_scale=1.0,
                        logit_softcap=None):
    """logits/proxy: (N, V) unit-stride rows; labels: (N,) int64 or None. The logit transform is folded
    into the kernels' multiplier and soft-cap (lpreg._contract.transform_constants; csrc/logit_transform.h).

    Returns (logp, proxy_logp, kl, entropy, row_stats): (N,) fp32 x4 and (N, 5) fp32.
    """
    labels = None if labels is None else labels.long()
    mult, cap = transform_constants(inv_temperature, logit_scale, logit_softcap)
    return tuple(_ops().token_stats_fwd(
        logits, labels, proxy, mult, bool(fixed), float(log_threshold), int(ignore_index), cap
    ))


def token_stats_backward(logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy, inv_temperature, ignore_index,
                         vocab_offset=0, logit_scale=1.0, logit_softcap=None):
    """g_*: (N,) or None. Returns grad_logits (N, V) in logits.dtype of the shard holding columns
    [vocab_offset, vocab_offset + V) (labels and the argmax slot are global columns)."""
    labels = None if labels is None else labels.long()
    if labels is None:
        g_logp = None  # logp is not defined without a sampled token (the op rejects it)
    mult, cap = transform_constants(inv_temperature, logit_scale, logit_softcap)
    return _ops().token_stats_bwd(
        logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy, mult, int(ignore_index), int(vocab_offset), cap
    )


def token_stats_shard_pass1(logits, labels, proxy, inv_temperature, fixed, ignore_index, logit_scale=1.0,
                            logit_softcap=None):
    """The shard's pass-1 partials (N, 7) fp32 (lpreg._contract.PASS1_SLOTS)."""
    labels = None if labels is None else labels.long()
    mult, cap = transform_constants(inv_temperature, logit_scale, logit_softcap)
    return _ops().token_stats_shard_pass1(logits, labels, proxy, mult, bool(fixed), int(ignore_index), cap)


def token_stats_shard_pass2(logits, labels, proxy, inv_temperature, cutoff, my_ref, argmax_y, ignore_index,
                            logit_scale=1.0, logit_softcap=None):
    """The shard's pass-2 partials (N, 2) fp32 (lpreg._contract.PASS2_SLOTS) given the rows' combined
    cutoff, max of y and argmax (a local column, -1 elsewhere)."""
    labels = None if labels is None else labels.long()
    mult, cap = transform_constants(inv_temperature, logit_scale, logit_softcap)
    return _ops().token_stats_shard_pass2(logits, labels, proxy, mult, cutoff.float().contiguous(),
                                          my_ref.float().contiguous(), argmax_y.long().contiguous(), int(ignore_index),
                                          cap)
