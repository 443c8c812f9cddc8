"""Benchmark: Lp-Reg token statistics, forward + backward, every provider.

One step = the four statistics of (N, V) logits under min-p (kappa = 0.02, on-policy proxy,
T = 1) and the backward of  loss = sum_rows w1 logp + w2 kl + w3 H  with fixed random
per-row weights. Providers:

- eager:   what a user writes today in PyTorch (log_softmax, softmax, min-p mask, clone, a
           second log_softmax of the masked logits, gather, kl = sum q (log q - log p), H);
- compile: torch.compile of that eager function;
- lpreg backends: "torch" (chunked PyTorch), "cpu" (compiled C++), and on CUDA "triton"
           and "cuda" (compiled CUDA).

extra_info of each benchmark: provider, N, V, dtype, ms, gbps (compulsory bytes 3 N V
elem_size: the logits read in the forward, read again and the gradient written in the
backward, over the measured time), peak_mem_mb (bench/conftest.py says how it is measured),
logits_mb, and peak_over_logits = peak_mem_mb / logits_mb (the gradient alone is 1.0).
CPU times come from pytest-benchmark's clock; CUDA times from CUDA events.

The logit transform (issue 30): `test_token_stats_softcap_*` run the lpreg backends with a
Gemma-style soft-cap (logit_softcap = 30) and without one, at the first CPU size and, on CUDA, at a
Gemma-style shape (V = 262,144, Gemma 3's vocabulary, bf16); extra_info holds logit_softcap, so the
soft-cap's cost is the ratio of the two rows.

Run:  pytest bench/test_bench_token_stats.py --benchmark-enable            (CPU sizes)
      pytest -m gpu bench --benchmark-enable --benchmark-json=out.json     (see gpu_check.sh)
With --benchmark-disable (CI) each case runs once on fewer rows and is checked against
lpreg.reference instead.
"""

import math

import pytest
import torch

import lpreg
from lpreg import _backends, reference

KAPPA = 0.02
CPU_SIZES = [(1024, 32000, torch.float32), (256, 151936, torch.float32), (256, 151936, torch.bfloat16)]
GPU_SIZES = [(8192, 151936, torch.bfloat16)]
GEMMA_SIZE = (4096, 262144, torch.bfloat16)  # Gemma 2 / 3's vocabulary, bf16, soft-cap 30
GEMMA_SOFTCAP = 30.0
CPU_PROVIDERS = ["eager", "compile", "torch", "cpu"]
GPU_PROVIDERS = ["eager", "compile", "torch", "triton", "cuda"]
SMOKE_ROWS = 4  # rows per case when benchmarks are disabled


def eager_stats(logits, labels):
    """The eager PyTorch Lp-Reg statistics (min-p proxy of the detached logits)."""
    x = logits.float()
    logp_all = torch.log_softmax(x, -1)
    p = torch.softmax(x, -1)
    keep = p >= KAPPA * p.amax(-1, keepdim=True)
    masked = x.detach().clone()
    masked.masked_fill_(~keep, -math.inf)
    logq = torch.log_softmax(masked, -1)
    logp = logp_all.gather(-1, labels[:, None])[:, 0]
    q = logq.exp()
    kl = torch.where(keep, q * (logq - logp_all), torch.zeros_like(q)).sum(-1)
    entropy = -(p * logp_all).sum(-1)
    return logp, kl, entropy


_compiled = {}


def compiled_stats(logits, labels):
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(eager_stats)
    return _compiled["fn"](logits, labels)


def lpreg_provider(backend):
    def run(logits, labels):
        st = lpreg.lpreg_token_stats(logits, labels, mode="min_p", threshold=KAPPA, backend=backend)
        return st.logp, st.kl, st.entropy

    return run


PROVIDERS = {"eager": eager_stats, "compile": compiled_stats}
PROVIDERS.update({b: lpreg_provider(b) for b in ("torch", "cpu", "triton", "cuda")})


def _skip_unavailable(provider):
    if provider in ("cpu", "cuda") and not _backends.native_available(provider):
        pytest.skip(_backends.native_unavailable_reason(provider))
    if provider == "triton" and not _backends.triton_available():
        pytest.skip("triton is not importable")


