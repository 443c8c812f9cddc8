"""Fused linear token statistics: `lpreg_token_stats(hidden @ weight.T + bias, labels)` without
the (..., V) logits.

Forward: per chunk of rows, logits_c = h_c W^T + b (fp32), then the fused token-stats op;
only the four (N,) outputs are kept. The gradient of the outputs w.r.t. the logits depends on
the upstream gradients (g_logp, g_kl, g_H) per token (docs/spec.md §2):

    grad_z = (g_logp (e_y - p) + g_kl (p - q) - g_H p (log p + H)) / T

so it cannot be formed before backward without storing N x V numbers. Backward therefore
recomputes each chunk's logits (2NHV flops) and runs the op's fused backward on them, then
the two gradient matmuls (4NHV): 8NHV in all against 6NHV for materialised logits, with
memory flat in N: one chunk of logits and its gradient, plus the fp32 hidden / weight / bias
gradients. Double backward is not supported. The backward reads the saved weight again: it checks
first that its storage still holds it (`lpreg._fused_linear_chunks.check_head`), and raises a
RuntimeError saying so where a sharded-parameter framework freed it in between.
"""

import math
from typing import TYPE_CHECKING, NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _validate
from ._fused_linear_chunks import ChunkMatmuls, check_head, chunk_stats, sharded_chunk_size, take_rows
from ._vocab_parallel import check_group
from .sparse_proxy import SparseProxy, build_proxy
from .token_stats import TokenStats

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class _Opts(NamedTuple):
    temperature: float
    mode: str
    threshold: float
    ignore_index: int
    backend: str
    process_group: object  # None, or the group over which the weight is sharded by vocabulary
    logit_scale: float = 1.0  # the logit transform the per-chunk op applies to the chunk's x = h W^T + b
    logit_softcap: Optional[float] = None


def _stats(logits: Tensor, labels: Tensor, proxy, rows, opts: _Opts) -> TokenStats:
    return chunk_stats(logits, labels[rows], take_rows(proxy, rows), opts.temperature, opts.mode, opts.threshold,
                       opts.ignore_index, opts.backend, opts.process_group, opts.logit_scale, opts.logit_softcap)


class _FusedLinearTokenStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels, proxy, opts, chunk):
        N = hidden2d.shape[0]
        mm = ChunkMatmuls(hidden2d, weight, bias, False, False, False)
        out = [torch.empty((N,), dtype=torch.float32, device=hidden2d.device) for _ in range(4)]
        with torch.no_grad():
            for a in range(0, N, chunk):
                rows = slice(a, min(N, a + chunk))
                for o, s in zip(out, _stats(mm.logits(rows), labels, proxy, rows, opts)):
                    o[rows] = s
        ctx.save_for_backward(hidden2d, weight, bias, labels)
        ctx.proxy, ctx.opts, ctx.chunk, ctx.weight_shape = proxy, opts, chunk, tuple(weight.shape)
        ctx.mark_non_differentiable(out[1])  # proxy_logp is a target
        return tuple(out)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp, g_proxy_logp, g_kl, g_entropy):
        hidden2d, weight, bias, labels = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        upstream = [(i, g) for i, g in ((0, g_logp), (2, g_kl), (3, g_entropy)) if g is not None]
        if not any(need) or not upstream:
            return None, None, None, None, None, None, None
        where = "in the backward, which recomputes the logits from it"
        check_head(weight, bias, where, ctx.weight_shape)
        mm = ChunkMatmuls(hidden2d, weight, bias, *need, where=where)
        N = hidden2d.shape[0]
        for a in range(0, N, ctx.chunk):
            rows = slice(a, min(N, a + ctx.chunk))
            with torch.enable_grad():
                logits = mm.logits(rows).requires_grad_(True)
                stats = _stats(logits, labels, ctx.proxy, rows, ctx.opts)
                outs = [stats[i] for i, _ in upstream]
                g = torch.autograd.grad(outs, logits, [u[rows].float() for _, u in upstream])[0]
            mm.accumulate(rows, g)
            del logits, stats, outs, g
        mm.sum_hidden_grad(ctx.opts.process_group)  # vocabulary-parallel: each rank's dh is its shard's share
        grad_h, grad_w, grad_b = mm.grads(hidden2d, weight, bias)
        return grad_h, grad_w, grad_b, None, None, None, None


