"""No folder or module of the checkout shadows an installed distribution, whatever the working directory.

A process started in the checkout's root has that root first on sys.path: pytest (tests/ is a
package, so it inserts the root), `python -m lpreg...`, `python setup.py ...`. A regular package
there named like an installed distribution's top-level module hides that distribution: the
top-level `kernels/` folder once hid the `kernels` distribution (the Hugging Face kernel hub) that
transformers >= 5.25 imports. `kernels/` is therefore no package (no `__init__.py`); the Triton
kernels are `lpreg.kernels` through the symbolic link lpreg/kernels -> ../kernels (setup.py says why).
"""

import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _importable_names(root):
    """The top-level names a process started in `root` would import from it: regular packages
    (folders with __init__.py) and modules (*.py)."""
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
        elif entry.endswith(".py"):
            names.add(entry[:-3])
    return names


def _shadowed(root):
    """{name: [distributions]} for each name importable from `root` that another installed
    distribution provides as a top-level module."""
    provided = importlib.metadata.packages_distributions()
    return {name: provided[name] for name in sorted(_importable_names(root))
            if name in provided and set(provided[name]) != {"lpreg"}}


def test_no_checkout_package_or_module_is_an_installed_distributions_name():
    assert _shadowed(ROOT) == {}


def test_the_check_catches_a_shadowing_package(tmp_path):
    # a checkout with a kernels/__init__.py, beside an environment with the kernels distribution
    if "kernels" not in importlib.metadata.packages_distributions():
        pytest.skip("the kernels distribution is not installed: no name to shadow (transformers < 5.25)")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "kernels" / "token_stats.py").write_text("")
    assert "kernels" in _shadowed(tmp_path)


def _run_in_root(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def test_transformers_hub_kernels_imports_the_real_kernels_from_the_checkout_root():
    """The import that failed at pytest's collection once the kernels distribution arrived."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the kernels distribution is not installed: transformers does not import it")
    code = ("import sys, os; assert sys.path[0] in ('', os.getcwd()), sys.path[0]\n"
            "import transformers.integrations.hub_kernels, kernels\n"
            "print(os.path.abspath(kernels.__file__))\n")
    r = _run_in_root("-c", code)
    assert r.returncode == 0, r.stderr[-3000:]
    where = r.stdout.strip().splitlines()[-1]
    assert not where.startswith(os.path.join(ROOT, "kernels") + os.sep), f"`kernels` came from the checkout: {where}"


def test_lpreg_kernels_is_the_checkouts_kernels_folder():
    r = _run_in_root("-c", "import lpreg.kernels.token_stats as t, os; print(os.path.abspath(t.__file__))")
    assert r.returncode == 0, r.stderr[-3000:]
    installed = os.path.join(os.path.dirname(__import__("lpreg").__file__), "kernels", "token_stats.py")
    assert r.stdout.strip() in (os.path.join(ROOT, "kernels", "token_stats.py"), installed)


def test_lpreg_kernels_is_a_link_to_the_kernels_folder_not_a_copy():
    # one source: the link git stores, which imports, mypy, IDEs and the sdist all follow
    link = os.path.join(ROOT, "lpreg", "kernels")
    assert os.path.islink(link), "lpreg/kernels must be the symbolic link ../kernels"
    assert os.readlink(link) == os.path.join("..", "kernels")
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))  # would shadow `kernels`


@pytest.mark.slow  # a cold mypy run over torch's stubs: ~30 CPU-seconds
def test_mypy_resolves_the_kernels_as_lpreg_kernels(tmp_path):
    """What an IDE's go-to-definition needs, from a checkout: the type checker finds the source of
    lpreg.kernels.token_stats (and types its functions) through the link, with no import-time code."""
    pytest.importorskip("mypy")
    check = tmp_path / "check.py"
    check.write_text("import lpreg.kernels.token_stats as t\nreveal_type(t.__file__)\n")
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file=", "--no-incremental",
                        "--follow-imports=silent", str(check)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr  # an unresolved import is an error (import-not-found)
    assert 'Revealed type is "str"' in r.stdout, r.stdout


def test_setup_py_runs_from_the_checkout_root(tmp_path):
    # egg_info (as sdist runs it) loads every installed distribution's setuptools entry points, the
    # kernels distribution's too; --egg-base keeps its output out of the checkout
    r = _run_in_root("setup.py", "egg_info", "--egg-base", str(tmp_path), env={"LPREG_SKIP_EXT": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "lpreg.egg-info" / "PKG-INFO").is_file()


def test_the_training_entry_point_starts_from_the_checkout_root():
    r = _run_in_root("-m", "lpreg.train", "--help")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--preset" in r.stdout
