"""torch.library glue: the `lpreg::token_stats` op, its backward op, fake kernels, autograd.

Both ops take 2-D (N, V) logits with unit-stride rows and a backend name; the public
functions in `lpreg.token_stats` reshape and validate before calling them. The backend
("auto" included) is resolved inside the op bodies, which run eagerly even in a compiled
graph: that keeps import probing of Triton and the extension out of what torch.compile
traces. Registering them as custom ops (with fake implementations) lets
`torch.compile(fullgraph=True)` trace a caller without graph breaks, and the autograd
registration routes the backward through a second op, so the compiled graph holds the fused
backward too.
"""

from typing import Optional

import torch
from torch import Tensor

from . import _backends, _contract, _validate, _vocab_parallel
from ._contract import as_upstream, fake_grad, fake_row_outputs, keep_for_backward


@torch.library.custom_op("lpreg::token_stats", mutates_args=())
def token_stats_op(
    logits: Tensor,
    labels: Optional[Tensor],
    proxy: Optional[Tensor],
    inv_temperature: float,
    fixed: bool,
    log_threshold: float,
    ignore_index: int,
    backend: str,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """logit_scale, logit_softcap: the logit transform (lpreg._contract.transform_constants) applied to
    the raw logits and proxy before the temperature."""
    if labels is not None:
        _validate.check_label_range(labels, logits.shape[-1], ignore_index)
    impl = _backends.implementation(_backends.resolve(backend, logits.device), "token_stats")
    return impl.token_stats_forward(logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index,
                                    logit_scale=logit_scale, logit_softcap=logit_softcap)


@token_stats_op.register_fake
def _(logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index, backend, logit_scale=1.0,
      logit_softcap=None):
    return fake_row_outputs(logits, _contract.TOKEN_STATS_WIDTH)


@torch.library.custom_op("lpreg::token_stats_backward", mutates_args=())
def token_stats_backward_op(
    logits: Tensor,
    labels: Optional[Tensor],
    proxy: Optional[Tensor],
    row_stats: Tensor,
    g_logp: Optional[Tensor],
    g_kl: Optional[Tensor],
    g_entropy: Optional[Tensor],
    inv_temperature: float,
    ignore_index: int,
    backend: str,
    vocab_offset: int = 0,
    logit_scale: float = 1.0,
    logit_softcap: Optional[float] = None,
) -> Tensor:
    """The gradient (N, V) of a shard holding the columns [vocab_offset, vocab_offset + V) of the
    vocabulary (the whole row: vocab_offset = 0); labels and the argmax slot are global columns."""
    if logits.shape[1] == 0:  # an empty shard of a vocabulary-parallel row
        return torch.zeros_like(logits)
    impl = _backends.implementation(_backends.resolve(backend, logits.device), "token_stats")
    return impl.token_stats_backward(
        logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy, inv_temperature, ignore_index, vocab_offset,
        logit_scale=logit_scale, logit_softcap=logit_softcap,
    )


@token_stats_backward_op.register_fake
def _(logits, labels, proxy, row_stats, g_logp, g_kl, g_entropy, inv_temperature, ignore_index, backend,
      vocab_offset=0, logit_scale=1.0, logit_softcap=None):
    return fake_grad(logits)


def _setup_context(ctx, inputs, output):
    logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index, backend, scale, softcap = inputs
    keep_for_backward(ctx, (logits, labels, proxy), output, inv_temperature, ignore_index, backend, 0, scale, softcap)


def _backward(ctx, g_logp, g_proxy_logp, g_kl, g_entropy, g_row_stats):
    logits, labels, proxy, row_stats = ctx.saved_tensors
    if labels is None:
        g_logp = None
    grad = None
    if ctx.needs_input_grad[0]:
        grad = token_stats_backward_op(
            logits, labels, proxy, row_stats,
            as_upstream(g_logp), as_upstream(g_kl), as_upstream(g_entropy),
            ctx.inv_temperature, ctx.ignore_index, ctx.backend, ctx.offset, ctx.logit_scale, ctx.logit_softcap,
        )
    return grad, None, None, None, None, None, None, None, None, None


token_stats_op.register_autograd(_backward, setup_context=_setup_context)


class ShardedTokenStats(torch.autograd.Function):
    """The token-stats op on vocabulary-parallel logits (N, V_r), this rank's shard
    (lpreg._vocab_parallel): the forward's two all_gathers combine the rows; the backward is the op's
    backward on the shard, with no collective (its inputs are the shard, the combined row_stats and
    the upstream gradients, which are the same on every rank). Eager only: collectives do not trace."""

    @staticmethod
    def forward(ctx, logits, labels, proxy, inv_temperature, fixed, log_threshold, ignore_index, backend,
                logit_scale, logit_softcap, group):
        impl = _backends.implementation(_backends.resolve(backend, logits.device), "token_stats")
        out, shard = _vocab_parallel.token_stats_forward(impl, logits, labels, proxy, inv_temperature, fixed,
                                                         log_threshold, ignore_index, group, logit_scale, logit_softcap)
        keep_for_backward(ctx, (logits, labels, proxy), out, inv_temperature, ignore_index, backend, shard.offset,
                          logit_scale, logit_softcap)
        ctx.set_materialize_grads(False)  # an output left out of the loss has no gradient term
        return out

    @staticmethod
    def backward(ctx, g_logp, g_proxy_logp, g_kl, g_entropy, g_row_stats):
        return (*_backward(ctx, g_logp, g_proxy_logp, g_kl, g_entropy, g_row_stats), None)
