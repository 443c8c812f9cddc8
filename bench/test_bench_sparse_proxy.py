"""Benchmark: statistics against a sparse (top-k) proxy, forward + backward, every provider.

One step = logp, KL(q || p) and H of (N, V) logits against a SparseProxy of k = 64 entries per
row (built once, untimed, by `lpreg.build_proxy` from perturbed logits with the labels), and
the backward of  loss = sum_rows w1 logp + w2 kl + w3 H  with fixed random per-row weights.
Providers:

- eager:   what a user writes in PyTorch (log_softmax, softmax, gather of the k indices,
           kl = sum_j q_j (log q_j - log p_idx_j), H);
- compile: torch.compile of that eager function;
- lpreg backends: "torch" (chunked PyTorch, which also serves "cpu" and "cuda": the extension
           has no sparse-proxy kernel) and, on CUDA, "triton".

extra_info of each benchmark: provider, N, V, k, dtype, ms, gbps (compulsory bytes 3 N V
elem_size: the logits read in the forward, read again and the gradient written in the
backward; the k gathered entries are negligible), peak_mem_mb (bench/conftest.py says how it
is measured), logits_mb and peak_over_logits. CPU times come from pytest-benchmark's clock;
CUDA times from CUDA events.

Run:  pytest bench/test_bench_sparse_proxy.py --benchmark-enable          (CPU sizes)
      pytest -m gpu bench --benchmark-enable --benchmark-json=out.json   (see gpu_check.sh)
With --benchmark-disable (CI) each case runs once on a few rows and is checked against the
eager function in float64 instead.
"""

import pytest
import torch

import lpreg
from lpreg import _backends

K = 64
CPU_SIZES = [(512, 32000, torch.float32), (128, 151936, torch.bfloat16)]
GPU_SIZES = [(8192, 151936, torch.bfloat16)]
CPU_PROVIDERS = ["eager", "compile", "torch"]
GPU_PROVIDERS = ["eager", "compile", "torch", "triton"]
SMOKE_ROWS = 4  # rows per case when benchmarks are disabled


def eager_stats(logits, labels, proxy):
    """The eager PyTorch statistics against a sparse proxy (indices, logq): logp, kl, H."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32, or fp64 for the check
    logp_all = torch.log_softmax(x, -1)
    logq = proxy.logq.to(logp_all.dtype)
    q = logq.exp()
    kl = torch.where(q > 0, q * (logq - logp_all.gather(-1, proxy.indices.long())), torch.zeros_like(q)).sum(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, labels[:, None])[:, 0], kl, entropy


_compiled = {}


def compiled_stats(logits, labels, proxy):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(eager_stats)
    return _compiled["fn"](logits, labels, proxy)


def lpreg_provider(backend):
    def run(logits, labels, proxy):
        st = lpreg.sparse_proxy_stats(logits, labels, proxy, backend=backend)
        return st.logp, st.kl, st.entropy

    return run


PROVIDERS = {"eager": eager_stats, "compile": compiled_stats}
PROVIDERS.update({b: lpreg_provider(b) for b in ("torch", "triton")})


def _inputs(N, V, dtype, device):
    gen = torch.Generator().manual_seed(N + V)
    logits = (torch.randn(N, V, generator=gen) * 3.0).to(dtype).to(device)
    labels = torch.randint(V, (N,), generator=gen).to(device)
    weights = torch.randn(3, N, generator=gen).to(device)
    rollout = logits.float() + 0.3 * torch.randn(N, V, generator=gen).to(device)
    proxy = lpreg.build_proxy(rollout, labels=labels, k=K)
    return logits, labels, weights, proxy


def _check(fn, logits, labels, weights, proxy):
    """The provider's statistics and gradient against the eager function in float64."""
    outs, grads = [], []
    for f, x0 in ((fn, logits), (eager_stats, logits.double())):
        x = x0.detach().clone().requires_grad_(True)
        logp, kl, ent = f(x, labels, proxy)
        (weights[0] * logp + weights[1] * kl + weights[2] * ent).sum().backward()
        outs.append((logp, kl, ent))
        grads.append(x.grad)
    for a, b in zip(*outs):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
    tol = 2e-4 if logits.dtype == torch.float32 else 1e-2  # a smoke check: tests/ holds the oracle
    scale = float(grads[1].abs().max())
    torch.testing.assert_close(grads[0].double(), grads[1], rtol=tol, atol=tol * scale)


def _run_case(benchmark, measure, smoke, provider, N, V, dtype, device):
    if provider == "triton" and not _backends.triton_available():
        pytest.skip("triton is not importable")
    if smoke:
        N = min(N, SMOKE_ROWS)
    fn = PROVIDERS[provider]
    logits, labels, weights, proxy = _inputs(N, V, dtype, device)
    measure["run_row_case"](benchmark, smoke, fn, logits, weights, labels, proxy, device=device, provider=provider,
                            check=lambda: _check(fn, logits, labels, weights, proxy), k=K)


# The case declarations below repeat bench/test_bench_token_stats.py's: one file per op (house style).
def _size_id(size):
    N, V, dtype = size
    return f"N{N}-V{V}-{str(dtype).replace('torch.', '')}"


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("size", CPU_SIZES, ids=_size_id)
def test_sparse_proxy_cpu(benchmark, measure, smoke, provider, size):
    benchmark.group = f"sparse_proxy cpu {_size_id(size)}"
    _run_case(benchmark, measure, smoke, provider, *size, device="cpu")


@pytest.mark.parametrize("size", [(3, 300, torch.float32)], ids=_size_id)
def test_sparse_proxy_triton_interpreted_smoke(benchmark, measure, smoke, size):
    # the Triton kernels under TRITON_INTERPRET=1 (no GPU): a correctness smoke run only
    if not smoke or torch.cuda.is_available():
        pytest.skip("an interpreter run is not a timing; on CUDA the gpu benchmark runs Triton")
    benchmark.group = f"sparse_proxy triton-interpreted {_size_id(size)}"
    _run_case(benchmark, measure, smoke, "triton", *size, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("size", GPU_SIZES, ids=_size_id)
def test_sparse_proxy_gpu(benchmark, measure, smoke, provider, size):
    benchmark.group = f"sparse_proxy cuda {_size_id(size)}"
    _run_case(benchmark, measure, smoke, provider, *size, device="cuda")
