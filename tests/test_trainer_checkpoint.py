"""Checkpoints: atomic round trip, resume resolution, metrics truncation, and kill-then-resume."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from lpreg.trainer import checkpoint as ckpt
from lpreg.trainer.config import preset_config
from lpreg.trainer.logging_utils import MetricsLog, read_metrics


@pytest.fixture()
def tiny():
    from lpreg.trainer.model import build_tiny_model
    from lpreg.trainer.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    return build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, seed=0), tok


def test_checkpoint_round_trip(tmp_path, tiny):
    from lpreg.train import load_weights

    model, tok = tiny
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    model(input_ids=torch.tensor([[5, 6, 7]])).logits.sum().backward()
    opt.step()
    sched.step()
    cfg = preset_config("test-micro", lr=0.123)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = ckpt.save_checkpoint(str(tmp_path), 7, model=model, tokenizer=tok, optimizer=opt, scheduler=sched,
                                data_position=14, config=cfg)
    expect = (random.random(), np.random.rand(), torch.rand(1).item())  # the stream after the save
    assert os.path.basename(path) == "step_000007" and os.path.isfile(os.path.join(path, ckpt.MARKER))
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if ".tmp-" in n]

    from lpreg.trainer.model import build_tiny_model

    other = build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    model_dir, state = ckpt.load_checkpoint(path)
    load_weights(other, model_dir)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    opt2 = torch.optim.AdamW(other.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    sa, sb = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert state["scheduler"]["last_epoch"] == 1 and state["step"] == 7 and state["data_position"] == 14
    assert state["config"]["lr"] == 0.123
    ckpt.restore_rng(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_incomplete_checkpoints_are_ignored_and_pruned(tmp_path, tiny):
    model, tok = tiny
    opt = torch.optim.AdamW(model.parameters())
    cfg = preset_config("test-micro")
    for step in (1, 2, 3):
        ckpt.save_checkpoint(str(tmp_path), step, model=model, tokenizer=None, optimizer=opt, scheduler=None,
                             data_position=step, config=cfg, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(os.listdir(root)) == ["step_000002", "step_000003"]
    # a crash mid-save leaves a temp dir; a crash before the marker leaves no COMPLETE file
    (root / "step_000009.tmp-123").mkdir()
    (root / "step_000008").mkdir()
    assert ckpt.latest_checkpoint(str(tmp_path)) == str(root / "step_000003")
    assert ckpt.resolve_resume("auto", str(tmp_path)) == str(root / "step_000003")
    assert ckpt.resolve_resume("none", str(tmp_path)) is None
    assert ckpt.resolve_resume(str(root / "step_000002"), "/elsewhere") == str(root / "step_000002")
    with pytest.raises(ValueError, match="step_000008"):
        ckpt.resolve_resume(str(root / "step_000008"), str(tmp_path))
    assert ckpt.resolve_resume("auto", str(tmp_path / "fresh")) is None


def test_metrics_log_truncates_rows_after_the_resume_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    log = MetricsLog(path)
    for s in (1, 2, 3, 4):
        log.write({"step": s, "x": float(s)})
    log.close()
    with open(path, "a") as fh:
        fh.write('{"step": 5, "x": ')  # a torn line from a killed run
    log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "x": 30.0})
    log.close()
    assert [(r["step"], r["x"]) for r in read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    MetricsLog(path).close()  # a fresh (non-resumed) run starts a fresh log
    assert read_metrics(path) == []


# The kill comes from the test's side: a wrapper (this test's code, not the trainer's) runs lpreg-train's
# entry point with the run's optimizer patched to SIGKILL the process at its N-th step() call, i.e. in the
# middle of that training step: after the backward, before the parameters change.
_KILLING_RUN = """
import os, signal, sys
import lpreg.trainer.setup as setup
from lpreg.train import main

kill_at, real = int(sys.argv[1]), setup._optimizer

def optimizer_that_dies(*args, **kwargs):
    model, optimizer, scheduler = real(*args, **kwargs)
    step, calls = optimizer.step, [0]

    def dying_step(*a, **k):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(*a, **k)

    optimizer.step = dying_step
    return model, optimizer, scheduler

setup._optimizer = optimizer_that_dies
main(sys.argv[2:])
"""


def _train(out, extra=(), kill_at_update=None, timeout=240):
    args = ["--preset", "test-micro", "--steps", "4", "--output-dir", str(out), "--resume", "auto", *extra]
    head = ["-m", "lpreg.train"] if kill_at_update is None else ["-c", _KILLING_RUN, str(kill_at_update)]
    return subprocess.run([sys.executable, *head, *args], capture_output=True, text=True, timeout=timeout)


def _final_params(out):
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / "step_000004" / "model" / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_mid_step_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    res = _train(ref, ["--keep-checkpoints", "5"])
    assert res.returncode == 0, res.stderr[-3000:]

    run = tmp_path / "run"
    res = _train(run, ["--keep-checkpoints", "5"], kill_at_update=3)  # one update per step: in the 3rd step
    assert res.returncode == -9, (res.returncode, res.stderr[-3000:])
    assert [r["step"] for r in read_metrics(str(run / "metrics.jsonl"))] == [1, 2]
    assert ckpt.latest_checkpoint(str(run)).endswith("step_000002")
    res = _train(run, ["--keep-checkpoints", "5"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr

    a, b = read_metrics(str(ref / "metrics.jsonl")), read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]  # no step repeated or skipped
    for ra, rb in zip(a, b):
        for key in ra:
            if key.startswith("timing/"):
                continue
            if isinstance(ra[key], float):
                assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), key
            else:
                assert rb[key] == ra[key], key
    pa, pb = _final_params(ref), _final_params(run)
    for k in pa:
        torch.testing.assert_close(pb[k], pa[k], rtol=1e-6, atol=1e-7)
    # the samples of the resumed steps are the uninterrupted run's samples
    sa = [json.loads(x) for x in (ref / "samples.jsonl").read_text().splitlines()]
    sb = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [s for s in sa if s["step"] >= 3] == [s for s in sb if s["step"] >= 3]


class _MakesADirectory:
    """An object whose unpickling runs code: os.mkdir(path)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_checkpoint_holding_an_arbitrary_object_is_refused(tmp_path, tiny):
    """--resume of someone else's checkpoint must not run its code: trainer_state.pt is loaded with
    weights_only=True, and our own state is plain tensors and values (the round trip above)."""
    model, tok = tiny
    opt = torch.optim.AdamW(model.parameters())
    path = ckpt.save_checkpoint(str(tmp_path), 1, model=model, tokenizer=tok, optimizer=opt, scheduler=None,
                                data_position=1, config=preset_config("test-micro"))
    file = os.path.join(path, "trainer_state.pt")
    state = torch.load(file, weights_only=True)
    target = str(tmp_path / "ran")
    torch.save({**state, "config": {"lr": 1e-3, "payload": _MakesADirectory(target)}}, file)
    with pytest.raises(ValueError, match="refused because loading it could run code") as exc:
        ckpt.load_checkpoint(path)
    assert "--resume" in str(exc.value) and "trainer_state.pt" in str(exc.value)
    assert not os.path.exists(target)  # nothing ran
    torch.load(file, weights_only=False)  # what an unguarded load would have done
    assert os.path.isdir(target)
    # a file of plain values that is not a trainer state is refused too, naming what it holds
    torch.save({"step": 1}, file)
    with pytest.raises(ValueError, match=r"not a trainer state .*\['step'\]"):
        ckpt.load_checkpoint(path)
