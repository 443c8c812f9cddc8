"""`import lpreg` needs no GPU, no Triton, no compiled extension, and never a top-level `kernels`."""

import subprocess
import sys

import pytest


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_is_light_and_names_no_top_level_kernels_module():
    r = _run(
        "import sys, lpreg\n"
        "assert 'kernels' not in sys.modules, 'a top-level kernels module was imported'\n"
        "assert 'triton' not in sys.modules, 'import lpreg must not import triton'\n"
        "assert 'lpreg._C' not in sys.modules, 'the extension must load lazily'\n"
        "print('ok')\n"
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("blocked", ["triton", "lpreg._C"])
def test_auto_backend_works_without_triton_or_extension(blocked):
    # A machine without the blocked module still computes on CPU (auto warns once and falls back).
    r = _run(
        f"import sys; sys.modules[{blocked!r}] = None\n"
        "import warnings, torch, lpreg\n"
        "x = torch.randn(3, 17); y = torch.tensor([0, 5, 16])\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = lpreg.lpreg_token_stats(x, y)\n"
        "    lpreg.lpreg_token_stats(x, y)\n"
        "b = lpreg.reference.lpreg_token_stats(x, y)\n"
        "torch.testing.assert_close(a.kl, b.kl)\n"
        "print(len([m for m in w if 'lpreg' in str(m.message)]))\n"
    )
    assert r.returncode == 0, r.stderr
    warned = int(r.stdout.strip().splitlines()[-1])
    assert warned == (1 if blocked == "lpreg._C" else 0)