def _check_inputs(hidden, weight, bias, labels, sharded=False, labels_optional=False) -> None:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (..., H), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, H) with H = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if weight.shape[0] == 0 and not sharded:  # a vocabulary shard may be empty
        raise ValueError(f"weight must have a non-empty vocabulary dimension V, got shape {tuple(weight.shape)}")
    V = weight.shape[0]
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (V,)):
        raise ValueError(f"bias must be None or a tensor of shape ({V},), got {getattr(bias, 'shape', bias)}")
    if labels is None and labels_optional:
        return
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        got = getattr(labels, "dtype", type(labels).__name__)
        raise ValueError(f"labels must be an integer torch.Tensor, got {got}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels must be on {hidden.device}, got {labels.device}")


def _flat_proxy(proxy, lead, V: int, device, sharded=False):
    """None, dense (..., V) logits -> (N, V) detached, or SparseProxy (..., k) -> flattened."""
    if proxy is None:
        return None
    if isinstance(proxy, SparseProxy):
        if tuple(proxy.indices.shape[:-1]) != tuple(lead) or proxy.logq.shape != proxy.indices.shape:
            raise ValueError(f"proxy (SparseProxy) must have shape (..., k) with ... = {tuple(lead)}, got indices "
                             f"{tuple(proxy.indices.shape)} and logq {tuple(proxy.logq.shape)}")
        return proxy.flatten()
    _validate.check_logits(proxy, "proxy", allow_empty=sharded)  # an empty vocabulary shard's proxy is empty
    if tuple(proxy.shape) != (*lead, V):
        raise ValueError(f"proxy (dense logits) must have shape {(*lead, V)}, got {tuple(proxy.shape)}")
    if proxy.device != device:
        raise ValueError(f"proxy must be on {device}, got {proxy.device}")
    return proxy.detach().reshape(math.prod(lead), V)  # V = 0 (an empty vocabulary shard) is legal


# the body of the public lpreg.fused_linear_token_stats (lpreg/fused_linear.py holds its documented signature)
def token_stats_in_chunks(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    mode: str = "min_p",
    threshold: float = 0.02,
    proxy: Union[None, Tensor, SparseProxy] = None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional["ProcessGroup"] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
) -> TokenStats:
    """`lpreg_token_stats(hidden @ weight.T + bias, labels, ...)` without the (..., V) logits.

    hidden: (..., H); weight: (V, H) of hidden's dtype; bias: (V,) or None; labels: (...)
    integer sampled tokens (`ignore_index` rows give zeros and no gradient).
    proxy: None (on-policy: the current logits, detached), dense (..., V) logits of the
    data-generating policy, or a `SparseProxy` (..., k) from `lpreg.build_proxy` (which holds
    its own filter: mode and threshold then do not apply).
    chunk_size: token rows per chunk, default `default_chunk_size(N, V)` (just under 32 MiB of fp32
    logits on CPU, 128 MiB on CUDA).

    process_group: None, or the tensor-parallel group over which the LM head is sharded by
    vocabulary: weight (and bias, and a dense proxy) are this rank's block of V_r rows (see
    `lpreg_token_stats`), everything else the same on every rank, and so are the statistics. The
    backward gives this shard's weight and bias gradients and the whole hidden gradient (each
    rank's share summed by one all_reduce of N x H fp32). Collectives: one all_gather of the
    widths, then two all_gathers per chunk of rows, forward, and again in the backward, which
    recomputes each chunk's statistics.
    logit_scale, logit_softcap: the LM head's logit transform (see `lpreg_token_stats`), applied by
    the per-chunk op to x = hidden @ weight.T + bias (and to a dense proxy) before the temperature.

    Returns TokenStats(logp, proxy_logp, kl, entropy), each (...) fp32; logp, kl and entropy
    are differentiable w.r.t. hidden, weight and bias (backward recomputes the logits chunk
    by chunk; memory stays flat in N).
    """
    if process_group is not None:
        check_group(process_group)
    _check_inputs(hidden, weight, bias, labels, sharded=process_group is not None)
    temperature = _validate.check_temperature(temperature)
    threshold = _validate.check_mode_threshold(mode, threshold)
    _validate.check_backend(backend)
    logit_scale = _validate.check_logit_scale(logit_scale)
    logit_softcap = _validate.check_logit_softcap(logit_softcap)
    lead = tuple(hidden.shape[:-1])
    V, H = weight.shape
    N = labels.numel()
    chunk = sharded_chunk_size(chunk_size, N, weight, hidden.device, process_group)
    flat_proxy = _flat_proxy(proxy, lead, V, hidden.device, sharded=process_group is not None)
    opts = _Opts(temperature, mode, threshold, int(ignore_index), backend, process_group, logit_scale, logit_softcap)
    out = _FusedLinearTokenStats.apply(hidden.reshape(N, H), weight, bias, labels.reshape(N).long(), flat_proxy,
                                       opts, max(1, chunk))
    return TokenStats(*(o.reshape(lead) for o in out))


