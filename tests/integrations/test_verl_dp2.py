"""The lpreg verl plugin at data-parallel size 2 (torchrun, 2 CPU processes, gloo, FSDP2 over both)
against one process on the same global batch (tests/integrations/verl_runs.py: verl's dispatch
halves at dp = 2; at dp = 1 the rows ordered so that every mini- and micro-batch is the same).

Cases: both forms x every loss_agg_mode the adapter accepts x on-policy (one mini-batch) and
off-policy (two mini-batches: the second trains against the rollout proxy), at beta = 1; and
lpreg at beta = 0 against verl's own vanilla loss at dp = 2 for every loss_agg_mode (token-sum
included: verl multiplies each rank's token sum by dp); use_fused_kernels=True with the tiny
model's untied LM head (its own FSDP2 unit: the head's gradient must be reduced over the ranks
by lpreg's gather, FSDP2's reduce-scatter never sees it).

Tolerances (2 ranks vs 1, or lpreg vs vanilla at dp = 2): the per-token terms are the same fp32
operations; the sums differ in order (FSDP2's reduce-scatter of the gradient over 2 ranks, the
loss's all-reduce over ranks). An fp32 sum of m terms reordered moves by <= m * eps32 * sum|terms|:
over <= 48 tokens, 48 * 6e-8 = 2.9e-6 relative, of a loss whose terms are <= ~2 (x the
seq-mean-token-sum's <= 6 tokens per row): LOSS_ATOL = 2.9e-6 * 2 * 6 ~ 3.5e-5; gradient norm,
relative: GRAD_RTOL = 2.9e-6 x 2 (two levels of sums) ~ 6e-6. For lpreg vs vanilla the two
kernels' log-prob rounding adds test_verl.py's bounds (2.3e-5 each). Parameters: the AdamW
bound of tests/integrations/tolerances.py from the runs' measured gradient differences.
Paper selection: exact (k tokens of both ranks' mini-batch).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl", reason="verl is not installed here: run `bash .ci/integrations.sh verl` (own venv)")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tolerances  # noqa: E402
import verl_runs as V  # noqa: E402
from tiny_lm import save_tiny  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
LOSS_ATOL, GRAD_RTOL = 3.5e-5, 6e-6
VS_VANILLA_ATOL, VS_VANILLA_RTOL = LOSS_ATOL + 2.3e-5, GRAD_RTOL + 2.3e-5
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

LPREG = [dict(loss_agg_mode=agg, lpreg_compat=form, mini=mini, lpreg_beta=1.0, lpreg_rho=0.5, lpreg_threshold=0.2)
         for form in ("released", "paper") for agg in AGG_MODES for mini in (V.B, 4)]
BETA0 = [dict(loss_agg_mode=agg, mini=4, lpreg_beta=0.0) for agg in AGG_MODES]
VANILLA = [dict(loss_agg_mode=agg, mini=4, loss_mode="vanilla") for agg in AGG_MODES]
SELECTION = dict(lpreg_compat="paper", lpreg_rho=0.3, micro=2, record_selection=True)  # 2 micro-batches per rank
# use_fused_kernels=True: the tiny model's LM head is untied, so verl's FSDP2 shards it as its own unit,
# whose forward never runs (lpreg gathers the weight itself): its gradient must still be reduced over ranks
FUSED = [dict(loss_agg_mode="token-mean", lpreg_compat=form, mini=4, lpreg_beta=1.0, lpreg_rho=0.5,
              lpreg_threshold=0.2, fused=True) for form in ("released", "paper")]
CASES = LPREG + BETA0 + VANILLA + FUSED + [SELECTION]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-rank runs, [rank 0 runs, rank 1 runs]) of every case."""
    out = tmp_path_factory.mktemp("dp2")
    (out / "spec.json").write_text(json.dumps(CASES))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29571",
           os.path.join(HERE, "verl_runs.py"), str(out / "spec.json"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=str(out))
    assert proc.returncode == 0, proc.stderr[-6000:]
    two = [[V.from_json(r) for r in json.load(open(out / f"rank{k}.json"))] for k in (0, 1)]
    V.init(29543)
    path = save_tiny(str(out / "tiny1"))
    one = [{**V.run(path, case), "path": path} for case in CASES[:-1]]  # the selection case: dp = 2 only
    return one, two


