"""Deprecated: the sweep moved to `python -m lpreg.experiments.compare` (same flags).

`python -m lpreg.trainer.compare ...` warns and runs it. The module is loaded by name at run time
(runpy), so nothing in lpreg.trainer imports lpreg.experiments (tests/test_import_graph.py).
"""

import runpy
import warnings

NEW_COMMAND = "python -m lpreg.experiments.compare"

if __name__ == "__main__":
    warnings.warn(f"python -m lpreg.trainer.compare is deprecated; use {NEW_COMMAND} (same flags)",
                  DeprecationWarning, stacklevel=1)
    runpy.run_module("lpreg.experiments.compare", run_name="__main__", alter_sys=True)
