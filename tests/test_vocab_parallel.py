"""Vocabulary-parallel ops and losses (docs/spec.md §6) on CPU, with gloo process groups spawned from
this process: every statistic and every gradient of a rank's shard equals the unsharded op on the
gathered logits (and the float64 oracle, within its tolerance), at tp = 2 and tp = 4.

Spawning costs more than every case together, so the module spawns once: four ranks that form the
tp = 4 group (all four), the tp = 2 groups {0, 1} and {2, 3}, and the data-parallel groups {0, 2}
and {1, 3} of that 2 x 2 mesh. Each rank runs every case below (`CASES`) and writes what it found;
the tests read it, one test per case. The vocabulary is 37 wide: shards of 19 + 18 at tp = 2 and
10 + 10 + 10 + 7 at tp = 4 (uneven last shards), with a label on the last shard.
"""

import copy
import json
import math
import os
import re
import tempfile
import time
import traceback
import types
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import lpreg
from lpreg import _backends, _vocab_parallel
from tests.spec_oracle import eager_in_dtype, make_logits, spec_grad, spec_token_stats

N, V = 7, 37
LABELS = [0, 36, -100, 5, 20, 11, 36]  # an ignored row; the last column (last shard) twice
BACKENDS = ["torch", "cpu", "triton"]
WORLD = 4


def backends(ranks):
    """Every backend at tp = 4; the interpreted Triton kernels (seconds a case) once, at tp = 2 only
    where `case_token_stats` and `case_token_stats_bf16` already ran them."""
    return BACKENDS if ranks == 4 else ["torch", "cpu"]


# ---------------------------------------------------------------------------- helpers (every rank)


