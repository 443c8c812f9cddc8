"""lpreg is typed: it ships `py.typed` (PEP 561) and mypy, with the settings in pyproject.toml
([tool.mypy]: all of lpreg/, every function of the public modules annotated), finds no error."""

import importlib.util
import os
import subprocess
import sys

import pytest

import lpreg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_ships_py_typed():
    # in the package folder, where an installed wheel puts it (pyproject.toml's package-data)
    assert os.path.isfile(os.path.join(os.path.dirname(lpreg.__file__), "py.typed"))


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None,
                    reason="mypy is not installed (it comes with the dev extra: pip install -e '.[dev]')")
def test_mypy_is_clean():
    # run from the checkout: mypy reads [tool.mypy] in pyproject.toml (files = ["lpreg"])
    r = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Success" in out, out
