"""The mechanism's metrics (issue 31): candidates, the filtered share, selected, and at the selected tokens the
kept mass m, the push 1/m - 1 and p_y; reduced from the loss core's per-token result, pooled exactly as sums.

- A tiny model whose head has a known tail: every figure computed by hand, in every loss entry point.
- Sums pooled over 2 micro-batches equal one call (paper form, step-wide selection).
- Sums pooled over 2 gloo ranks (spawned) equal the single-process value.
"""

import json
import math
import os
import tempfile
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import lpreg
from tests.test_policy_loss import make_batch

KAPPA = 0.02
# Four rows of next-token probabilities (V = 4), each a head and a known tail under min-p at kappa = 0.02:
# the kept set is {v : p_v >= 0.02 max p}, its mass m; the sampled token, its advantage.
ROWS = [
    # p                            kept      m      label  p_y    A
    ([0.60, 0.30, 0.095, 0.005], 0.995, 2, -1.0),  # cutoff 0.012: the 0.005 tail is filtered; y kept
    ([0.90, 0.09, 0.007, 0.003], 0.990, 3, -1.0),  # cutoff 0.018: y = the 0.003 tail, filtered as noise
    ([0.40, 0.40, 0.195, 0.005], 0.995, 1, -1.0),  # cutoff 0.008: y kept
    ([0.70, 0.20, 0.090, 0.010], 0.990, 0, +1.0),  # A > 0: never selected
]


def tiny_model():
    """hidden (1, 4, 4) one-hot rows and a head W (V = 4, H = 4) whose column i is log p of row i, so that
    the logits of token i are exactly log p_i: a model with a known tail. Labels, advantages, mask."""
    W = torch.log(torch.tensor([p for p, *_ in ROWS], dtype=torch.float32)).T.contiguous()
    hidden = torch.eye(4)[None]
    labels = torch.tensor([[label for _, _, label, _ in ROWS]])
    adv = torch.tensor([[a for *_, a in ROWS]])
    return hidden, W, labels, adv, torch.ones(1, 4)


def by_hand(compat):
    """The metrics from the table, with rho = 1: every pool token is a candidate."""
    pool = [i for i, (*_, a) in enumerate(ROWS) if compat == "paper" or a < 0]  # released: the A < 0 pool
    filtered = [i for i in pool if i == 1]  # row 1's label is the filtered tail
    selected = [i for i in pool if i not in filtered and ROWS[i][3] < 0]  # A < 0 and kept (and m < 1)
    m = [ROWS[i][1] for i in selected]
    p_y = [ROWS[i][0][ROWS[i][2]] for i in selected]
    return {
        "lpreg_candidates": float(len(pool)),
        "lpreg_filtered_frac": len(filtered) / len(pool),
        "lpreg_selected": float(len(selected)),
        "lpreg_kept_mass": sum(m) / len(m),
        "lpreg_push": sum(1 / v - 1 for v in m) / len(m),
        "lpreg_p_y": sum(p_y) / len(p_y),
    }


@pytest.mark.parametrize("compat", ["released", "paper"])
def test_known_tail_by_hand(compat):
    hidden, W, labels, adv, mask = tiny_model()
    want = by_hand(compat)
    assert want["lpreg_candidates"] == (4.0 if compat == "paper" else 3.0) and want["lpreg_selected"] == 2.0
    assert want["lpreg_filtered_frac"] == pytest.approx(1 / want["lpreg_candidates"])
    assert want["lpreg_kept_mass"] == pytest.approx(0.995) and want["lpreg_push"] == pytest.approx(1 / 0.995 - 1)
    kw = dict(compat=compat, rho=1.0, threshold=KAPPA, backend="torch")
    logits = hidden @ W.T
    _, m1 = lpreg.lpreg_policy_loss(logits, labels, adv, None, mask, **kw)
    _, m2 = lpreg.fused_linear_policy_loss(hidden, W, labels, adv, None, mask, chunk_size=3, **kw)
    stats = lpreg.lpreg_token_stats(logits, labels, threshold=KAPPA, backend="torch")
    _, m3 = lpreg.policy_loss_from_stats(stats, adv, None, mask, compat=compat, rho=1.0)
    terms = lpreg.lpreg_regularize(torch.zeros(1, 4), stats, adv, None, mask, compat=compat, rho=1.0)
    m4 = {f"actor/{k}": float(v) for k, v in lpreg.mechanism_metrics(lpreg.mechanism_sums(terms, mask)).items()}
    for name, got in (("lpreg_policy_loss", m1), ("fused_linear_policy_loss", m2), ("policy_loss_from_stats", m3),
                      ("lpreg_regularize", m4)):
        for key, value in want.items():
            assert got[f"actor/{key}"] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, key)
    # the per-token result: the filtered row's kept mass is NaN, the others the row's kept mass
    assert terms.filtered.tolist() == [[False, True, False, False]]
    assert math.isnan(terms.kept_mass[0, 1])
    kept = [terms.kept_mass[0, i].item() for i in (0, 2, 3)]
    assert kept == pytest.approx([0.995, 0.995, 0.990], rel=1e-5)
    assert terms.p_y[0].tolist() == pytest.approx([0.095, 0.003, 0.4, 0.7], rel=1e-5)


