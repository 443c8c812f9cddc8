"""Fused linear + Lp-Reg policy loss: the LM head and the loss without materialising logits.

Computes exactly `lpreg_policy_loss(hidden @ weight.T + bias, ...)` while holding at most
`chunk_size x V` logits at a time. As in Liger-Kernel's fused linear cross-entropy, the
forward computes the loss *and* every gradient, chunk of tokens by chunk:

    logits_c = h_c W^T + b                      fp32 output (fp32 accumulation, never rounded
                                                to bf16 before the softmax)
    g_c      = d loss / d logits_c              the fused token-stats backward (one pass)
    dh_c     = g_c W,   dW += g_c^T h_c,   db += sum_rows g_c      dW, db accumulated in fp32

and the autograd backward only scales the stored gradients by the upstream scalar.

The lowest-rho selection is global, so it is fixed before the gradient pass: with a
`selection_threshold` (paper) it comes from old_logp and costs nothing; otherwise (paper on
current p_y, or released) a first no-grad pass computes every token's current log-prob chunk
by chunk: one extra N x H x V matmul (2NHV flops on top of 6NHV).

On CUDA with bf16/fp16 weights the chunk matmuls run in the input dtype with fp32 output
(`torch.mm(..., out_dtype=torch.float32)`) and g_c is rounded to that dtype for the two
gradient matmuls, as in Liger; elsewhere the chunk is computed in fp32 (a half-precision
weight is upcast once per call: V x H x 4 bytes).
"""

from typing import Optional

import torch
from torch import Tensor

from . import policy_loss as pl
from .selection import SelectionThreshold
from .sparse_proxy import SparseProxy

_TARGET_ELEMENTS_CUDA = 1 << 25  # 32M fp32 logits = 128 MiB per chunk buffer
_TARGET_ELEMENTS_CPU = 1 << 22  # 4M = 16 MiB


