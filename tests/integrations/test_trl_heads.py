"""Scaled and soft-capped LM heads in LpRegGRPOTrainer's fused path, and the head guard (issue 30 §4, §5).

- Each family (Gemma 2, Gemma 3, Cohere, Granite; tiny local configs, tests/integrations/tiny_lm.py): the
  guard (lpreg.integrations._head_guard.check_fused_head) passes with the transform the config
  describes and raises, naming the model class, with the identity transform (the transform matters).
- The user path: `LpRegGRPOTrainer(..., lpreg_fused=True).train()` on Gemma 2 and Cohere at lpreg_beta = 0
  equals TRL's own GRPOTrainer (whose fused head applies the soft-cap / scale itself), and at beta > 0 the
  fused path equals the logits path (the model's own logits).
- A Llama subclass that adds to a logit in forward() (no config attribute says so): training with
  lpreg_fused=True raises before the first step, naming the class; lpreg_fused=False trains.
"""

import os
import sys

import pytest

pytest.importorskip("trl", reason="trl is not installed here: run `bash .ci/integrations.sh trl` (own venv)")

import torch  # noqa: E402

from lpreg import LogitTransform, logit_transform_from_config  # noqa: E402
from lpreg.integrations._head_guard import check_fused_head  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_trl import GRAD_RTOL, LOSS_ATOL, compare, train  # noqa: E402
from tiny_lm import HEAD_FAMILIES, tiny_edited_head, tiny_family  # noqa: E402


def _ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(2, 40, (2, 10), generator=g), torch.ones(2, 10, dtype=torch.long)


@pytest.mark.parametrize("family", sorted(HEAD_FAMILIES))
def test_guard_passes_with_the_config_transform_and_catches_its_absence(family):
    model = tiny_family(family)
    transform = logit_transform_from_config(model.config)
    assert not transform.is_identity
    ids, att = _ids()
    check_fused_head(model, ids, att, transform, temperature=0.9)
    with pytest.raises(RuntimeError, match=type(model).__name__ + ".*differ.*by up to"):
        check_fused_head(model, ids, att, LogitTransform(), temperature=0.9)


def test_guard_catches_a_head_edited_in_forward():
    model = tiny_edited_head()
    ids, att = _ids()
    with pytest.raises(RuntimeError, match="EditedHeadLlama"):
        check_fused_head(model, ids, att, logit_transform_from_config(model.config), temperature=1.0)
    with pytest.raises(ValueError, match="n_tokens"):
        check_fused_head(model, ids, att, LogitTransform(), n_tokens=0)


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_fused_scaled_heads_train_as_trl(tmp_path, family):
    case = dict(loss_type="dapo", num_iterations=2, epsilon=0.02)
    ref = train({**case, "trainer": "trl"}, tmp_path, model=tiny_family(family))
    ours = train({**case, "lpreg_beta": 0.0, "lpreg_fused": True}, tmp_path, model=tiny_family(family))
    loss, grad, excess, _ = compare(ref, ours, f"beta=0 fused {family}")
    assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and excess <= 0
    lp = dict(case, lpreg_beta=1.0, lpreg_rho=0.5, lpreg_threshold=0.2, lpreg_compat="paper")
    fused = train({**lp, "lpreg_fused": True, "lpreg_chunk_size": 5}, tmp_path, model=tiny_family(family))
    unfused = train({**lp, "lpreg_fused": False}, tmp_path, model=tiny_family(family))
    loss, grad, excess, _ = compare(fused, unfused, f"beta=1 fused vs unfused {family}")
    assert loss <= LOSS_ATOL and grad <= GRAD_RTOL and excess <= 0
    assert any(h["lpreg/selected"] > 0 for h in fused["logs"])


def test_edited_head_refused_fused_and_trains_unfused(tmp_path):
    with pytest.raises(RuntimeError, match="EditedHeadLlama.*lpreg_fused=False"):
        train(dict(loss_type="dapo", lpreg_fused=True, max_steps=1), tmp_path, model=tiny_edited_head())
    run = train(dict(loss_type="dapo", lpreg_fused=False, max_steps=1), tmp_path, model=tiny_edited_head())
    assert len(run["logs"]) == 1 and run["logs"][0]["loss"] == run["logs"][0]["loss"]
