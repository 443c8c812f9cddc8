#!/usr/bin/env bash
# The version ranges lpreg declares (pyproject.toml, README), tested at their ends. Each combination
# gets its own virtual environment, made as README tells a user: torch first, then lpreg built
# against it (`pip install --no-build-isolation -e .`, on a copy of the tree, so the compiled
# extension never lands in this checkout). LPREG_REQUIRE_EXT=1 makes a failed extension build fail
# here instead of installing without it; the C++ standard follows each torch (C++17 before 2.14,
# C++20 from 2.14).
#
#   torch-floor    Python 3.10 (the floor), torch 2.6.0 (Triton 3.2): the core quick suite, the
#                  compiled extension
#   torch-newest   Python 3.13 (the newest claimed), torch 2.14.1: the core quick suite, the compiled
#                  extension; and `lpreg[verl]` must fail to install there (verl needs Python < 3.13)
#   train-floor    Python 3.12, torch 2.13.0, transformers 4.56.0, accelerate 1.0.0: the trainer's and
#                  the experiments' tests
# Python 3.11 is .ci/run's own environment (README's install, the whole suite, TRL and verl). On Python
# 3.10, `lpreg[trl]` must fail to install (TRL 1.16 needs Python >= 3.11): checked in torch-floor.
#
# torch-floor pins numpy < 2.4: Triton 3.2's CPU interpreter, which runs the Triton kernels in the
# tests, turns 1-element arrays into ints, and NumPy 2.4 refuses that (conftest.py skips those cases
# with that reason where it happens). On a GPU the kernels are compiled and never meet NumPy.
#
# Usage: bash .ci/compat.sh [torch-floor|torch-newest|train-floor ...]   (default: all three)
# COMPAT_DIR (default /tmp/lpreg-compat) holds the environments and the copies.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${COMPAT_DIR:-/tmp/lpreg-compat}
# a Python X.Y: on PATH, or one of pyenv's builds (its shim hides versions not selected)
find_python() {
    local c
    for c in "python$1" "$(pyenv root 2>/dev/null)"/versions/"$1".*/bin/"python$1"; do
        if "$c" -c "import venv" 2>/dev/null; then echo "$c"; return; fi
    done
    echo "compat: no Python $1 found (a claimed version)" >&2; exit 1
}
declare -A PYTHON=([torch-floor]="$(find_python 3.10)" [torch-newest]="$(find_python 3.13)"
                   [train-floor]="$(find_python 3.12)")
for name in "${!PYTHON[@]}"; do [[ -n "${PYTHON[$name]}" ]] || exit 1; done
# an extra that cannot serve this Python must fail at install time (pip's resolver, from the framework's
# Requires-Python), not at first use: (extra, the message pip prints)
declare -A REFUSED_EXTRA=([torch-floor]="trl" [torch-newest]="verl")
declare -A INSTALL=([torch-floor]="torch==2.6.0 numpy<2.4"
                    [torch-newest]="torch==2.14.1"
                    [train-floor]="torch==2.13.0")
declare -A EXTRAS=([torch-floor]="train,test" [torch-newest]="train,test" [train-floor]="train,test")
declare -A PINS=([torch-floor]="numpy<2.4" [torch-newest]="" [train-floor]="transformers==4.56.0 accelerate==1.0.0")
# the core quick suite: every op, loss, backend, kernel-compile and packaging test (the trainer's run in
# train-floor; the docs, the type check and the nvcc compile do not depend on torch's version)
CORE="tests --ignore-glob=tests/test_trainer_* --ignore-glob=tests/test_experiments_* --ignore=tests/test_evaluate.py
      --ignore=tests/test_docs.py --ignore=tests/test_typing.py --ignore=tests/test_cuda_compile.py"
declare -A TESTS=([torch-floor]="$CORE"
                  [torch-newest]="$CORE"
                  [train-floor]="tests/test_trainer_*.py tests/test_experiments_*.py tests/test_evaluate.py")
mkdir -p "$WORK"

