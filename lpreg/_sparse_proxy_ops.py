"""torch.library glue: the `lpreg::sparse_proxy_stats` op, its backward op, fake kernels, autograd;
and `lpreg::build_proxy`, the no-grad op that records the proxy's top-k at rollout time.

The same layering as token stats (lpreg._token_stats_ops): the ops take 2-D (N, V) logits with
unit-stride rows, (N, k) int64 indices and fp32 log q, an optional (N,) fp32 exact label
log q, and a backend name that is resolved inside the op bodies by `lpreg._backends`
(the same resolution as token stats), then served by the module that registry names.
The public function, with its argument checks, is `lpreg.sparse_proxy.sparse_proxy_stats`.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _backends, _contract, _validate, _vocab_parallel
from ._contract import as_upstream, fake_grad, fake_row_outputs, keep_for_backward

_OP = "sparse_proxy_stats"


@torch.library.custom_op("lpreg::sparse_proxy_stats", mutates_args=())
def sparse_proxy_stats_op(logits: Tensor, labels: Optional[Tensor], indices: Tensor, logq: Tensor,
                          label_logq: Optional[Tensor], inv_temperature: float, ignore_index: int, backend: str,
                          logit_scale: float = 1.0, logit_softcap: Optional[float] = None
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if labels is not None:
        _validate.check_label_range(labels, logits.shape[-1], ignore_index)
    _validate.check_index_range(indices, logits.shape[-1])
    impl = _backends.implementation(_backends.resolve(backend, logits.device), _OP)
    return impl.sparse_proxy_forward(logits, labels, indices, logq, label_logq, inv_temperature, ignore_index,
                                     logit_scale=logit_scale, logit_softcap=logit_softcap)


@sparse_proxy_stats_op.register_fake
def _(logits, labels, indices, logq, label_logq, inv_temperature, ignore_index, backend, logit_scale=1.0,
      logit_softcap=None):
    return fake_row_outputs(logits, _contract.SPARSE_PROXY_WIDTH)


@torch.library.custom_op("lpreg::sparse_proxy_stats_backward", mutates_args=())
def sparse_proxy_stats_backward_op(logits: Tensor, labels: Optional[Tensor], indices: Tensor, logq: Tensor,
                                   row_stats: Tensor, g_logp: Optional[Tensor], g_kl: Optional[Tensor],
                                   g_entropy: Optional[Tensor], inv_temperature: float, ignore_index: int,
                                   backend: str, vocab_offset: int = 0, logit_scale: float = 1.0,
                                   logit_softcap: Optional[float] = None) -> Tensor:
    """The gradient (N, V) of a shard holding the columns [vocab_offset, vocab_offset + V) of the
    vocabulary (the whole row: vocab_offset = 0); labels and indices are global columns."""
    if logits.shape[1] == 0:  # an empty shard of a vocabulary-parallel row
        return torch.zeros_like(logits)
    impl = _backends.implementation(_backends.resolve(backend, logits.device), _OP)
    return impl.sparse_proxy_backward(logits, labels, indices, logq, row_stats, g_logp, g_kl, g_entropy,
                                      inv_temperature, ignore_index, vocab_offset, logit_scale=logit_scale,
                                      logit_softcap=logit_softcap)


@sparse_proxy_stats_backward_op.register_fake
def _(logits, labels, indices, logq, row_stats, g_logp, g_kl, g_entropy, inv_temperature, ignore_index, backend,
      vocab_offset=0, logit_scale=1.0, logit_softcap=None):
    return fake_grad(logits)


def _setup_context(ctx, inputs, output):
    logits, labels, indices, logq, label_logq, inv_temperature, ignore_index, backend, scale, softcap = inputs
    keep_for_backward(ctx, (logits, labels, indices, logq), output, inv_temperature, ignore_index, backend, 0, scale,
                      softcap)


def _backward(ctx, g_logp, g_proxy_logp, g_kl, g_entropy, g_row_stats):
    logits, labels, indices, logq, row_stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = sparse_proxy_stats_backward_op(
            logits, labels, indices, logq, row_stats,
            as_upstream(g_logp) if labels is not None else None, as_upstream(g_kl), as_upstream(g_entropy),
            ctx.inv_temperature, ctx.ignore_index, ctx.backend, ctx.offset, ctx.logit_scale, ctx.logit_softcap,
        )
    return grad, None, None, None, None, None, None, None, None, None


sparse_proxy_stats_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lpreg::build_proxy", mutates_args=())
def build_proxy_op(logits: Tensor, labels: Optional[Tensor], inv_temperature: float, fixed: bool,
                   log_threshold: float, k: int, ignore_index: int, backend: str, logit_scale: float = 1.0,
                   logit_softcap: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(indices (N, k) int32, logq (N, k) fp32, coverage (N,) fp32, label_logq (N,) fp32); label_logq is
    all zeros without labels (the public function then drops it)."""
    if labels is not None:
        _validate.check_label_range(labels, logits.shape[-1], ignore_index)
    impl = _backends.implementation(_backends.resolve(backend, logits.device), "build_proxy")
    idx, logq, cov, label_logq = impl.build_proxy_rows(logits, labels, inv_temperature, fixed, log_threshold, k,
                                                       ignore_index, logit_scale=logit_scale,
                                                       logit_softcap=logit_softcap)
    return idx, logq, cov, (torch.zeros_like(cov) if label_logq is None else label_logq)


