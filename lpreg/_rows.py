"""Row helpers shared by the PyTorch paths: (..., V) tensors as (N, V) rows, walked in chunks, and
the row math both PyTorch backends (token stats, sparse proxy) compute the same way.

`row_chunks` is the one row chunker of the pure-PyTorch paths (the torch backends and the
float64-capable oracle in lpreg.reference): a chunk holds at most CHUNK_ELEMENTS fp32
temporaries per live tensor (about 16 MiB), whatever N and V. The math helpers follow the
kernels' definitions (lpreg.kernels.token_stats states them); a backend imports them from here,
never from another backend.
"""

from typing import Iterator

import torch
from torch import Tensor

from . import _contract as layout

_NEG_INF = float("-inf")

CHUNK_ELEMENTS = 1 << 22


def row_chunks(N: int, V: int) -> Iterator[tuple[int, int]]:
    """Row ranges [a, b) that cover [0, N), each at most max(1, CHUNK_ELEMENTS // V) rows."""
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for start in range(0, N, step):
        yield start, min(N, start + step)


def as_rows(t: Tensor) -> Tensor:
    """(..., V) -> (N, V) with unit-stride rows (a view whenever possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def lse_and_entropy(x):
    """Rows of x: (max, logsumexp, entropy), with H = log s - t/s, s = sum e^(x-m),
    t = sum e^(x-m)(x-m); -inf entries contribute nothing (0 log 0 = 0)."""
    m = x.amax(-1)
    m_ref = torch.where(m == _NEG_INF, torch.zeros_like(m), m)
    d = x - m_ref[:, None]
    e = d.exp()
    s = e.sum(-1)
    t = torch.where(e > 0, e * d, torch.zeros_like(e)).sum(-1)
    return m, m_ref + s.log(), s.log() - t / s


def kept_cutoff(y, fixed, log_threshold):
    """The kept set K of rows of y = proxy / T (docs/spec.md §1), as the kernels define it.

    Returns (my, my_ref, ey, cutoff, argmax_y): the row max, the max with -inf read as 0,
    e^(y - my_ref), the cutoff (y_i >= cutoff keeps i) and the first argmax ("fixed" mode;
    -1 in "min_p", where the argmax is kept anyway).
    """
    my = y.amax(-1)
    my_ref = torch.where(my == _NEG_INF, torch.zeros_like(my), my)
    ey = (y - my_ref[:, None]).exp()
    if fixed:
        lse_y = my_ref + ey.sum(-1).log()
        cutoff = lse_y + log_threshold
        cutoff = torch.where(my < cutoff, torch.full_like(cutoff, float("inf")), cutoff)  # K = {argmax}
        argmax_y = y.argmax(-1)  # first maximum, as the kernels
    else:
        cutoff = my + log_threshold
        argmax_y = torch.full_like(my, layout.NO_ARGMAX, dtype=torch.long)
    return my, my_ref, ey, cutoff, argmax_y


def kept_mask(y, cutoff, argmax_y):
    cols = torch.arange(y.shape[-1], device=y.device)
    return (y >= cutoff[:, None]) | (cols[None, :] == argmax_y[:, None])


def valid_rows(labels, a, b, ignore_index, like):
    """(b - a,) bool: rows of [a, b) that count (all of them without labels)."""
    if labels is None:
        return torch.ones((b - a,), dtype=torch.bool, device=like.device)
    return labels[a:b] != ignore_index


def masked_rows(t, valid, inv_temperature):
    """t / T in fp32 with every ignored row set to -inf: the ignored-row invariant for the
    dense backward. Such a row is then an empty row, where p and q are exactly 0 and no
    exp overflows (its zeroed row_stats are never a softmax state to recompute p from)."""
    x = t.float() * inv_temperature
    return torch.where(valid[:, None], x, torch.full_like(x, _NEG_INF))


def upstream(g, a, b, valid):
    """The upstream gradient of rows [a, b), 0 on ignored rows."""
    return torch.where(valid, g[a:b].float(), torch.zeros((), dtype=torch.float32, device=valid.device))


def entropy_term(p, logp, entropy):
    """p (log p + H), with 0 log 0 = 0 wherever p = 0: x = -inf (ignored rows included), and a
    finite x whose x - lse rounds to -inf. A NaN p (a NaN row) stays NaN."""
    return torch.where(p == 0, torch.zeros_like(p), p * (logp + entropy[:, None]))
