"""Cross-rank helpers of a step: gathers and sums over the processes of a run (accelerate), and the full
parameters each rank generates with under FSDP. Every function is a no-op on one process."""

import contextlib
from typing import List

import torch
from torch import Tensor

__all__ = ["gather_floats", "gather_varlen", "reduce_sum", "full_params_for_generation"]


def gather_floats(acc, values: List[float]) -> List[float]:
    """A list of floats from every rank, concatenated in rank order (equal lengths per rank)."""
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return acc.gather(t).cpu().tolist() if acc.num_processes > 1 else t.cpu().tolist()


def gather_varlen(acc, t: Tensor) -> Tensor:
    """1-d tensors of different lengths from every rank, concatenated in rank order."""
    if acc.num_processes == 1:
        return t
    n = torch.tensor([t.numel()], device=acc.device)
    sizes = acc.gather(n).tolist()
    padded = torch.zeros(max(sizes), dtype=t.dtype, device=acc.device)
    padded[: t.numel()] = t
    allp = acc.gather(padded).view(len(sizes), -1)
    return torch.cat([allp[r, : sizes[r]] for r in range(len(sizes))])


def reduce_sum(acc, x: float) -> float:
    """The sum over ranks of one number."""
    if acc.num_processes == 1:
        return float(x)
    return float(acc.reduce(torch.tensor(float(x), dtype=torch.float64, device=acc.device), reduction="sum"))


def full_params_for_generation(acc, model) -> contextlib.AbstractContextManager:
    """Under FSDP (v1) every rank generates with its own full copy of the parameters (gathered
    once per step, not written back); under DDP or a single process the module already is one."""
    # imported here: only this call needs accelerate's types, and torch.distributed.fsdp is a heavy
    # import that only an FSDP run reaches
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        if isinstance(model, FSDP):
            return FSDP.summon_full_params(model, writeback=False, recurse=True)
    return contextlib.nullcontext()