@build_proxy_op.register_fake
def _(logits, labels, inv_temperature, fixed, log_threshold, k, ignore_index, backend, logit_scale=1.0,
      logit_softcap=None):
    N = logits.shape[0]
    return (logits.new_empty((N, k), dtype=torch.int32), logits.new_empty((N, k), dtype=torch.float32),
            logits.new_empty((N,), dtype=torch.float32), logits.new_empty((N,), dtype=torch.float32))


class ShardedSparseProxyStats(torch.autograd.Function):
    """`lpreg::sparse_proxy_stats` on vocabulary-parallel logits (N, V_r), this rank's shard, against a
    proxy whose indices are global columns (lpreg._vocab_parallel): two all_gathers forward, none
    backward. Pass 1 on the shard is the token-stats backend's (max, sum and entropy moment)."""

    @staticmethod
    def forward(ctx, logits, labels, indices, logq, label_logq, inv_temperature, ignore_index, backend,
                logit_scale, logit_softcap, group):
        resolved = _backends.resolve(backend, logits.device)
        out, shard = _vocab_parallel.sparse_proxy_forward(
            _backends.implementation(resolved, "token_stats"), logits, labels, indices, logq, label_logq,
            inv_temperature, ignore_index, group, logit_scale, logit_softcap)
        keep_for_backward(ctx, (logits, labels, indices, logq), out, inv_temperature, ignore_index, backend,
                          shard.offset, logit_scale, logit_softcap)
        ctx.set_materialize_grads(False)  # an output left out of the loss has no gradient term
        return out

    @staticmethod
    def backward(ctx, g_logp, g_proxy_logp, g_kl, g_entropy, g_row_stats):
        return (*_backward(ctx, g_logp, g_proxy_logp, g_kl, g_entropy, g_row_stats), None)


def build_proxy_sharded(logits, labels, inv_temperature, fixed, log_threshold, k, ignore_index, backend,
                        logit_scale, logit_softcap, group):
    """`build_proxy_op` on vocabulary-parallel logits (N, V_r): the same four tensors, with global
    columns, on every rank (two all_gathers; lpreg._vocab_parallel). Pass 1 is the token-stats
    backend's, the top-k PyTorch's, as for the unsharded op."""
    resolved = _backends.resolve(backend, logits.device)
    idx, logq, cov, label_logq = _vocab_parallel.build_proxy(
        _backends.implementation(resolved, "token_stats"), logits, labels, inv_temperature, fixed, log_threshold, k,
        ignore_index, group, logit_scale, logit_softcap)
    return idx, logq, cov, (torch.zeros_like(cov) if label_logq is None else label_logq)
