"""lpreg.experiments.mechanism: the released form's selection against the package's own count, and a probe
whose beta = 1 update is exactly the run's own next update and which leaves the run untouched."""

import copy
import json

import pytest
import torch

from lpreg import lpreg_policy_loss, lpreg_token_stats
from lpreg.experiments.mechanism import due, released_selection, summarise_probe
from lpreg.trainer.config import preset_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def test_released_selection_matches_the_package_count():
    B, T, V = 6, 9, 40
    mask = torch.ones(B, T)
    mask[1, 6:] = 0
    adv = torch.tensor([1.0, -0.5, -1.5, 0.7, -0.2, -1.0])[:, None].expand(B, T).contiguous()
    n_neg = int(((adv < 0) & (mask > 0)).sum())
    # (logit scale, rho, tokens selected): at scale 1.5 min-p filters most of the lowest-p labels, so
    # fewer than k = int(rho n_neg) are selected; rho 0.02 gives k <= 1: none
    for scale, rho, want in ((1.0, 0.1, 2), (1.0, 0.3, 6), (1.0, 0.6, 12), (1.5, 0.6, 6), (1.0, 0.02, 0)):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(B, T, V, generator=g) * scale
        labels = torch.randint(0, V, (B, T), generator=g)
        stats = lpreg_token_stats(logits, labels, backend="torch")
        sel = released_selection(stats.logp, stats.proxy_logp, adv, mask, rho)
        _, m = lpreg_policy_loss(logits, labels, adv, None, mask, compat="released", rho=rho, backend="torch")
        assert int(sel.sum()) == round(m["actor/lpreg_frac"] * int(mask.sum())) == want, (scale, rho)
        assert want <= max(int(rho * n_neg), 0)
        assert bool((adv[sel] < 0).all()) and bool((mask[sel] > 0).all())
        assert bool((stats.logp[sel] < stats.proxy_logp[sel]).all())  # y survives the proxy's filter


def test_probe_steps_and_summary():
    cfg = preset_config("test-micro", mechanism_every=20, steps=60)
    assert [s for s in range(60) if due(cfg, s)] == [0, 19, 39, 59]  # the first and every 20th (0-based)
    assert not any(due(preset_config("test-micro"), s) for s in range(5))
    out = summarise_probe({"p_before": [0.1, 0.2], "ratio_beta1": [2.0, 0.5], "ratio_beta0": [0.5, 0.5]})
    assert out["n_selected"] == 2 and out["frac_down_beta1"] == 0.5 and out["frac_down_beta0"] == 1.0
    assert out["log_ratio_beta1"] == pytest.approx(0.0) and out["p_before"] == pytest.approx(0.15)
    assert out["ratio_median"] == pytest.approx(2.5)  # r1 / r0 = 4 and 1
    out = summarise_probe({"p_before": [0.1, 0.2, 0.3], "kept_mass": [0.5, 0.9, 0.7], "ratio_beta1": [1.1, 1.0, 1.2],
                           "ratio_beta0": [1.0, 1.0, 1.0]})
    assert out["kept_mass_median"] == 0.7 and out["ratio_median"] == pytest.approx(1.1)
    with pytest.raises(ValueError, match="--mechanism-every .* --mini-batches 1"):
        preset_config("test-micro", mechanism_every=1, mini_batches=2)


