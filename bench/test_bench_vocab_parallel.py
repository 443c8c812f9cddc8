"""Benchmark: vocabulary-parallel token statistics at tp = 2 on CPU, per rank, against the unsharded op.

One step = forward + backward of  loss = sum_rows w1 logp + w2 kl + w3 H  (as in
bench/test_bench_token_stats.py), min-p kappa = 0.02, T = 1, backend "cpu" (the C++ kernels).
Providers:

- unsharded:  the op on the whole (N, V) logits in this process, one thread;
- tp2:        two gloo ranks spawned once, one thread each, each holding its (N, V/2) block and
              calling the op with process_group; a step runs both ranks once. Each rank times its
              own step and the time it spends inside the two all_gathers; the parent times the step
              as a whole (the slower rank plus a pipe round trip).

extra_info: provider, N, V, dtype, rank_ms (each rank's median step), collective_ms (each rank's
median time inside the all_gathers), sent_bytes / received_bytes (what one rank sends and receives
per step: lpreg._vocab_parallel.collective_bytes), logits_bytes (compulsory traffic of one rank's
shard: the forward reads it twice, the backward reads it once and writes the gradient, 4 N V_r
elements; the unsharded op about 3 N V), peak_mem_mb per rank (bench/conftest.py's measure).

Run:  pytest bench/test_bench_vocab_parallel.py --benchmark-enable -s
With --benchmark-disable (CI) each provider runs once on a few rows, and the ranks' statistics
are checked against the unsharded op's.
"""

import importlib.util
import multiprocessing
import os
import statistics
import tempfile
import time

import pytest
import torch

import lpreg
from lpreg import _backends, _vocab_parallel

SIZES = [(1024, 32000, torch.float32), (256, 151936, torch.bfloat16)]
SMOKE_ROWS = 4
REPS = 5


def _inputs(N, V, dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(N, V, generator=g) * 2).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    weights = [torch.randn(N, generator=g) for _ in range(3)]
    return logits, labels, weights


def _step(x, labels, weights, group=None):
    x.grad = None
    st = lpreg.lpreg_token_stats(x, labels, backend="cpu", process_group=group)
    (weights[0] * st.logp + weights[1] * st.kl + weights[2] * st.entropy).sum().backward()
    return st


def _measure():
    """bench/conftest.py's helpers (bench/ is not a package; a spawned rank loads the file)."""
    spec = importlib.util.spec_from_file_location("bench_conftest", os.path.join(os.path.dirname(__file__),
                                                                                 "conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rank(rank, store, conn, N, V, dtype):
    """One rank: its block of the logits, then one step per "run" message, answered with its clocks."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    logits, labels, weights = _inputs(N, V, dtype)
    x = torch.chunk(logits, 2, dim=-1)[rank].contiguous().requires_grad_()
    inside = []
    gather = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    original = getattr(dist, gather)

    def timed(*args, **kwargs):  # the time this rank spends inside a collective (waiting included)
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        inside[-1] += time.perf_counter() - t0
        return out

    setattr(dist, gather, timed)
    measure = _measure()
    while (msg := conn.recv()) != "stop":
        inside.append(0.0)
        if msg == "peak":  # from no gradient, as bench/conftest.py's time_row_op measures it
            x.grad = None
            conn.send(measure.peak_memory_mb(lambda: _step(x, labels, weights, dist.group.WORLD), "cpu"))
            continue
        t0 = time.perf_counter()
        st = _step(x, labels, weights, dist.group.WORLD)
        conn.send(((time.perf_counter() - t0) * 1e3, inside[-1] * 1e3, [s.tolist() for s in st]))
    dist.destroy_process_group()


class _Ranks:
    """Two spawned ranks that run one step each per call."""

    def __init__(self, N, V, dtype):
        ctx = multiprocessing.get_context("spawn")
        store = os.path.join(tempfile.mkdtemp(prefix="lpreg_bench_vp_"), "store")
        self.conns, self.procs = [], []
        for rank in range(2):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_rank, args=(rank, store, child, N, V, dtype), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.replies = []

    def step(self):
        for c in self.conns:
            c.send("run")
        self.replies.append([c.recv() for c in self.conns])

    def peak(self):
        for c in self.conns:
            c.send("peak")
        return [c.recv() for c in self.conns]

    def close(self):
        for c in self.conns:
            c.send("stop")
        for p in self.procs:
            p.join(60)


def _size_id(size):
    N, V, dtype = size
    return f"N{N}-V{V}-{str(dtype).replace('torch.', '')}"


@pytest.mark.parametrize("size", SIZES, ids=_size_id)
def test_unsharded(benchmark, measure, smoke, size):
    if not _backends.native_available("cpu"):
        pytest.skip(_backends.native_unavailable_reason("cpu"))
    N, V, dtype = size
    N = SMOKE_ROWS if smoke else N
    benchmark.group = f"vocab_parallel cpu {_size_id(size)}"
    logits, labels, weights = _inputs(N, V, dtype)
    x = logits.clone().requires_grad_()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _step(x, labels, weights)  # warm-up: the first call's one-time set-up is not the op's memory
        x.grad = None
        peak = measure["peak_memory_mb"](lambda: _step(x, labels, weights), "cpu")
        benchmark.pedantic(lambda: _step(x, labels, weights), rounds=1 if smoke else REPS, iterations=1,
                           warmup_rounds=0)
    finally:
        torch.set_num_threads(previous)
    ms = None if benchmark.stats is None else benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(provider="unsharded", N=N, V=V, dtype=str(dtype), rank_ms=[ms], collective_ms=[0.0],
                                sent_bytes=0, received_bytes=0, logits_bytes=3 * N * V * logits.element_size(),
                                peak_mem_mb=[peak])


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES, ids=_size_id)
def test_tp2(benchmark, smoke, size):
    if not _backends.native_available("cpu"):
        pytest.skip(_backends.native_unavailable_reason("cpu"))
    N, V, dtype = size
    N = SMOKE_ROWS if smoke else N
    benchmark.group = f"vocab_parallel cpu {_size_id(size)}"
    ranks = _Ranks(N, V, dtype)
    try:
        ranks.step()  # warm-up
        peak = ranks.peak()
        ranks.replies.clear()
        benchmark.pedantic(ranks.step, rounds=1 if smoke else REPS, iterations=1, warmup_rounds=0)
    finally:
        ranks.close()
    rank_ms = [statistics.median(r[i][0] for r in ranks.replies) for i in range(2)]
    collective_ms = [statistics.median(r[i][1] for r in ranks.replies) for i in range(2)]
    sent, received = _vocab_parallel.collective_bytes(N, 2, "token_stats")
    width = -(-V // 2)
    benchmark.extra_info.update(provider="tp2", N=N, V=V, dtype=str(dtype), rank_ms=rank_ms,
                                collective_ms=collective_ms, sent_bytes=sent, received_bytes=received,
                                logits_bytes=4 * N * width * torch.empty((), dtype=dtype).element_size(),
                                peak_mem_mb=peak)
    print(f"\ntp2 {_size_id(size)}: rank ms {rank_ms}, inside the all_gathers {collective_ms}, "
          f"sent {sent} B, received {received} B per rank and step, peak MiB {peak}")
    if smoke:  # both ranks hold the unsharded op's statistics
        logits, labels, weights = _inputs(N, V, dtype)
        want = lpreg.lpreg_token_stats(logits, labels, backend="cpu")
        for rank in range(2):
            for got, ref in zip(ranks.replies[-1][rank][2], want):
                torch.testing.assert_close(torch.tensor(got), ref, rtol=1e-5, atol=1e-5)
