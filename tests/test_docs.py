"""The repository documents itself: README's framework snippets are the ones the integration
tests run, and no file points at a document outside the repository."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]


def code_block(text: str, heading: str, lang: str) -> str:
    """The first ```lang block after `heading`."""
    start = text.index(f"```{lang}\n", text.index(heading))
    return text[start:text.index("```\n", start + 4)]


def test_readme_framework_snippets_are_the_tested_ones():
    # tests/integrations/ executes the docs/integrations.md blocks verbatim; README must show the same text
    readme = (ROOT / "README.md").read_text()
    docs = (ROOT / "docs" / "integrations.md").read_text()
    for heading, lang in (("## Use with TRL", "python"), ("## Use with verl", "bash")):
        assert code_block(readme, heading, lang) == code_block(docs, heading, lang), heading


def tracked_text_files():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
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
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, _ in link.findall(md.read_text()):
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert broken == [], broken
