"""The loss functions have one visible signature each (issue 30): explicit keywords that `inspect`, IDEs, mypy
and mkdocstrings all read from the source, and Google-style docstrings that the API page renders as
parameter tables. The page is built with mkdocs, as tests/test_docs.py builds the site."""

import dataclasses
import html
import inspect
import os
import re
import subprocess
import sys

import pytest

import lpreg
from lpreg.loss_config import STATS_OPTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# each public loss-side function: the option keywords it must show (policy_loss_from_stats takes the
# statistics as given, so their filter's threshold is not its option; lpreg_regularize takes the selection's
# and the penalty's options only: the base objective is the caller's)
LOSSES = {
    "lpreg_policy_loss": ("rho", "beta", "threshold"),
    "fused_linear_policy_loss": ("rho", "beta", "threshold"),
    "policy_loss_from_stats": ("rho", "beta"),
    "lpreg_regularize": ("rho", "beta"),
}
STATS_FNS = {"fused_linear_token_stats": ("threshold", "logit_scale", "logit_softcap"),
             "fused_linear_build_proxy": ("threshold", "logit_scale", "logit_softcap")}


@pytest.mark.parametrize("name", sorted({**LOSSES, **STATS_FNS}))
def test_signature_is_explicit(name):
    fn = getattr(lpreg, name)
    params = inspect.signature(fn).parameters
    assert not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()), name  # no **options
    assert not hasattr(fn, "__signature__"), name  # no rewritten signature: inspect reads the source
    for option in {**LOSSES, **STATS_FNS}[name]:
        p = params[option]
        assert p.kind == inspect.Parameter.KEYWORD_ONLY and p.annotation is not inspect.Parameter.empty
        assert p.default is not inspect.Parameter.empty
    doc = inspect.getdoc(fn) or ""
    for section in ("Args:", "Returns:", "Raises:"):
        assert section in doc, (name, section)
    documented = set(re.findall(r"^    (\w+):", doc.split("Args:")[1].split("Returns:")[0], re.M))
    assert documented == set(params), (name, set(params) ^ documented)  # every parameter, and only those


def test_losses_take_every_loss_option_with_its_default():
    fields = {f.name: f.default for f in dataclasses.fields(lpreg.LossConfig)}
    for fn, excluded in ((lpreg.lpreg_policy_loss, ()), (lpreg.fused_linear_policy_loss, ()),
                         (lpreg.policy_loss_from_stats, STATS_OPTIONS)):
        params = inspect.signature(fn).parameters
        for name, default in fields.items():
            if name not in excluded:
                assert params[name].default == default, (fn.__name__, name)


def test_no_overloads_left():
    """typing.overload stubs would show as extra signature blocks: none on the loss functions."""
    import typing

    if not hasattr(typing, "get_overloads"):  # Python < 3.11 cannot list them
        pytest.skip("typing.get_overloads needs Python 3.11")
    for name in {**LOSSES, **STATS_FNS}:
        assert typing.get_overloads(getattr(lpreg, name)) == [], name


@pytest.fixture(scope="module")
def api_page(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the documentation tools come with the docs extra: pip install -e '.[docs]'")
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    # not --strict: tests/test_docs.py owns the strict build; this one reads the API page it renders
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--no-strict", "--site-dir", str(site)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return (site / "api" / "index.html").read_text()


def section(page, name):
    """The HTML of lpreg.<name>'s entry: from its heading to the next object heading."""
    start = page.index(f'id="lpreg.{name}"')
    nxt = re.compile(r'<h[1-6] id="lpreg\.[A-Za-z_]+"').search(page, start + 1)
    return page[start:nxt.start() if nxt else len(page)]


@pytest.mark.parametrize("name", sorted({**LOSSES, **STATS_FNS}))
def test_api_page_names_the_options(api_page, name):
    body = section(api_page, name)
    signatures = re.findall(r'<div class="doc-signature highlight">(.*?)</div>', body, re.S)
    assert len(signatures) == 1, f"{name}: {len(signatures)} signature blocks"  # one, not overload stubs
    sig_names = set(re.findall(r'<span class="n">(\w+)</span>', signatures[0]))
    rows = [html.unescape(r) for r in re.findall(r'<tr class="doc-section-item">\s*<td>\s*<code>(\w+)</code>', body)]
    for option in {**LOSSES, **STATS_FNS}[name]:
        assert option in sig_names, f"{name}: the signature block does not name {option}"
        assert option in rows, f"{name}: no parameter-table row for {option}"
    for title in ("Parameters:", "Returns:", "Raises:"):  # Google sections render as sections, not text
        assert f'doc-section-title">{title}' in body, (name, title)


def test_from_stats_page_says_why_threshold_is_not_its_option(api_page):
    text = re.sub(r"<[^>]+>", "", section(api_page, "policy_loss_from_stats"))
    assert "threshold" in text and "do not apply" in text


def test_selection_threshold_page_shows_one_signature(api_page):
    """selection_threshold keeps its typing overloads (a list in, a list out) for mypy; the page shows the
    implementation's signature alone, with its parameter table."""
    body = section(api_page, "selection_threshold")
    assert body.count('<div class="doc-signature highlight">') == 1
    rows = re.findall(r'<tr class="doc-section-item">\s*<td>\s*<code>(\w+)</code>', body)
    assert {"old_logp", "masks", "rho", "group"} <= set(rows)
