#!/usr/bin/env bash
# Packaging check, as a distributor would run it: build the sdist, build a wheel FROM THAT SDIST
# (so a file missing from the sdist breaks the build here, not on a user's machine), install the
# wheel into a fresh virtual environment, and call the compiled and the pure-PyTorch backends.
# Usage: bash .ci/package_check.sh [WORKDIR]   (run from the repository, torch installed in the
# active environment; the fresh environment gets the same torch version).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")
rm -rf "$work/dist" "$work/wheel" "$work/venv"

python -m build --sdist --no-isolation --outdir "$work/dist" .
sdist=$(ls "$work"/dist/lpreg-*.tar.gz)
listing=$(tar tzf "$sdist")
for required in csrc/lpreg_ops.cpp csrc/token_stats_args.h csrc/cpu/token_stats_cpu.h csrc/cuda/token_stats.cu \
                csrc/cuda/token_stats_cuda.h kernels/token_stats.py LICENSE; do
    grep -q "/$required\$" <<<"$listing" || { echo "sdist lacks $required" >&2; exit 1; }
done

MAX_JOBS=${MAX_JOBS:-2} pip wheel --no-build-isolation --no-deps --wheel-dir "$work/wheel" "$sdist"
wheel=$(ls "$work"/wheel/lpreg-*.whl)
grep -q "lpreg/_C" <<<"$(python -m zipfile -l "$wheel")" || { echo "wheel lacks the compiled lpreg._C" >&2; exit 1; }
# PEP 561: the marker that tells type checkers lpreg is typed (pyproject.toml's package-data)
grep -q "lpreg/py.typed" <<<"$(python -m zipfile -l "$wheel")" || { echo "wheel lacks lpreg/py.typed" >&2; exit 1; }

python -m venv "$work/venv"
"$work/venv/bin/pip" install -q "torch==$torch_version" numpy
"$work/venv/bin/pip" install -q --no-deps "$wheel"
cd "$work"  # away from the source tree: the installed wheel must stand alone
"$work/venv/bin/python" - <<'PY'
import torch
import lpreg
from lpreg import _native

assert _native.available("cpu"), "the wheel's compiled CPU extension does not load"
torch.manual_seed(0)
logits = torch.randn(4, 1000)
kl = {b: lpreg.lpreg_kl(logits, temperature=1.0, mode="min_p", threshold=0.02, backend=b) for b in ("cpu", "torch")}
assert torch.isfinite(kl["cpu"]).all() and (kl["cpu"] > 0).all(), kl["cpu"]
torch.testing.assert_close(kl["cpu"], kl["torch"], rtol=1e-5, atol=1e-6)  # fp32 sums in different orders
print(f"package check ok: lpreg {lpreg.__version__} from {lpreg.__file__}; kl[cpu] = {kl['cpu'].tolist()}")
PY
