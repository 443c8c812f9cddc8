"""Public API of the off-policy sparse proxy: record q at rollout time as top-k pairs
(`build_proxy`), score the policy against it (`sparse_proxy_stats`).

`build_proxy` runs on the logits of the rollout-time forward that produces old_logp (no extra
model forward): per row it keeps K (docs/spec.md §1), takes the k largest kept entries and
stores (index, log q) with log q renormalised over the captured entries, plus
coverage = captured kept mass / kept mass (1 when |K| <= k). Given the sampled labels it
also stores each label's exact log q (`label_logq`), so that a kept label outside the top k
is still a candidate of the Lp-Reg selection (its log q is finite, as with the dense proxy).

Layers, as for token stats: this module (validation, reshapes) -> the `lpreg::sparse_proxy_stats`
custom op in lpreg._sparse_proxy_ops -> the backend resolved by lpreg._contract: Triton
(lpreg.kernels.sparse_proxy_stats) or PyTorch (lpreg._sparse_proxy_torch_backend).
"""

import math
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
from torch import Tensor

from . import _validate, _vocab_parallel
from ._rows import as_rows
from ._sparse_proxy_ops import ShardedSparseProxyStats, build_proxy_op, build_proxy_sharded, sparse_proxy_stats_op
from .token_stats import TokenStats

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class SparseProxy(NamedTuple):
    """Top-k representation of the proxy q; padding entries have logq = -inf."""

    indices: Tensor  # (..., k) int32 / int64 vocabulary indices, unique per row
    logq: Tensor  # (..., k) fp32 log q renormalised over the captured entries
    coverage: Tensor  # (...) fp32 captured kept mass / kept mass, in (0, 1]
    # (...) fp32 exact log q of the labels given to build_proxy (-inf outside K, 0 where
    # ignored), or None; sparse_proxy_stats returns it as proxy_logp
    label_logq: Optional[Tensor] = None

    def flatten(self) -> "SparseProxy":
        k = self.indices.shape[-1]
        lab = None if self.label_logq is None else self.label_logq.reshape(-1)
        return SparseProxy(self.indices.reshape(-1, k), self.logq.reshape(-1, k), self.coverage.reshape(-1), lab)

    def rows(self, a: int, b: int) -> "SparseProxy":
        """Rows [a, b) of a flattened proxy."""
        lab = None if self.label_logq is None else self.label_logq[a:b]
        return SparseProxy(self.indices[a:b], self.logq[a:b], self.coverage[a:b], lab)


@torch.no_grad()
def build_proxy(logits: Tensor, labels: Optional[Tensor] = None, *, temperature: float = 1.0,
                mode: str = "min_p", threshold: float = 0.02, k: int = 64, ignore_index: int = -100,
                backend: str = "auto", process_group: Optional["ProcessGroup"] = None, logit_scale: float = 1.0,
                logit_softcap: Optional[float] = None) -> SparseProxy:
    """Top-k sparse proxy of `logits`: (..., V) -> SparseProxy((..., k), (..., k), (...), (...) or None).

    labels: (...) integer sampled tokens, optional. When given, the proxy carries each label's
        exact log q = y_label - logsumexp_K(y) (y = logits / T; -inf only when the label is
        outside K, 0 on `ignore_index` rows), which `sparse_proxy_stats` returns as proxy_logp
        for these labels.
    Indices are int32 (half the rollout storage of int64); k > V pads with logq = -inf. A row
    holding a NaN, or only -inf, gives NaN logq, coverage and label_logq.
    backend: resolved as for token stats; every backend runs the same no-grad PyTorch top-k (the
    forward that made `logits` costs far more than this one read of them).
    process_group: None, or the group over which the vocabulary is sharded (see
        `lpreg_token_stats`): logits are this rank's (..., V_r) block, and every rank gets the same
        proxy, with global indices (two all_gathers: pass 1's partials, then each shard's k largest
        kept entries; docs/spec.md §6).
    logit_scale, logit_softcap: the LM head's logit transform (see `lpreg_token_stats`), applied to
        the raw logits before the temperature: q is the proxy of the model's transformed logits.
    """
    sharded = process_group is not None
    if sharded:
        _vocab_parallel.check_group(process_group)
    _validate.check_logits(logits, allow_empty=sharded)
    temperature = _validate.check_temperature(temperature)
    threshold = _validate.check_mode_threshold(mode, threshold)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    lab = None
    if labels is not None:
        # the range is checked inside the op (sharded: against the whole vocabulary, once the ranks'
        # widths are known)
        _validate.check_labels(labels, logits, ignore_index)
        lab = labels.reshape(-1).long()
    _validate.check_backend(backend)
    logit_scale = _validate.check_logit_scale(logit_scale)
    logit_softcap = _validate.check_logit_softcap(logit_softcap)
    args = (as_rows(logits.detach()), lab, 1.0 / temperature, mode == "fixed", math.log(threshold), k,
            int(ignore_index), backend, logit_scale, logit_softcap)
    idx, logq, cov, label_logq = build_proxy_sharded(*args, process_group) if sharded else build_proxy_op(*args)
    lead = logits.shape[:-1]
    return SparseProxy(idx.reshape(*lead, k), logq.reshape(*lead, k), cov.reshape(lead),
                       None if labels is None else label_logq.reshape(lead))


