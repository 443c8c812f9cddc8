"""LpRegGRPOTrainer on 2 CPU processes (gloo) under FSDP2 and DeepSpeed ZeRO-3, against 1 process.

Each sharded run (`accelerate launch` of tests/integrations/trl_runs.py) trains every case below
for 2 optimiser steps; the same cases run here in one process on the same global batch
(trl_runs.py: deterministic generation, no per-process shuffle). The cases cover both forms,
the four PPO-clip loss types, CISPO, SAPO, LUSPO with sequence ratios, TRL's options,
on- and off-policy (num_iterations = 2: the second step
trains on the first step's completions against the rollout proxy), the fused path (which
gathers the sharded LM head) and the logits path.

Tolerances (2 ranks vs 1 rank, same micro-batches): the per-token terms are the same fp32
operations on the same rows; what differs is the order of the sums (the gradient reduction
over ranks, and FSDP2 / ZeRO-3's fp32 reduce-scatter against one process's accumulation).
Gradient: an fp32 sum of m terms in another order moves each element by at most
~m * eps32 * sum|terms|; over <= 96 tokens with per-token gradients of size ~|g| that is
~96 * 6e-8 = 6e-6 relative to the gradient norm: GRAD_RTOL = 1e-5 (seen: <= 2e-7).
Loss: the same sums of <= 96 terms of size <= ~2: LOSS_ATOL = 96 * 2 * 6e-8 ~ 1.2e-5 (seen:
<= 4e-9). Parameters after the SGD steps: theta_T - theta'_T = -lr sum_t (g_t - g'_t) exactly,
so the bound is lr * sum_t max|g_t - g'_t| from the two runs' own gradients (measured), plus
the rounding of two fp32 updates of a parameter of size <= ~40: + T * 2 * 40 * 6e-8.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl", reason="trl is not installed here: run `bash .ci/integrations.sh trl` (own venv)")


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tolerances  # noqa: E402
import trl_runs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
GRAD_RTOL, LOSS_ATOL = 1e-5, 1.2e-5

COMMON = dict(lpreg_beta=1.0, lpreg_rho=0.3, lpreg_threshold=0.2, epsilon=0.02)
# every loss_type x form x on/off-policy; the fused path (the gathered head) for (released, on-policy) and
# (paper, off-policy), the logits path for the other two, so each backend sees both forms and both policies
CASES = [dict(loss_type=lt, lpreg_compat=form, num_iterations=it, lpreg_fused=(form == "released") == (it == 1),
              **COMMON)
         for lt in ("dapo", "bnpo", "grpo", "dr_grpo") for form in ("released", "paper") for it in (1, 2)]
# TRL's other objectives (issue 30), off-policy: the released swap over CISPO and SAPO, the paper form over a
# sequence-ratio objective (GSPO's sequence ratio with luspo), and TRL's options composed (reference KL, delta;
# the logits path, so FSDP2 only)
CASES += [dict(COMMON, loss_type="cispo", lpreg_compat="released", num_iterations=2, lpreg_fused=True,
               epsilon_high=1.01),
          dict(COMMON, loss_type="sapo", lpreg_compat="released", num_iterations=2, lpreg_fused=False),
          dict(COMMON, loss_type="luspo", importance_sampling_level="sequence", lpreg_compat="paper", num_iterations=2,
               lpreg_fused=True),
          dict(COMMON, loss_type="dapo", lpreg_compat="released", num_iterations=2, lpreg_fused=False, beta=0.04,
               delta=1.05)]
# ZeRO-3 is slower to start on CPU: the fused cases (every loss_type, both forms, on- and off-policy)
ZERO3_CASES = [c for c in CASES if c["lpreg_fused"]]
# the mechanism metrics, pooled exactly: 2 ranks x 2 micro-batches log what 1 rank x 4 micro-batches logs
MECHANISM = ("lpreg/candidates", "lpreg/filtered_frac", "lpreg/selected", "lpreg/kept_mass", "lpreg/push",
             "lpreg/p_y", "lpreg/frac", "lpreg/kl", "lpreg/threshold")
# paper form, one step, 2 micro-batches per rank: the step-wide selection recorded per micro-batch
SELECTION_CASE = dict(loss_type="dapo", lpreg_compat="paper", lpreg_rho=0.3, lpreg_threshold=0.2, max_steps=1,
                      record_selection=True)

FSDP2_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
"""
ZERO3_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: 'no'
deepspeed_config:
  zero_stage: 3
  zero3_init_flag: false
  offload_optimizer_device: none
  offload_param_device: none
