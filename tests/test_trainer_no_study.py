"""The trainer is the tool: no study's name appears in lpreg/trainer/ (issue 28).

A study (lpreg.experiments) reaches the trainer through its registration points only: tasks, presets,
options, output transforms, warm-start augments, instruments. Its names (the tasks, the floor, the spark
token, the warm-start noise, the mechanism probe's option) therefore have no place in the trainer's code,
comments included; the import rule itself is tests/test_import_graph.py.
"""

import os
import re

TRAINER = os.path.join(os.path.dirname(__file__), "..", "lpreg", "trainer")
# lower-case study words (a paper title such as "The Entropy Mechanism of RL" is not a study name)
# ("mechanism" alone is the package's: lpreg.mechanism_metrics, what Lp-Reg acts on, in every run's metrics;
# the study's is the mechanism probe)
STUDY_NAMES = ("spark", "noisy", "floor", "mechanism probe", "mechanism.jsonl", "warm_start_noise", "diversity",
               "check token", "token_noise", "output_floor", "mechanism_every")
_PATTERN = re.compile("|".join(re.escape(n) for n in STUDY_NAMES))


def study_names_in(root: str) -> list:
    """(file, line number, word) for every study name in the .py files under `root`."""
    hits = []
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as fh:
                    for number, line in enumerate(fh, 1):
                        hits += [(os.path.relpath(path, root), number, m.group(0)) for m in _PATTERN.finditer(line)]
    return hits


def test_no_study_name_in_the_trainer():
    assert study_names_in(TRAINER) == []


def test_the_rule_finds_a_study_name(tmp_path):
    """The check can fail: a trainer-like file naming the floor or the spark token is reported."""
    (tmp_path / "model.py").write_text("def add_output_floor(model):\n    pass\n# the spark token\n")
    (tmp_path / "clean.py").write_text("x = 1  # The Entropy Mechanism of RL\n")
    assert study_names_in(str(tmp_path)) == [("model.py", 1, "output_floor"), ("model.py", 3, "spark")]
