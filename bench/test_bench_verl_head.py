"""Benchmark: bytes the fused verl path moves for an untied FSDP2 LM head per micro-batch, as a ratio
to the model's own FSDP2 unshard and gradient reduce-scatter.

verl wraps an untied head as its own FSDP2 unit, whose forward the fused path does not run: lpreg has
FSDP2 unshard it (`_verl_engine.head_weights`) and FSDP2's root post-backward reduce-scatter its
gradient. Measured here at dp = 2 (torchrun, 2 CPU processes, gloo) on a root module (a small body,
its own unit) holding the head, nn.Linear(H, V), both under verl's default mixed-precision policy
(param_dtype bf16, reduce_dtype fp32), one micro-batch's forward + backward through:

- fsdp2:  the head's own forward (FSDP2's unshard before it, again before its backward, since it
          reshards after forward; its reduce-scatter);
- lpreg:  head_weights(head, bf16, fp32) and the matmul, as the fused path does;
- fp32:   the gather before this change, full_tensor() of the fp32 master shard (gathered_param).

Bytes are counted at the collectives (a TorchDispatchMode sees FSDP2's c10d ops and DTensor's
functional ones): each all-gather's full output and each reduce-scatter's full input, per rank, the
body's unit included in every variant (it is the same in all three). extra_info: V, H, gather_mb /
reduce_mb per variant, gather_ratio and reduce_ratio (variant / fsdp2). Goal: lpreg's <= 1.

Run:  pytest bench/test_bench_verl_head.py --benchmark-enable -s
With --benchmark-disable (CI) it runs once at a small size and checks the ratios.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl", reason="verl is not installed here (its own venv)")

SIZES = [(32000, 512)]  # V, H: a 65 MB fp32 head (Qwen3-8B's, 151936 x 4096, is 2.5 GB: too big for the CPU VM)
SMOKE = (1000, 64)


def _measure(V, H):  # runs in each torchrun process
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.utils._python_dispatch import TorchDispatchMode

    from lpreg.integrations._verl_engine import gathered_param

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.gather = self.reduce = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name, world = str(func), dist.get_world_size()
            t = args[0] if args else None
            size = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
            if name.startswith("c10d._allgather_base_"):  # FSDP2: (output, input)
                self.gather += size
            elif name.startswith("c10d._reduce_scatter_base_"):  # FSDP2: (output shard, input)
                self.reduce += size * world
            elif name.startswith("_c10d_functional.all_gather_into_tensor"):  # DTensor: (input shard, ...)
                self.gather += size * world
            elif name.startswith("_c10d_functional.reduce_scatter_tensor"):  # DTensor: (input, ...)
                self.reduce += size
            return func(*args, **(kwargs or {}))

    from lpreg.integrations._verl_engine import head_weights

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = torch.nn.Linear(H, H), torch.nn.Linear(H, V, bias=False)

        def forward(self, x, variant):
            h = self.body(x)
            if variant == "fsdp2":
                return self.head(h)
            if variant == "lpreg":
                w, _, _ = head_weights(self.head, torch.bfloat16, torch.float32)
            else:
                w = gathered_param(self.head.weight)
            return h.to(w.dtype) @ w.t()

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    torch.manual_seed(0)
    model = Model()
    fully_shard(model.head, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    x = torch.randn(16, H)
    out = {}
    for name in ("fsdp2", "lpreg", "fp32"):
        model.zero_grad(set_to_none=True)
        with Count() as c:
            model(x, name).float().square().mean().backward()
        grad = model.head.weight.grad
        out[name] = {"gather": c.gather, "reduce": c.reduce,
                     "grad": float(grad.full_tensor().float().norm()) if grad is not None else None}
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out))
    dist.destroy_process_group()


def run(V, H):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29619",
           os.path.abspath(__file__), str(V), str(H)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][0]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"V{s[0]}xH{s[1]}")
def test_bench_head_bytes(benchmark, smoke, size):
    V, H = SMOKE if smoke else size
    result = {}
    benchmark.pedantic(lambda: result.update(run(V, H)), rounds=1, iterations=1, warmup_rounds=0)
    base = result["fsdp2"]
    info = {"V": V, "H": H}
    for name, b in result.items():
        info[f"{name}_grad_norm"] = b["grad"]
        info[f"{name}_gather_mb"], info[f"{name}_reduce_mb"] = b["gather"] / 2**20, b["reduce"] / 2**20
        info[f"{name}_gather_ratio"] = b["gather"] / base["gather"]
        info[f"{name}_reduce_ratio"] = b["reduce"] / base["reduce"]
    benchmark.extra_info.update(info)
    print(json.dumps(info))
    head = V * H
    assert base["gather"] >= 2 * head * 2 and base["reduce"] >= head * 4  # bf16 unshard twice, fp32 reduce-scatter
    assert info["lpreg_gather_ratio"] <= 1.0 and info["lpreg_reduce_ratio"] <= 1.0
    assert result["lpreg"]["gather"] < result["fp32"]["gather"]  # the previous gather: the fp32 master
    # the same gradient reaches the head's shards (bf16 products: 2^-7 relative)
    assert abs(result["lpreg"]["grad"] - base["grad"]) <= 2 ** -7 * base["grad"]


if __name__ == "__main__":
    _measure(int(sys.argv[1]), int(sys.argv[2]))