"""


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """Every case in this process (world size 1)."""
    trl_runs.no_shuffle()
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    out = tmp_path_factory.mktemp("one")
    return [trl_runs.train(c, out / f"case{i}", world=1) for i, c in enumerate(CASES)]


def launch(tmp_path, yaml_text, cases, port):
    (tmp_path / "accelerate.yaml").write_text(yaml_text)
    (tmp_path / "spec.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
           str(tmp_path / "accelerate.yaml"), "--main_process_port", str(port), os.path.join(HERE, "trl_runs.py"),
           str(tmp_path / "spec.json"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [[trl_runs.from_json(r) for r in json.load(open(tmp_path / f"rank{k}.json"))] for k in (0, 1)]


def compare(one, two, label):
    """Max |loss diff|, max relative grad-norm diff, max |param diff| and its excess over the SGD
    bound of tests/integrations/tolerances.py (<= 0 passes)."""
    la, lb = one["logs"], two["logs"]
    assert len(la) == len(lb) == 2, (label, la, lb)
    loss = max(abs(x["loss"] - y["loss"]) for x, y in zip(la, lb))
    grad = max(abs(x["grad_norm"] - y["grad_norm"]) / abs(x["grad_norm"]) for x, y in zip(la, lb))
    shaped = {k: v.reshape(-1) for k, v in one["params"].items()}
    param = max((p - two["params"][k]).abs().max().item() for k, p in shaped.items())
    grads = [{k: g.reshape(-1) for k, g in step.items()} for step in one["grads"]]
    excess = tolerances.sgd_excess(shaped, two["params"], grads, two["grads"], lr=0.1)
    print(f"{label}: loss abs {loss:.2e}, grad-norm rel {grad:.2e}, param abs {param:.2e} "
          f"(excess over the SGD bound {excess:.2e})")
    tolerances.record(f"test_trl_multirank {label}", loss_abs=loss, loss_tol=LOSS_ATOL, grad_rel=grad,
                      grad_tol=GRAD_RTOL, param_abs=param, param_bound_excess=excess)
    return loss, grad, param, excess


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("fsdp2"), FSDP2_YAML, CASES + [SELECTION_CASE], 29561)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="ZeRO-3 needs deepspeed, which lpreg[trl] does not bring: "
                                            "pip install 'lpreg[trl,deepspeed]'")
    return launch(tmp_path_factory.mktemp("zero3"), ZERO3_YAML, ZERO3_CASES, 29563)


@pytest.mark.parametrize("backend", ["fsdp2", "zero3"])
def test_two_ranks_equal_one_rank(request, one_rank, backend):
    cases = CASES if backend == "fsdp2" else ZERO3_CASES
    ranks = request.getfixturevalue(backend)
    for i, case in enumerate(cases):
        ref = one_rank[CASES.index(case)]
        label = f"{backend} {case['loss_type']} {case['lpreg_compat']} it={case['num_iterations']} " \
                f"fused={case['lpreg_fused']}"
        for r in ranks:  # both ranks log the same reduced values and hold the same full parameters
            loss, grad, param, excess = compare(ref, r[i], label)
            assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and excess <= 0, label
            for a, b in zip(ref["logs"], r[i]["logs"]):  # exact pools: the same global batch, split differently
                for k in MECHANISM:
                    assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), (label, k, a[k], b[k])
        assert all(h["lpreg/frac"] > 0 for h in ref["logs"]), label  # Lp-Reg selected tokens
        if case["num_iterations"] == 2 and case["loss_type"] in ("dapo", "bnpo", "grpo", "dr_grpo", "luspo"):
            # off-policy: the second step trains on the first step's rollout (TRL logs clip ratios for these)
            assert ref["logs"][1]["clip_ratio/region_mean"] > 0, label
    if backend == "zero3":  # the head was gathered (forward and backward), as TRL gathers it
        assert all(run["gathers"] > 0 for r in ranks for run in r)


def test_paper_selection_exact_across_ranks(fsdp2):
    """Paper form, 2 ranks x 2 micro-batches: the step threshold selects exactly k = max(1,
    floor(rho n)) tokens of the global generation batch (n: its valid tokens on both ranks)."""
    seen = [s for r in fsdp2 for s in r[-1]["selection"]]  # per micro-batch: (k, in the set here, valid, n)
    assert len(seen) == 4
    n = sum(s[2] for s in seen)
    assert all(s[3] == n for s in seen) and all(s[0] == max(1, int(0.3 * n)) for s in seen)
    assert sum(s[1] for s in seen) == seen[0][0]
