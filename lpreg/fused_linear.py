"""Fused linear + Lp-Reg policy loss: the LM head and the loss without materialising logits.

Computes exactly `lpreg_policy_loss(hidden @ weight.T + bias, ...)` while holding at most
`chunk_size x V` logits at a time. As in Liger-Kernel's fused linear cross-entropy, the
forward computes the loss *and* every gradient, chunk of tokens by chunk (see
`lpreg._fused_linear_chunks`), and the autograd backward only scales the stored gradients by
the upstream scalar.

The lowest-rho selection S is global: it needs every token's log-prob before any token's
loss is known. The loss is a sum over tokens, loss = sum_t w_t loss_t(S), and loss_t depends
on S only through t's own membership, so it splits exactly as

    loss = sum_t w_t loss_t(nobody selected)                                  pass 1, all N rows
         + sum_{t in B} w_t [loss_t(S) - loss_t(nobody selected)]             pass 2, rows in B

where B is the bottom-k set (the candidates; S is a subset of B). Pass 1 runs the
policy-gradient terms, records each token's log-prob and computes their gradient; the
threshold is then fixed from the recorded log-probs; pass 2 recomputes the LM head for the
rows of B only (k = max(1, floor(rho n)) rows, about rho N) and adds the gradient of the
bracket: the KL term and, for compat="released", the switch to the unclipped surrogate. Both
terms of the bracket are evaluated on the same recomputed row, so a token outside S adds
exactly 0; the metric sums split the same way. Cost: 6NHV flops + 6kHV, against 8NHV for a
separate scoring pass. With a precomputed `selection_threshold` S is known up front and
pass 1 alone computes the whole loss (unless old_logp=None: the threshold then applies to
this pass's log-probs, and the two passes run).
"""

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import _fused_linear_stats as _stats
from . import _loss_terms as pl
from ._fused_linear_chunks import ChunkMatmuls, Rows, default_chunk_size, sharded_chunk_size, take_rows
from ._vocab_parallel import check_group
from .loss_config import LossConfig
from .policy_loss import Metrics, Proxy
from .selection import SelectionThreshold
from .sparse_proxy import SparseProxy
from .token_stats import TokenStats

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["fused_linear_policy_loss", "fused_linear_token_stats", "fused_linear_build_proxy", "default_chunk_size"]


