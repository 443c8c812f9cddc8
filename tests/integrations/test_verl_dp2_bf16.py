"""The fused LM head under verl's default mixed-precision policy (param_dtype bf16, reduce_dtype fp32)
at data-parallel size 2 (torchrun, 2 CPU processes, gloo, FSDP2) against one process on the same
global batch (tests/integrations/verl_runs.py, as test_verl_dp2.py), use_fused_kernels=True with the
tiny model's untied head (its own FSDP2 unit, gathered by lpreg): the head's matmul runs in bf16
(the gathered weight's dtype is checked), its gradient is still reduced over the ranks.

Tolerances (bf16, unit roundoff u = 2^-8): each rank's bf16 weight gradient is rounded once from
its half of the batch and the two are averaged in fp32, against one rounding of the whole batch's
gradient at dp = 1: elementwise the two differ by <= 2u of the gradient's scale, so the head's
gradient and the gradient norm agree to GRAD_RTOL = 4u (normwise, relative), twice that bound. The
first step's loss sees the same bf16 forward of the same rows on both (only the loss's fp32
all-reduce order differs); the second step's forward runs on parameters one AdamW step apart by
those gradient differences: LOSS_ATOL = 4u x the loss's scale (<= 2).
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("verl", reason="verl is not installed here: run `bash .ci/integrations.sh verl` (own venv)")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import verl_runs as V  # noqa: E402
from tiny_lm import save_tiny  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
U = 2.0 ** -8
GRAD_RTOL, LOSS_ATOL = 4 * U, 4 * U * 2
CASES = [dict(loss_agg_mode="token-mean", lpreg_compat=form, mini=4, lpreg_beta=1.0, lpreg_rho=0.5,
              lpreg_threshold=0.2, fused=True, param_dtype="bf16") for form in ("released", "paper")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp2bf16")
    (out / "spec.json").write_text(json.dumps(CASES))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29577",
           os.path.join(HERE, "verl_runs.py"), str(out / "spec.json"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=str(out))
    assert proc.returncode == 0, proc.stderr[-6000:]
    two = [[V.from_json(r) for r in json.load(open(out / f"rank{k}.json"))] for k in (0, 1)]
    V.init(29545)
    path = save_tiny(str(out / "tiny1"))
    import lpreg.integrations._verl_engine as engine_module

    seen, real = [], engine_module.fused_linear_token_stats

    def spy(hidden, weight, *args, **kwargs):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *args, **kwargs)

    engine_module.fused_linear_token_stats = spy
    try:
        one = [V.run(path, case) for case in CASES]
    finally:
        engine_module.fused_linear_token_stats = real
    return one, two, seen


def test_fused_head_runs_in_the_policy_compute_dtype(runs):
    _, _, seen = runs
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen), seen


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c["lpreg_compat"] for c in CASES])
def test_bf16_fused_head_two_ranks_equal_one_rank(runs, i):
    one, two, _ = runs
    for rank in two:
        for a, b in zip(one[i]["steps"], rank[i]["steps"]):
            assert abs(a["loss"] - b["loss"]) <= LOSS_ATOL, (a["loss"], b["loss"])
            assert abs(a["grad_norm"] - b["grad_norm"]) <= GRAD_RTOL * abs(a["grad_norm"])
            g1, g2 = a["grads"]["lm_head.weight"].reshape(-1), b["grads"]["lm_head.weight"].reshape(-1)
            print(f"{CASES[i]['lpreg_compat']}: loss {abs(a['loss'] - b['loss']):.1e}, head grad rel "
                  f"{((g1 - g2).norm() / g1.norm()).item():.1e}")
            # a rank trained on its own half would differ by O(1) relative
            assert (g1 - g2).norm() <= GRAD_RTOL * g1.norm()
    assert one[i]["steps"][0]["metrics"]["actor/lpreg_frac"] > 0
    assert len(one[i]["steps"]) == 2
