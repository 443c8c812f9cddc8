"""Chunk machinery shared by the fused linear paths (`lpreg.fused_linear`).

A chunk is a set of token rows (a slice, or an index tensor of selected rows). For each one
the LM head is recomputed, `logits_c = h_c W^T + b` with fp32 output, the per-token
statistics are taken from it, and the gradient of a per-chunk scalar with respect to the
logits, g_c (rows x V), is pushed into the three parameter gradients:

    dh_c = g_c W,   dW += g_c^T h_c,   db += sum_rows g_c          (dW, db accumulated in fp32)

On CUDA with bf16/fp16 weights the matmuls run in the input dtype with fp32 output
(`torch.mm(..., out_dtype=torch.float32)`) and g_c is rounded to that dtype for the two
gradient matmuls; elsewhere everything runs in fp32 (a half-precision weight is upcast once
per call: V x H x 4 bytes). The chunk products ignore autocast: called inside an autocast region
(a framework's bf16 mixed precision) they keep this precision rule instead of silently running
in the autocast dtype, so a fused path's result does not depend on the region it is called from.

The weight (and bias) are read again wherever a ChunkMatmuls is built: in the forward and, for
`fused_linear_token_stats`, in the backward, which recomputes the logits. A sharded-parameter
framework may free a parameter's storage in between (FSDP2 resizes it to 0 bytes and keeps the
shape; ZeRO-3 swaps in an empty tensor): `check_storage` turns that into a RuntimeError instead of
a matmul over freed memory.
"""

from contextlib import nullcontext
from typing import Any, ContextManager, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ._vocab_parallel import vocab_shard
from .sparse_proxy import SparseProxy, sparse_proxy_stats
from .token_stats import TokenStats, lpreg_token_stats

_TARGET_ELEMENTS_CUDA = 1 << 25  # 32M fp32 logits = 128 MiB per chunk buffer
# CPU: each (rows x V) fp32 buffer just under 32 MiB (240 rows at V = 32,000). glibc's malloc
# serves a block above its mmap threshold, which grows with the blocks freed but stops at 32 MiB,
# by a fresh mmap, so every chunk would first-touch (page-fault and zero) the logits' gradient and
# the op's temporaries anew; below it, freed blocks are reused warm. Measured on the 2-core VM,
# N = 4096, H = 256, V = 32,000, 2 threads: 512-row chunks 256k page faults a call, 240-row 45k;
# peak memory 161 -> 101 MiB; time, interleaved median of 9 (with the reused logits buffer of
# `ChunkMatmuls.logits`): 240 rows 1803 ms, 512 rows 1832 ms (without the buffer 2031 / 2013 ms;
# materialised logits 1917 ms).
_TARGET_ELEMENTS_CPU = (31 << 20) // 4

Rows = Union[slice, Tensor]  # a range of rows, or an int64 index tensor of rows


