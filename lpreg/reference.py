"""Readable pure-PyTorch Lp-Reg statistics: the oracle the kernels are tested against.

Same signatures as `lpreg.lpreg_token_stats` / `lpreg.lpreg_kl`, any device, autograd
through ordinary PyTorch ops. Rows are processed in chunks (`lpreg._rows.row_chunks`, the
chunker the torch backends use too) and each chunk runs under activation checkpointing, so
at most one chunk of fp32 probabilities is alive at a time, in the forward and in the backward.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import _validate
from ._rows import row_chunks
from .logit_transform import LogitTransform
from .token_stats import TokenStats


def kept_set(y: Tensor, mode: str, threshold: float) -> Tensor:
    """docs/spec.md §1: boolean mask of K for scaled proxy logits y = proxy / T, (N, V)."""
    ymax = y.amax(-1, keepdim=True)
    if mode == "min_p":
        return y >= ymax + torch.log(torch.tensor(threshold, dtype=y.dtype))
    lse = torch.logsumexp(y, -1, keepdim=True)
    kept = y >= lse + torch.log(torch.tensor(threshold, dtype=y.dtype))
    first_argmax = torch.zeros_like(kept).scatter_(-1, y.argmax(-1, keepdim=True), True)
    return torch.where(kept.any(-1, keepdim=True), kept, first_argmax)


def _chunk_stats(x_raw: Tensor, y_raw: Optional[Tensor], labels: Optional[Tensor], temperature: float, mode: str,
                 threshold: float, ignore_index: int, transform: LogitTransform) -> Tuple[Tensor, ...]:
    # fp32 accumulation for low-precision inputs; float64 stays float64 (for gradcheck). The logit
    # transform (docs/spec.md "The logit transform") comes first, with autograd through it.
    acc = torch.promote_types(x_raw.dtype, torch.float32)
    x = transform.apply(x_raw.to(acc)) / temperature
    y = x.detach() if y_raw is None else transform.apply(y_raw.to(acc)) / temperature
    logp_all = torch.log_softmax(x, -1)
    p = logp_all.exp()
    # p log p with the 0 log 0 = 0 convention for -inf logits (masking log p, not the
    # product, keeps the gradient finite there)
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)
    kept = kept_set(y, mode, threshold)
    logq_all = torch.where(kept, y, torch.full_like(y, float("-inf"))).log_softmax(-1)
    q = logq_all.exp()
    kl = torch.where(kept, q * (logq_all - logp_all), torch.zeros_like(q)).sum(-1)
    bad = torch.isnan(x).any(-1) | torch.isnan(y).any(-1) | torch.isneginf(x).all(-1) | torch.isneginf(y).all(-1)
    nan = torch.full_like(kl, float("nan"))
    if labels is None:
        valid = torch.ones_like(bad)
        logp = proxy_logp = torch.zeros_like(kl)
    else:
        valid = labels != ignore_index
        safe = torch.where(valid, labels, torch.zeros_like(labels))[:, None]
        logp = logp_all.gather(-1, safe)[:, 0]
        proxy_logp = logq_all.gather(-1, safe)[:, 0].detach()
    outs = []
    for v in (logp, proxy_logp, kl, entropy):
        v = torch.where(bad, nan, v)
        outs.append(torch.where(valid, v, torch.zeros_like(v)))
    return tuple(outs)


def _stats(logits: Tensor, labels: Optional[Tensor], temperature: float, mode: str, threshold: float,
           proxy_logits: Optional[Tensor], ignore_index: int, transform: LogitTransform) -> Tuple[Tensor, ...]:
    _validate.check_logits(logits)
    temperature = _validate.check_temperature(temperature)
    threshold = _validate.check_mode_threshold(mode, threshold)
    _validate.check_proxy_logits(proxy_logits, logits)
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    y = None if proxy_logits is None else proxy_logits.detach().reshape(-1, V)
    lab = None
    if labels is not None:
        _validate.check_labels(labels, logits, ignore_index)
        _validate.check_label_range(labels, V, ignore_index)
        lab = labels.reshape(-1).long()
    parts = []
    for a, b in row_chunks(x.shape[0], V):
        args = (x[a:b], None if y is None else y[a:b], None if lab is None else lab[a:b],
                temperature, mode, threshold, ignore_index, transform)
        if torch.is_grad_enabled() and logits.requires_grad:
            parts.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            parts.append(_chunk_stats(*args))
    shape = logits.shape[:-1]
    if not parts:
        empty = logits.new_zeros(shape, dtype=torch.promote_types(logits.dtype, torch.float32))
        return empty, empty.clone(), empty.clone(), empty.clone()
    return tuple(torch.cat([p[i] for p in parts]).reshape(shape) for i in range(4))


def lpreg_token_stats(logits: Tensor, labels: Tensor, *, temperature: float = 1.0, mode: str = "min_p",
                      threshold: float = 0.02, proxy_logits: Optional[Tensor] = None, ignore_index: int = -100,
                      backend: str = "auto", logit_scale: float = 1.0,
                      logit_softcap: Optional[float] = None) -> TokenStats:
    """Reference for `lpreg.lpreg_token_stats` (backend is accepted and ignored)."""
    _validate.check_backend(backend)
    transform = LogitTransform(scale=logit_scale, softcap=logit_softcap)
    return TokenStats(*_stats(logits, labels, temperature, mode, threshold, proxy_logits, ignore_index, transform))


def lpreg_kl(logits: Tensor, *, temperature: float = 1.0, mode: str = "min_p", threshold: float = 0.02,
             proxy_logits: Optional[Tensor] = None, reduction: str = "none", backend: str = "auto",
             logit_scale: float = 1.0, logit_softcap: Optional[float] = None) -> Tensor:
    """Reference for `lpreg.lpreg_kl` (backend is accepted and ignored)."""
    _validate.check_backend(backend)
    _validate.check_reduction(reduction)
    transform = LogitTransform(scale=logit_scale, softcap=logit_softcap)
    kl = _stats(logits, None, temperature, mode, threshold, proxy_logits, -100, transform)[2]
    return kl.mean() if reduction == "mean" else kl.sum() if reduction == "sum" else kl
