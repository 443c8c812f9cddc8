#!/usr/bin/env bash
# CI for lpreg.integrations: each framework in its own virtual environment (verl pins
# transformers < 5.11, TRL 1.16 takes newer ones), with lpreg installed from this tree,
# then its tests against the real package. Usage: bash .ci/integrations.sh [trl|verl ...]
# VENVS (default /tmp/lpreg-venvs) holds the environments; REUSE_VENVS=1 keeps existing ones.
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS=${VENVS:-/tmp/lpreg-venvs}
TORCH=torch==2.13.0
declare -A FRAMEWORK=([trl]="trl>=1.16,<1.17" [verl]="verl>=0.9.1,<0.10")
mkdir -p "$VENVS"

make_venv() {  # $1: trl | verl
    local venv="$VENVS/$1"
    if [[ "${REUSE_VENVS:-0}" == 1 && -x "$venv/bin/python" ]]; then return; fi
    rm -rf "$venv"
    python3 -m venv "$venv"
    # one resolve with torch pinned; --no-compile: byte-compiling ray / transformers costs minutes on 2 cores
    "$venv/bin/pip" install -q --no-compile "$TORCH" "${FRAMEWORK[$1]}" pytest pytest-benchmark
}

install_lpreg() {  # $1: trl | verl. A copy of the tree: the build never writes into this one.
    local venv="$VENVS/$1" src
    src=$(mktemp -d)
    git ls-files -co --exclude-standard | while read -r f; do [[ -e "$f" ]] && echo "$f"; done \
        | tar -cf - -T - | tar -xf - -C "$src"
    LPREG_SKIP_EXT=1 "$venv/bin/pip" install -q --no-compile --no-build-isolation --no-deps --force-reinstall "$src"
    rm -rf "$src"
}

run_tests() {  # $1: trl | verl. importlib mode: the installed lpreg, not ./lpreg (no lpreg.kernels there)
    local venv="$VENVS/$1" t0=$SECONDS
    "$venv/bin/pytest" --import-mode=importlib -p no:cacheprovider -q "tests/integrations/test_$1.py"
    echo "integrations: tests/integrations/test_$1.py took $((SECONDS - t0)) s"
}

one() {  # $1: trl | verl: environment, install, tests
    make_venv "$1"
    install_lpreg "$1"
    run_tests "$1"
}

# The two frameworks run side by side (2 cores: installs wait on disk, tests on one core each),
# each logging to its own file, printed whole when it ends.
T0=$SECONDS
LOGS=$(mktemp -d)
declare -A PID
FWS=(${@:-trl verl})
for fw in "${FWS[@]}"; do
    one "$fw" > "$LOGS/$fw.log" 2>&1 &
    PID[$fw]=$!
done
status=0
for fw in "${FWS[@]}"; do
    if wait "${PID[$fw]}"; then rc=0; else rc=$?; status=1; fi
    echo "===== integrations: $fw (exit $rc) ====="
    cat "$LOGS/$fw.log"
done
rm -rf "$LOGS"
echo "integrations: total $((SECONDS - T0)) s"
exit $status
