"""`@triton.jit` helpers shared by the per-row kernels (token_stats.py, sparse_proxy_stats.py).

Each kernel program owns one row (one token position) and walks its vocabulary in tiles of
BLOCK_V; these helpers are the pieces both ops compute alike:

- `unit_stride_rows`: the launchers' layout precondition (host side, not jitted);
- `row_pointers`, `row_label`: the row prologue (its logits and proxy, its label, and whether it
  counts: unless its label is ignore_index);
- `load_scaled`: a tile of x = z / T in fp32, -inf past the row's end (neutral for every sum);
- `online_softmax_update` / `lse_entropy`: the one-pass max, logsumexp and entropy moment;
- `cross_term`: a kept token's term of the KL against a separate proxy (+inf at x = -inf);
- `zero_outputs`, `nan_epilogue`, `store_outputs`, `store_stat`: an ignored row's zeros, a bad row's
  NaN outputs, and the stores;
- `upstream_coefficients`: the per-row upstream gradients, already divided by T;
- `entropy_grad`, `zero_row`: the entropy term of the backward, and an ignored row's zeros.

The row-statistics slots (`LSE`, `ENTROPY`, ...) are constexprs of the layout in
lpreg._contract, which also states the ignored-row invariant `zero_row` serves.
"""

import triton
import triton.language as tl

from .. import _contract as _layout

# slots of a row of row_stats (the one layout definition is lpreg._contract)
LSE = tl.constexpr(_layout.LSE)
ENTROPY = tl.constexpr(_layout.ENTROPY)
LSE_KEPT = tl.constexpr(_layout.LSE_KEPT)
CUTOFF = tl.constexpr(_layout.CUTOFF)
ARGMAX = tl.constexpr(_layout.ARGMAX)
NO_ARGMAX = tl.constexpr(_layout.NO_ARGMAX)


def unit_stride_rows(t):
    """Whether the kernels can walk the rows of a 2-D tensor t with stride 1: a unit last
    stride, or a layout torch calls contiguous whatever that stride is -- V = 1, or no row at
    all (N = 0, nothing to launch). The same test as csrc/lpreg_ops.cpp's."""
    return t.stride(-1) == 1 or t.shape[-1] == 1 or t.shape[0] == 0


@triton.jit
def row_pointers(logits_ptr, proxy_ptr, row, logits_row_stride, proxy_row_stride, HAS_PROXY: tl.constexpr):
    """(x_row, y_row): the row's logits and its proxy source (the logits themselves on-policy)."""
    x_row = logits_ptr + row * logits_row_stride
    if HAS_PROXY:
        y_row = proxy_ptr + row * proxy_row_stride
    else:
        y_row = x_row
    return x_row, y_row


@triton.jit
def row_label(labels_ptr, row, ignore_index, HAS_LABELS: tl.constexpr):
    """(label, valid): the row's sampled token (0 without labels) and whether the row counts."""
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        valid = label != ignore_index
    else:
        label = tl.zeros((), tl.int64)
        valid = row >= 0
    return label, valid