def _check_sparse_proxy(proxy: object, logits: Tensor) -> None:
    if not isinstance(proxy, SparseProxy):
        raise ValueError(f"proxy must be a SparseProxy, got {type(proxy).__name__}")
    lead = tuple(logits.shape[:-1])
    if tuple(proxy.indices.shape[:-1]) != lead or proxy.logq.shape != proxy.indices.shape:
        raise ValueError(f"proxy must have shape (..., k) with ... = {lead}, got indices "
                         f"{tuple(proxy.indices.shape)} and logq {tuple(proxy.logq.shape)}")
    if proxy.label_logq is not None and tuple(proxy.label_logq.shape) != lead:
        raise ValueError(f"proxy.label_logq must have shape {lead}, got {tuple(proxy.label_logq.shape)}")


def sparse_proxy_stats(logits: Tensor, labels: Optional[Tensor], proxy: SparseProxy, *, temperature: float = 1.0,
                       ignore_index: int = -100, backend: str = "auto",
                       process_group: Optional["ProcessGroup"] = None, logit_scale: float = 1.0,
                       logit_softcap: Optional[float] = None) -> TokenStats:
    """Statistics against a sparse proxy: logits (..., V), labels (...), proxy ((..., k) x2, (...)).

    Returns TokenStats(logp, proxy_logp, kl, entropy), each (...) fp32; logp, kl and entropy
    are differentiable (grad (e_y - p), (p - q), -p (log p + H), all / T). proxy_logp is the
    proxy's exact label log q when it was built with these labels (`proxy.label_logq`), else
    the captured entry's log q (-inf for a label outside the top k).
    backend: "auto" | "triton" | "torch" | "cpu" | "cuda", resolved as for token stats
    ("cpu" / "cuda" run the PyTorch implementation: the extension has no sparse-proxy kernel).
    process_group: None, or the group over which the vocabulary is sharded (see
        `lpreg_token_stats`): logits are this rank's (..., V_r) block; the proxy, its indices global
        columns, is the same on every rank (two all_gathers; the gradient is this shard's).
    logit_scale, logit_softcap: the LM head's logit transform (see `lpreg_token_stats`), applied to
        the raw logits (not to the proxy, whose log q is already a distribution); gradients are
        w.r.t. the raw logits.
    """
    sharded = process_group is not None
    if sharded:
        _vocab_parallel.check_group(process_group)
    _validate.check_logits(logits, allow_empty=sharded)
    temperature = _validate.check_temperature(temperature)
    _check_sparse_proxy(proxy, logits)
    if labels is not None:
        _validate.check_labels(labels, logits, ignore_index)
    _validate.check_backend(backend)
    logit_scale = _validate.check_logit_scale(logit_scale)
    logit_softcap = _validate.check_logit_softcap(logit_softcap)
    k = proxy.indices.shape[-1]
    idx = proxy.indices.reshape(-1, k).long().contiguous()
    lq = proxy.logq.reshape(-1, k).float().contiguous()
    lab = None if labels is None else labels.reshape(-1).long()
    label_logq = None
    if labels is not None and proxy.label_logq is not None:
        label_logq = proxy.label_logq.detach().reshape(-1).float().contiguous()
    args = (as_rows(logits), lab, idx, lq, label_logq, 1.0 / temperature, int(ignore_index), backend, logit_scale,
            logit_softcap)
    out = ShardedSparseProxyStats.apply(*args, process_group) if sharded else sparse_proxy_stats_op(*args)
    return TokenStats(*(o.reshape(logits.shape[:-1]) for o in out[:4]))
