"""Benchmarks: fused_linear_policy_loss vs materialised logits + lpreg_policy_loss.

CPU: peak memory of one forward + backward for N in {1k, 4k, 16k} tokens, H = 256,
V = 32,000, fp32. Each case runs in a fresh subprocess and reports the peak resident set
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, the kernel's own high-water mark) minus the
resident set just before the call, with the inputs already allocated: `peak_mem_mb` is
the memory the call itself needed. The fused path must stay flat in N; the materialised
one grows as N x V x 4 bytes (logits, their gradient and the op temporaries).

GPU (`gpu` marker): N = 8192, H = 4096, V = 151,936, bf16: time (CUDA events), peak memory
over the inputs (torch.cuda.max_memory_allocated) and effective TFLOP/s on 6 N H V flops.

With --benchmark-disable (the CI smoke run) the CPU cases shrink to N = 64, V = 1,000, so
the run checks the machinery in seconds; the GPU case skips without CUDA.

    pytest bench/test_bench_fused_linear.py --benchmark-enable -s
"""

import json
import os
import resource
import subprocess
import sys
import time

import pytest
import torch

import lpreg

H_CPU, V_CPU = 256, 32_000
N_GPU, H_GPU, V_GPU = 8192, 4096, 151_936

def _rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def case(provider, N, H, V):
    """One forward + backward on CPU; returns peak memory over the pre-call RSS and time."""
    torch.manual_seed(0)
    B = 8
    L = max(1, N // B)
    hidden = torch.randn(B, L, H).requires_grad_(True)
    weight = (torch.randn(V, H) / H ** 0.5).requires_grad_(True)
    labels = torch.randint(0, V, (B, L))
    adv = torch.randn(B)
    old = torch.full((B, L), -8.0)
    mask = torch.ones(B, L)

    def step(n):
        args = (labels[:, :n], adv, old[:, :n], mask[:, :n])
        if provider == "fused":
            loss, _ = lpreg.fused_linear_policy_loss(hidden[:, :n], weight, *args)
        else:
            loss, _ = lpreg.lpreg_policy_loss(hidden[:, :n] @ weight.T, *args)
        loss.backward()

    step(1)  # warm-up: loads the lazily imported backend before the baseline is read
    hidden.grad = weight.grad = None
    base = _rss_kb()
    t0 = time.perf_counter()
    step(L)
    ms = (time.perf_counter() - t0) * 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mem_mb": (peak - base) / 1024, "peak_rss_mb": peak / 1024, "ms": ms}


def _run_case(provider, N, H, V):
    """`case` in a fresh interpreter, so that ru_maxrss is this case's high-water mark alone."""
    out = subprocess.run([sys.executable, "-W", "ignore", os.path.abspath(__file__), provider, str(N), str(H), str(V)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("provider", ["fused", "materialised"])
@pytest.mark.parametrize("N", [1024, 4096, 16384])
def test_cpu_peak_memory(benchmark, provider, N):
    H, V = (H_CPU, V_CPU) if not benchmark.disabled else (32, 1000)
    N = N if not benchmark.disabled else 64
    result = {}

    def run():
        # the smoke run (--benchmark-disable) stays in-process: same code, no interpreter start
        result.update(case(provider, N, H, V) if benchmark.disabled else _run_case(provider, N, H, V))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(provider=provider, N=N, H=H, V=V, device="cpu", **result)
    assert result["peak_rss_mb"] > 0 and result["ms"] > 0


def _gpu_inputs(dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    B = 8
    L = N_GPU // B
    hidden = torch.randn(B, L, H_GPU, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
    weight = (torch.randn(V_GPU, H_GPU, device="cuda", dtype=dtype, generator=g) / H_GPU ** 0.5).requires_grad_(True)
    labels = torch.randint(0, V_GPU, (B, L), device="cuda", generator=g)
    adv = torch.randn(B, device="cuda", generator=g)
    old = torch.full((B, L), -8.0, device="cuda")
    mask = torch.ones(B, L, device="cuda")
    return hidden, weight, labels, adv, old, mask


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("provider", ["fused", "materialised"])
def test_gpu_time_and_memory(benchmark, provider):
    hidden, weight, labels, adv, old, mask = _gpu_inputs()

    def step():
        hidden.grad = weight.grad = None
        if provider == "fused":
            loss, _ = lpreg.fused_linear_policy_loss(hidden, weight, labels, adv, old, mask)
        else:
            loss, _ = lpreg.lpreg_policy_loss(hidden @ weight.T, labels, adv, old, mask)
        loss.backward()

    step()  # compile / warm up
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.pedantic(step, rounds=3, iterations=1)
    benchmark.extra_info.update(provider=provider, ms=ms, peak_mem_mb=peak,
                                tflops=6 * N_GPU * H_GPU * V_GPU / (ms * 1e-3) / 1e12)
    assert peak > 0


if __name__ == "__main__":
    print(json.dumps(case(sys.argv[1], *map(int, sys.argv[2:5]))))