@pytest.mark.slow
def test_probe_is_the_runs_own_update_at_beta_1_and_leaves_the_run_untouched(tmp_path):
    from lpreg.experiments.mechanism import probe
    from lpreg.trainer.advantage import group_advantages
    from lpreg.trainer.rollout import rollout
    from lpreg.trainer.scoring import scoring_pass
    from lpreg.trainer.setup import setup
    from lpreg.trainer.update import update

    cfg = preset_config("test-micro", output_dir=str(tmp_path), resume="none", prompts_per_step=4, lpreg_rho=0.5,
                        mechanism_every=1, token_stats_backend="torch")
    run = setup(cfg)
    try:
        plans = []
        for step in (0, 1):  # a real update first, so that the probe meets a non-empty AdamW state
            ro = rollout(run, step)
            # half of each group right: negative advantages whatever the tiny policy answers
            ro.seq_adv, _ = group_advantages([float(i % 2) for i in range(len(ro.responses))], cfg.samples_per_prompt)
            plans.append(scoring_pass(run, ro, step))
            if step == 0:
                update(run, plans[0])
        params = {k: v.clone() for k, v in run.policy.state_dict().items()}
        opt = copy.deepcopy(run.optimizer.state_dict())
        metrics = probe(run, plans[1], 1)
        for k, v in run.policy.state_dict().items():
            assert torch.equal(v, params[k]), k
        for i, s in opt["state"].items():
            assert all(torch.equal(s[n], run.optimizer.state_dict()["state"][i][n]) for n in s)
        row = json.loads((tmp_path / "mechanism.jsonl").read_text().splitlines()[-1])
        assert row["step"] == 2 and metrics["mechanism/n_selected"] == len(row["p_before"]) > 0
        # the run's own update (Lp-Reg released, beta = 1) moves the selected tokens exactly as the probe's
        update(run, plans[1])
        b = plans[1].batch
        with torch.no_grad():
            logits = run.policy(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
        stats = lpreg_token_stats(logits, b.labels, backend="torch")
        before = torch.tensor(row["p_before"], dtype=torch.float64)
        with torch.no_grad():  # the selection, recomputed from the parameters before the update
            run.policy.load_state_dict(params)
            old = lpreg_token_stats(run.policy(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1],
                                    b.labels, backend="torch")
        # the released form selects per call: per micro-batch, in the probe's order
        after = torch.cat([stats.logp[mb][released_selection(old.logp[mb], old.proxy_logp[mb], plans[1].tok_adv[mb],
                                                             b.loss_mask[mb], cfg.lpreg_rho)]
                           for mini in plans[1].micro for mb in mini]).double().exp()
        torch.testing.assert_close(after / before, torch.tensor(row["ratio_beta1"], dtype=torch.float64),
                                   rtol=1e-5, atol=0)
        # and the two updates differ on these tokens: beta = 1 lifts them relative to beta = 0
        assert metrics["mechanism/log_ratio_beta1"] > metrics["mechanism/log_ratio_beta0"]
    finally:
        run.close()


def test_summary_lines_give_the_median_ratios_of_each_probe(tmp_path):
    """The mechanism's lines of lpreg-train's end-of-run summary (the instrument's `summary` hook)."""
    from lpreg.experiments.mechanism import LOG_FILE, summary_lines
    from lpreg.trainer.instruments import INSTRUMENTS
    from lpreg.trainer.summary import format_summary

    mech = [{"step": 1, "p_before": [0.01, 0.02, 0.03], "kept_mass": [0.9, 0.8, 0.9], "ratio_beta1": [1.2, 1.1, 1.0],
             "ratio_beta0": [0.9, 0.8, 0.7]},
            {"step": 2, "p_before": [], "kept_mass": [], "ratio_beta1": [], "ratio_beta0": []}]
    lines = summary_lines(mech)
    assert len(lines) == 3 + 1 + 1  # the explanation, one line per probe that selected tokens, the pooled line
    assert "step   1:   3 tokens, median m 0.900" in lines[3]
    assert "1.100 with Lp-Reg, 0.800 without; median ratio 1.375" in lines[3]  # ratios 1.333, 1.375, 1.429
    assert "all probes: 3 tokens, median kept mass m 0.900" in lines[4] and "= 0.11" in lines[4]
    assert "median ratio 1.375, higher with Lp-Reg for 100% of tokens" in lines[4]
    assert summary_lines(mech[1:]) == []  # no probe selected anything: no lines
    assert INSTRUMENTS["mechanism"].summary is summary_lines and INSTRUMENTS["mechanism"].log_file == LOG_FILE
    (tmp_path / LOG_FILE).write_text("")
    text = format_summary([{"step": 1, "critic/score/mean": 0.5}], str(tmp_path), extra_lines=lines,
                          log_files=[LOG_FILE])
    assert text.splitlines()[-2] == lines[-1] and str(tmp_path / LOG_FILE) in text