@triton.jit
def tanh(u):
    """tanh(u) from one exp, odd-symmetric: e = e^(-2|u|) in [0, 1], tanh |u| = (1 - e) / (1 + e);
    exactly +-1 where e underflows (|u| > about 44), NaN stays NaN."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def transform(x, inv_temperature, softcap, SOFTCAP: tl.constexpr):
    """x' = z / T of raw fp32 logits x (lpreg._contract.transform_constants; inv_temperature is the
    folded multiplier s / T): softcap tanh(x inv_temperature / softcap) with a soft-cap (softcap =
    c / T), else x inv_temperature, the exact path without a transform."""
    if SOFTCAP:
        return softcap * tanh(x * (inv_temperature / softcap))
    else:
        return x * inv_temperature


@triton.jit
def transform_slope(x, softcap, SOFTCAP: tl.constexpr):
    """dx'/dx divided by the multiplier, at x' = transform(x): 1 - (x' / softcap)^2 with a soft-cap
    (0 where tanh saturates), else 1."""
    if SOFTCAP:
        u = x / softcap
        return 1.0 - u * u
    else:
        return 1.0


@triton.jit
def load_scaled(row_ptr, cols, V, inv_temperature, softcap, SOFTCAP: tl.constexpr):
    """x = transform(logits[cols]) in fp32 (z / T); -inf past the end of the row (e^-inf = 0, never
    kept, never a max), also with a soft-cap, which would map -inf to -c / T."""
    in_row = cols < V
    x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
    if SOFTCAP:
        return tl.where(in_row, transform(x, inv_temperature, softcap, SOFTCAP), float("-inf"))
    else:
        return x * inv_temperature


@triton.jit
def online_softmax_update(m, s, t, x, x_max):
    """Fold a tile x (with x_max = max x) into the running (m, s, t) of the row, where
    s = sum e^(x-m) and t = sum e^(x-m)(x-m) (the entropy moment). Moving the reference from
    m to m' = max(m, x_max) rescales s' = s e^(m-m') and t' = e^(m-m') (t + s (m-m')); an
    all -inf prefix keeps the reference at 0, and e = 0 terms add 0 to t (0 log 0 = 0).
    A NaN in x makes s NaN."""
    m_new = tl.maximum(m, x_max)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = x - m_ref
    e = tl.exp(d)
    scale = tl.exp(m - m_ref)
    t = scale * (t + tl.where(s > 0, s * (m - m_ref), 0.0)) + tl.sum(tl.where(e > 0, e * d, 0.0), 0)
    s = s * scale + tl.sum(e, 0)
    return m_new, s, t


@triton.jit
def cross_term(e, y, x):
    """e (y - x), a kept token's share of the KL's cross term sum_K e^(y-my) (y - x): +inf
    where x = -inf, since q > 0 = p there makes KL(q || p) = +inf even when e = e^(y-my)
    underflows fp32 to 0 (0 * inf would be NaN). A NaN in x or y stays NaN."""
    return tl.where(x == float("-inf"), float("inf"), e * (y - x))


@triton.jit
def lse_entropy(m, s, t):
    """(logsumexp, entropy) of the row: lse = m + log s, H = log s - t / s."""
    log_s = tl.log(s)
    return m + log_s, log_s - t / s


@triton.jit
def zero_outputs():
    """(logp, proxy_logp, kl, entropy, lse) = 0 as typed fp32 scalars: both sides of a kernel's
    runtime `if valid` must agree on types, and an ignored row keeps these zeros."""
    zero = tl.zeros((), tl.float32)
    return zero, zero, zero, zero, zero


@triton.jit
def nan_epilogue(bad, logp, proxy_logp, kl, entropy, lse):
    """A row holding a NaN (or only -inf) gives NaN outputs; its NaN lse makes its gradient NaN."""
    nan = float("nan")
    return (tl.where(bad, nan, logp), tl.where(bad, nan, proxy_logp), tl.where(bad, nan, kl),
            tl.where(bad, nan, entropy), tl.where(bad, nan, lse))


@triton.jit
def store_outputs(logp_ptr, proxy_logp_ptr, kl_ptr, entropy_ptr, row, logp, proxy_logp, kl, entropy):
    tl.store(logp_ptr + row, logp)
    tl.store(proxy_logp_ptr + row, proxy_logp)
    tl.store(kl_ptr + row, kl)
    tl.store(entropy_ptr + row, entropy)


@triton.jit
def store_stat(row_stats_ptr, row, WIDTH: tl.constexpr, SLOT: tl.constexpr, value):
    tl.store(row_stats_ptr + row * WIDTH + SLOT, value)


@triton.jit
def load_stat(row_stats_ptr, row, WIDTH: tl.constexpr, SLOT: tl.constexpr):
    return tl.load(row_stats_ptr + row * WIDTH + SLOT)


@triton.jit
def upstream_coefficients(g_logp_ptr, g_kl_ptr, g_entropy_ptr, row, inv_temperature,
                          HAS_G_LOGP: tl.constexpr, HAS_G_KL: tl.constexpr, HAS_G_ENTROPY: tl.constexpr):
    """(g_logp, g_kl, g_H) / T for the row; 0 for an output that took no part in the loss."""
    g_logp = 0.0
    g_kl = 0.0
    g_entropy = 0.0
    if HAS_G_LOGP:
        g_logp = tl.load(g_logp_ptr + row)
    if HAS_G_KL:
        g_kl = tl.load(g_kl_ptr + row)
    if HAS_G_ENTROPY:
        g_entropy = tl.load(g_entropy_ptr + row)
    return g_logp * inv_temperature, g_kl * inv_temperature, g_entropy * inv_temperature


@triton.jit
def entropy_grad(p, logp, entropy):
    """p (log p + H), the entropy term of the backward (times -g_H), with 0 log 0 = 0 wherever
    p = 0: at x = -inf, and at a finite x whose x - lse rounds to -inf (a row spread beyond
    the fp32 range). A NaN p (a NaN row) stays NaN."""
    return tl.where(p == 0.0, 0.0, p * (logp + entropy))


@triton.jit
def zero_row(g_row, V, BLOCK_V: tl.constexpr):
    """An ignored row's gradient: exact zeros, without reading its logits or statistics."""
    cols0 = tl.arange(0, BLOCK_V)
    zeros = tl.zeros((BLOCK_V,), g_row.dtype.element_ty)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        tl.store(g_row + cols, zeros, mask=cols < V)