def _add(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {key: a[key] + b[key] for key in a}


class _Passes:
    """The two passes over token rows for one call: loss, metric sums and gradients."""

    def __init__(self, mm: ChunkMatmuls, batch: pl.Batch, proxy: Proxy, cfg: LossConfig,
                 group: Optional["ProcessGroup"]) -> None:
        self.mm, self.batch, self.proxy, self.cfg, self.group = mm, batch, proxy, cfg, group
        self.loss = torch.zeros((), dtype=torch.float32, device=mm.h.device)
        self.sums: Optional[Dict[str, Tensor]] = None

    def _stats(self, rows: Rows) -> Tuple[Tensor, TokenStats]:
        """Recompute the LM head for `rows` and take the per-token statistics (with grad)."""
        logits = self.mm.logits(rows).requires_grad_(self.mm.need_grad)
        assert self.batch.labels is not None  # prepare() was given labels
        return logits, pl.compute_token_stats(logits, self.batch.labels[rows], take_rows(self.proxy, rows), self.cfg,
                                              self.group)

    def _finish(self, chunk_loss: Tensor, logits: Tensor, rows: Rows, part: Dict[str, Tensor]) -> None:
        if self.mm.need_grad:
            self.mm.accumulate(rows, torch.autograd.grad(chunk_loss, logits)[0])
        self.loss += chunk_loss.detach()
        self.sums = part if self.sums is None else _add(self.sums, part)

    def all_rows(self, bottom: Tensor, chunk: int, logp_out: Optional[Tensor]) -> None:
        """Pass 1: every row, with selection mask `bottom`; records log-probs into logp_out."""
        N = bottom.shape[0]
        for a in range(0, N, chunk):
            rows = slice(a, min(N, a + chunk))
            with torch.enable_grad():
                logits, stats = self._stats(rows)
                out, part = pl.token_terms(stats, bottom, self.batch, self.cfg, rows)
                chunk_loss = (out.loss * self.batch.weight[rows]).sum()
            if logp_out is not None:
                logp_out[rows] = stats[0].detach()
            self._finish(chunk_loss, logits, rows, part)
            del logits, stats, out

    def selected_rows(self, bottom: Tensor, chunk: int) -> None:
        """Pass 2: the rows of `bottom` only, adding loss_t(S) - loss_t(nobody) per row."""
        idx = bottom.nonzero()[:, 0]
        nobody = torch.zeros_like(bottom)
        for a in range(0, idx.numel(), chunk):
            rows = idx[a:a + chunk]
            with torch.enable_grad():
                logits, stats = self._stats(rows)
                out_s, part_s = pl.token_terms(stats, bottom, self.batch, self.cfg, rows)
                out_0, part_0 = pl.token_terms(stats, nobody, self.batch, self.cfg, rows)
                loss_s, loss_0 = out_s.loss, out_0.loss
                # equal terms (a token outside S) add exactly 0, even when both are infinite
                diff = torch.where(loss_s == loss_0, torch.zeros_like(loss_s), loss_s - loss_0)
                chunk_loss = (diff * self.batch.weight[rows]).sum()
            part = {key: part_s[key] - part_0[key] for key in part_s}
            self._finish(chunk_loss, logits, rows, part)
            del logits, stats, out_s, out_0, loss_s, loss_0

    def empty_sums(self) -> Dict[str, Tensor]:
        """The metric sums of no token (N == 0), with whatever keys token_terms reports."""
        dev = self.mm.h.device
        empty = torch.zeros((0,), dtype=torch.float32, device=dev)
        none = torch.zeros((0,), dtype=torch.bool, device=dev)
        return pl.token_terms((empty, empty, empty, empty), none, self.batch, self.cfg, slice(0, 0))[1]


class _FusedLinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], batch: pl.Batch, proxy: Proxy,
                cfg: LossConfig, sel: Optional[SelectionThreshold], chunk: int,
                group: Optional["ProcessGroup"]) -> Tuple[Tensor, ...]:
        N = batch.valid.shape[0]
        mm = ChunkMatmuls(hidden.reshape(N, hidden.shape[-1]), weight, bias, *ctx.needs_input_grad[:3])
        run = _Passes(mm, batch, proxy, cfg, group)
        if not pl.needs_current_logp(batch, sel):  # the selection is known up front: one pass
            bottom, kth = pl.global_selection(batch, None, cfg, sel)
            run.all_rows(bottom, chunk, None)
        else:
            logp = torch.empty((N,), dtype=torch.float32, device=hidden.device)
            run.all_rows(torch.zeros((N,), dtype=torch.bool, device=hidden.device), chunk, logp)
            bottom, kth = pl.global_selection(batch, logp, cfg, sel)
            if cfg.beta > 0:  # beta = 0 selects nothing (lpreg._loss_terms): pass 2 would add exactly 0
                run.selected_rows(bottom, chunk)
        sums = run.sums if run.sums is not None else run.empty_sums()
        metrics = pl.finish_metrics(run.loss, sums, batch.valid.sum(), kth)
        mm.sum_hidden_grad(group)  # vocabulary-parallel: each rank's dh is its shard's share
        ctx.save_for_backward(*mm.grads(hidden, weight, bias))
        values = [metrics[key].clone() for key in pl.METRIC_KEYS]  # no output aliases another
        ctx.mark_non_differentiable(*values)
        return (run.loss, *values)

    @staticmethod
    def backward(ctx: Any, g_loss: Tensor, *g_metrics: Tensor) -> Tuple[Optional[Tensor], ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda t: None if t is None else t * g_loss.to(t.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None, None, None, None


def _check_linear(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    """hidden (B, L, H), weight (V, H) of hidden's dtype, bias (V,) or None."""
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


def fused_linear_policy_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    advantages: Tensor,
    old_logp: Optional[Tensor],
    response_mask: Tensor,
    *,
    bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    proxy: Proxy = None,
    selection_threshold: Optional[SelectionThreshold] = None,
    num_tokens: Optional[Union[int, Tensor]] = None,
    weights: Optional[Tensor] = None,
    return_tensors: bool = False,
    process_group: Optional["ProcessGroup"] = None,
    compat: str = "released",
    temperature: float = 1.0,
    mode: str = "min_p",
    threshold: float = 0.02,
    rho: float = 0.01,
    beta: float = 1.0,
    clip_low: float = 1.0,
    clip_high: float = 9.0,
    clip_ratio_c: Optional[float] = None,
    loss_agg_mode: str = "token-mean",
    kl_estimator: Optional[str] = None,
    ignore_index: int = -100,
    backend: str = "auto",
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
) -> Tuple[Tensor, Metrics]:
    """`lpreg_policy_loss(hidden @ weight.T + bias, ...)` without the (B, L, V) logits.

    Without `selection_threshold` the call makes one pass over all N rows and a second over the
    ~rho N candidate rows of the selection (module docstring); with it, one pass. Extra memory
    besides the chunk: the fp32 hidden gradient (B, L, H), the fp32 weight gradient (V, H)
    (+ bias), N fp32 log-probs.

    Args:
        hidden: (B, L, H) hidden states before the LM head.
        weight: (V, H) LM head weight, of hidden's dtype.
        labels: (B, L) sampled tokens; a label equal to ignore_index never counts.
        advantages: (B, L) or (B,) advantages A.
        old_logp: (B, L) rollout log-probs of the labels, or None for on-policy (this pass's
            detached log-probs: the ratio is exactly 1).
        response_mask: (B, L), > 0 where a token counts.
        bias: (V,) LM head bias, or None.
        chunk_size: Token rows per chunk; None: `default_chunk_size(N, V)`, ~2**25 logits on CUDA
            (e.g. 208 rows at V = 151,936), just under 32 MiB on CPU.
        proxy: None (on-policy), dense (B, L, V) rollout logits, or a `SparseProxy` (B, L, k).
        selection_threshold: compat="paper" only: a `SelectionThreshold` (the step-wide
            percentile), or None to select within this call.
        num_tokens: None (this call's count), or the global valid-token count, the token-mean
            denominator (int or 0-d tensor).
        weights: None, or per-token importance-sampling weights (B, L) or (B,) (the rule:
            `lpreg.policy_loss_from_stats`).
        return_tensors: False gives python floats (one host sync); True gives 0-d tensors.
        process_group: None, or the tensor-parallel group over which the LM head is sharded by
            vocabulary: weight (and bias, and a dense proxy) are this rank's block of V_r rows,
            hidden and the rest the same on every rank. The loss and metrics are the same on every
            rank; the weight and bias gradients are this shard's, the hidden gradient the whole one
            (one all_reduce of N x H fp32 per call: do not all-reduce it again).
        compat: "released" (the default) or "paper" (the literal Eq. 6).
        temperature: The policy's sampling temperature T (> 0).
        mode: The proxy's noise filter, "min_p" or "fixed".
        threshold: The filter's threshold (kappa).
        rho: The fraction of lowest-probability tokens eligible for the penalty, in (0, 1].
        beta: The penalty's weight, >= 0 (0 turns Lp-Reg off: the plain clipped surrogate).
        clip_low: The ratio clip's lower width: r >= 1 - clip_low.
        clip_high: The ratio clip's upper width: r <= 1 + clip_high.
        clip_ratio_c: None, or verl's dual clip (> 1): an A < 0 token's surrogate is at most -A c.
        loss_agg_mode: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum".
        kl_estimator: None (k3 for released, the full KL for paper), "k3" or "full".
        ignore_index: The label value that never counts.
        backend: The token-statistics backend: "auto", "triton", "torch", "cpu" or "cuda".
        logit_scale: The LM head's logit multiplier, applied after the matmul and before the
            temperature (Cohere, Granite, MiniCPM); finite and > 0.
        logit_softcap: None, or the LM head's tanh soft-cap c (Gemma): z = c tanh(logit_scale x / c).

    Returns:
        (loss, metrics) as `lpreg.lpreg_policy_loss` (the mechanism metrics summed over the
        chunks); gradients flow to hidden, weight and bias.

    Raises:
        LossConfigError: An option is out of range (a ValueError naming the option).
        ValueError: An input has the wrong type, shape, dtype or device.
    """
    cfg = LossConfig(compat=compat, temperature=temperature, mode=mode, threshold=threshold, rho=rho, beta=beta,
                     clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode,
                     kl_estimator=kl_estimator, ignore_index=ignore_index, backend=backend,
                     logit_scale=logit_scale, logit_softcap=logit_softcap)
    if process_group is not None:
        check_group(process_group)
    _check_linear(hidden, weight, bias)
    pl.check_selection_threshold(selection_threshold, cfg)
    B, L = hidden.shape[:2]
    V = weight.shape[0]
    pl.check_proxy(proxy, (B, L), V, hidden.device)
    batch = pl.prepare((B, L), hidden.device, labels, advantages, old_logp, response_mask, cfg,
                       num_tokens=num_tokens, weights=weights)
    N = B * L
    chunk = sharded_chunk_size(chunk_size, N, weight, hidden.device, process_group)
    out = _FusedLinearPolicyLoss.apply(hidden, weight, bias, batch, pl.flat_proxy(proxy, N, V), cfg,
                                       selection_threshold, chunk, process_group)
    loss, metrics = out[0], dict(zip(pl.METRIC_KEYS, out[1:]))
    return loss, (metrics if return_tensors else pl.to_floats(metrics))


def fused_linear_token_stats(
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

    Args:
        hidden: (..., H) hidden states before the LM head.
        weight: (V, H) LM head weight, of hidden's dtype.
        labels: (...) integer sampled tokens (`ignore_index` rows give zeros and no gradient).
        bias: (V,) LM head bias, or None.
        temperature: The policy's sampling temperature T (> 0).
        mode: The proxy's noise filter, "min_p" or "fixed".
        threshold: The filter's threshold (kappa).
        proxy: None (on-policy: the current logits, detached), dense (..., V) logits of the
            data-generating policy, or a `SparseProxy` (..., k) from `lpreg.build_proxy` (which
            holds its own filter: mode and threshold then do not apply).
        ignore_index: The label value that gives a zero row.
        chunk_size: Token rows per chunk; None: `default_chunk_size(N, V)` (just under 32 MiB of
            fp32 logits on CPU, 128 MiB on CUDA).
        backend: "auto", "triton", "torch", "cpu" or "cuda".
        process_group: None, or the tensor-parallel group over which the LM head is sharded by
            vocabulary: weight (and bias, and a dense proxy) are this rank's block of V_r rows,
            everything else the same on every rank, and so are the statistics. The backward gives
            this shard's weight and bias gradients and the whole hidden gradient.
        logit_scale: The LM head's logit multiplier, applied after the matmul and before the
            temperature; finite and > 0.
        logit_softcap: None, or the LM head's tanh soft-cap c: z = c tanh(logit_scale x / c).

    Returns:
        TokenStats(logp, proxy_logp, kl, entropy), each (...) fp32; logp, kl and entropy are
        differentiable w.r.t. hidden, weight and bias (the backward recomputes the logits chunk by
        chunk: memory stays flat in N).

    Raises:
        ValueError: An input or option is invalid (the message names it).
    """
    return _stats.token_stats_in_chunks(
        hidden, weight, labels, bias=bias, temperature=temperature, mode=mode, threshold=threshold, proxy=proxy,
        ignore_index=ignore_index, chunk_size=chunk_size, backend=backend, process_group=process_group,
        logit_scale=logit_scale, logit_softcap=logit_softcap)


def fused_linear_build_proxy(
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
    """`lpreg.build_proxy(hidden @ weight.T + bias, labels, ...)` without the (..., V) logits.

    The rollout-time proxy record of a fused path, from the hidden states and the LM head, with no
    gradient. Each chunk of rows is one fp32 product of the head, then `build_proxy` on it.

    Args:
        hidden: (..., H) hidden states before the LM head.
        weight: (V, H) LM head weight, of hidden's dtype.
        labels: (...) integer sampled tokens, or None (with them, the record carries each label's
            exact log q).
        bias: (V,) LM head bias, or None.
        temperature: The policy's sampling temperature T (> 0).
        mode: The proxy's noise filter, "min_p" or "fixed".
        threshold: The filter's threshold (kappa).
        k: The number of proxy entries kept per token (>= 1).
        ignore_index: The label value that gives an empty row.
        chunk_size: Token rows per chunk; None: `default_chunk_size(N, V)`.
        backend: "auto", "triton", "torch", "cpu" or "cuda".
        process_group: None, or the group over which the head is sharded by vocabulary (weight and
            bias are this rank's block; every rank gets the same record, with global indices).
        logit_scale: The LM head's logit multiplier, applied after the matmul and before the
            temperature; finite and > 0.
        logit_softcap: None, or the LM head's tanh soft-cap c: z = c tanh(logit_scale x / c).

    Returns:
        A SparseProxy ((..., k) int32 indices, (..., k) fp32 log q, (...) coverage, (...) label log q
        or None), equal to build_proxy's on the materialised logits.

    Raises:
        ValueError: An input or option is invalid (the message names it).
    """
    return _stats.build_proxy_in_chunks(
        hidden, weight, labels, bias=bias, temperature=temperature, mode=mode, threshold=threshold, k=k,
        ignore_index=ignore_index, chunk_size=chunk_size, backend=backend, process_group=process_group,
        logit_scale=logit_scale, logit_softcap=logit_softcap)
