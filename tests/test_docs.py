"""The repository documents itself:
- every Python block of README and of the site's pages (docs/**/*.md) runs: here, each page's blocks
  in order in one namespace, as a reader pastes them; or, for a block that needs TRL or several
  processes, verbatim in the test that owns that setting (RUN_ELSEWHERE, checked to still read it);
- the site builds with warnings as errors (`mkdocs build --strict`, what CI runs);
- the API page documents every name of `lpreg.__all__`;
- no file points at a document outside the repository, and relative links resolve."""

import os
import pathlib
import re
import subprocess
import sys
import types
from dataclasses import dataclass
from typing import Dict, List, Tuple

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@dataclass(frozen=True)
class Block:
    page: str     # relative to the repository root
    line: int     # of the opening fence, 1-based
    lang: str
    heading: str  # the last heading above the block, without its #s
    code: str


def blocks(path: pathlib.Path) -> List[Block]:
    """The fenced code blocks of a Markdown file, in order (fences at the start of a line)."""
    out, heading, lang, start, code = [], "", None, 0, []
    for n, line in enumerate(path.read_text().splitlines(keepends=True), 1):
        if lang is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif line.startswith("```"):
                lang, start, code = line[3:].strip(), n, []
        elif line.startswith("```"):
            out.append(Block(str(path.relative_to(ROOT)), start, lang, heading, "".join(code)))
            lang = None
        else:
            code.append(line)
    assert lang is None, f"{path}: the block opened at line {start} is never closed"
    return out


def python_blocks(path: pathlib.Path) -> List[Block]:
    return [b for b in blocks(path) if b.lang == "python"]


def the_block(page: str, heading: str, lang: str = "python") -> Block:
    """The first `lang` block under `heading` (at any depth) of `page`."""
    found = [b for b in blocks(ROOT / page) if b.lang == lang and b.heading == heading]
    assert found, f"{page} has no ```{lang} block under the heading {heading!r}"
    return found[0]


# Python blocks that need a framework or several processes: each runs verbatim, read from its page,
# in the test named here (which must still name the heading it reads). A copy of one of them on
# another page (README shows the TRL block) must be the same text, and is then covered by that run.
RUN_ELSEWHERE: Dict[Tuple[str, str], str] = {
    # test_docs_snippet_runs_verbatim, with TRL installed (bash .ci/integrations.sh)
    ("docs/integrations.md", "Use with TRL"): "tests/integrations/test_trl.py",
    # case_dtensor_loss_parallel, on a 2 x 2 (data x tensor) gloo mesh of 4 processes
    ("docs/integrations.md", "Vocabulary-parallel (tensor-parallel) logits"): "tests/test_vocab_parallel.py",
}

# Blocks that show an excerpt of a table (`...` for its other entries), run here in the namespace of
# the module that owns the table with `...,` standing for those entries.
EXCERPTS: Dict[Tuple[str, str], str] = {
    ("docs/architecture.md", "Adding a loss"): "lpreg.trainer.losses",
}


def run_elsewhere(block: Block) -> bool:
    return any(block.code == the_block(page, heading).code for page, heading in RUN_ELSEWHERE)


def runnable_pages():
    return [p for p in PAGES if any(not run_elsewhere(b) for b in python_blocks(p))]