def compare(a, b, label):
    loss = max(abs(x["loss"] - y["loss"]) for x, y in zip(a["steps"], b["steps"]))
    grad = max(abs(x["grad_norm"] - y["grad_norm"]) / abs(x["grad_norm"]) for x, y in zip(a["steps"], b["steps"]))
    param = max((p.reshape(-1) - b["params"][k].reshape(-1)).abs().max().item() for k, p in a["params"].items())
    shaped = {k: v.reshape(-1) for k, v in a["params"].items()}
    excess = tolerances.adamw_excess(shaped, b["params"], [{k: g.reshape(-1) for k, g in s["grads"].items()}
                                                           for s in a["steps"]],
                                     [s["grads"] for s in b["steps"]], [s["grad_norm"] for s in a["steps"]],
                                     [s["grad_norm"] for s in b["steps"]], lr=V.LR)
    print(f"{label}: loss abs {loss:.2e}, grad-norm rel {grad:.2e}, param abs {param:.2e}, "
          f"AdamW-bound excess {excess:.2e}")
    tolerances.record(f"test_verl_dp2 {label}", loss_abs=loss, grad_rel=grad, param_abs=param,
                      param_bound_excess=excess)
    return loss, grad, excess


@pytest.mark.parametrize("i", range(len(LPREG)))
def test_two_ranks_equal_one_rank(runs, i):
    one, two = runs
    case = CASES[i]
    label = f"dp2 vs dp1 {case['lpreg_compat']} {case['loss_agg_mode']} mini={case['mini']}"
    for rank in two:
        loss, grad, excess = compare(one[i], rank[i], label)
        assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and excess <= 0, label
    assert one[i]["steps"][0]["metrics"]["actor/lpreg_frac"] > 0  # Lp-Reg selected tokens
    assert len(one[i]["steps"]) == (1 if case["mini"] == V.B else 2)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_beta0_equals_verl_vanilla_at_dp2(runs, agg):
    """lpreg at beta = 0 and verl's vanilla loss, both at dp = 2 (token-sum: verl's sum x dp)."""
    _, two = runs
    i, j = CASES.index(dict(loss_agg_mode=agg, mini=4, lpreg_beta=0.0)), CASES.index(
        dict(loss_agg_mode=agg, mini=4, loss_mode="vanilla"))
    loss, grad, excess = compare(two[0][j], two[0][i], f"dp2 beta=0 vs vanilla {agg}")
    assert loss <= VS_VANILLA_ATOL and grad <= VS_VANILLA_RTOL and excess <= 0
    assert abs(two[0][j]["steps"][0]["loss"]) > 1e-4


def test_paper_selection_exact_across_ranks(runs):
    """Paper form at dp = 2, two micro-batches per rank: the union over ranks and micro-batches of
    the step-wide set has exactly k = max(1, floor(rho n)) tokens, n over both ranks."""
    _, two = runs
    seen = [s for r in two for s in r[-1]["selection"]]  # per micro-batch: (k, n, in the set here, valid here)
    assert len(seen) == 4  # 2 ranks x 2 micro-batches
    n = sum(s[3] for s in seen)
    assert all(s[1] == n for s in seen) and seen[0][0] == max(1, int(0.3 * n)) == sum(s[2] for s in seen)
    assert torch.tensor([s[0] for s in seen]).unique().numel() == 1


@pytest.mark.parametrize("case", FUSED, ids=lambda c: c["lpreg_compat"])
def test_fused_kernels_untied_head_two_ranks_equal_one_rank(runs, case):
    """use_fused_kernels=True at dp = 2 against dp = 1 on the same global batch: the loss, gradient
    norm and parameters agree, and so does the untied LM head's gradient, element by element (a
    rank trained on its own half of the batch would move its head shard by that half's gradient)."""
    from transformers import AutoConfig

    one, two = runs
    i = CASES.index(case)
    assert not AutoConfig.from_pretrained(one[i]["path"]).tie_word_embeddings  # the head is its own FSDP2 unit
    label = f"dp2 vs dp1 fused {case['lpreg_compat']} mini={case['mini']}"
    for rank in two:
        loss, grad, excess = compare(one[i], rank[i], label)
        assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and excess <= 0, label
        for a, b in zip(one[i]["steps"], rank[i]["steps"]):
            g1, g2 = a["grads"]["lm_head.weight"].reshape(-1), b["grads"]["lm_head.weight"].reshape(-1)
            assert (g1 - g2).abs().max() <= GRAD_RTOL * g1.norm(), label
    assert one[i]["steps"][0]["metrics"]["actor/lpreg_frac"] > 0