def default_chunk_size(N: int, V: int, device: torch.device) -> int:
    """Rows per chunk: about 2**25 logits on CUDA (128 MiB per fp32 C x V buffer; the chunk
    holds the logits and their gradient, ~256 MiB, plus the fused op's temporaries), just under
    32 MiB per fp32 buffer on CPU (below glibc's largest mmap threshold); a multiple of 16 rows
    when that is at least 16; never more than N."""
    target = _TARGET_ELEMENTS_CUDA if device.type == "cuda" else _TARGET_ELEMENTS_CPU
    c = max(1, target // max(V, 1))
    if c >= 16:
        c -= c % 16
    return max(1, min(N, c))


def check_chunk_size(chunk_size: Optional[int], N: int, V: int, device: torch.device) -> int:
    if chunk_size is None:
        return default_chunk_size(N, V, device)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    return chunk_size


def _has_mm_out_dtype(w: Tensor) -> bool:
    """Whether this torch offers mm(half, half, out_dtype=fp32) on w's device (torch >= 2.8)."""
    try:
        torch.mm(w[:1], w[:1].t(), out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def take_rows(t, rows: Rows):
    """Rows of a flattened (N, ...) tensor or SparseProxy; None stays None."""
    if t is None:
        return None
    if isinstance(t, SparseProxy):
        lab = None if t.label_logq is None else t.label_logq[rows]  # the label's exact log q travels too
        return SparseProxy(t.indices[rows], t.logq[rows], t.coverage[rows], lab)
    return t[rows]


def chunk_stats(logits: Tensor, labels: Tensor, proxy, temperature: float, mode: str, threshold: float,
                ignore_index: int, backend: str, process_group=None, logit_scale: float = 1.0,
                logit_softcap: Optional[float] = None) -> TokenStats:
    """(logp, proxy_logp, kl, entropy), each (n,) fp32, for (n, V) logits and a proxy slice
    (None: on-policy; (n, V) dense logits; or a SparseProxy, which carries its own filter); with a
    process_group, the logits are this rank's vocabulary shard. The logits are the chunk's raw
    matmul x; the op applies the logit transform (logit_scale, logit_softcap), to a dense proxy too."""
    if isinstance(proxy, SparseProxy):
        return sparse_proxy_stats(logits, labels, proxy, temperature=temperature, ignore_index=ignore_index,
                                  backend=backend, process_group=process_group, logit_scale=logit_scale,
                                  logit_softcap=logit_softcap)
    return lpreg_token_stats(logits, labels, temperature=temperature, mode=mode, threshold=threshold,
                             proxy_logits=proxy, ignore_index=ignore_index, backend=backend,
                             process_group=process_group, logit_scale=logit_scale, logit_softcap=logit_softcap)


def sharded_chunk_size(chunk_size: Optional[int], N: int, weight: Tensor, device: torch.device, group) -> int:
    """check_chunk_size for a weight that is this rank's vocabulary shard: every rank of `group` must
    walk the same chunks (each chunk's statistics are two collectives), so the default comes from the
    widest shard, W, which one all_gather of the widths gives (it also checks their layout)."""
    W = weight.shape[0]
    if group is not None:
        W = vocab_shard(W, device, group).block
    return check_chunk_size(chunk_size, N, W, device)


def check_storage(t: Optional[Tensor], name: str, where: str) -> None:
    """RuntimeError unless t's storage holds every element of its view. FSDP2 frees a resharded
    parameter by resizing its storage to 0 bytes and keeps its shape; a matmul would then read freed
    memory (a crash, or garbage), so say what happened instead."""
    if t is None or t.numel() == 0 or t.device.type == "meta":
        return
    try:
        have = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without plain storage: nothing to check
        return
    extent = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    need = extent * t.element_size()
    if have < need:
        raise RuntimeError(
            f"{name} of shape {tuple(t.shape)} needs {need} bytes of storage but its storage holds {have} ({where}): "
            f"its memory was freed, as FSDP2 does when it reshards a parameter (storage resized to 0, shape kept). "
            f"Keep the LM head unsharded from the forward of the fused statistics through their backward (e.g. "
            f"group the head with the module whose forward runs them, or gather it with full_tensor() first)")


def check_head(weight: Tensor, bias: Optional[Tensor], where: str, shape: Optional[Tuple[int, ...]] = None) -> None:
    """check_storage of the head's weight and bias; with `shape`, also that the weight still has the shape
    it had in the forward (ZeRO-3 replaces a released parameter's data by an empty tensor)."""
    if shape is not None and tuple(weight.shape) != tuple(shape):
        raise RuntimeError(
            f"weight had shape {tuple(shape)} in the forward and has {tuple(weight.shape)} {where}: its data was "
            f"released in between, as DeepSpeed ZeRO-3 does with a partitioned parameter outside its gather. Keep the "
            f"LM head gathered through the backward (lpreg.integrations' adapters re-gather it there)")
    check_storage(weight, "weight", where)
    check_storage(bias, "bias", where)


def _no_autocast(device: torch.device) -> ContextManager[Any]:
    """The chunk products' own precision, whatever autocast region they run in."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


class ChunkMatmuls:
    """The chunk products with fp32 results, and the fp32 gradient accumulators."""

    def __init__(self, hidden2d: Tensor, weight: Tensor, bias: Optional[Tensor], need_h: bool, need_w: bool,
                 need_b: bool, where: str = "in the forward"):
        check_head(weight, bias, where)
        self.h = hidden2d.detach()
        self.w = weight.detach()
        self.half = self.w.dtype != torch.float32
        self.native = self.half and self.w.is_cuda and _has_mm_out_dtype(self.w)
        if self.half and not self.native:
            self.w = self.w.float()  # CPU has no mm(..., out_dtype=fp32) for half inputs
        self.b = None if bias is None else bias.detach().float()
        self._buffer: Optional[Tensor] = None  # the fp32 logits of one chunk, reused by every chunk
        dev = self.h.device
        # dh in fp32: a row may receive a second contribution (the selected-rows pass); the
        # slices of the first pass cover every row once and write it
        self.grad_h = torch.empty(self.h.shape, dtype=torch.float32, device=dev) if need_h else None
        self.grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if need_w else None
        self.grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if need_b else None

    @property
    def need_grad(self) -> bool:
        return self.grad_h is not None or self.grad_w is not None or self.grad_b is not None

    def _mm(self, a: Tensor, b: Tensor) -> Tensor:
        if self.native:
            return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
        return torch.mm(a.float(), b.float())

    def logits(self, rows: Rows) -> Tensor:
        """(n, V) fp32 logits of the rows. In fp32 they are written into one buffer that every chunk
        reuses: valid until the next call, which is all a chunk needs (its gradient is taken
        before the next chunk). A matmul into warm memory ran 1.3-1.4x faster on the 2-core VM
        than into a fresh tensor (240-1024 rows, H = 256, V = 32,000: the fresh one pays for
        first-touching its pages); the whole call 11% faster (see _TARGET_ELEMENTS_CPU)."""
        h = self.h[rows]
        with _no_autocast(h.device):
            if self.native:
                out = self._mm(h, self.w.t())
                return out if self.b is None else out + self.b
            n = h.shape[0]
            if self._buffer is None or self._buffer.shape[0] < n:
                self._buffer = torch.empty((n, self.w.shape[0]), dtype=torch.float32, device=h.device)
            out = torch.mm(h.float(), self.w.float().t(), out=self._buffer[:n])
            return out if self.b is None else out.add_(self.b)

    def accumulate(self, rows: Rows, g: Tensor) -> None:
        """Add the parameter gradients of d(scalar)/d logits_rows = g (n, V). A slice of rows
        writes dh (the first pass visits each row once), an index tensor adds to it."""
        with _no_autocast(g.device):
            self._accumulate(rows, g)

    def _accumulate(self, rows: Rows, g: Tensor) -> None:
        h = self.h[rows]
        if self.grad_h is not None:
            dh = self._mm(g, self.w)
            if isinstance(rows, slice):
                self.grad_h[rows] = dh
            else:
                self.grad_h.index_add_(0, rows, dh)
        if self.grad_w is not None:
            if self.native:
                self.grad_w += torch.mm(g.t().to(self.w.dtype), h.to(self.w.dtype), out_dtype=torch.float32)
            else:
                self.grad_w.addmm_(g.t(), h.float())  # in place: no (V, H) temporary
        if self.grad_b is not None:
            self.grad_b += g.sum(0)

    def sum_hidden_grad(self, group) -> None:
        """With the weight a vocabulary shard, dh = g W_r is this rank's share of the hidden states'
        gradient: the sum over the ranks of `group` (one all_reduce of N x H fp32) is the whole one."""
        if group is not None and self.grad_h is not None:
            dist.all_reduce(self.grad_h, group=group)

    def grads(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
        """The accumulated gradients in the inputs' shapes and dtypes (None where not needed)."""
        return (None if self.grad_h is None else self.grad_h.to(hidden.dtype).reshape(hidden.shape),
                None if self.grad_w is None else self.grad_w.to(weight.dtype),
                None if self.grad_b is None or bias is None else self.grad_b.to(bias.dtype))
