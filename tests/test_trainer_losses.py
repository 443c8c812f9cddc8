"""Trainer losses vs straightforward float64 re-implementations, and micro-batch exactness."""

import pytest
import torch

from lpreg.selection import selection_threshold
from lpreg.trainer.config import preset_config
from lpreg.trainer.losses import (
    method_loss,
    scatter_selection,
    select_tokens,
    summarise_loss_metrics,
)

B, T, V = 3, 7, 11


def _inputs(seed=0, peaked=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * (3.0 if peaked else 1.0)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 5:] = 0
    mask[2, :2] = 0
    labels = torch.where(mask > 0, labels, torch.full_like(labels, -100))
    adv = torch.tensor([1.5, -0.7, -1.2])[:, None].expand(B, T) * mask
    # old log-probs away from the current ones, so that the ratio clip engages
    old = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    old = (old + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() * mask
    return logits, labels, adv.contiguous(), old, mask


def _ref_stats(logits, labels):
    lp_all = torch.log_softmax(logits.double(), -1)
    logp = lp_all.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    entropy = -(lp_all.exp() * lp_all).sum(-1)
    return logp, entropy


def _ref_loss(name, logits, labels, adv, old, mask, cfg, sel):
    """The per-token formulas written out in float64, summed over valid tokens."""
    logp, ent = _ref_stats(logits, labels)
    adv, old, mask, sel = adv.double(), old.double(), mask.double(), sel.double()
    r = torch.exp(logp - old)
    hi = cfg.clip_high_dapo if name in ("clip_higher", "80_20") else cfg.clip_high
    ppo = torch.maximum(-adv * r, -adv * r.clamp(1 - cfg.clip_low, 1 + hi))
    if name in ("grpo", "clip_higher"):
        per = ppo
    elif name == "entropy_bonus":
        per = ppo - cfg.entropy_coef * ent
    elif name == "80_20":
        per = ppo * sel
    elif name == "kl_cov":
        per = -adv * r + cfg.kl_cov_coef * (logp - old).abs() * sel
    else:  # clip_cov
        per = ppo * (1 - sel)
    return (per * mask).sum()


def _ref_selection(name, logits, labels, adv, mask, cfg):
    logp, ent = _ref_stats(logits, labels)
    valid = mask > 0
    n = int(valid.sum())
    out = torch.zeros(B, T, dtype=torch.bool)
    flat_idx = torch.nonzero(valid.reshape(-1)).reshape(-1)
    if name == "80_20":
        assert cfg.top_entropy_frac == 0.2
        k = -(-n // 5)  # ceil(0.2 n): the authors' top-20% of the step's tokens
        vals = ent.reshape(-1)[flat_idx]
    elif name == "kl_cov":
        k = max(1, int(n * cfg.kl_cov_ratio))
        a, lp = adv.double().reshape(-1)[flat_idx], logp.reshape(-1)[flat_idx]
        vals = (a - a.mean()) * (lp - lp.mean())
    else:
        return None
    top = sorted(range(n), key=lambda i: -float(vals[i]))[:k]
    out.view(-1)[flat_idx[top]] = True
    return out


@pytest.mark.parametrize("name", ["grpo", "clip_higher", "entropy_bonus", "80_20", "kl_cov"])
def test_baseline_matches_float64_reference(name):
    cfg = preset_config("test-micro", loss=name, top_entropy_frac=0.2, kl_cov_ratio=0.1, token_stats_backend="torch")
    logits, labels, adv, old, mask = _inputs()
    sel = _ref_selection(name, logits, labels, adv, mask, cfg)
    x = logits.clone().requires_grad_(True)
    loss, sums = method_loss(name, x, labels, adv, old, mask, cfg)
    loss.backward()
    xr = logits.double().requires_grad_(True)
    ref = _ref_loss(name, xr, labels, adv, old, mask, cfg, sel if sel is not None else torch.zeros(B, T))
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-4)
    if sel is not None:
        assert int(sums["actor/selected_frac"]) == int(sel.sum()) > 0
    # ratio clip engaged (the old log-probs were perturbed), so the test exercised it
    assert sums["actor/pg_clipfrac"] > 0


def test_clip_cov_zeroes_a_random_draw_from_the_band():
    cfg = preset_config("test-micro", loss="clip_cov", clip_cov_ratio=0.2, clip_cov_lb=0.0, clip_cov_ub=50.0,
                        token_stats_backend="torch")
    logits, labels, adv, old, mask = _inputs(seed=3)
    valid = mask > 0
    logp, ent = _ref_stats(logits, labels)
    a, lp = adv[valid].double(), logp[valid]
    cov = (a - a.mean()) * (lp - lp.mean())
    band = (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
    flat = select_tokens("clip_cov", logp[valid].float(), ent[valid].float(), adv[valid], cfg,
                         generator=torch.Generator().manual_seed(0))
    n = int(valid.sum())
    assert int(flat.sum()) == min(max(1, int(n * cfg.clip_cov_ratio)), int(band.sum())) > 1
    assert bool((flat <= band).all())  # every zeroed token lies in the covariance band
    sel = scatter_selection(flat, [mask])[0]
    x = logits.clone().requires_grad_(True)
    loss, _ = method_loss("clip_cov", x, labels, adv, old, mask, cfg, selected=sel)
    loss.backward()
    xr = logits.double().requires_grad_(True)
    ref = _ref_loss("clip_cov", xr, labels, adv, old, mask, cfg, sel)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-5, rtol=1e-4)
    # the zeroed tokens get no gradient at all
    assert float(x.grad[sel].abs().sum()) == 0.0


def test_scatter_selection_round_trip():
    masks = [torch.tensor([[1.0, 0, 1], [0, 1, 1]]), torch.tensor([[0.0, 1, 0]])]
    flat = torch.tensor([True, False, False, True, True])
    out = scatter_selection(flat, masks)
    assert out[0].tolist() == [[True, False, False], [False, False, True]]
    assert out[1].tolist() == [[False, True, False]]
    with pytest.raises(ValueError, match="flat_sel"):
        scatter_selection(flat[:4], masks)


@pytest.mark.parametrize("name", ["lpreg", "80_20", "kl_cov", "entropy_bonus"])
def test_micro_batches_sum_to_the_whole_step(name):
    """Splitting the step into micro-batches, with the step-wide choice fixed once, gives the
    same loss sum and gradient as one pass over the whole step."""
    # the paper form: its rho-percentile is step-wide (the released form's is per call, as in its code)
    cfg = preset_config("test-micro", loss=name, lpreg_rho=0.5, top_entropy_frac=0.3, kl_cov_ratio=0.1,
                        lpreg_compat="paper", token_stats_backend="torch")
    logits, labels, adv, _old, mask = _inputs(seed=5, peaked=False)  # flat rows: low-p tokens survive min-p
    x = logits.clone().requires_grad_(True)
    whole, whole_sums = method_loss(name, x, labels, adv, None, mask, cfg)
    whole.backward()
    parts = [slice(0, 1), slice(1, 3)]
    y = logits.clone().requires_grad_(True)
    with torch.no_grad():
        from lpreg.token_stats import lpreg_token_stats

        st = [lpreg_token_stats(logits[p], labels[p], backend="torch") for p in parts]
    masks = [mask[p] for p in parts]
    thresholds, chosen = [None, None], [None, None]
    if name == "lpreg":
        thresholds = selection_threshold([s.logp for s in st], masks, rho=cfg.lpreg_rho)
    elif name != "entropy_bonus":
        cat = lambda ts: torch.cat([t[m > 0] for t, m in zip(ts, masks)])  # noqa: E731
        flat = select_tokens(name, cat([s.logp for s in st]), cat([s.entropy for s in st]),
                             cat([adv[p] for p in parts]), cfg)
        chosen = scatter_selection(flat, masks)
    total, sums = 0.0, {}
    for i, p in enumerate(parts):
        loss, s = method_loss(name, y[p], labels[p], adv[p], None, mask[p], cfg, selected=chosen[i],
                              lpreg_threshold=thresholds[i])
        loss.backward()
        total += loss.item()
        sums = {k: sums.get(k, 0.0) + float(v) for k, v in s.items()}
    assert abs(total - whole.item()) <= 1e-5 * max(1.0, abs(whole.item()))
    torch.testing.assert_close(y.grad, x.grad, atol=1e-6, rtol=1e-5)
    n = int(mask.sum())
    a = summarise_loss_metrics({k: float(v) for k, v in whole_sums.items()}, n)
    b = summarise_loss_metrics(sums, n)
    for key in ("actor/pg_loss", "actor/entropy", "actor/lpreg_frac", "actor/lpreg_kl"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7)
    if name == "lpreg":
        assert b["actor/lpreg_frac"] > 0  # negative-advantage rows hold low-probability tokens


def test_lpreg_sum_is_token_mean_times_count():
    from lpreg.policy_loss import lpreg_policy_loss

    cfg = preset_config("test-micro", loss="lpreg", lpreg_rho=0.2, token_stats_backend="torch")
    assert cfg.lpreg_compat == "released"  # the trainer's default form (issue 10 item 1)
    logits, labels, adv, old, mask = _inputs(seed=7)
    loss, _ = method_loss("lpreg", logits, labels, adv, old, mask, cfg)
    ref, _ = lpreg_policy_loss(logits, labels, adv, old, mask, compat="released", rho=0.2, backend="torch")
    assert loss.item() == pytest.approx(ref.item() * float(mask.sum()), rel=1e-6)


def test_unknown_loss_is_an_error():
    cfg = preset_config("test-micro", token_stats_backend="torch")
    logits, labels, adv, old, mask = _inputs()
    with pytest.raises(ValueError, match="bogus"):
        method_loss("bogus", logits, labels, adv, old, mask, cfg)


def test_a_new_loss_is_one_function_and_one_entry(monkeypatch):
    """Issue 18 item 3: the config, the update (method_loss), the step-wide choice and compare read
    one table. A baseline registered there is a --loss choice, trains, and is a compare arm."""
    from lpreg.experiments.compare import arm_flags
    from lpreg.train import main
    from lpreg.trainer.losses import LOSSES, Loss

    def terms(t, cfg):  # GRPO's surrogate minus 0.01 H per token
        return t.pg - 0.01 * t.entropy

    monkeypatch.setitem(LOSSES, "my_bonus", Loss("my bonus", terms=terms))
    cfg = preset_config("test-micro", loss="my_bonus", token_stats_backend="torch")
    assert cfg.loss == "my_bonus" and cfg.mini_batches == 1 and arm_flags("my_bonus") == ["--loss", "my_bonus"]
    logits, labels, adv, old, mask = _inputs(seed=2)
    loss, sums = method_loss("my_bonus", logits, labels, adv, old, mask, cfg)
    ref = _ref_loss("entropy_bonus", logits, labels, adv, old, mask, preset_config("test-micro", entropy_coef=0.01),
                    torch.zeros(B, T))
    assert abs(loss.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    assert float(sums["actor/selected_frac"]) == 0.0  # it makes no step-wide choice
    # an off-policy entry gets the published 8 updates per rollout (cpu-tiny: 16 prompts)
    monkeypatch.setitem(LOSSES, "my_off", Loss("my off-policy", terms=terms, off_policy=True))
    assert preset_config("cpu-tiny", loss="my_off").mini_batches == 8
    with pytest.raises(SystemExit, match="my_other"):
        main(["--preset", "test-micro", "--loss", "my_other"])


def test_lpreg_mechanism_metrics_pool_exactly_over_micro_batches():
    """The trainer's step metrics carry Lp-Reg's mechanism (issue 31): over two micro-batches, the
    counts add and the means are over all selected tokens (each call's mean weighted by its count), not
    a mean of the calls' means."""
    from lpreg.policy_loss import lpreg_policy_loss

    cfg = preset_config("test-micro", loss="lpreg", lpreg_rho=0.5, lpreg_threshold=0.001,
                        token_stats_backend="torch")
    logits, labels, adv, old, mask = _inputs(seed=2)  # both calls select; one filters a candidate
    halves = [slice(0, 2), slice(2, 3)]
    sums, calls = {}, []
    for sl in halves:
        _, s = method_loss("lpreg", logits[sl], labels[sl], adv[sl], old[sl], mask[sl], cfg)
        for k, v in s.items():
            sums[k] = sums.get(k, 0.0) + v
        _, m = lpreg_policy_loss(logits[sl], labels[sl], adv[sl], old[sl], mask[sl], compat="released", rho=0.5,
                                 threshold=0.001, backend="torch")
        calls.append(m)
    out = summarise_loss_metrics(sums, int(mask.sum()))
    sel = [m["actor/lpreg_selected"] for m in calls]
    cand = [m["actor/lpreg_candidates"] for m in calls]
    assert all(s > 0 for s in sel) and all(c > 0 for c in cand)
    assert calls[0]["actor/lpreg_filtered_frac"] != calls[1]["actor/lpreg_filtered_frac"]
    assert out["actor/lpreg_selected"] == pytest.approx(sum(sel))
    assert out["actor/lpreg_candidates"] == pytest.approx(sum(cand))
    assert out["actor/lpreg_filtered_frac"] == pytest.approx(
        sum(m["actor/lpreg_filtered_frac"] * c for m, c in zip(calls, cand)) / sum(cand), rel=1e-6)
    for key in ("actor/lpreg_kept_mass", "actor/lpreg_push", "actor/lpreg_p_y"):
        assert out[key] == pytest.approx(sum(m[key] * s for m, s in zip(calls, sel)) / sum(sel), rel=1e-6), key
    assert 0 < out["actor/lpreg_kept_mass"] <= 1 and out["actor/lpreg_push"] >= 0