@pytest.mark.parametrize("page", runnable_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(page, one_torch_thread, capsys):
    """A page's Python blocks, in order, in one namespace; its excerpts in their module's namespace."""
    scope: dict = {"__name__": "__docs__"}
    for block in python_blocks(page):
        where = f"{block.page}:{block.line} (under {block.heading!r})"
        if run_elsewhere(block):
            continue
        excerpt = EXCERPTS.get((block.page, block.heading))
        if excerpt:
            module = __import__(excerpt, fromlist=["_"])
            table = dict(vars(module))
            code = re.sub(r"^(\s*)\.\.\.,\s*$", r"\1**LOSSES,", block.code, flags=re.M)
            exec(compile(code, where, "exec"), table)
            check_excerpt(block, table, module)
            continue
        try:
            exec(compile(block.code, where, "exec"), scope)
        except Exception as exc:
            raise AssertionError(
                f"the block at {where} does not run as it stands ({type(exc).__name__}: {exc}). A block that "
                f"needs TRL or several processes must be the same text as one of RUN_ELSEWHERE's") from exc


def check_excerpt(block: Block, table: dict, module: types.ModuleType):
    """architecture.md's "Adding a loss": the entry it adds is a Loss whose terms compute a per-token loss,
    and the module's own table is untouched."""
    new = set(table["LOSSES"]) - set(module.LOSSES)
    assert len(new) == 1 and set(module.LOSSES) <= set(table["LOSSES"]), (block.page, new)
    entry = table["LOSSES"][new.pop()]
    assert isinstance(entry, module.Loss) and entry.terms is not None
    pieces = types.SimpleNamespace(**{name: torch.rand(2, 3) for name in
                                      ("logp", "old_logp", "entropy", "adv", "unclipped", "clipped", "pg")})
    assert entry.terms(pieces, None).shape == (2, 3)


def test_blocks_run_elsewhere_are_still_read_there():
    for (page, heading), test in RUN_ELSEWHERE.items():
        the_block(page, heading)  # it exists
        source = (ROOT / test).read_text()
        assert heading in source and pathlib.Path(page).name in source, (
            f"{test} no longer reads the block under {heading!r} of {page}: it must run it, verbatim")


def test_readme_shows_blocks_run_here_and_elsewhere():
    """README shows a block that runs here and the TRL block that tests/integrations runs (an edited
    copy of a framework block would otherwise be tried here, and fail for want of the framework)."""
    readme = python_blocks(ROOT / "README.md")
    assert any(run_elsewhere(b) for b in readme), "README's TRL block is not the one tests/integrations runs"
    assert any(not run_elsewhere(b) for b in readme), "README shows no block that runs here"


def test_readme_verl_block_is_the_tested_one():
    # tests/integrations/test_verl.py reads its Hydra overrides from docs/integrations.md's block
    readme = [b for b in blocks(ROOT / "README.md") if b.lang == "bash" and "verl.trainer.main_ppo" in b.code]
    assert [b.code for b in readme] == [the_block("docs/integrations.md", "Use with verl", "bash").code]


def test_the_two_commands_are_the_same_in_readme_and_install_page():
    readme = the_block("README.md", "Two commands", "bash").code
    assert readme == the_block("docs/install.md", "The two commands", "bash").code
    assert "lpreg-train --preset cpu-demo" in readme and readme.rstrip().endswith("pytest")


def test_api_page_documents_every_public_name():
    import lpreg

    documented = set(re.findall(r"^::: lpreg\.(\w+)\s*$", (ROOT / "docs" / "api.md").read_text(), re.M))
    missing = [name for name in lpreg.__all__ if name not in documented]
    assert missing == [], f"docs/api.md has no `::: lpreg.<name>` entry for {missing}"
    unknown = sorted(documented - set(lpreg.__all__))
    assert unknown == [], f"docs/api.md documents names that are not in lpreg.__all__: {unknown}"


def test_the_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav, or a docstring the
    API reference cannot render fails (a few seconds)."""
    pytest.importorskip("mkdocs", reason="the documentation tools come with the docs extra: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()


def tracked_text_files():
    git = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if git.returncode == 0:
        names = git.stdout.split()
    else:  # not a git checkout (an sdist, a copy of the tree): every file but built and installed ones
        skip = {".venv", "build", "dist", ".git", "__pycache__", ".pytest_cache", ".mypy_cache", "runs"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    for name in names:
        path = ROOT / name
        if path.suffix in {".png", ".so"} or not path.is_file():
            continue
        yield name, path.read_text(errors="replace")


def test_no_reference_points_outside_the_repository():
    dead = re.compile(r"\.\./shared|\bSPEC\b")
    offenders = [name for name, text in tracked_text_files() if name != "tests/test_docs.py" and dead.search(text)]
    assert offenders == [], f"these files cite a document that is not in the repository: {offenders}"


def test_relative_links_in_docs_resolve():
    link = re.compile(r"\]\(([^)#:]+)(#[^)]*)?\)")
    broken = []
    for md in PAGES:
        for target, _ in link.findall(md.read_text()):
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert broken == [], broken
