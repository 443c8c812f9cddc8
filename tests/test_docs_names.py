"""Every module, function and file path that the docs name exists: a renamed file or function fails here,
not in a reader's terminal. Scanned: README, CHANGELOG and docs/**/*.md, inside `inline code` and code
blocks' comments alike (the text between backticks, and bare paths in Markdown links)."""

import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
# the repository's top-level folders: a path starting with one of these is a file of this repository
TOP = ("kernels/", "lpreg/", "csrc/", "bench/", "tests/", "docs/", ".ci/")
TOP_FILES = {"setup.py", "pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in", "mkdocs.yml",
             "conftest.py", "LICENSE"}
PATH = re.compile(r"(?<![\w./-])((?:kernels|lpreg|csrc|bench|tests|docs|\.ci)/[\w./*-]*[\w*])")
# lpreg.x.y or lpreg.x.y.z (a module, or a module's attribute); `lpreg.*` patterns are skipped
DOTTED = re.compile(r"(?<![\w.])(lpreg(?:\.[A-Za-z_]\w*)+)")
CODE = re.compile(r"`([^`\n]+)`")
# how a file path may stand after a path in prose: "path::name" or "path:line"
SUFFIX = re.compile(r"(::\w+|:\d+)$")
# placeholders of the how-to pages ("Add an op": my_op; "Add a backend": lpreg._mine; architecture's
# import example), and TRL's metric keys (`lpreg/kl`: a key, not a path)
PLACEHOLDER = re.compile(r"my_op|\b_mine\b|^lpreg\.trainer\.x$|^lpreg/\w+$")


def _names(page: pathlib.Path):
    text = page.read_text()
    spans = CODE.findall(text)
    spans += re.findall(r"\]\(([^)\s]+)\)", text)  # link targets
    blocks = re.findall(r"```[\w-]*\n(.*?)```", text, flags=re.S)
    return spans + blocks


def _paths(page: pathlib.Path):
    found = set()
    for span in _names(page):
        for path in PATH.findall(span):
            path = SUFFIX.sub("", path.rstrip("."))
            if not PLACEHOLDER.search(path):
                found.add(path)
    return sorted(found)


def _exists(path: str, page: pathlib.Path) -> bool:
    if "*" in path:
        return any(ROOT.glob(path))
    candidates = [ROOT / path, page.parent / path]
    return any(c.exists() for c in candidates)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_path_named_exists(page):
    missing = [p for p in _paths(page) if not _exists(p, page)]
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


def _defined_in_source(path: pathlib.Path, names) -> bool:
    """For a module whose optional framework is missing here: its first attribute is defined in its file."""
    if not names:
        return True
    name, text = names[0], path.read_text()
    defined = re.search(rf"^(class|def) {name}\b|^{name}\s*[:=]", text, flags=re.M)
    imported = re.search(rf"^\s*from \S+ import [^#\n]*\b{name}\b", text, flags=re.M)  # re-exported
    return bool(defined or imported)


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
                continue  # no such module: try a shorter one
            # a dependency (an optional framework) is missing: the longest prefix that is a source file
            for end in range(cut, 0, -1):
                source = (ROOT / "/".join(parts[:end])).with_suffix(".py")
                if source.exists():
                    return _defined_in_source(source, parts[end:])
            return False
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                # a name an integration module exports once its framework is installed (lpreg.integrations.verl)
                return attr == parts[-1] and attr in getattr(obj, "__all__", ())
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_lpreg_module_and_function_named_exists(page):
    names = sorted({d for span in _names(page) for d in DOTTED.findall(span) if not PLACEHOLDER.search(d)})
    missing = [d for d in names if not _resolves(d)]
    assert not missing, f"{page.relative_to(ROOT)} names lpreg objects that do not exist: {missing}"


def test_the_checks_catch_a_stale_name(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See `lpreg/no_such_file.py`, `lpreg.no_such_function` and `lpreg.backends`.\n")
    assert _paths(page) == ["lpreg/no_such_file.py"] and not _exists("lpreg/no_such_file.py", page)
    assert not _resolves("lpreg.no_such_function") and _resolves("lpreg.backends")