def softcap_provider(backend, logit_softcap):
    def run(logits, labels):
        st = lpreg.lpreg_token_stats(logits, labels, mode="min_p", threshold=KAPPA, backend=backend,
                                     logit_softcap=logit_softcap)
        return st.logp, st.kl, st.entropy

    return run


def _inputs(N, V, dtype, device):
    gen = torch.Generator().manual_seed(N + V)
    logits = (torch.randn(N, V, generator=gen) * 3.0).to(dtype).to(device)
    labels = torch.randint(V, (N,), generator=gen).to(device)
    weights = torch.randn(3, N, generator=gen).to(device)
    return logits, labels, weights


def _reference(logits, labels):
    st = reference.lpreg_token_stats(logits, labels, mode="min_p", threshold=KAPPA)
    return st.logp, st.kl, st.entropy


def _check(fn, logits, labels, weights, ref=_reference):
    """The provider's statistics and gradient against lpreg.reference (fp32 math)."""
    outs, grads = [], []
    for f in (fn, ref):
        x = logits.detach().clone().requires_grad_(True)
        logp, kl, ent = f(x, labels)
        (weights[0] * logp + weights[1] * kl + weights[2] * ent).sum().backward()
        outs.append((logp, kl, ent))
        grads.append(x.grad)
    for a, b in zip(*outs):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4)
    tol = 2e-4 if logits.dtype == torch.float32 else 1e-2  # a smoke check: tests/ holds the oracle
    scale = float(grads[1].float().abs().max())
    torch.testing.assert_close(grads[0].float(), grads[1].float(), rtol=tol, atol=tol * scale)


def _run_case(benchmark, measure, smoke, provider, N, V, dtype, device, logit_softcap=None):
    _skip_unavailable(provider)
    if smoke:
        N = min(N, SMOKE_ROWS)
    info = {}
    if logit_softcap is None:
        fn, ref = PROVIDERS[provider], _reference
    else:  # the soft-capped op against the reference on the soft-capped logits
        fn = softcap_provider(provider, logit_softcap)
        info["logit_softcap"] = logit_softcap

        def ref(x, labels):
            return _reference(torch.tanh(x.float() / logit_softcap) * logit_softcap, labels)

    logits, labels, weights = _inputs(N, V, dtype, device)
    measure["run_row_case"](benchmark, smoke, fn, logits, weights, labels, device=device, provider=provider,
                            check=lambda: _check(fn, logits, labels, weights, ref), **info)


def _size_id(size):
    N, V, dtype = size
    return f"N{N}-V{V}-{str(dtype).replace('torch.', '')}"


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
@pytest.mark.parametrize("size", CPU_SIZES, ids=_size_id)
def test_token_stats_cpu(benchmark, measure, smoke, provider, size):
    benchmark.group = f"token_stats cpu {_size_id(size)}"
    _run_case(benchmark, measure, smoke, provider, *size, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("size", GPU_SIZES, ids=_size_id)
def test_token_stats_gpu(benchmark, measure, smoke, provider, size):
    benchmark.group = f"token_stats cuda {_size_id(size)}"
    _run_case(benchmark, measure, smoke, provider, *size, device="cuda")


@pytest.mark.parametrize("logit_softcap", [None, GEMMA_SOFTCAP], ids=["plain", "softcap30"])
@pytest.mark.parametrize("provider", ["torch", "cpu"])
def test_token_stats_softcap_cpu(benchmark, measure, smoke, provider, logit_softcap):
    """The soft-cap's cost on the CPU at the first CPU size: the ratio of the softcap30 row to the plain one."""
    size = CPU_SIZES[0]
    benchmark.group = f"token_stats softcap cpu {_size_id(size)}"
    _run_case(benchmark, measure, smoke, provider, *size, device="cpu", logit_softcap=logit_softcap)


@pytest.mark.gpu
@pytest.mark.parametrize("logit_softcap", [None, GEMMA_SOFTCAP], ids=["plain", "softcap30"])
@pytest.mark.parametrize("provider", ["triton", "cuda"])
def test_token_stats_softcap_gpu(benchmark, measure, smoke, provider, logit_softcap):
    """A Gemma-style head on CUDA: V = 262,144, bf16, soft-cap 30 (and the same shape without it)."""
    benchmark.group = f"token_stats softcap cuda {_size_id(GEMMA_SIZE)}"
    _run_case(benchmark, measure, smoke, provider, *GEMMA_SIZE, device="cuda", logit_softcap=logit_softcap)