prepare() {  # $1: combination. A fresh copy of the tree, a fresh venv, torch, then lpreg as README installs it
    local name=$1 src="$WORK/src-$1" venv="$WORK/venv-$1" t0=$SECONDS
    rm -rf "$src" "$venv"
    mkdir -p "$src"
    git ls-files -co --exclude-standard | while read -r f; do [[ -e "$f" ]] && echo "$f"; done \
        | tar -cf - -T - | tar -xf - -C "$src"
    "${PYTHON[$name]}" -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/pip" install -q --no-compile -U ${INSTALL[$name]} "setuptools>=77" wheel ninja
    # shellcheck disable=SC2086
    (cd "$src" && MAX_JOBS=1 LPREG_SKIP_CUDA=1 LPREG_REQUIRE_EXT=1 "$venv/bin/pip" install -q --no-compile \
        --no-build-isolation -e ".[${EXTRAS[$name]}]" ${PINS[$name]})
    # in the copy: the checkout's own lpreg/ (built against another torch) must not be on sys.path
    (cd "$src" && "$venv/bin/python" -c "import sys, torch, lpreg, importlib.metadata as m
assert lpreg.__file__.startswith('$src'), lpreg.__file__
assert lpreg.backends()['cpu'].available, lpreg.backends()['cpu']
print('compat: $name ready: Python', sys.version.split()[0], '| torch', torch.__version__,
      '| transformers', m.version('transformers'), '| accelerate', m.version('accelerate'),
      '| numpy', m.version('numpy'))")
    echo "compat: $name installed and built in $((SECONDS - t0)) s"
    local extra=${REFUSED_EXTRA[$name]:-} out
    if [[ -n "$extra" ]]; then  # a dry run: the resolver alone decides, nothing is installed
        if out=$(cd "$src" && "$venv/bin/pip" install --dry-run --no-build-isolation -e ".[$extra]" 2>&1); then
            echo "compat: $name: lpreg[$extra] installed on this Python, but it cannot serve it" >&2; return 1
        fi
        grep -q "Requires-Python" <<< "$out" || { echo "$out" >&2; echo "compat: $name: lpreg[$extra] failed for another reason" >&2; return 1; }
        echo "compat: $name: lpreg[$extra] refused at install time, as it must ($(grep -m1 'Requires-Python' <<< "$out" | sed 's/^ *//'))"
    fi
}

run_tests() {  # $1: combination
    local name=$1 t0=$SECONDS rc=0
    # shellcheck disable=SC2086
    (cd "$WORK/src-$name" && OMP_NUM_THREADS=1 "$WORK/venv-$name/bin/python" -m pytest -q -p no:cacheprovider \
        ${TESTS[$name]}) || rc=$?
    echo "compat: $name tests took $((SECONDS - t0)) s (exit $rc)"
    return $rc
}

T0=$SECONDS
NAMES=(${@:-torch-floor torch-newest train-floor})
LOGS=$(mktemp -d)
declare -A PID
for name in "${NAMES[@]}"; do  # installs side by side: they wait on the network and the disk
    prepare "$name" > "$LOGS/prepare-$name.log" 2>&1 &
    PID[$name]=$!
done
for name in "${NAMES[@]}"; do
    wait "${PID[$name]}" || { grep -v "^WARNING: Location" "$LOGS/prepare-$name.log"; exit 1; }
    grep "^compat:" "$LOGS/prepare-$name.log"
done
status=0
for name in "${NAMES[@]}"; do  # the suites side by side, one torch thread each
    run_tests "$name" > "$LOGS/test-$name.log" 2>&1 &
    PID[$name]=$!
done
for name in "${NAMES[@]}"; do
    if wait "${PID[$name]}"; then rc=0; else rc=$?; status=1; fi
    echo "===== compat: $name (exit $rc) ====="
    tail -n 25 "$LOGS/test-$name.log"
done
rm -rf "$LOGS"
echo "compat: total $((SECONDS - T0)) s"
exit $status
