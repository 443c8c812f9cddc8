"""Benchmark: the cost of the mechanism metrics (issue 31) against the loss's forward + backward.

The loss: `fused_linear_policy_loss` as a user calls it (compat="released", no selection_threshold),
fp32, at the CPU benchmark's target shape (bench/test_bench_fused_linear.py: N = 4096 tokens, H = 256,
V = 32,000), forward + backward. The metrics (candidates, filtered share, selected, kept mass, push,
p_y) are reduced from the per-token result the loss already holds, chunk by chunk, with no extra pass
and no extra host sync (the one .tolist() of the metrics carries six more numbers). Two measures, in
one process, interleaved over rounds (the order alternates), medians:

- direct: the reductions as the loss runs them, timed alone: `mechanism_sums` on a chunk-sized
  per-token result once per chunk of pass 1 and twice per chunk of pass 2 (the selection's candidate
  rows), then `mechanism_metrics` once; `metrics_ratio` = that time / the loss's time (target <= 2%).
- a/b: the loss against the same loss with `mechanism_sums` replaced by constant zeros;
  `ab_ratio` = (with - without) / without. It includes the rest of the metric plumbing, and the
  machine's noise (a shared VM drifts by a few percent), so it is reported, not the target.

Both are recorded in extra_info (with load1, the 1-minute load average). With --benchmark-disable (CI)
one round runs at a tiny shape and checks that the stub leaves the loss unchanged.

    pytest bench/test_bench_mechanism_metrics.py --benchmark-enable -s
"""

import math
import os
import statistics
import time

import torch

import lpreg
from lpreg import _loss_terms

B = 8
TARGET = (4096, 256, 32_000)  # N, H, V: the CPU benchmark's target shape
SMOKE = (64, 32, 1000)


def inputs(N, H, V):
    g = torch.Generator().manual_seed(0)
    L = N // B
    hidden = torch.randn(B, L, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_(True)
    labels = torch.randint(0, V, (B, L), generator=g)
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        logp = torch.cat([torch.log_softmax(hidden[:, a:a + 128] @ weight.T, -1)
                          .gather(-1, labels[:, a:a + 128, None])[..., 0] for a in range(0, L, 128)], 1)
    old = logp + 0.1 * torch.randn(B, L, generator=g)
    return hidden, weight, labels, adv, old, torch.ones(B, L)


def chunk_terms(n):
    """A per-token result of n tokens (the values do not change the reductions' cost)."""
    g = torch.Generator().manual_seed(1)
    f = torch.rand(n, generator=g)
    return _loss_terms.LossTerms(f, f, f < 0.5, f < 0.2, f, f < 0.1, f + 0.5, f)


def zero_sums(terms, valid):
    z = torch.zeros(())
    return {key: z for key in _loss_terms.MECHANISM_KEYS}


def median_ms(fn, rounds):
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def test_cpu_mechanism_metrics_cost(benchmark, monkeypatch):
    enabled = not benchmark.disabled
    N, H, V = TARGET if enabled else SMOKE
    rounds = 7 if enabled else 1
    hidden, weight, labels, adv, old, mask = inputs(N, H, V)
    chunk = lpreg.fused_linear.default_chunk_size(N, V, torch.device("cpu"))
    n_neg = int(((adv[:, None] < 0) & (mask > 0)).sum())
    k = max(1, int(0.01 * n_neg))  # the released selection's candidate rows: pass 2
    pass1 = [min(chunk, N - a) for a in range(0, N, chunk)]
    pass2 = [min(chunk, k - a) for a in range(0, k, chunk)] if k > 1 else []
    chunks = [chunk_terms(n) for n in pass1 + pass2 + pass2]  # pass 2 reduces twice (with and without S)
    valids = [torch.ones(n, dtype=torch.bool) for n in pass1 + pass2 + pass2]

    def loss_step():
        hidden.grad = weight.grad = None
        loss, _ = lpreg.fused_linear_policy_loss(hidden, weight, labels, adv, old, mask, return_tensors=True)
        loss.backward()
        return loss.detach()

    def metrics_step():
        parts = [_loss_terms.mechanism_sums(t, v) for t, v in zip(chunks, valids)]
        sums = {key: sum(p[key] for p in parts) for key in parts[0]}
        return _loss_terms.mechanism_metrics(sums)

    real = _loss_terms.mechanism_sums
    with_ms, without_ms, direct_ms = [], [], []
    losses = {}

    def run():
        loss_step()  # warm-up
        for r in range(rounds):
            order = ("with", "without") if r % 2 == 0 else ("without", "with")
            for variant in order:
                monkeypatch.setattr(_loss_terms, "mechanism_sums", real if variant == "with" else zero_sums)
                t0 = time.perf_counter()
                losses[variant] = loss_step()
                (with_ms if variant == "with" else without_ms).append((time.perf_counter() - t0) * 1e3)
            monkeypatch.setattr(_loss_terms, "mechanism_sums", real)
            direct_ms.append(median_ms(metrics_step, 5))

    benchmark.pedantic(run, rounds=1, iterations=1)
    monkeypatch.setattr(_loss_terms, "mechanism_sums", real)
    assert torch.equal(losses["with"], losses["without"])  # the metrics never change the loss
    t_with, t_without, t_direct = map(statistics.median, (with_ms, without_ms, direct_ms))
    info = dict(N=N, H=H, V=V, device="cpu", dtype="float32", chunk=chunk, chunks=len(chunks), rounds=rounds,
                loss_ms=round(t_with, 2), loss_without_metrics_ms=round(t_without, 2),
                metrics_ms=round(t_direct, 4), metrics_ratio=t_direct / t_with,
                ab_ratio=(t_with - t_without) / t_without, load1=os.getloadavg()[0],
                threads=torch.get_num_threads())
    print(info, flush=True)  # seen with -s
    benchmark.extra_info.update(info)
    assert t_direct > 0 and math.isfinite(info["ab_ratio"])
