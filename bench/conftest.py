"""Benchmark-wide set-up and measurement helpers (pytest-benchmark).

- TRITON_INTERPRET (without CUDA) and the `gpu` skip come from the root conftest.py.
- CI runs `pytest tests bench --benchmark-disable`: every benchmark then runs once as a smoke
  test; the `smoke` fixture tells a benchmark so, and it shrinks its sizes and checks its
  result against the reference instead of timing.

Peak memory (`peak_memory_mb`): the growth of memory over what was allocated before one
forward + backward, the logits and their stale gradient excluded.
- CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus
  memory_allocated() before: exact for the caching allocator.
- CPU: the process's peak resident set. Linux lets a process reset its high-water mark
  (`echo 5 > /proc/self/clear_refs` sets VmHWM to the current VmRSS), so the delta
  VmHWM(after) - VmRSS(before) is the true peak of pages touched during the step. Freed heap
  memory that glibc kept (and could hand back without new pages) would hide allocations, so
  malloc_trim(0) returns it to the kernel first. Tensors above glibc's mmap threshold (32 MiB
  at most) are mmap'ed and counted exactly. tracemalloc would not see torch's allocations.
"""

import ctypes
import re
import time

import pytest
import torch


@pytest.fixture
def smoke(request):
    """True when benchmarks are disabled (CI): run once, small, and check the result.

    pyproject's addopts hold --benchmark-disable; --benchmark-enable on the command line wins.
    """
    disabled = request.config.getoption("benchmark_disable", default=False)
    return bool(disabled and not request.config.getoption("benchmark_enable", default=False))


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else None


def _reset_rss_peak():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb(step, device):
    """Run step() once; return its peak memory growth in MiB (None where it cannot be measured)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not _reset_rss_peak() or _proc_status_kb("VmHWM") is None:
        step()
        return None
    base = _proc_status_kb("VmRSS")
    step()
    return (_proc_status_kb("VmHWM") - base) / 1024


def median_ms(step, reps=5, cuda=True):
    """Median time of step() in ms over `reps` runs after one warm-up: device time from CUDA
    events, or wall time on the CPU (cuda=False). bench/gpu_results.py uses it too."""
    step()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def time_row_op(benchmark, step, reset, *, device, N, V, elem, logits_mb, provider):
    """Time one forward + backward of a per-row op and record ms, GB/s of compulsory traffic
    (3 N V elements: the forward's read, the backward's read and write) and peak memory.

    step() runs the op; reset() clears the stale gradient between runs. Out of GPU memory skips.
    """
    try:
        step()  # warm-up (and torch.compile's compilation)
        reset()
        peak = peak_memory_mb(step, device)
        ms = median_ms(step) if device == "cuda" else None
        benchmark.pedantic(step, rounds=3 if device == "cpu" else 10, iterations=1, warmup_rounds=0)
    except torch.cuda.OutOfMemoryError:
        reset()
        torch.cuda.empty_cache()
        pytest.skip(f"{provider}: out of GPU memory at N={N}, V={V}")
    if ms is None and benchmark.stats is not None:
        ms = benchmark.stats.stats.mean * 1e3
    benchmark.extra_info.update(
        ms=ms, gbps=(3 * N * V * elem / (ms * 1e-3) / 1e9) if ms else None, peak_mem_mb=peak,
        peak_over_logits=(peak / logits_mb) if peak is not None else None,
    )


def run_row_case(benchmark, smoke, fn, logits, weights, *args, device, provider, check, **info):
    """The body of a per-row op's benchmark case: one step is the forward fn(x, *args) -> (logp, kl,
    entropy) of logits x (N, V) and the backward of sum_rows w1 logp + w2 kl + w3 H. Records
    extra_info (provider, N, V, dtype, logits_mb, compulsory_bytes and `info`); then, when
    benchmarks are disabled, check() and one run, else time_row_op."""
    N, V = logits.shape
    x = logits.detach().clone().requires_grad_(True)

    def step():
        x.grad = None
        logp, kl, ent = fn(x, *args)
        (weights[0] * logp + weights[1] * kl + weights[2] * ent).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    elem = logits.element_size()
    logits_mb = N * V * elem / 2**20
    benchmark.extra_info.update(provider=provider, N=N, V=V, dtype=str(logits.dtype).replace("torch.", ""),
                                logits_mb=logits_mb, compulsory_bytes=3 * N * V * elem, **info)
    if smoke:
        check()
        benchmark(step)
        return

    def reset():
        x.grad = None

    time_row_op(benchmark, step, reset, device=device, N=N, V=V, elem=elem, logits_mb=logits_mb, provider=provider)


@pytest.fixture
def measure():
    """The helpers above, as a fixture (bench/ is not a package, so conftest is not importable)."""
    return {"peak_memory_mb": peak_memory_mb, "median_ms": median_ms, "time_row_op": time_row_op,
            "run_row_case": run_row_case}
