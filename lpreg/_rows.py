"""Row helpers shared by the op layers: (..., V) tensors as (N, V) rows, walked in chunks.

`row_chunks` is the one row chunker of the pure-PyTorch paths (the torch backends and the
float64-capable oracle in lpreg.reference): a chunk holds at most CHUNK_ELEMENTS fp32
temporaries per live tensor (about 16 MiB), whatever N and V.
"""

from typing import Iterator

from torch import Tensor

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
