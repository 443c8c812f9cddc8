"""Lp-Reg over a base loss other than vanilla, and the pooled mechanism metrics, at data-parallel
size 2 (torchrun, 2 CPU processes, gloo, FSDP2 over both; tests/integrations/verl_runs.py as in
test_verl_dp2.py: the same global batch, the same micro-batches at dp = 1 and 2).

- SAPO (its own seq-mean-token-mean aggregation, with verl's global batch size): lpreg at beta = 0
  over lpreg_base_loss_mode=sapo against verl's own loss_mode=sapo, both at dp = 2 (vanilla at dp = 2
  is test_verl_dp2.py's test_beta0_equals_verl_vanilla_at_dp2). Tolerances: test_verl_dp2.py's
  lpreg-vs-vanilla ones (the same sums, the two kernels' log-prob rounding).
- The mechanism metrics (actor/lpreg_*), both forms, four micro-batches per optimiser step: the values
  logged at dp = 2 (verl's metric reduction over micro-batches and ranks after lpreg's pooling) equal
  the dp = 1 run's and one computation over all its micro-batches' per-token terms (relative 1e-6:
  float32 sums of <= 48 terms, pooled in float64).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl", reason="verl is not installed here: run `bash .ci/integrations.sh verl` (own venv)")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_verl_dp2 as D  # noqa: E402
import verl_runs as V  # noqa: E402
from test_verl import MECHANISM, pooled_from_terms  # noqa: E402
from tiny_lm import save_tiny  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SAPO = [dict(loss_mode="sapo", mini=4, old_logp_shift=0.5),
        dict(lpreg_base_loss_mode="sapo", lpreg_beta=0.0, mini=4, old_logp_shift=0.5)]
POOLED = [dict(mini=V.B, micro=2, lpreg_compat=form, lpreg_beta=1.0, lpreg_rho=0.5, lpreg_threshold=0.2)
          for form in ("released", "paper")]
CASES = SAPO + POOLED


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-rank runs of the pooled cases with their per-token terms, [rank 0 runs, rank 1 runs])."""
    out = tmp_path_factory.mktemp("dp2bases")
    (out / "spec.json").write_text(json.dumps(CASES))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581",
           os.path.join(HERE, "verl_runs.py"), str(out / "spec.json"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=str(out))
    assert proc.returncode == 0, proc.stderr[-6000:]
    two = [[V.from_json(r) for r in json.load(open(out / f"rank{k}.json"))] for k in (0, 1)]
    V.init(29583)
    path = save_tiny(str(out / "tiny1"))
    one = [V.run(path, {**case, "record_terms": True}) for case in POOLED]
    return one, two


def test_sapo_beta0_equals_verl_sapo_at_dp2(runs):
    _, two = runs
    for rank in two:
        loss, grad, excess = D.compare(rank[0], rank[1], "dp2 beta=0 lpreg over sapo vs verl's sapo")
        assert loss <= D.VS_VANILLA_ATOL and grad <= D.VS_VANILLA_RTOL and excess <= 0
    assert abs(two[0][0]["steps"][1]["loss"]) > 1e-5


@pytest.mark.parametrize("i", range(len(POOLED)), ids=[c["lpreg_compat"] for c in POOLED])
def test_mechanism_metrics_exact_across_two_ranks(runs, i):
    one, two = runs
    want = pooled_from_terms(one[i]["terms"])
    assert len(one[i]["terms"]) == 4 and want["actor/lpreg_selected"] >= 2
    for run in (one[i], two[0][len(SAPO) + i], two[1][len(SAPO) + i]):
        logged = run["steps"][0]["metrics"]
        for k in MECHANISM:
            assert logged[k] == pytest.approx(want[k], rel=1e-6, abs=1e-7), (k, logged[k], want[k])