@torch.no_grad()
# the body of the public lpreg.fused_linear_build_proxy
def build_proxy_in_chunks(
    hidden: Tensor,
    weight: Tensor,
    labels: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    temperature: float = 1.0,
    mode: str = "min_p",
    threshold: float = 0.02,
    k: int = 64,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    backend: str = "auto",
    process_group: Optional["ProcessGroup"] = None,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
) -> SparseProxy:
    """`lpreg.build_proxy(hidden @ weight.T + bias, labels, ...)` without the (..., V) logits: the
    rollout-time proxy record of a fused path, from the hidden states and the LM head, no grad.

    hidden: (..., H); weight: (V, H) of hidden's dtype; bias: (V,) or None; labels: (...) integer
    sampled tokens or None (as for build_proxy: with them, the record carries each label's exact
    log q). Each chunk of `chunk_size` rows (default `default_chunk_size(N, V)`) is one fp32
    product of the head, as in `fused_linear_token_stats` (whatever autocast region it is called
    from), then `build_proxy` on it. process_group: None, or the group over which the head is
    sharded by vocabulary (weight and bias are this rank's block; every rank gets the same record,
    with global indices; one all_gather of the widths, then build_proxy's two per chunk).
    logit_scale, logit_softcap: the LM head's logit transform, applied to each chunk's x by
    build_proxy (the record is the proxy of the model's transformed logits).

    Returns a SparseProxy ((..., k) int32 indices, (..., k) fp32 log q, (...) coverage, (...) label
    log q or None), equal to build_proxy's on the materialised logits.
    """
    if process_group is not None:
        check_group(process_group)
    _check_inputs(hidden, weight, bias, labels, sharded=process_group is not None, labels_optional=True)
    temperature = _validate.check_temperature(temperature)
    threshold = _validate.check_mode_threshold(mode, threshold)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    _validate.check_backend(backend)
    logit_scale = _validate.check_logit_scale(logit_scale)
    logit_softcap = _validate.check_logit_softcap(logit_softcap)
    lead = tuple(hidden.shape[:-1])
    V, H = weight.shape
    N = math.prod(lead)
    chunk = max(1, sharded_chunk_size(chunk_size, N, weight, hidden.device, process_group))
    mm = ChunkMatmuls(hidden.reshape(N, H), weight, bias, False, False, False)
    flat = None if labels is None else labels.reshape(N)
    dev = hidden.device
    idx = torch.zeros((N, k), dtype=torch.int32, device=dev)
    logq = torch.zeros((N, k), dtype=torch.float32, device=dev)
    cov = torch.zeros((N,), dtype=torch.float32, device=dev)
    label_logq = None if labels is None else torch.zeros((N,), dtype=torch.float32, device=dev)
    for a in range(0, N, chunk):
        rows = slice(a, min(N, a + chunk))
        p = build_proxy(mm.logits(rows), None if flat is None else flat[rows], temperature=temperature, mode=mode,
                        threshold=threshold, k=k, ignore_index=ignore_index, backend=backend,
                        process_group=process_group, logit_scale=logit_scale, logit_softcap=logit_softcap)
        idx[rows], logq[rows], cov[rows] = p.indices, p.logq, p.coverage
        if label_logq is not None and p.label_logq is not None:  # given labels, build_proxy returns it
            label_logq[rows] = p.label_logq
    return SparseProxy(idx.reshape(*lead, k), logq.reshape(*lead, k), cov.reshape(lead),
                       None if label_logq is None else label_logq.reshape(lead))