def default_chunk_size(N: int, V: int, device: torch.device) -> int:
    """Rows per chunk: about 2**25 logits on CUDA (128 MiB per fp32 C x V buffer; the chunk
    holds the logits and their gradient, ~256 MiB, plus the fused op's temporaries), 2**22 on
    CPU (16 MiB); a multiple of 16 rows when that is at least 16; never more than N."""
    target = _TARGET_ELEMENTS_CUDA if device.type == "cuda" else _TARGET_ELEMENTS_CPU
    c = max(1, target // max(V, 1))
    if c >= 16:
        c -= c % 16
    return max(1, min(N, c))


def _has_mm_out_dtype(w: Tensor) -> bool:
    """Whether this torch offers mm(half, half, out_dtype=fp32) on w's device (torch >= 2.8)."""
    try:
        torch.mm(w[:1], w[:1].t(), out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class _Matmuls:
    """The three chunk products with fp32 results, for the weight's dtype and device."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        self.w = weight.detach()
        self.half = self.w.dtype != torch.float32
        self.native = self.half and self.w.is_cuda and _has_mm_out_dtype(self.w)
        if self.half and not self.native:
            self.w = self.w.float()  # CPU has no mm(..., out_dtype=fp32) for half inputs
        self.b = None if bias is None else bias.detach().float()

    def _mm(self, a: Tensor, b: Tensor) -> Tensor:
        if self.native:
            return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
        return torch.mm(a.float(), b.float())

    def logits(self, h: Tensor) -> Tensor:
        out = self._mm(h, self.w.t())
        return out if self.b is None else out + self.b

    def grad_hidden(self, g: Tensor) -> Tensor:
        return self._mm(g, self.w)

    def add_grad_weight(self, acc: Tensor, g: Tensor, h: Tensor) -> None:
        """acc (V, H) fp32 += g^T h."""
        if self.native:
            acc += torch.mm(g.t().to(self.w.dtype), h.to(self.w.dtype), out_dtype=torch.float32)
        else:
            acc.addmm_(g.t(), h.float())  # in place: no (V, H) temporary


class _FusedLinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, batch, proxy, cfg, sel, chunk):
        N, H = batch.labels.shape[0], hidden.shape[-1]
        h = hidden.detach().reshape(N, H)
        mm = _Matmuls(weight, bias)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        need_grad = need_h or need_w or need_b

        def proxy_rows(a, b):
            if proxy is None:
                return None
            return proxy.rows(a, b) if isinstance(proxy, SparseProxy) else proxy[a:b]

        # ---- the global part of the selection, before any gradient
        logp_all = None
        if sel is None:
            logp_all = torch.empty((N,), dtype=torch.float32, device=h.device)
            with torch.no_grad():
                for a in range(0, N, chunk):
                    b = min(N, a + chunk)
                    stats = pl.row_stats(mm.logits(h[a:b]), batch.labels[a:b], proxy_rows(a, b), cfg)
                    logp_all[a:b] = stats[0]
        bottom, kth = pl.global_selection(batch, logp_all, cfg, sel)

        # ---- loss and gradients, chunk by chunk
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        sums = None
        for a in range(0, N, chunk):
            b = min(N, a + chunk)
            sl = slice(a, b)
            with torch.enable_grad():
                logits = mm.logits(h[sl]).requires_grad_(need_grad)
                stats = pl.row_stats(logits, batch.labels[sl], proxy_rows(a, b), cfg)
                loss_t, part = pl.token_terms(stats, bottom, batch, cfg, sl)
                chunk_loss = (loss_t * batch.weight[sl]).sum()
                g = torch.autograd.grad(chunk_loss, logits)[0] if need_grad else None
            loss += chunk_loss.detach()
            sums = part if sums is None else {key: sums[key] + part[key] for key in sums}
            if g is not None:
                if need_h:
                    grad_h[sl] = mm.grad_hidden(g).to(h.dtype)
                if need_w:
                    mm.add_grad_weight(grad_w, g, h[sl])
                if need_b:
                    grad_b += g.sum(0)
            del logits, stats, loss_t, g
        if sums is None:  # N == 0
            zero = torch.zeros((), device=h.device)
            sums = {key: zero for key in ("kl", "n_sel", "entropy", "ppo_kl", "clip")}
        metrics = pl.finish_metrics(loss, sums, batch.valid.sum(), kth)
        ctx.save_for_backward(
            None if grad_h is None else grad_h.reshape(hidden.shape),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        values = [metrics[key].clone() for key in pl.METRIC_KEYS]  # no output aliases another
        ctx.mark_non_differentiable(*values)
        return (loss, *values)

    @staticmethod
    def backward(ctx, g_loss, *g_metrics):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda t: None if t is None else t * g_loss.to(t.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None, None, None


def fused_linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    advantages: Tensor,
    old_logp: Tensor,
    response_mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    compat: str = "paper",
    temperature: float = 1.0,
    mode: str = "min_p",
    threshold: float = 0.02,
    rho: float = 0.01,
    beta: float = 1.0,
    clip_low: float = 1.0,
    clip_high: float = 9.0,
    loss_agg_mode: str = "token-mean",
    proxy=None,
    kl_estimator: Optional[str] = None,
    selection_threshold: Optional[SelectionThreshold] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    return_tensors: bool = False,
):
    """`lpreg_policy_loss(hidden @ weight.T + bias, ...)` without the (B, L, V) logits.

    hidden: (B, L, H); weight: (V, H); bias: (V,) or None; the other tensors and keywords as
    in `lpreg.lpreg_policy_loss` (a dense proxy is (B, L, V), a SparseProxy (B, L, k)).
    chunk_size: token rows per chunk; default `default_chunk_size(N, V)`: ~2**25 logits on
    CUDA (e.g. 220 rows at V = 151,936: 128 MiB per fp32 chunk buffer, ~256 MiB live with
    its gradient), ~2**22 on CPU (16 MiB). Extra memory besides the chunk: the hidden
    gradient (B, L, H), the fp32 weight gradient (V, H) (+ bias), N fp32 log-probs.

    Returns (loss, metrics) as lpreg_policy_loss; gradients flow to hidden, weight and bias.
    """
    cfg = pl.make_config(compat, temperature, mode, threshold, rho, beta, clip_low, clip_high, loss_agg_mode,
                         kl_estimator, ignore_index, backend)
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a float torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must have shape (B, L, H), got {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape (V, H) with H = {hidden.shape[-1]}, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    V = weight.shape[0]
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (V,)):
        raise ValueError(f"bias must be None or a tensor of shape ({V},), got {getattr(bias, 'shape', bias)}")
    if selection_threshold is not None and cfg.compat != "paper":
        raise ValueError(f"selection_threshold is a compat='paper' feature, got compat={cfg.compat!r}")
    if selection_threshold is not None and not isinstance(selection_threshold, SelectionThreshold):
        raise ValueError(f"selection_threshold must be a SelectionThreshold, got {type(selection_threshold).__name__}")
    B, L = hidden.shape[:2]
    pl.check_proxy(proxy, (B, L), V, hidden.device)
    batch = pl.prepare((B, L), hidden.device, labels, advantages, old_logp, response_mask, cfg)
    N = B * L
    if chunk_size is None:
        chunk_size = default_chunk_size(N, V, hidden.device)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if isinstance(proxy, Tensor):
        proxy = proxy.detach().reshape(N, V)
    elif isinstance(proxy, SparseProxy):
        proxy = proxy.flatten()
    out = _FusedLinearPolicyLoss.apply(hidden, weight, bias, batch, proxy, cfg, selection_threshold,
                                       max(1, chunk_size))
    loss, metrics = out[0], dict(zip(pl.METRIC_KEYS, out[1:]))
    return loss, (metrics if return_tensors else pl.to_floats(metrics))
