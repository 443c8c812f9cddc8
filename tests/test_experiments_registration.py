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


def test_the_trainer_alone_has_no_study_and_lpreg_train_loads_it_only_when_asked():
    """In a fresh process: the loop's modules load without lpreg.experiments and without its tasks,
    presets and instruments; lpreg.train (the command line) does not load it either until a study name is
    asked for (a preset, a task, an option, an output transform), and then registers all of it."""
    out = _python(
        "import sys\n"
        "import lpreg.trainer.loop, lpreg.trainer.compare, lpreg.trainer.evaluate\n"
        "from lpreg.trainer.config import PRESETS, load_config\n"
        "from lpreg.trainer.instruments import INSTRUMENTS\n"
        "from lpreg.trainer.tasks import TASKS\n"
        "study = lambda: sorted(m for m in sys.modules if m.startswith('lpreg.experiments'))\n"
        "assert not study(), 'the trainer imported experiments'\n"
        "assert {'cpu-tiny', 'test-micro', 'qwen2.5-math-1.5b'} <= set(PRESETS), PRESETS\n"
        "assert not {'cpu-sparks', 'noisy-sparks-demo', 'cpu-regime-sweep'} & set(PRESETS), PRESETS\n"
        "assert set(TASKS) == {'arithmetic'} and INSTRUMENTS == {}\n"
        "import lpreg.train\n"
        "cfg = load_config(['--preset', 'cpu-tiny', '--steps', '3'])\n"
        "assert not study(), ('lpreg-train --preset cpu-tiny loaded the study', study())\n"
        "cfg = load_config(['--preset', 'cpu-sparks', '--mechanism-every', '5'])\n"
        "assert study() and cfg.option('mechanism_every') == 5 and cfg.task == 'sparks'\n"
        "names = {'cpu-sparks', 'noisy-sparks-demo', 'cpu-sweep', 'cpu-sparks-demo', 'cpu-regime-sweep'}\n"
        "assert names <= set(PRESETS)\n"
        "assert {'sparks', 'noisy-sparks'} <= set(TASKS)\n"
        "assert list(INSTRUMENTS) == ['diversity', 'mechanism']\n"
        "print('ok')\n")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("argv", [["--preset", "test-micro", "--task", "sparks"],
                                  ["--preset", "test-micro", "--mechanism-every", "2"],
                                  ["--preset", "test-micro", "--output-transform", "output_floor:floor=0.1"]])
def test_each_kind_of_study_name_loads_the_study(argv):
    out = _python("import sys\nimport lpreg.train\nfrom lpreg.trainer.config import load_config\n"
                  f"load_config({argv!r})\n"
                  "assert 'lpreg.experiments' in sys.modules\nprint('ok')\n")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_lpreg_train_lists_exactly_the_names_the_study_registers():
    """lpreg.train.STUDY_NAMES (the lazy table) is what lpreg.experiments registers, no more, no less."""
    out = _python(
        "import lpreg.train\n"
        "from lpreg.trainer import output_transform, registry, tasks\n"
        "kinds = {'preset': registry.PRESETS, 'task': tasks.TASKS, 'option': registry.OPTIONS,\n"
        "         'output_transform': output_transform.TRANSFORMS}\n"
        "before = {k: set(v) for k, v in kinds.items()}\n"
        "import lpreg.experiments\n"
        "added = {k: sorted(set(v) - before[k]) for k, v in kinds.items()}\n"
        "listed = {k: sorted(v) for k, v in lpreg.train.STUDY_NAMES.items()}\n"
        "assert added == listed, (added, listed)\n"
        "print('ok')\n")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_register_is_idempotent_and_names_the_trainers_hooks():
    import lpreg.experiments
    from lpreg.experiments import diversity, mechanism, output_floor
    from lpreg.trainer.config import PRESETS, preset_config
    from lpreg.trainer.instruments import INSTRUMENTS
    from lpreg.trainer.output_transform import TRANSFORMS
    from lpreg.trainer.tasks import TASKS

    before = (dict(PRESETS), dict(TASKS), dict(INSTRUMENTS))
    lpreg.experiments.register()
    assert (dict(PRESETS), dict(TASKS), dict(INSTRUMENTS)) == before
    assert INSTRUMENTS["mechanism"].before_update is mechanism.probe and INSTRUMENTS["mechanism"].step_metrics is None
    assert INSTRUMENTS["diversity"].step_metrics is diversity.step_metrics
    assert diversity.SPARK_TOKENS["sparks"] == ("check",) and preset_config("cpu-sparks-demo").option(
        "mechanism_every") == 30
    assert TRANSFORMS["output_floor"].install is output_floor.install
    assert TRANSFORMS["output_floor"].module == "lpreg.experiments.output_floor"
    assert preset_config("noisy-sparks-demo").task == "noisy-sparks"


def test_a_study_option_without_the_study_is_an_error_not_a_no_op():
    """Without lpreg.experiments (and without lpreg.train's lazy table), `mechanism_every` is no option."""
    out = _python("from lpreg.trainer.config import preset_config\n"
                  "try:\n    preset_config('test-micro', mechanism_every=1)\n"
                  "except ValueError as err:\n    print(err)\n")
    assert "unknown TrainConfig fields or options ['mechanism_every']" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("old, new, usage", [
    ("lpreg.trainer.compare", "lpreg.experiments.compare", "usage: python -m lpreg.experiments.compare"),
])
def test_the_old_commands_warn_and_run_the_new_ones(old, new, usage):
    """`python -m lpreg.trainer.compare` (deprecated) names the new command and runs it."""
    out = _python(["-m", old, "--help"])
    assert out.returncode == 0, out.stderr
    assert "DeprecationWarning" in out.stderr and f"python -m {new}" in out.stderr
    assert out.stdout.startswith(usage), out.stdout[:200]
