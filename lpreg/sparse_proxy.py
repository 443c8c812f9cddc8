"""Off-policy sparse proxy: record q at rollout time as top-k pairs, score the policy against it.

`build_proxy` runs on the logits of the rollout-time forward that produces old_logp (no extra
model forward): per row it keeps K (SPEC 1), takes the k largest kept entries and stores
(index, log q) with log q renormalised over the captured entries, plus
coverage = captured kept mass / kept mass (1 when |K| <= k).

`sparse_proxy_stats` is the `lpreg::sparse_proxy_stats` custom op: logp, proxy_logp,
KL(q || p) and entropy of the current logits in one pass over each row plus k gathered
logits (see lpreg.kernels.sparse_proxy_kl for the math and the Triton kernels). The torch
fallback below keeps the same row-statistics contract ([lse, H] per row) and runs on any
device in row chunks of at most 4M fp32 elements.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _backends, _validate
from ._torch_backend import lse_and_entropy, row_chunks
from .reference import kept_set



class SparseProxy(NamedTuple):
    """Top-k representation of the proxy q; padding entries have logq = -inf."""

    indices: Tensor  # (..., k) int32 / int64 vocabulary indices, unique per row
    logq: Tensor  # (..., k) fp32 log q renormalised over the captured entries
    coverage: Tensor  # (...) fp32 captured kept mass / kept mass, in (0, 1]

    def flatten(self) -> "SparseProxy":
        k = self.indices.shape[-1]
        return SparseProxy(self.indices.reshape(-1, k), self.logq.reshape(-1, k), self.coverage.reshape(-1))

    def rows(self, a: int, b: int) -> "SparseProxy":
        """Rows [a, b) of a flattened proxy."""
        return SparseProxy(self.indices[a:b], self.logq[a:b], self.coverage[a:b])


@torch.no_grad()
def build_proxy(logits: Tensor, *, temperature: float = 1.0, mode: str = "min_p", threshold: float = 0.02,
                k: int = 64) -> SparseProxy:
    """Top-k sparse proxy of `logits`: (..., V) -> SparseProxy((..., k), (..., k), (...)).

    Indices are int32 (half the rollout storage of int64); k > V pads with logq = -inf.
    """
    _validate.check_logits(logits)
    temperature = _validate.check_temperature(temperature)
    threshold = _validate.check_mode_threshold(mode, threshold)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    V = logits.shape[-1]
    x = logits.reshape(-1, V)
    N = x.shape[0]
    kk = min(k, V)
    idx = torch.zeros((N, k), dtype=torch.int32, device=logits.device)
    logq = torch.full((N, k), float("-inf"), dtype=torch.float32, device=logits.device)
    cov = torch.empty((N,), dtype=torch.float32, device=logits.device)
    for a, b in row_chunks(N, V):
        y = x[a:b].float() / temperature
        kept = kept_set(y, mode, threshold)
        yk = torch.where(kept, y, torch.full_like(y, float("-inf")))
        lse_kept = torch.logsumexp(yk, -1)
        vals, top = torch.topk(yk, kk, dim=-1)  # captured = kept entries among the k largest
        lse_cap = torch.logsumexp(vals, -1)
        logq[a:b, :kk] = vals - lse_cap[:, None]  # -inf stays -inf for non-kept entries
        idx[a:b, :kk] = top.to(torch.int32)
        # every kept entry captured: exactly 1 (the two sums differ only in summation order)
        cov[a:b] = torch.where(kept.sum(-1) <= kk, torch.ones_like(lse_cap), torch.exp(lse_cap - lse_kept))
        bad = torch.isnan(y).any(-1) | torch.isneginf(y).all(-1)
        logq[a:b] = torch.where(bad[:, None], torch.full_like(logq[a:b], float("nan")), logq[a:b])
        cov[a:b] = torch.where(bad, torch.full_like(cov[a:b], float("nan")), cov[a:b])
    lead = logits.shape[:-1]
    return SparseProxy(idx.reshape(*lead, k), logq.reshape(*lead, k), cov.reshape(lead))


# ---------------------------------------------------------------- torch fallback (chunked rows)

def _torch_forward(logits, labels, indices, logq, inv_temperature, ignore_index):
    N, V = logits.shape
    dev = logits.device
    out = [torch.zeros((N,), dtype=torch.float32, device=dev) for _ in range(4)]
    row_stats = torch.zeros((N, 2), dtype=torch.float32, device=dev)
    for a, b in row_chunks(N, V):
        x = logits[a:b].float() * inv_temperature
        m, lse, entropy = lse_and_entropy(x)
        lq = logq[a:b].float()
        q = lq.exp()
        x_idx = x.gather(-1, indices[a:b])
        # KL(q || p) = sum_j q_j (log q_j - (x_idx_j - lse)), 0 log 0 = 0 for padding
        kl = torch.where(q > 0, q * (lq - (x_idx - lse[:, None])), torch.zeros_like(q)).sum(-1)
        bad = torch.isnan(x).any(-1) | (m == float("-inf"))
        if labels is not None:
            lab = labels[a:b]
            valid = lab != ignore_index
            safe = torch.where(valid, lab, torch.zeros_like(lab))
            logp = x.gather(-1, safe[:, None])[:, 0] - lse
            hit = indices[a:b] == safe[:, None]
            proxy_logp = torch.where(hit, lq, torch.full_like(lq, float("-inf"))).amax(-1)
        else:
            valid = torch.ones_like(bad)
            logp = proxy_logp = torch.zeros_like(lse)
        nan = torch.full_like(lse, float("nan"))
        for i, v in enumerate((logp, proxy_logp, kl, entropy)):
            out[i][a:b] = torch.where(valid, torch.where(bad, nan, v), torch.zeros_like(v))
        stats = torch.stack([torch.where(bad, nan, lse), entropy], -1)
        row_stats[a:b] = torch.where(valid[:, None], stats, torch.zeros_like(stats))
    return out[0], out[1], out[2], out[3], row_stats


def _torch_backward(logits, labels, indices, logq, row_stats, g_logp, g_kl, g_entropy, inv_temperature,
                    ignore_index):
    N, V = logits.shape
    grad = torch.empty_like(logits)
    for a, b in row_chunks(N, V):
        x = logits[a:b].float() * inv_temperature
        lse, entropy = row_stats[a:b].unbind(-1)
        valid = torch.ones_like(lse, dtype=torch.bool) if labels is None else labels[a:b] != ignore_index
        zero = torch.zeros_like(lse)
        lse = torch.where(valid, lse, zero)
        logp = x - lse[:, None]
        p = logp.exp()
        g = torch.zeros_like(x)
        if g_logp is not None:
            c = torch.where(valid, g_logp[a:b], zero)
            g -= c[:, None] * p
            safe = torch.where(valid, labels[a:b], torch.zeros_like(labels[a:b]))
            g.scatter_add_(-1, safe[:, None], c[:, None])
        if g_kl is not None:
            c = torch.where(valid, g_kl[a:b], zero)
            q = logq[a:b].float().exp()
            g += c[:, None] * p
            g.scatter_add_(-1, indices[a:b], -c[:, None] * q)  # - g_kl q_sparse
        if g_entropy is not None:
            c = torch.where(valid, g_entropy[a:b], zero)
            g -= c[:, None] * torch.where(x == float("-inf"), torch.zeros_like(p), p * (logp + entropy[:, None]))
        grad[a:b] = (g * inv_temperature).to(grad.dtype)
    return grad


# ---------------------------------------------------------------- custom op + autograd

def _impl(backend):
    if backend == "triton":
        from lpreg.kernels import sparse_proxy_kl

        return sparse_proxy_kl.sparse_proxy_forward, sparse_proxy_kl.sparse_proxy_backward
    return _torch_forward, _torch_backward


@torch.library.custom_op("lpreg::sparse_proxy_stats", mutates_args=())
def sparse_proxy_stats_op(logits: Tensor, labels: Optional[Tensor], indices: Tensor, logq: Tensor,
                          inv_temperature: float, ignore_index: int, backend: str
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if labels is not None:
        _validate.check_label_range(labels, logits.shape[-1], ignore_index)
    if indices.numel() and bool(((indices < 0) | (indices >= logits.shape[-1])).any()):
        bad = indices[(indices < 0) | (indices >= logits.shape[-1])][0].item()
        raise ValueError(f"proxy.indices must be in [0, {logits.shape[-1]}), got {bad}")
    return _impl(_resolve(backend, logits.device))[0](logits, labels, indices, logq, inv_temperature, ignore_index)


@sparse_proxy_stats_op.register_fake
def _(logits, labels, indices, logq, inv_temperature, ignore_index, backend):
    N = logits.shape[0]
    vec = [logits.new_empty((N,), dtype=torch.float32) for _ in range(4)]
    return (*vec, logits.new_empty((N, 2), dtype=torch.float32))


@torch.library.custom_op("lpreg::sparse_proxy_stats_backward", mutates_args=())
def sparse_proxy_stats_backward_op(logits: Tensor, labels: Optional[Tensor], indices: Tensor, logq: Tensor,
                                   row_stats: Tensor, g_logp: Optional[Tensor], g_kl: Optional[Tensor],
                                   g_entropy: Optional[Tensor], inv_temperature: float, ignore_index: int,
                                   backend: str) -> Tensor:
    backward = _impl(_resolve(backend, logits.device))[1]
    return backward(logits, labels, indices, logq, row_stats, g_logp, g_kl, g_entropy, inv_temperature, ignore_index)


@sparse_proxy_stats_backward_op.register_fake
def _(logits, labels, indices, logq, row_stats, g_logp, g_kl, g_entropy, inv_temperature, ignore_index, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, labels, indices, logq, inv_temperature, ignore_index, backend = inputs
    ctx.save_for_backward(logits, labels, indices, logq, output[4])
    ctx.inv_temperature, ctx.ignore_index, ctx.backend = inv_temperature, ignore_index, backend
    ctx.mark_non_differentiable(output[1], output[4])


def _g(g):
    return None if g is None else g.float().contiguous()


def _backward(ctx, g_logp, g_proxy_logp, g_kl, g_entropy, g_row_stats):
    logits, labels, indices, logq, row_stats = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = sparse_proxy_stats_backward_op(
            logits, labels, indices, logq, row_stats,
            _g(g_logp) if labels is not None else None, _g(g_kl), _g(g_entropy),
            ctx.inv_temperature, ctx.ignore_index, ctx.backend,
        )
    return grad, None, None, None, None, None, None


sparse_proxy_stats_op.register_autograd(_backward, setup_context=_setup_context)


def _resolve(backend, device):
    """Triton where `backend` resolves to it; every other backend is served by the torch path.
    Called inside the ops, so torch.compile never traces the availability probe."""
    if backend == "triton" or (backend == "auto" and device.type == "cuda" and _backends.triton_available()):
        return _backends.resolve("triton", device)
    return "torch"


def sparse_proxy_stats(logits: Tensor, labels: Optional[Tensor], proxy: SparseProxy, *, temperature: float = 1.0,
                       ignore_index: int = -100, backend: str = "auto"):
    """Statistics against a sparse proxy: logits (..., V), labels (...), proxy ((..., k) x2, (...)).

    Returns TokenStats-like (logp, proxy_logp, kl, entropy), each (...) fp32; logp, kl and
    entropy are differentiable (grad (e_y - p), (p - q), -p (log p + H), all / T).
    """
    from .token_stats import TokenStats

    _validate.check_logits(logits)
    temperature = _validate.check_temperature(temperature)
    V = logits.shape[-1]
    if not isinstance(proxy, SparseProxy):
        raise ValueError(f"proxy must be a SparseProxy, got {type(proxy).__name__}")
    if tuple(proxy.indices.shape[:-1]) != tuple(logits.shape[:-1]) or proxy.logq.shape != proxy.indices.shape:
        raise ValueError(f"proxy must have shape (..., k) with ... = {tuple(logits.shape[:-1])}, got indices "
                         f"{tuple(proxy.indices.shape)} and logq {tuple(proxy.logq.shape)}")
    if labels is not None:
        _validate.check_labels(labels, logits, ignore_index)
    _validate.check_backend(backend)
    x = logits.reshape(-1, V)
    x = x if x.stride(-1) == 1 else x.contiguous()
    k = proxy.indices.shape[-1]
    idx = proxy.indices.reshape(-1, k).long().contiguous()
    lq = proxy.logq.reshape(-1, k).float().contiguous()
    lab = None if labels is None else labels.reshape(-1).long()
    out = sparse_proxy_stats_op(x, lab, idx, lq, 1.0 / temperature, int(ignore_index), backend)
    return TokenStats(*(o.reshape(logits.shape[:-1]) for o in out[:4]))