class Env:
    """This rank's groups: tp[2] / tp[4] are (group, rank in it, ranks), dp the data-parallel group,
    alone a group of this rank only (for single-process references)."""

    def __init__(self, rank):
        self.rank = rank
        world = dist.group.WORLD
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
        dps = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        self.tp = {4: (world, rank, 4), 2: (pairs[rank // 2], rank % 2, 2)}
        self.dp = dps[rank % 2]
        self.dp_rank = rank // 2
        self.alone = [dist.new_group([i]) for i in range(WORLD)][rank]  # this rank by itself


def shard(t, rank, ranks, dim=-1):
    """Rank `rank`'s block of t along `dim`, as torch.chunk cuts it (the last ones narrower)."""
    return torch.chunk(t, ranks, dim=dim)[rank]


def same_on_every_rank(t, group):
    """Every rank of `group` holds bitwise the same t."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    assert all(torch.equal(o.nan_to_num(7.0), out[0].nan_to_num(7.0)) for o in out), "ranks disagree"


def upstream(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g) for _ in range(3)]


def check_stats_and_grads(env, ranks, backend, x, labels, *, dtype=torch.float32, proxy=None, **kw):
    """The sharded op against the unsharded one on the gathered logits and the float64 oracle."""
    group, r, _ = env.tp[ranks]
    full = x.to(dtype)
    xs = shard(full, r, ranks).clone().requires_grad_()
    ps = None if proxy is None else shard(proxy, r, ranks)
    st = lpreg.lpreg_token_stats(xs, labels, proxy_logits=ps, backend=backend, process_group=group, **kw)
    xf = full.clone().requires_grad_()
    ref = lpreg.lpreg_token_stats(xf, labels, proxy_logits=proxy, backend=backend, **kw)
    oracle = spec_token_stats(full, labels, proxy_logits=proxy, **kw)
    for name in ("logp", "proxy_logp", "kl", "entropy"):
        got = getattr(st, name)
        assert got.dtype == torch.float32 and got.shape == labels.shape, name
        torch.testing.assert_close(got, getattr(ref, name), rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(got.double(), oracle[name], rtol=1e-5, atol=1e-5, msg=name)
        same_on_every_rank(got, group)
    g = upstream(labels.shape[0], seed=7)
    (st.logp * g[0] + st.kl * g[1] + st.entropy * g[2]).sum().backward()
    (ref.logp * g[0] + ref.kl * g[1] + ref.entropy * g[2]).sum().backward()
    want = shard(spec_grad(oracle, *g, temperature=kw.get("temperature", 1.0)), r, ranks)
    assert xs.grad.dtype == dtype
    err = (xs.grad.double() - want).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-6 + 1e-5 * want.abs().max().item(), err
        torch.testing.assert_close(xs.grad, shard(xf.grad, r, ranks), rtol=1e-5, atol=1e-6)
        return
    # low precision: twice the error of eager PyTorch in that dtype (tests/spec_oracle.py's rule)
    xe = full.detach().clone().requires_grad_()
    e_logp, e_kl, e_h = eager_in_dtype(xe, labels.clamp(min=0), proxy_logits=proxy,
                                       **{k: kw[k] for k in ("temperature", "mode", "threshold")})
    terms = e_logp * g[0].to(dtype) + e_kl * g[1].to(dtype) + e_h * g[2].to(dtype)
    (eager,) = torch.autograd.grad(torch.where(labels != -100, terms, 0).sum(), xe)
    eager_err = (eager.double() - spec_grad(oracle, *g, temperature=kw["temperature"])).abs().max().item()
    assert err <= 2 * eager_err, (err, eager_err)


# ---------------------------------------------------------------------------- the cases


def case_token_stats(env):
    """Both modes, on- and off-policy (a dense proxy), three backends, tp = 2 and 4, fp32."""
    x, labels, proxy = make_logits(N, V, seed=3), torch.tensor(LABELS), make_logits(N, V, seed=4)
    for ranks in (2, 4):
        for backend in BACKENDS:
            for mode, threshold in (("min_p", 0.02), ("fixed", 0.05)):
                for p in (None, proxy):
                    check_stats_and_grads(env, ranks, backend, x, labels, proxy=p, temperature=0.9, mode=mode,
                                          threshold=threshold)


def case_token_stats_bf16(env):
    x, labels = make_logits(N, V, seed=5), torch.tensor(LABELS)
    for ranks in (2, 4):
        for backend in BACKENDS:
            for mode, threshold in (("min_p", 0.02), ("fixed", 0.05)):
                check_stats_and_grads(env, ranks, backend, x, labels, dtype=torch.bfloat16, temperature=1.0,
                                      mode=mode, threshold=threshold)


def case_fixed_mode_argmax_alone(env):
    """"fixed" with no token reaching tau: K is the first argmax alone, which lives on one shard;
    a tie for the max across shards goes to the lower column."""
    x = torch.randn(3, V, generator=torch.Generator().manual_seed(2)) * 0.01
    x[0, 30] = x[0, 3] = 1.0  # a tie across shards: column 3 is the first argmax
    x[1, 33] = 1.0  # on the last shard
    labels = torch.tensor([3, 33, 30])
    for ranks in (2, 4):
        for backend in backends(ranks):
            check_stats_and_grads(env, ranks, backend, x, labels, temperature=1.0, mode="fixed", threshold=0.5)


def case_bad_rows_are_nan_on_every_rank(env):
    """A NaN or a +inf on one shard, or -inf everywhere: that row is NaN on every rank, values and
    gradient, and no other row changes; a shard that is all -inf in a finite row is legal."""
    x = make_logits(5, V, seed=6, neg_inf=False)
    x[0, 35] = math.nan  # on the last shard only
    x[1, 2] = math.inf  # on the first shard only
    x[2] = -math.inf
    x[3, :19] = -math.inf  # the first shard of tp = 2 holds no finite logit
    labels = torch.tensor([1, 1, 1, 30, 4])
    for ranks in (2, 4):
        group, r, _ = env.tp[ranks]
        for backend in backends(ranks):
            xs = shard(x, r, ranks).clone().requires_grad_()
            st = lpreg.lpreg_token_stats(xs, labels, backend=backend, process_group=group)
            for name, v in zip(st._fields, st):
                assert torch.isnan(v[:3]).all(), (name, v)
                assert not torch.isnan(v[3:]).any(), (name, v)  # proxy_logp is -inf where the label is filtered
            (st.logp + st.kl + st.entropy).sum().backward()
            assert torch.isnan(xs.grad[:3]).all() and torch.isfinite(xs.grad[3:]).all()
            ref = lpreg.lpreg_token_stats(x, labels, backend=backend)
            for a, b in zip(st, ref):
                torch.testing.assert_close(a[3:], b[3:], rtol=1e-5, atol=1e-5)


def case_kl_without_labels(env):
    x, proxy = make_logits(N, V, seed=8), make_logits(N, V, seed=9)
    for ranks in (2, 4):
        group, r, _ = env.tp[ranks]
        for backend in backends(ranks):
            for p in (None, proxy):
                xs = shard(x, r, ranks).clone().requires_grad_()
                kl = lpreg.lpreg_kl(xs, proxy_logits=None if p is None else shard(p, r, ranks), reduction="sum",
                                    backend=backend, process_group=group)
                xf = x.clone().requires_grad_()
                ref = lpreg.lpreg_kl(xf, proxy_logits=p, reduction="sum", backend=backend)
                torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-5)
                kl.backward()
                ref.backward()
                torch.testing.assert_close(xs.grad, shard(xf.grad, r, ranks), rtol=1e-5, atol=1e-6)


def case_build_proxy(env):
    """build_proxy on shards: the same captured (index, log q) pairs, coverage and label log q."""
    y, labels = make_logits(N, V, seed=10), torch.tensor(LABELS)
    for ranks in (2, 4):
        group, r, _ = env.tp[ranks]
        for mode, threshold in (("min_p", 0.02), ("fixed", 0.05)):
            for k in (3, 64):  # fewer than |K| in peaked rows, and more than the vocabulary
                for lab in (labels, None):
                    got = lpreg.build_proxy(shard(y, r, ranks), lab, temperature=0.8, mode=mode, threshold=threshold,
                                            k=k, process_group=group)
                    want = lpreg.build_proxy(y, lab, temperature=0.8, mode=mode, threshold=threshold, k=k)
                    captured = want.logq > -math.inf
                    assert torch.equal(got.logq > -math.inf, captured)
                    for row in range(N):
                        a = sorted(zip(want.indices[row][captured[row]].tolist(), want.logq[row][captured[row]]))
                        b = sorted(zip(got.indices[row][captured[row]].tolist(), got.logq[row][captured[row]]))
                        assert [i for i, _ in a] == [i for i, _ in b], (row, a, b)
                        torch.testing.assert_close(torch.stack([v for _, v in b]), torch.stack([v for _, v in a]))
                    assert len(set(got.indices[0].tolist())) == min(k, V) or k > V  # distinct columns
                    torch.testing.assert_close(got.coverage, want.coverage)
                    if lab is not None:
                        torch.testing.assert_close(got.label_logq, want.label_logq)
                    same_on_every_rank(got.logq, group)


def case_sparse_proxy_stats(env):
    """Statistics against a sparse proxy (global indices), with and without the exact label log q."""
    x, labels = make_logits(N, V, seed=11), torch.tensor(LABELS)
    proxy = lpreg.build_proxy(make_logits(N, V, seed=12), labels, k=4)
    g = upstream(N, seed=3)
    for ranks in (2, 4):
        group, r, _ = env.tp[ranks]
        for backend in backends(ranks):
            for p in (proxy, proxy._replace(label_logq=None)):
                xs = shard(x, r, ranks).clone().requires_grad_()
                st = lpreg.sparse_proxy_stats(xs, labels, p, temperature=0.9, backend=backend, process_group=group)
                xf = x.clone().requires_grad_()
                ref = lpreg.sparse_proxy_stats(xf, labels, p, temperature=0.9, backend=backend)
                for a, b in zip(st, ref):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                (st.logp * g[0] + st.kl * g[1] + st.entropy * g[2]).sum().backward()
                (ref.logp * g[0] + ref.kl * g[1] + ref.entropy * g[2]).sum().backward()
                torch.testing.assert_close(xs.grad, shard(xf.grad, r, ranks), rtol=1e-5, atol=1e-6)


def case_logit_transform(env):
    """The logit transform (issue 30: a multiplier, a tanh soft-cap) on shards: token stats on- and
    off-policy against the unsharded op and the float64 oracle, build_proxy and sparse_proxy_stats
    against the unsharded ones (values and gradients)."""
    x, labels, proxy = make_logits(N, V, seed=13) * 6, torch.tensor(LABELS), make_logits(N, V, seed=14) * 6
    capped = dict(logit_scale=1.5, logit_softcap=4.0)
    g = upstream(N, seed=5)
    for ranks in (2, 4):
        group, r, _ = env.tp[ranks]
        for backend in backends(ranks):
            for tf in (dict(logit_scale=0.5), capped):
                for p in (None, proxy):
                    check_stats_and_grads(env, ranks, backend, x, labels, proxy=p, temperature=0.9, mode="min_p",
                                          threshold=0.05, **tf)
        got = lpreg.build_proxy(shard(proxy, r, ranks), labels, k=4, temperature=0.9, process_group=group, **capped)
        want = lpreg.build_proxy(proxy, labels, k=4, temperature=0.9, **capped)
        torch.testing.assert_close(got.logq.sort(-1).values, want.logq.sort(-1).values)
        torch.testing.assert_close(got.coverage, want.coverage)
        torch.testing.assert_close(got.label_logq, want.label_logq)
        for backend in backends(ranks):
            xs = shard(x, r, ranks).clone().requires_grad_()
            st = lpreg.sparse_proxy_stats(xs, labels, want, temperature=0.9, backend=backend, process_group=group,
                                          **capped)
            xf = x.clone().requires_grad_()
            ref = lpreg.sparse_proxy_stats(xf, labels, want, temperature=0.9, backend=backend, **capped)
            for a, b in zip(st, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            (st.logp * g[0] + st.kl * g[1] + st.entropy * g[2]).sum().backward()
            (ref.logp * g[0] + ref.kl * g[1] + ref.entropy * g[2]).sum().backward()
            torch.testing.assert_close(xs.grad, shard(xf.grad, r, ranks), rtol=1e-5, atol=1e-6)


def _batch(seed, B=2, L=6):
    from tests.test_policy_loss import make_batch

    logits, labels, adv, old, mask = make_batch(B=B, L=L, V=V, seed=seed)
    labels[0, 0] = V - 1  # a label on the last shard
    labels[1, -1] = -100
    return logits, labels, adv, old, mask


def _loss_and_grad(logits, *args, **kw):
    x = logits.clone().requires_grad_()
    loss, metrics = lpreg.lpreg_policy_loss(x, *args, **kw)
    loss.backward()
    return loss, metrics, x.grad


def case_policy_loss(env):
    """Both forms, on-policy, a dense and a sparse proxy: the loss, every metric and the shard's
    gradient. A filter that keeps p >= 1e-4 max p lets low-probability labels be selected."""
    logits, labels, adv, old, mask = _batch(seed=1, B=3)
    dense = make_logits(18, V, seed=13).reshape(3, 6, V)
    sparse = lpreg.build_proxy(dense, labels, k=5, threshold=1e-4)
    selected = {}
    for ranks in (2, 4):
        group, r, _ = env.tp[ranks]
        for compat in ("released", "paper"):
            for proxy in (None, dense, sparse):
                kw = dict(compat=compat, rho=0.3, threshold=1e-4, backend="cpu")
                local = shard(proxy, r, ranks) if isinstance(proxy, torch.Tensor) else proxy
                loss, metrics, grad = _loss_and_grad(shard(logits, r, ranks), labels, adv, old, mask, proxy=local,
                                                     process_group=group, **kw)
                ref, ref_metrics, ref_grad = _loss_and_grad(logits, labels, adv, old, mask, proxy=proxy, **kw)
                torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
                assert metrics.keys() == ref_metrics.keys()
                for key in metrics:
                    assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-6), key
                selected[compat] = max(selected.get(compat, 0.0), metrics["actor/lpreg_frac"])
                torch.testing.assert_close(grad, shard(ref_grad, r, ranks), rtol=1e-5, atol=1e-7)
                same_on_every_rank(loss.detach(), group)
    assert min(selected.values()) > 0, f"a form selected nothing: the test would not see its KL term {selected}"


def case_paper_selection_across_dp_and_tp(env):
    """The paper form's step-wide selection over data- and tensor-parallel groups at once: each
    data-parallel rank holds its own batch, sharded over the vocabulary across its tp = 2 group;
    selection_threshold runs over the data-parallel group; the losses add up to the single-process
    loss on the whole step's gathered logits, and each shard's gradient is its slice of that one."""
    group, r, _ = env.tp[2]
    batches = [_batch(seed=20 + i) for i in range(2)]
    logits, labels, adv, old, mask = batches[env.dp_rank]
    n_valid = sum(int(((b[4] > 0) & (b[1] != -100)).sum()) for b in batches)
    sel = lpreg.selection_threshold(old, mask * (labels != -100), rho=0.2, group=env.dp)
    kw = dict(compat="paper", rho=0.2, threshold=1e-4, backend="cpu", num_tokens=n_valid)
    loss, metrics, grad = _loss_and_grad(shard(logits, r, 2), labels, adv, old, mask, selection_threshold=sel,
                                         process_group=group, **kw)
    whole = [torch.cat([b[i] for b in batches]) for i in range(5)]
    whole_sel = lpreg.selection_threshold(whole[3], whole[4] * (whole[1] != -100), rho=0.2, group=env.alone)
    ref, ref_metrics, ref_grad = _loss_and_grad(*whole, selection_threshold=whole_sel, **kw)
    total = loss.detach().clone()
    dist.all_reduce(total, group=env.dp)
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)
    B = logits.shape[0]
    want = shard(ref_grad[env.dp_rank * B:(env.dp_rank + 1) * B], r, 2)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
    selected = torch.tensor([metrics["actor/lpreg_frac"]])
    dist.all_reduce(selected, group=env.dp)
    assert selected.item() > 0, "no token selected on either data-parallel rank"


def case_fused_linear(env):
    """The LM head sharded over the vocabulary: loss, metrics and statistics, the weight and bias
    gradients of the shard and the whole hidden gradient."""
    g = torch.Generator().manual_seed(5)
    B, L, H = 2, 6, 16
    hidden = torch.randn(B, L, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    bias = torch.randn(V, generator=g) * 0.1
    _, labels, adv, old, mask = _batch(seed=2)
    for ranks in (2, 4):
        group, r, _ = env.tp[ranks]
        for compat in ("released", "paper"):
            local = (hidden, shard(weight, r, ranks, dim=0), shard(bias, r, ranks))
            leaves = [t.clone().requires_grad_() for t in local]
            loss, metrics = lpreg.fused_linear_policy_loss(leaves[0], leaves[1], labels, adv, old, mask, bias=leaves[2],
                                                           compat=compat, rho=0.2, chunk_size=5, process_group=group)
            loss.backward()
            refs = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
            ref, ref_metrics = lpreg.fused_linear_policy_loss(refs[0], refs[1], labels, adv, old, mask, bias=refs[2],
                                                              compat=compat, rho=0.2, chunk_size=5)
            ref.backward()
            torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
            for key in metrics:
                assert metrics[key] == pytest.approx(ref_metrics[key], rel=1e-5, abs=1e-6), key
            torch.testing.assert_close(leaves[0].grad, refs[0].grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(leaves[1].grad, shard(refs[1].grad, r, ranks, dim=0), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(leaves[2].grad, shard(refs[2].grad, r, ranks), rtol=1e-4, atol=1e-6)
        # the statistics alone, backward through the recomputed chunks
        leaves = [t.clone().requires_grad_() for t in (hidden, shard(weight, r, ranks, dim=0))]
        st = lpreg.fused_linear_token_stats(leaves[0], leaves[1], labels, chunk_size=5, process_group=group)
        refs = [t.clone().requires_grad_() for t in (hidden, weight)]
        ref = lpreg.fused_linear_token_stats(refs[0], refs[1], labels, chunk_size=5)
        u = upstream(B * L, seed=4)
        for s in (st, ref):
            (s.logp * u[0].reshape(B, L) + s.kl * u[1].reshape(B, L) + s.entropy * u[2].reshape(B, L)).sum().backward()
        for a, b in zip(st, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leaves[0].grad, refs[0].grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(leaves[1].grad, shard(refs[1].grad, r, ranks, dim=0), rtol=1e-4, atol=1e-6)


class _Count:
    """Wraps torch.distributed's collectives: how many calls, and the bytes each rank sends."""

    NAMES = ("all_gather_single", "all_gather_into_tensor", "all_gather", "all_reduce", "broadcast",
             "reduce_scatter_tensor", "all_to_all_single")

    def __enter__(self):
        self.calls, self.sent, self.saved = [], 0, {}
        for name in self.NAMES:
            if hasattr(dist, name):
                self.saved[name] = fn = getattr(dist, name)
                setattr(dist, name, self._wrap(name, fn))
        return self

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls.append(name)
            if name in ("all_gather_single", "all_gather_into_tensor"):
                self.sent += args[1].numel() * args[1].element_size()
            return fn(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def case_collectives_per_call(env):
    """Two all_gathers per forward whatever the number of rows, their bytes as documented, and no
    collective in the backward."""
    group, r, _ = env.tp[2]
    for rows in (3, 40):
        x = shard(make_logits(rows, V, seed=14), r, 2).clone().requires_grad_()
        labels = torch.randint(0, V, (rows,), generator=torch.Generator().manual_seed(rows))
        for proxy in (None, shard(make_logits(rows, V, seed=15), r, 2)):
            with _Count() as fwd:
                st = lpreg.lpreg_token_stats(x, labels, proxy_logits=proxy, process_group=group)
            assert len(fwd.calls) == 2 and set(fwd.calls) <= {"all_gather_single", "all_gather_into_tensor"}, fwd.calls
            assert fwd.sent == _vocab_parallel.collective_bytes(rows, 2, "token_stats")[0]
            with _Count() as bwd:
                (st.logp + st.kl + st.entropy).sum().backward()
            assert bwd.calls == [], bwd.calls
            x.grad = None
        proxy = lpreg.build_proxy(make_logits(rows, V, seed=16), labels, k=4)
        with _Count() as fwd:
            st = lpreg.sparse_proxy_stats(x, labels, proxy, process_group=group)
        assert len(fwd.calls) == 2 and fwd.sent == _vocab_parallel.collective_bytes(rows, 2, "sparse_proxy")[0]
        with _Count() as bwd:
            (st.logp + st.kl).sum().backward()
        assert bwd.calls == []
        with _Count() as fwd:
            lpreg.build_proxy(x.detach(), labels, k=4, process_group=group)
        assert len(fwd.calls) == 2 and fwd.sent == _vocab_parallel.collective_bytes(rows, 2, "build_proxy", k=4)[0]


def case_errors_on_every_rank(env):
    """A label past the whole vocabulary, and shards that are not torch.chunk's blocks: ValueError
    naming the argument and the value, on every rank alike (none is left waiting in a collective)."""
    group, r, _ = env.tp[2]
    x = shard(make_logits(2, V, seed=17), r, 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 37\) or ignore_index=-100, got 37"):
        lpreg.lpreg_token_stats(x, torch.tensor([37, 1]), process_group=group)
    uneven = make_logits(2, V, seed=17)[:, :12] if r == 0 else make_logits(2, V, seed=17)[:, 12:]
    with pytest.raises(ValueError, match=r"logits must be sharded over the vocabulary.*got widths \[12, 25\]"):
        lpreg.lpreg_token_stats(uneven, torch.tensor([1, 2]), process_group=group)
    # the group still works: nobody was left behind
    lpreg.lpreg_token_stats(x, torch.tensor([1, 2]), process_group=group)


def _docs_block(heading):
    """The first ```python block after `heading` in docs/integrations.md."""
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "integrations.md")) as f:
        text = f.read()
    start = text.index("```python\n", text.index(heading)) + len("```python\n")
    return text[start:text.index("```\n", start)]


class _TinyLM(torch.nn.Module):
    """A model with an `lm_head`, whose output has `.logits`, as the docs' block expects."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(11, 16)
        self.lm_head = torch.nn.Linear(16, V)

    def forward(self, input_ids):
        return types.SimpleNamespace(logits=self.lm_head(torch.tanh(self.embed(input_ids))))


def case_dtensor_loss_parallel(env):
    """docs/integrations.md's DTensor block, run as it stands: a torchtitan-style tensor-parallel LM
    head (ColwiseParallel(use_local_output=False) leaves the logits a DTensor sharded over the
    vocabulary, Shard(-1), as `loss_parallel` expects) on a 2 x 2 (data x tensor) mesh. The head's
    weight and bias shards and the replicated embedding (through DTensor's own reduction of the
    hidden states' gradient) get the unsharded model's gradients."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = _TinyLM()
    reference = copy.deepcopy(model)
    _, labels, advantages, old_logp, response_mask = _batch(seed=30 + env.dp_rank)
    input_ids = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(31 + env.dp_rank))
    scope = dict(model=model, tp_mesh=mesh["tp"], input_ids=input_ids, labels=labels, advantages=advantages,
                 old_logp=old_logp, response_mask=response_mask)
    exec(_docs_block("## Vocabulary-parallel (tensor-parallel) logits"), scope)
    assert scope["logits"].placements == (Shard(2),) and scope["logits"].to_local().shape[-1] < V
    ref, ref_metrics = lpreg.lpreg_policy_loss(reference(input_ids).logits, labels, advantages, old_logp,
                                               response_mask, compat="released", rho=0.01, beta=1.0)
    ref.backward()
    torch.testing.assert_close(scope["loss"], ref, rtol=1e-5, atol=1e-6)
    assert scope["metrics"] == pytest.approx(ref_metrics, rel=1e-5, abs=1e-6)
    r = mesh["tp"].get_local_rank()
    # fp32 sums in other orders (the head's shards, DTensor's reduction of the hidden gradient)
    torch.testing.assert_close(model.lm_head.weight.grad.to_local(), shard(reference.lm_head.weight.grad, r, 2, dim=0),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.lm_head.bias.grad.to_local(), shard(reference.lm_head.bias.grad, r, 2),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.embed.weight.grad, reference.embed.weight.grad, rtol=1e-4, atol=1e-6)


CASES = {name[5:]: fn for name, fn in sorted(globals().items()) if name.startswith("case_")}


# ---------------------------------------------------------------------------- the spawned run


def _worker(rank, store, out_dir):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    env = Env(rank)
    results, seconds = {}, {}
    for name, case in CASES.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        try:
            case(env)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()[-3000:]
        seconds[name] = round(time.perf_counter() - start, 2)
    results["seconds"] = seconds
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned():
    """Every case's outcome on every rank: {case: [outcome of rank 0, 1, 2, 3]}."""
    import torch.multiprocessing as mp

    if not _backends.native_available("cpu"):
        pytest.skip("the cases run the cpu backend: " + _backends.native_unavailable_reason("cpu"))
    out = tempfile.mkdtemp(prefix="lpreg_vp_")
    mp.spawn(_worker, args=(os.path.join(out, "store"), out), nprocs=WORLD, join=True)
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(WORLD)]
    print("seconds per case, rank 0:", ranks[0]["seconds"])  # shown with -s
    return {name: [rk.get(name, "missing") for rk in ranks] for name in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_vocab_parallel(spawned, case):
    failures = [f"rank {r}:\n{out}" for r, out in enumerate(spawned[case]) if out != "ok"]
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------- without a process group


def test_process_group_must_be_a_live_group():
    x = torch.randn(2, 5)
    with pytest.raises(ValueError, match="process_group needs torch.distributed to be initialised"):
        lpreg.lpreg_token_stats(x, torch.tensor([0, 1]), process_group=object())


@pytest.mark.parametrize("widths, ok", [([19, 18], True), ([10, 10, 10, 7], True), ([3, 3, 3, 0], True),
                                        ([12, 25], False), ([10, 7, 10, 10], False), ([3, 3, 0, 3], False)])
def test_shard_layout_is_torch_chunks(widths, ok):
    if ok:  # exactly torch.chunk's blocks (DTensor's Shard(-1)), the offsets from the rank and rank 0's width
        chunks = [len(c) for c in torch.chunk(torch.empty(sum(widths)), len(widths))]
        assert chunks + [0] * (len(widths) - len(chunks)) == widths
        shards = [_vocab_parallel.shard_layout(widths, r) for r in range(len(widths))]
        assert [s.offset for s in shards] == [r * widths[0] for r in range(len(widths))]
        assert [s.width for s in shards] == widths and {s.vocab for s in shards} == {sum(widths)}
    else:
        with pytest.raises(ValueError, match=re.escape(f"got widths {widths}")):
            _vocab_parallel.shard_layout(widths, 0)
