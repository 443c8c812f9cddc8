"""The contract every op shares: the row-statistics layout, the fake (meta) kernels, the backend table.

This module is the bottom layer of lpreg: it imports nothing of lpreg at module level, and every
other layer (public API -> op glue -> backends, the Triton kernels included) may import it. Keeping
these three things here, and nowhere else, is what keeps the op layers free of import cycles: no
op's glue imports another op's glue, and no backend imports another backend.

## Row-statistics layout

The per-row state a forward hands its backward, (N, width) fp32. Read by the Triton kernels (as
constexprs, through lpreg.kernels._row_helpers), the PyTorch backends, the fake kernels and the
compiled-extension wrapper; the C++ / CUDA kernels name the same slots in csrc/row_stats.h, and
tests/test_token_stats_ops.py checks that the two agree.

    token stats,  (N, 5):  [lse, H, lse_K, cutoff, argmax_y]
    sparse proxy, (N, 2):  [lse, H]          (the first two slots of token stats)

Ignored-row invariant (every backend): a row whose label is `ignore_index` describes no
distribution. Its forward writes zero outputs and zero statistics (argmax_y = -1) without reading
its logits, and its backward writes an exact zero gradient without reading the statistics or
computing p or q: the zeros are not a softmax state, and recomputing p = exp(x - 0) from lse = 0
overflows to inf for a logit above about 88, which then turns the zero coefficients into NaN.

## Backend table

Every op resolves `backend=` the same way (`resolve`: "auto" picks per device; an explicit backend
that cannot serve the tensor raises ValueError), then looks up the module that serves the resolved
name (`implementation`):

    op                   triton                              torch / cpu / cuda
    token_stats          lpreg.kernels.token_stats           lpreg._token_stats_torch_backend / lpreg._native (x2)
    sparse_proxy_stats   lpreg.kernels.sparse_proxy_stats    lpreg._sparse_proxy_torch_backend (x3)
    build_proxy          lpreg._sparse_proxy_torch_backend (every backend: a no-grad top-k, no kernel)

Token-stats modules expose `token_stats_forward` / `token_stats_backward`, sparse-proxy modules
`sparse_proxy_forward` / `sparse_proxy_backward` and `build_proxy_rows`, with the contracts written
in their Triton kernel files. For vocabulary-parallel logits (a shard of columns [offset, offset + V)
on each rank) the token-stats modules also expose the two halves of the forward's row pass,
`token_stats_shard_pass1` / `token_stats_shard_pass2` (the partials below; lpreg._vocab_parallel
combines them across ranks, for the sparse proxy and build_proxy too), and both backwards take a
`vocab_offset`: labels, the argmax slot and proxy indices stay global vocabulary indices. The
compiled extension has no sparse-proxy kernel: "cpu" and "cuda" are checked exactly as for token
stats and then served by the PyTorch module. Imports are lazy (importlib), so `import lpreg` needs
neither Triton nor a GPU nor the compiled extension, and the backend is resolved inside the
custom-op bodies, which torch.compile never traces.
"""

import importlib
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

# ---------------------------------------------------------------------------- row-statistics layout

LSE = 0  # logsumexp(x), x = z / T
ENTROPY = 1  # H(p)
LSE_KEPT = 2  # logsumexp over the kept set K of the proxy source y
CUTOFF = 3  # y_i >= cutoff keeps token i
ARGMAX = 4  # first argmax of y ("fixed" mode; -1 where unused), stored as fp32
TOKEN_STATS_SLOTS = ("lse", "entropy", "lse_kept", "cutoff", "argmax_y")
TOKEN_STATS_WIDTH = len(TOKEN_STATS_SLOTS)

SPARSE_PROXY_SLOTS = TOKEN_STATS_SLOTS[:2]
SPARSE_PROXY_WIDTH = len(SPARSE_PROXY_SLOTS)

NO_ARGMAX = -1  # the argmax slot of an ignored row, and of "min_p" rows

# ---------------------------------------------------------------------------- vocab-parallel row partials

# What one rank's shard of a row contributes before the ranks combine (lpreg._vocab_parallel; the
# math is docs/spec.md §6). Pass 1, (N, 7) fp32, needs nothing but the shard:
PART_MAX = 0  # m_r = max of x over the shard (-inf for an all -inf shard)
PART_SUM = 1  # s_r = sum e^(x - m_r)
PART_MOMENT = 2  # t_r = sum e^(x - m_r) (x - m_r), the entropy moment
PART_MAX_Y = 3  # max of y (= m_r on-policy)
PART_SUM_Y = 4  # sum e^(y - max y) ("fixed" mode; = s_r on-policy, 0 with a proxy in "min_p")
PART_ARGMAX_Y = 5  # first argmax of y in the shard, a local column ("fixed" mode; -1 otherwise)
PART_BAD = 6  # 1 when the shard holds a NaN or a +inf (x or y), else 0
PASS1_SLOTS = ("max", "sum", "moment", "max_y", "sum_y", "argmax_y", "bad")
PASS1_WIDTH = len(PASS1_SLOTS)
# Pass 2, (N, 2) fp32, needs the combined cutoff, max of y and argmax of every row:
PART_KEPT = 0  # sum over the shard's kept tokens of e^(y - max y)
PART_CROSS = 1  # sum over them of e^(y - max y) (y - x), +inf at x = -inf (with a proxy; 0 on-policy)
PASS2_SLOTS = ("kept", "cross")
PASS2_WIDTH = len(PASS2_SLOTS)
# An ignored row's partials: it is skipped, its combined statistics are the ignored-row zeros.
NEUTRAL_PASS1 = (float("-inf"), 0.0, 0.0, float("-inf"), 0.0, float(NO_ARGMAX), 0.0)

