"""The Triton kernels, one op per file, as `lpreg.kernels` (imported lazily by the op glue).

Their source lives in the checkout's top-level `kernels/` folder. That folder is deliberately not a
Python package (it has no `__init__.py`): a regular package named `kernels` at the checkout's root
would shadow the `kernels` distribution (the Hugging Face kernel hub, which transformers imports)
for every process started there: pytest, `python -m ...`, `python setup.py ...`.

- In a wheel, setup.py's build_py copies `kernels/*.py` into this package's folder.
- In a source checkout (an editable install, or the tree on sys.path), this package's search path
  is extended to the top-level `kernels/` folder, so `lpreg.kernels.token_stats` is
  `kernels/token_stats.py`.
"""

import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_CHECKOUT = os.path.dirname(os.path.dirname(_HERE))
_SOURCE = os.path.join(_CHECKOUT, "kernels")
# only a checkout of lpreg (setup.py and csrc/ beside kernels/), never a site-packages folder that
# happens to hold another distribution's `kernels`
if (not os.path.exists(os.path.join(_HERE, "token_stats.py"))
        and os.path.isfile(os.path.join(_SOURCE, "token_stats.py"))
        and os.path.isfile(os.path.join(_CHECKOUT, "setup.py"))
        and os.path.isdir(os.path.join(_CHECKOUT, "csrc"))):
    __path__.append(_SOURCE)  # noqa: F821 (a package's module-level __path__)
