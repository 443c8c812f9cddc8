"""An empty vocabulary shard (docs/spec.md §6): DTensor's Shard(-1) of V = 9 over 4 ranks gives the
widths [3, 3, 3, 0]. The empty rank holds no column: it contributes nothing (max -inf, sums 0, an
(N, 0) gradient), but it takes part in every collective, so no rank is left waiting.

Four gloo ranks are spawned once for the module; each runs every case below (`CASES`) in order and
writes what it found. A rank that fails a case stops there (its peers would then wait in a collective
it never joins), and the collectives time out after `GLOO_TIMEOUT_S`, so a deadlock fails the test
(`SPAWN_TIMEOUT_S` bounds the whole run) instead of hanging it. Every result of a rank equals the
unsharded op on the whole rows, and its gradient is the unsharded gradient's slice.
"""

import json
import os
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import lpreg
from lpreg import _rows
from tests.spec_oracle import make_logits

WORLD, N, V, H = 4, 7, 9, 5
BLOCK = -(-V // WORLD)  # 3: DTensor's Shard(-1) blocks, ceil(V / ranks) wide, the last rank's empty
LABELS = [0, 8, -100, 4, 6, 2, 8]  # an ignored row; the last column (rank 2's) twice
GLOO_TIMEOUT_S, SPAWN_TIMEOUT_S = 30, 240
# the compiled kernels' shard passes too, where the extension is built (README's install builds it)
BACKENDS = ["torch"] + (["cpu"] if lpreg.backends()["cpu"].available else [])


def cols(r):
    """Rank r's columns, as DTensor's Shard(-1) cuts V = 9 over 4 ranks: [3, 3, 3, 0] wide."""
    return slice(min(V, r * BLOCK), min(V, (r + 1) * BLOCK))


def test_the_layout_is_dtensors_with_an_empty_last_shard():
    from torch.distributed.tensor.placement_types import Shard

    if hasattr(Shard, "local_shard_size_and_offset"):
        split = Shard.local_shard_size_and_offset
    else:  # torch < 2.7 names it privately
        def split(size, n, r):
            return Shard._local_shard_size_on_dim(size, n, r, return_offset=True)
    dtensor = [split(V, WORLD, r) for r in range(WORLD)]
    assert [(c.stop - c.start, c.start) for c in map(cols, range(WORLD))] == [tuple(d) for d in dtensor]
    assert [d[0] for d in dtensor] == [3, 3, 3, 0]


def test_as_rows_keeps_an_empty_vocabulary():
    """The root cause: (N, 0) rows were reshaped with an inferred N, which 0 elements cannot give."""
    for shape in ((7, 0), (2, 3, 0), (0, 0)):
        t = torch.empty(shape)
        assert _rows.as_rows(t).shape == (t.shape[:-1].numel(), 0)


# ---------------------------------------------------------------------------- the cases (every rank)


def close(got, want, name):
    """fp32 agreement: rows summed over the ranks in another order than one whole row, so an entry is
    within 1e-4 of the tensor's scale (as tests/test_vocab_parallel.py allows the fused paths)."""
    finite = want[torch.isfinite(want)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 + 1e-4 * scale, equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


def same_proxy(got, want, name):
    """The same captured (index, log q) pairs per row (their order within a row is free), coverage and
    label log q."""
    captured = want.logq > float("-inf")
    assert torch.equal(got.logq > float("-inf"), captured), name
    for row in range(captured.shape[0]):
        a = sorted(zip(want.indices[row][captured[row]].tolist(), want.logq[row][captured[row]].tolist()))
        b = sorted(zip(got.indices[row][captured[row]].tolist(), got.logq[row][captured[row]].tolist()))
        assert [i for i, _ in a] == [i for i, _ in b], (name, row, a, b)
        close(torch.tensor([v for _, v in b]), torch.tensor([v for _, v in a]), f"{name} logq")
    close(got.coverage, want.coverage, f"{name} coverage")
    assert (got.label_logq is None) == (want.label_logq is None), name
    if want.label_logq is not None:
        close(got.label_logq, want.label_logq, f"{name} label_logq")


def upstream(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, generator=g) for _ in range(3)]


def stats_and_grad(fn, x, r, **kw):
    """fn(x) on the rank's shard and on the whole rows: their outputs and gradients (shard, whole)."""
    xs = x[:, cols(r)].clone().requires_grad_()
    xf = x.clone().requires_grad_()
    g = upstream(5)
    outs = []
    for leaf, group in ((xs, dist.group.WORLD), (xf, None)):
        st = fn(leaf, process_group=group, **kw)
        (st.logp * g[0] + st.kl * g[1] + st.entropy * g[2]).sum().backward()
        outs.append(st)
    return outs[0], outs[1], xs.grad, xf.grad[:, cols(r)]


def case_token_stats(r):
    x, labels, proxy = make_logits(N, V, seed=1), torch.tensor(LABELS), make_logits(N, V, seed=2)
    for mode, threshold in (("min_p", 0.05), ("fixed", 0.1)):
        for p in (None, proxy):
            for backend in BACKENDS:
                kw = dict(mode=mode, threshold=threshold, backend=backend, temperature=0.9)

                def fn(leaf, process_group, p=p, **kw):
                    ps = None if p is None else (p[:, cols(r)] if process_group is not None else p)
                    return lpreg.lpreg_token_stats(leaf, labels, proxy_logits=ps, process_group=process_group, **kw)

                got, want, grad, want_grad = stats_and_grad(fn, x, r, **kw)
                for name in got._fields:
                    close(getattr(got, name), getattr(want, name), f"{name} {mode} {backend}")
                assert grad.shape == (N, cols(r).stop - cols(r).start)
                close(grad, want_grad, f"grad {mode} {backend}")
    kl = lpreg.lpreg_kl(x[:, cols(r)], process_group=dist.group.WORLD, reduction="none")
    close(kl, lpreg.lpreg_kl(x), "lpreg_kl")


def case_sparse_proxy(r):
    x, labels = make_logits(N, V, seed=3), torch.tensor(LABELS)
    for k in (2, 12):  # fewer than the kept set, and more than V
        proxy = lpreg.build_proxy(make_logits(N, V, seed=4), labels, k=k, threshold=0.05)

        def fn(leaf, process_group, proxy=proxy):
            return lpreg.sparse_proxy_stats(leaf, labels, proxy, process_group=process_group, temperature=0.9)

        got, want, grad, want_grad = stats_and_grad(fn, x, r)
        for name in got._fields:
            close(getattr(got, name), getattr(want, name), f"sparse {name} k={k}")
        close(grad, want_grad, f"sparse grad k={k}")


def case_build_proxy(r):
    x, labels = make_logits(N, V, seed=5), torch.tensor(LABELS)
    for mode, threshold in (("min_p", 0.05), ("fixed", 0.1)):
        for k in (2, 12):
            for lab in (labels, None):
                got = lpreg.build_proxy(x[:, cols(r)], lab, k=k, mode=mode, threshold=threshold,
                                        process_group=dist.group.WORLD)
                want = lpreg.build_proxy(x, lab, k=k, mode=mode, threshold=threshold)
                same_proxy(got, want, f"build_proxy {mode} k={k}")


def head(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 3
    bias = torch.randn(V, generator=g)
    return hidden, weight, bias


def case_fused_token_stats(r):
    hidden, weight, bias = head(6)
    labels = torch.tensor([LABELS])
    sparse = lpreg.build_proxy(hidden @ weight.T + bias, labels, k=3, threshold=0.05)
    dense = make_logits(N, V, seed=10)[None]
    for proxy in (None, sparse, dense):
        grads = []
        for group, w, b in ((dist.group.WORLD, weight[cols(r)], bias[cols(r)]), (None, weight, bias)):
            leaves = [t.clone().requires_grad_() for t in (hidden, w, b)]
            p = dense[..., cols(r)] if proxy is dense and group is not None else proxy
            st = lpreg.fused_linear_token_stats(leaves[0], leaves[1], labels, bias=leaves[2], proxy=p,
                                                chunk_size=3, threshold=0.05, process_group=group)
            g = upstream(7)
            (st.logp[0] * g[0] + st.kl[0] * g[1] + st.entropy[0] * g[2]).sum().backward()
            grads.append((st, [t.grad for t in leaves]))
        (got, (gh, gw, gb)), (want, (wh, ww, wb)) = grads
        for name in got._fields:
            close(getattr(got, name), getattr(want, name), f"fused {name}")
        assert gw.shape == (cols(r).stop - cols(r).start, H) and gb.shape == (gw.shape[0],)
        close(gh, wh, "fused grad hidden")
        close(gw, ww[cols(r)], "fused grad weight")
        close(gb, wb[cols(r)], "fused grad bias")


def case_fused_build_proxy(r):
    hidden, weight, bias = head(8)
    labels = torch.tensor([LABELS])
    got = lpreg.fused_linear_build_proxy(hidden, weight[cols(r)], labels, bias=bias[cols(r)], k=4, threshold=0.05,
                                         chunk_size=3, process_group=dist.group.WORLD)
    want = lpreg.build_proxy(hidden @ weight.T + bias, labels, k=4, threshold=0.05)
    same_proxy(got.flatten(), want.flatten(), "fused build_proxy")


def case_losses(r):
    hidden, weight, bias = head(9)
    labels = torch.tensor([LABELS])
    adv = torch.tensor([[-1.0, -0.5, 1.0, -2.0, 0.3, -1.0, -0.7]])
    old = torch.full((1, N), -2.0)
    mask = (labels != -100).float()
    kw = dict(compat="paper", rho=0.5, threshold=1e-6)  # a wide kept set: the selection acts
    results = []
    for group, w, b in ((dist.group.WORLD, weight[cols(r)], bias[cols(r)]), (None, weight, bias)):
        leaves = [t.clone().requires_grad_() for t in (hidden, w, b)]
        loss, m = lpreg.fused_linear_policy_loss(leaves[0], leaves[1], labels, adv, old, mask, bias=leaves[2],
                                                 chunk_size=3, process_group=group, **kw)
        loss.backward()
        logits = (hidden @ w.T + b).clone().requires_grad_()
        loss2, m2 = lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, process_group=group, **kw)
        loss2.backward()
        results.append((loss, m, [t.grad for t in leaves], loss2, logits.grad))
    (loss, m, grads, loss2, glog), (wloss, wm, wgrads, wloss2, wglog) = results
    close(loss, wloss, "fused loss")
    close(loss2, wloss2, "loss")
    assert m == wm or all(abs(m[k] - wm[k]) <= 1e-6 for k in m), (m, wm)
    assert m["actor/lpreg_frac"] > 0  # the selection acted
    close(grads[0], wgrads[0], "fused loss grad hidden")
    close(grads[1], wgrads[1][cols(r)], "fused loss grad weight")
    close(grads[2], wgrads[2][cols(r)], "fused loss grad bias")
    close(glog, wglog[..., cols(r)], "loss grad logits")


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


# ---------------------------------------------------------------------------- the spawned run


def _worker(rank, store, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    results = {}
    for name, case in CASES.items():
        torch.manual_seed(0)
        try:
            case(rank)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()[-3000:]
            break  # this rank's peers may now wait in a collective it left: they time out, no hang
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    try:
        dist.destroy_process_group()
    except Exception:
        pass


@pytest.fixture(scope="module")
def spawned():
    """{case: [outcome on rank 0, 1, 2, 3]}; a run that outlives SPAWN_TIMEOUT_S is killed and fails."""
    import torch.multiprocessing as mp

    out = tempfile.mkdtemp(prefix="lpreg_vp_empty_")
    ctx = mp.start_processes(_worker, args=(os.path.join(out, "store"), out), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                pytest.fail(f"the 4-rank run did not finish in {SPAWN_TIMEOUT_S} s: a deadlock")
    except mp.ProcessRaisedException as exc:  # a rank died outside a case: report it as every case's outcome
        return {name: [str(exc)] * WORLD for name in CASES}
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    ranks = []
    for r in range(WORLD):
        path = os.path.join(out, f"rank{r}.json")
        ranks.append(json.load(open(path)) if os.path.exists(path) else {})
    return {name: [rk.get(name, "not reached") for rk in ranks] for name in CASES}


@pytest.mark.slow  # spawns four processes (tens of seconds): `pytest -m slow`, as tests/test_vocab_parallel.py
@pytest.mark.parametrize("case", list(CASES))
def test_empty_vocabulary_shard(spawned, case):
    failures = [f"rank {r}:\n{out}" for r, out in enumerate(spawned[case]) if out != "ok"]
    assert not failures, "\n".join(failures)
