"""The step-wide lowest-rho selection: micro-batches and ranks reproduce the single batch."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lpreg
from lpreg.selection import bottom_k_count, bottom_k_mask, local_candidates, merge_candidates


def step_data(n_mb=4, B=3, L=7, seed=0, ties=True):
    """Micro-batches of old log-probs with exact ties across micro-batches, and masks."""
    g = torch.Generator().manual_seed(seed)
    olds, masks = [], []
    for _ in range(n_mb):
        o = -torch.rand(B, L, generator=g) * 6
        if ties:
            o[0, :3] = -5.5  # the same value in every micro-batch: ties across the step
        m = (torch.rand(B, L, generator=g) > 0.25).float()
        olds.append(o)
        masks.append(m)
    return olds, masks


def single_batch_mask(olds, masks, rho):
    values = torch.cat([o.reshape(-1) for o in olds])
    valid = torch.cat([m.reshape(-1) > 0 for m in masks])
    k = bottom_k_count(valid.sum(), rho)
    return bottom_k_mask(values, valid, k)[0]


def test_bottom_k_count_matches_python_int():
    for n in (0, 1, 99, 100, 101, 12345, 10**7 + 3):
        for rho in (0.005, 0.01, 0.3, 1.0):
            assert int(bottom_k_count(torch.tensor(n), rho)) == max(1, int(n * rho))
            assert bottom_k_count(n, rho) == max(1, math.floor(n * rho))


@pytest.mark.parametrize("rho", [0.01, 0.2, 0.5, 1.0])
def test_micro_batches_equal_single_batch(rho):
    olds, masks = step_data()
    want = single_batch_mask(olds, masks, rho)
    sels = lpreg.selection_threshold(olds, masks, rho=rho)
    got = torch.cat([s.mask(o, m > 0).reshape(-1) for s, o, m in zip(sels, olds, masks)])
    assert torch.equal(got, want)
    assert int(got.sum()) == max(1, int(sum(int((m > 0).sum()) for m in masks) * rho))
    single = lpreg.selection_threshold(torch.cat(olds), torch.cat(masks), rho=rho)
    assert torch.equal(single.mask(torch.cat(olds), torch.cat(masks) > 0).reshape(-1), want)


def test_ties_cut_by_position_across_micro_batches():
    olds, masks = step_data(n_mb=3)
    for o, m in zip(olds, masks):
        o[:] = -1.0  # every token tied
        m[:] = 1
    sels = lpreg.selection_threshold(olds, masks, rho=0.3)
    got = torch.cat([s.mask(o, m > 0).reshape(-1) for s, o, m in zip(sels, olds, masks)])
    k = int(63 * 0.3)
    assert got.tolist() == [True] * k + [False] * (63 - k)


@pytest.mark.parametrize("world", [2, 3])
def test_simulated_ranks_equal_single_batch(world):
    """Each rank sends its k smallest (value, position) pairs; the merge is exact."""
    olds, masks = step_data(n_mb=6, seed=world)
    rho = 0.15
    want = single_batch_mask(olds, masks, rho)
    per_rank = [list(range(r, 6, world)) for r in range(world)]  # interleaved ownership
    ranks_olds = [[olds[i] for i in ids] for ids in per_rank]
    ranks_masks = [[masks[i] for i in ids] for ids in per_rank]
    n_valid = sum(int((m > 0).sum()) for m in masks)
    k = bottom_k_count(n_valid, rho)
    sizes = [sum(o.numel() for o in ro) for ro in ranks_olds]
    offsets = [sum(sizes[:r]) for r in range(world)]
    cands = torch.stack([
        local_candidates(torch.cat([o.reshape(-1) for o in ro]), torch.cat([m.reshape(-1) > 0 for m in rm]), k, off)
        for ro, rm, off in zip(ranks_olds, ranks_masks, offsets)
    ])
    t, pos = merge_candidates(cands, k)
    # global order is rank-major: compare against the single batch in that order
    order = [i for ids in per_rank for i in ids]
    want = single_batch_mask([olds[i] for i in order], [masks[i] for i in order], rho)
    got = []
    for r in range(world):
        off = offsets[r]
        for o, m in zip(ranks_olds[r], ranks_masks[r]):
            sel = lpreg.SelectionThreshold(t, pos, off, k, n_valid)
            got.append(sel.mask(o, m > 0).reshape(-1))
            off += o.numel()
    assert torch.equal(torch.cat(got), want)


def _worker(rank, world, port, olds, masks, rho, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mine = list(range(rank, len(olds), world))
        sels = lpreg.selection_threshold([olds[i] for i in mine], [masks[i] for i in mine], rho=rho)
        got = torch.cat([s.mask(olds[i], masks[i] > 0).reshape(-1) for s, i in zip(sels, mine)])
        torch.save(got, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gloo_two_ranks_equal_single_batch(tmp_path):
    olds, masks = step_data(n_mb=4, seed=7)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: no re-import of torch in the children (small CPU tensors only, no OpenMP regions)
    mp.start_processes(_worker, args=(2, port, olds, masks, 0.2, str(tmp_path)), nprocs=2, join=True,
                       start_method="fork")
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    order = [0, 2, 1, 3]  # rank 0 owns micro-batches 0, 2; rank 1 owns 1, 3
    want = single_batch_mask([olds[i] for i in order], [masks[i] for i in order], 0.2)
    assert torch.equal(torch.cat([out[0], out[1]]), want)


def test_loss_with_threshold_equals_single_call_on_policy():
    """On-policy (old_logp = current logp), the old-policy threshold selects what the
    single call selects on current p_y, micro-batch by micro-batch."""
    from tests.test_policy_loss import make_batch

    logits, labels, adv, _, mask = make_batch(B=8, L=10, seed=3)
    old = lpreg.lpreg_token_stats(logits, labels, backend="torch").logp
    kw = dict(compat="paper", rho=0.5, backend="torch", loss_agg_mode="seq-mean-token-sum")
    loss, m = lpreg.lpreg_policy_loss(logits, labels, adv, old, mask, **kw)
    n_sel = round(m["actor/lpreg_frac"] * int((mask > 0).sum()))
    assert n_sel > 0
    parts = [slice(0, 3), slice(3, 5), slice(5, 8)]
    sels = lpreg.selection_threshold([old[p] for p in parts], [mask[p] for p in parts], rho=0.5)
    total, total_sel = 0.0, 0
    for p, sel in zip(parts, sels):
        lp, mp_ = lpreg.lpreg_policy_loss(logits[p], labels[p], adv[p], old[p], mask[p], selection_threshold=sel,
                                          **kw)
        total += float(lp) * (p.stop - p.start) / 8  # seq-mean over the whole batch
        total_sel += round(mp_["actor/lpreg_frac"] * int((mask[p] > 0).sum()))
    assert total_sel == n_sel
    assert total == pytest.approx(float(loss), rel=1e-5, abs=1e-6)


def test_bad_input():
    olds, masks = step_data(n_mb=2)
    with pytest.raises(ValueError, match="rho"):
        lpreg.selection_threshold(olds, masks, rho=0)
    with pytest.raises(ValueError, match="masks"):
        lpreg.selection_threshold(olds, masks[:1])
    with pytest.raises(ValueError, match="advantages"):
        lpreg.selection_threshold(olds, masks, negative_only=True)
    empty = lpreg.selection_threshold(olds[0], torch.zeros_like(masks[0]))
    assert empty.k == 0 and not empty.mask(olds[0], torch.ones_like(masks[0], dtype=torch.bool)).any()
