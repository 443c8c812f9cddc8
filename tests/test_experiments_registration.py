"""lpreg.experiments registers into the trainer's registration points; the trainer alone knows none of it.

The import rule itself (no module of lpreg.trainer imports lpreg.experiments) is in tests/test_import_graph.py.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _python(code_or_args, timeout=120):
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_trainer_alone_has_no_study_and_lpreg_train_registers_it():
    """In a fresh process: the loop's modules load without lpreg.experiments and without its task,
    presets and instruments; the command line's module (lpreg.train) registers all of them."""
    out = _python(
        "import sys\n"
        "import lpreg.trainer.loop, lpreg.trainer.compare, lpreg.trainer.spark_value\n"
        "from lpreg.trainer.config import PRESETS\n"
        "from lpreg.trainer.instruments import INSTRUMENTS\n"
        "from lpreg.trainer.tasks import TASKS\n"
        "assert not any(m.startswith('lpreg.experiments') for m in sys.modules), 'the trainer imported experiments'\n"
        "assert set(PRESETS) == {'cpu-tiny', 'test-micro', 'qwen2.5-math-1.5b'}, PRESETS\n"
        "assert set(TASKS) == {'arithmetic'} and INSTRUMENTS == {}\n"
        "import lpreg.train\n"
        "assert {'cpu-sparks', 'cpu-demo', 'cpu-sweep', 'cpu-sparks-demo', 'cpu-regime-sweep'} <= set(PRESETS)\n"
        "assert {'sparks', 'noisy-sparks'} <= set(TASKS)\n"
        "assert list(INSTRUMENTS) == ['diversity', 'mechanism']\n"
        "print('ok')\n")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_register_is_idempotent_and_names_the_trainers_hooks():
    import lpreg.experiments
    from lpreg.experiments import diversity, mechanism
    from lpreg.trainer.config import PRESETS, preset_config
    from lpreg.trainer.instruments import INSTRUMENTS
    from lpreg.trainer.tasks import TASKS

    before = (dict(PRESETS), dict(TASKS), dict(INSTRUMENTS))
    lpreg.experiments.register()
    assert (dict(PRESETS), dict(TASKS), dict(INSTRUMENTS)) == before
    assert INSTRUMENTS["mechanism"].before_update is mechanism.probe and INSTRUMENTS["mechanism"].step_metrics is None
    assert INSTRUMENTS["diversity"].step_metrics is diversity.step_metrics
    assert TASKS["sparks"].spark_tokens == ("check",) and preset_config("cpu-sparks-demo").mechanism_every == 30
    assert preset_config("cpu-demo").task == "noisy-sparks" and preset_config("cpu-demo").mechanism_every > 0


def test_mechanism_every_without_the_instrument_is_an_error_not_a_no_op(tmp_path, monkeypatch):
    import lpreg.experiments  # noqa: F401
    from lpreg.trainer import instruments
    from lpreg.trainer.config import preset_config
    from lpreg.trainer.setup import setup

    monkeypatch.delitem(instruments.INSTRUMENTS, "mechanism")
    with pytest.raises(ValueError, match="--mechanism-every needs the mechanism instrument"):
        setup(preset_config("test-micro", mechanism_every=1, output_dir=str(tmp_path), resume="none"))


@pytest.mark.parametrize("old, new, usage", [
    ("lpreg.trainer.compare", "lpreg.experiments.compare", "usage: python -m lpreg.experiments.compare"),
    ("lpreg.trainer.spark_value", "lpreg.experiments.spark_value", "usage: lpreg-train"),  # its flags: TrainConfig's
])
def test_the_old_commands_warn_and_run_the_new_ones(old, new, usage):
    """`python -m lpreg.trainer.compare` / `.spark_value` (deprecated) name the new command and run it."""
    out = _python(["-m", old, "--help"])
    assert out.returncode == 0, out.stderr
    assert "DeprecationWarning" in out.stderr and f"python -m {new}" in out.stderr
    assert out.stdout.startswith(usage), out.stdout[:200]
