"""A checkpoint is the policy (issue 28): a registered output transform is saved with the weights and
restored by `lpreg-eval`, `--model` and resume; its code is imported only when a checkpoint names it; an
unknown one is a clear error; and `lpreg-eval --checkpoint` repeats a run's last held-out evaluation exactly.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lpreg.trainer import output_transform as ot
from lpreg.trainer.model import build_tiny_model, load_policy
from lpreg.trainer.tokenizer import build_char_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py
ROOT = os.path.join(os.path.dirname(__file__), "..")


def _halve(model, factor: float = 0.5) -> None:
    """A test transform: the LM head's logits times `factor` (a hotter policy)."""
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: out * factor)


@pytest.fixture
def scaled():
    ot.register_output_transform("test_scale", _halve)
    yield "test_scale"
    ot.TRANSFORMS.pop("test_scale", None)


def _tiny(seed=0):
    tok = build_char_tokenizer()
    return build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, seed=seed), tok


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits


def test_the_transform_is_saved_with_the_weights_and_restored_by_load_policy(tmp_path, scaled):
    model, tok = _tiny()
    plain = _logits(model)
    ot.apply_output_transform(model, "test_scale:factor=0.25")
    torch.testing.assert_close(_logits(model), plain * 0.25)
    assert model.config.lpreg_output_transform == {"name": "test_scale", "module": __name__,
                                                   "params": {"factor": 0.25}}
    ot.apply_output_transform(model, "test_scale:factor=0.25")  # the same one again: a no-op, not applied twice
    torch.testing.assert_close(_logits(model), plain * 0.25)
    with pytest.raises(ValueError, match="already has the output transform 'test_scale'"):
        ot.apply_output_transform(model, "test_scale:factor=0.5")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    again, _ = load_policy(str(tmp_path / "m"))  # what lpreg-eval --model and lpreg-train --model do
    torch.testing.assert_close(_logits(again), plain * 0.25)


def test_resume_restores_the_checkpoints_transform_and_refuses_another(tmp_path, scaled):
    from lpreg.trainer.setup import load_checkpoint_weights

    model, tok = _tiny()
    ot.apply_output_transform(model, "test_scale:factor=0.25")
    model.save_pretrained(tmp_path / "m")
    fresh, _ = _tiny(seed=1)  # a run that names no transform resumes the checkpoint's policy
    load_checkpoint_weights(fresh, str(tmp_path / "m"), source="--resume")
    torch.testing.assert_close(_logits(fresh), _logits(model))
    other, _ = _tiny(seed=1)
    ot.apply_output_transform(other, "test_scale:factor=0.5")
    with pytest.raises(ValueError, match="--resume .* records the output transform .*test_scale.*0.25"):
        load_checkpoint_weights(other, str(tmp_path / "m"), source="--resume")
    plain, _ = _tiny()
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="records the output transform None"):
        load_checkpoint_weights(other, str(tmp_path / "plain"), source="--resume")


def _with_entry(tmp_path, entry):
    model, tok = _tiny()
    model.config.lpreg_output_transform = entry
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    return str(tmp_path / "m")


@pytest.mark.parametrize("entry, message", [
    ({"name": "no_such", "params": {}}, r"unknown output transform 'no_such'; registered"),
    ({"name": "no_such", "module": "lpreg.no_such_module", "params": {}},
     r"'no_such', defined in 'lpreg.no_such_module', which cannot be imported"),
    ({"name": "no_such", "module": "lpreg.trainer.stats", "params": {}},
     r"unknown output transform 'no_such' \(module 'lpreg.trainer.stats' did not register it\)"),
    ({"name": "no_such", "module": "os", "params": {}},
     r"'no_such' from module 'os', which is not registered; lpreg imports only its own modules"),
])
def test_a_checkpoint_naming_an_unknown_transform_is_a_clear_error(tmp_path, entry, message):
    path = _with_entry(tmp_path, entry)
    with pytest.raises(ValueError, match=message) as exc:
        load_policy(path)
    assert repr(path) in str(exc.value)  # and it names the checkpoint


def test_the_code_of_a_transform_is_imported_only_when_a_checkpoint_names_it(tmp_path):
    """In a fresh process nothing registers the floor; loading a checkpoint that names it imports its module
    (lpreg.experiments.output_floor), and the policy's output is the floored one."""
    path = _with_entry(tmp_path, {"name": "output_floor", "module": "lpreg.experiments.output_floor",
                                  "params": {"floor": 0.5}})
    code = ("import sys, torch\n"
            "from lpreg.trainer.model import load_policy\n"
            "assert 'lpreg.experiments' not in sys.modules\n"
            f"model, tok = load_policy({path!r})\n"
            "assert 'lpreg.experiments.output_floor' in sys.modules\n"
            "p = model(input_ids=torch.tensor([[5, 6, 7]])).logits[0, -1].exp()\n"
            "print(float(p.min() * len(tok)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip()) >= 0.5 * (1 - 1e-4)  # every token keeps at least floor / V


def test_parse_spec():
    assert ot.parse_spec("a") == ("a", {})
    assert ot.parse_spec("a:x=0.25,y=3,z=true,w=text") == ("a", {"x": 0.25, "y": 3, "z": True, "w": "text"})
    for bad in ("", ":x=1", "a:x", "a:1x=2"):
        with pytest.raises(ValueError, match="--output-transform must be NAME or NAME:key=value"):
            ot.parse_spec(bad)


def test_lpreg_eval_of_a_saved_run_reproduces_its_last_evaluation_exactly(tmp_path):
    """A tiny run with an output transform (the floor); `lpreg-eval --checkpoint` of its last checkpoint
    gives the run's own last held-out evaluation: every metric and every problem's correct count. The same
    weights without the transform sample other completions: the transform is part of the policy."""
    import lpreg.experiments  # noqa: F401  (the floor transform; lpreg-train would load it lazily)
    from lpreg.trainer.config import preset_config
    from lpreg.trainer.evaluate import run as lpreg_eval
    from lpreg.trainer.loop import train

    out = tmp_path / "run"
    train(preset_config("test-micro", output_dir=str(out), resume="none", steps=2, max_operand=9, eval_every=2,
                        eval_start=True, eval_problems=12, eval_k=4, warmup_steps=60,
                        output_transform="output_floor:floor=0.2"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    held_out = [json.loads(x) for x in (out / "held_out.jsonl").read_text().splitlines()]
    assert [h["step"] for h in held_out] == [0, 2] and len(held_out[-1]["correct"]) == 12
    ckpt = out / "checkpoints" / "step_000002"
    got = lpreg_eval(["--checkpoint", str(ckpt), "--output", str(tmp_path / "eval.json")])
    last = rows[-1]
    assert {k: got[k[5:]] for k in last if k.startswith("eval/")} == {k: v for k, v in last.items()
                                                                      if k.startswith("eval/")}
    records = json.loads((tmp_path / "eval.json").read_text())["records"]
    assert [int(sum(r["rewards"])) for r in records] == held_out[-1]["correct"]
    # the same weights, the transform removed from the checkpoint's config: another policy
    plain = tmp_path / "plain"
    shutil.copytree(ckpt, plain)
    config = json.loads((plain / "model" / "config.json").read_text())
    assert config.pop("lpreg_output_transform")["name"] == "output_floor"
    (plain / "model" / "config.json").write_text(json.dumps(config))
    lpreg_eval(["--checkpoint", str(plain), "--output", str(tmp_path / "plain.json")])
    other = json.loads((tmp_path / "plain.json").read_text())["records"]
    assert [r["completions"] for r in other] != [r["completions"] for r in records]
