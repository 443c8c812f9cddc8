"""Deprecated: the cpu-sparks design check moved to `python -m lpreg.experiments.spark_value` (same flags).

`python -m lpreg.trainer.spark_value ...` warns and runs it, loaded by name at run time (runpy), so
nothing in lpreg.trainer imports lpreg.experiments (tests/test_import_graph.py).
"""

import runpy
import warnings

NEW_COMMAND = "python -m lpreg.experiments.spark_value"

if __name__ == "__main__":
    warnings.warn(f"python -m lpreg.trainer.spark_value is deprecated; use {NEW_COMMAND} (same flags)",
                  DeprecationWarning, stacklevel=1)
    runpy.run_module("lpreg.experiments.spark_value", run_name="__main__", alter_sys=True)