# ---------------------------------------------------------------------------- fake (meta) kernels


def fake_row_outputs(logits: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fake forward outputs of a per-row op on (N, V) logits: four (N,) fp32 vectors (logp,
    proxy_logp, kl, entropy) and row_stats (N, width) fp32."""
    N = logits.shape[0]
    vec = [logits.new_empty((N,), dtype=torch.float32) for _ in range(4)]
    return (*vec, logits.new_empty((N, width), dtype=torch.float32))


def fake_grad(logits: Tensor) -> Tensor:
    """Fake backward output: the gradient (N, V), contiguous, in the logits' dtype."""
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def keep_for_backward(ctx, inputs, output, inv_temperature: float, ignore_index: int, backend: str,
                      offset: int = 0) -> None:
    """What a per-row op's backward reads: its tensor inputs and the forward's row_stats (output[4]),
    the scalars, and the first global column of the logits (a vocabulary shard's offset; 0 for whole
    rows). proxy_logp (output[1]) and row_stats are not differentiable."""
    ctx.save_for_backward(*inputs, output[4])
    ctx.inv_temperature, ctx.ignore_index, ctx.backend, ctx.offset = inv_temperature, ignore_index, backend, offset
    ctx.mark_non_differentiable(output[1], output[4])


def as_upstream(g: Optional[Tensor]) -> Optional[Tensor]:
    """An upstream gradient as the kernels read it: fp32 and contiguous; None when the output took
    no part in the loss."""
    return None if g is None else g.float().contiguous()


# ---------------------------------------------------------------------------- backend table

_MODULES = {
    "token_stats": {
        "triton": "lpreg.kernels.token_stats",
        "torch": "lpreg._token_stats_torch_backend",
        "cpu": "lpreg._native",
        "cuda": "lpreg._native",
    },
    "sparse_proxy_stats": {
        "triton": "lpreg.kernels.sparse_proxy_stats",
        "torch": "lpreg._sparse_proxy_torch_backend",
        "cpu": "lpreg._sparse_proxy_torch_backend",
        "cuda": "lpreg._sparse_proxy_torch_backend",
    },
    "build_proxy": {name: "lpreg._sparse_proxy_torch_backend" for name in ("triton", "torch", "cpu", "cuda")},
}
_warned = set()


def implementation(backend: str, op: str = "token_stats"):
    """The module that serves `op` for a resolved backend name."""
    return importlib.import_module(_MODULES[op][backend])


# Availability is a fact of the installation: probed once (resolve() runs inside the custom ops,
# never under torch.compile's tracing).
_available = {}


def _probe(key, check) -> bool:
    if key not in _available:
        try:
            _available[key] = bool(check())
        except Exception:
            _available[key] = False
    return _available[key]


def triton_available() -> bool:
    return _probe("triton", lambda: importlib.import_module("triton") is not None)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def native_available(device_type: str) -> bool:
    return _probe(device_type, lambda: importlib.import_module("lpreg._native").available(device_type))


def _warn_once(key, message) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(backend: str, device: torch.device) -> str:
    """Turn backend="auto" into a concrete backend for `device`, and check explicit ones."""
    kind = device.type
    if backend == "auto":
        if kind == "cuda":
            # Triton first on CUDA (design grounds until a GPU run measures both); CUDA C++ the fallback
            if triton_available():
                return "triton"
            if native_available("cuda"):
                return "cuda"
            _warn_once("cuda", "lpreg: neither Triton nor lpreg._C (CUDA) is available; using backend='torch'")
            return "torch"
        if kind == "cpu":
            if native_available("cpu"):
                return "cpu"
            _warn_once("cpu", "lpreg: the compiled extension lpreg._C is not available; using backend='torch'")
            return "torch"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not importable")
        if kind != "cuda" and not triton_interpreted():
            raise ValueError(
                f"backend='triton' on a {kind} tensor needs TRITON_INTERPRET=1 set before lpreg.kernels is imported"
            )
    elif backend in ("cpu", "cuda"):
        if kind != backend:
            raise ValueError(f"backend={backend!r} needs {backend} tensors, got a tensor on {device}")
        if not native_available(backend):
            raise ValueError(f"backend={backend!r} needs the compiled extension lpreg._C built with {backend} support")
    return backend