def test_nothing_selected_reports_zeros():
    hidden, W, labels, adv, mask = tiny_model()
    _, m = lpreg.lpreg_policy_loss(hidden @ W.T, labels, adv, None, mask, rho=0.01, backend="torch")
    # released: k = int(0.01 * 3) = 0 <= 1 selects nothing
    assert {k: m[f"actor/{k}"] for k in by_hand("released")} == {
        "lpreg_candidates": 0.0, "lpreg_filtered_frac": 0.0, "lpreg_selected": 0.0, "lpreg_kept_mass": 0.0,
        "lpreg_push": 0.0, "lpreg_p_y": 0.0}


def pooled(parts):
    """The sums of several calls added (what an adapter does over micro-batches)."""
    return {key: sum(p[key] for p in parts) for key in parts[0]}


def paper_terms(batch, **kw):
    logits, labels, adv, old, mask = batch
    stats = lpreg.lpreg_token_stats(logits, labels, backend="torch")
    return lpreg.lpreg_regularize(torch.zeros_like(mask), stats, adv, old, mask, compat="paper", **kw)


def test_micro_batches_pool_to_one_call():
    """Paper form with its step-wide selection: the sums of two micro-batches are the whole batch's."""
    logits, labels, adv, _, mask = make_batch(seed=11, adv_per_token=True)
    old = lpreg.lpreg_token_stats(logits, labels, backend="torch").logp  # selection on old = current log-probs
    whole = lpreg.mechanism_sums(paper_terms((logits, labels, adv, old, mask), rho=0.8), mask)
    halves = [slice(0, 2), slice(2, None)]
    sel = lpreg.selection_threshold([old[h] for h in halves], [mask[h] for h in halves], rho=0.8)
    parts = [lpreg.mechanism_sums(paper_terms((logits[h], labels[h], adv[h], old[h], mask[h]),
                                              rho=0.8, selection_threshold=s), mask[h])
             for h, s in zip(halves, sel)]
    assert whole["selected"] > 0 and whole["filtered"] > 0
    got = pooled(parts)
    for key in ("candidates", "filtered", "selected"):
        assert torch.equal(got[key], whole[key]), key
    for key, value in lpreg.mechanism_metrics(got).items():
        torch.testing.assert_close(value, lpreg.mechanism_metrics(whole)[key], msg=key)
    # a mean of the micro-batches' means is not the pooled value: the sums are what pools
    means = [lpreg.mechanism_metrics(p)["lpreg_filtered_frac"] for p in parts]
    assert parts[0]["candidates"] != parts[1]["candidates"]
    assert not torch.allclose(sum(means) / 2, lpreg.mechanism_metrics(whole)["lpreg_filtered_frac"])


def test_released_pools_the_calls_terms():
    """Released form (per-call selection): the pooled sums equal the sums over the concatenated per-call terms."""
    logits, labels, adv, old, mask = make_batch(seed=12, adv_per_token=True)
    halves = [slice(0, 3), slice(3, None)]
    terms = []
    for h in halves:
        stats = lpreg.lpreg_token_stats(logits[h], labels[h], backend="torch")
        terms.append(lpreg.lpreg_regularize(torch.zeros_like(mask[h]), stats, adv[h], old[h], mask[h], rho=0.6))
    got = pooled([lpreg.mechanism_sums(t, mask[h]) for t, h in zip(terms, halves)])
    cat = lpreg.LossTerms(*(torch.cat(fields) for fields in zip(*terms)))
    want = lpreg.mechanism_sums(cat, mask)
    assert want["selected"] > 0
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)


# ------------------------------------------------------------------ 2 gloo ranks, spawned


def _rank_case(rank, world):
    """Each rank trains on its half of the batch with the step-wide threshold across ranks; the all-reduced
    sums must equal the single-process call over the whole batch (computed on every rank)."""
    logits, labels, adv, _, mask = make_batch(seed=13, adv_per_token=True)
    old = lpreg.lpreg_token_stats(logits, labels, backend="torch").logp
    whole = lpreg.mechanism_sums(paper_terms((logits, labels, adv, old, mask), rho=0.8), mask)
    h = slice(0, 2) if rank == 0 else slice(2, None)  # unequal halves: 2 and 4 sequences
    sel = lpreg.selection_threshold(old[h], mask[h], rho=0.8)  # the world group: exact across ranks
    mine = lpreg.mechanism_sums(paper_terms((logits[h], labels[h], adv[h], old[h], mask[h]), rho=0.8,
                                            selection_threshold=sel), mask[h])
    keys = sorted(mine)
    packed = torch.stack([mine[k] for k in keys])
    dist.all_reduce(packed)  # SUM: one collective for all six
    got = dict(zip(keys, packed))
    assert whole["selected"] > 0 and mine["selected"] < whole["selected"]
    for key in ("candidates", "filtered", "selected"):
        assert torch.equal(got[key], whole[key]), key
    for key, value in lpreg.mechanism_metrics(got).items():
        torch.testing.assert_close(value, lpreg.mechanism_metrics(whole)[key], msg=key)


def _worker(rank, store, out_dir, world):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        _rank_case(rank, world)
        result = "ok"
    except Exception:
        result = traceback.format_exc()[-3000:]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_pool_to_one_process():
    import torch.multiprocessing as mp

    out = tempfile.mkdtemp(prefix="lpreg_mech_")
    mp.spawn(_worker, args=(os.path.join(out, "store"), out, 2), nprocs=2, join=True)
    results = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    failures = [f"rank {r}:\n{res}" for r, res in enumerate(results) if res != "ok"]
    assert not failures, "\n".join(failures)
