#!/usr/bin/env bash
# CI for lpreg.integrations: each framework in its own virtual environment (verl pins
# transformers < 5.11, TRL 1.16 takes newer ones), made as README tells a user: torch, then lpreg
# with the framework's extra (`lpreg[trl,deepspeed]`, `lpreg[verl]`) and the `test` extra (the test
# runner), nothing by hand. lpreg comes from one wheel built WITH its compiled CPU extension, installed in
# both environments, so the suites test the `cpu` kernels users get. Usage:
#   bash .ci/integrations.sh [trl|verl ...]
# VENVS (default /tmp/lpreg-venvs) holds the environments and the wheel; REUSE_VENVS=1 keeps
# existing environments (and only reinstalls lpreg). LPREG_WHEEL_DIR: a directory holding an lpreg
# wheel already built from this tree against the same torch (.ci/run passes the package check's);
# else the wheel is built here, with the active environment's torch and build tools.
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS=${VENVS:-/tmp/lpreg-venvs}
TORCH=torch==2.13.0
# each framework's extras, exactly as README's "Use with TRL / verl" installs them
declare -A EXTRAS=([trl]="trl,deepspeed,test" [verl]="verl,test")
# each suite: its adapter's tests, its recipes (docs/recipes, 2 steps each), and for TRL the smoke run of
# the GRPO-step benchmark
declare -A SUITE=([trl]="tests/integrations/test_trl*.py tests/integrations/test_recipes_trl.py bench/test_bench_trl_step.py"
                  [verl]="tests/integrations/test_verl*.py tests/integrations/test_recipes_verl.py")
WHEELS="$VENVS/wheel"
mkdir -p "$VENVS"

build_wheel() {  # a copy of the tree: the build never writes into this one
    local src t0=$SECONDS
    src=$(mktemp -d)
    git ls-files -co --exclude-standard | while read -r f; do [[ -e "$f" ]] && echo "$f"; done \
        | tar -cf - -T - | tar -xf - -C "$src"
    rm -rf "$WHEELS"
    MAX_JOBS=${MAX_JOBS:-2} LPREG_SKIP_CUDA=1 LPREG_REQUIRE_EXT=1 python -m pip wheel -q --no-build-isolation \
        --no-deps --wheel-dir "$WHEELS" "$src"
    rm -rf "$src"
    echo "integrations: wheel with the compiled extension built in $((SECONDS - t0)) s"
}

make_venv() {  # $1: trl | verl
    local venv="$VENVS/$1" wheel
    wheel=$(ls "$WHEELS"/lpreg-*.whl)
    if [[ "${REUSE_VENVS:-0}" == 1 && -x "$venv/bin/python" ]]; then
        "$venv/bin/pip" install -q --no-compile --no-deps --force-reinstall "$wheel"
    else
        rm -rf "$venv"
        python3 -m venv "$venv"
        # one resolve with torch pinned; --no-compile: byte-compiling ray / transformers costs minutes on 2 cores
        "$venv/bin/pip" install -q --no-compile "$TORCH" "lpreg[${EXTRAS[$1]}] @ file://$wheel"
    fi
    (cd / && "$venv/bin/python" -c "from lpreg import _native; assert _native.available('cpu'), 'no lpreg._C'")
}

run_tests() {  # $1: trl | verl. importlib mode: the installed lpreg (the wheel), not this checkout's
    local venv="$VENVS/$1" t0=$SECONDS rc=0 log="$VENVS/tolerances-$1.jsonl"
    rm -f "$log"
    LPREG_TOLERANCE_LOG="$log" OMP_NUM_THREADS=1 "$venv/bin/pytest" --import-mode=importlib -p no:cacheprovider \
        -q -rs --durations=15 ${SUITE[$1]} || rc=$?
    echo "integrations: ${SUITE[$1]} took $((SECONDS - t0)) s"
    # every measured difference and its tolerance (tests/integrations/tolerances.py: record)
    [[ -f "$log" ]] && "$venv/bin/python" -c 'import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    print("  " + d.pop("case") + ": " + ", ".join(f"{k} {v:.2e}" for k, v in d.items()))' "$log"
    return $rc
}

# The wheel first (the environments install it with their extras), then the environments side by
# side (2 cores: the installs wait on the network and the disk).
T0=$SECONDS
LOGS=$(mktemp -d)
FWS=(${@:-trl verl})
declare -A PID
if [[ -n "${LPREG_WHEEL_DIR:-}" ]] && compgen -G "$LPREG_WHEEL_DIR/lpreg-*.whl" > /dev/null; then
    WHEELS=$LPREG_WHEEL_DIR
    echo "integrations: using $(ls "$WHEELS"/lpreg-*.whl)"
else
    build_wheel
fi
for fw in "${FWS[@]}"; do
    make_venv "$fw" > "$LOGS/venv-$fw.log" 2>&1 &
    PID[$fw]=$!
done
status=0
for fw in "${FWS[@]}"; do
    wait "${PID[$fw]}" || { cat "$LOGS/venv-$fw.log"; exit 1; }
done
echo "integrations: environments ready after $((SECONDS - T0)) s"

# The suites side by side, one core each, each logging to its own file, printed whole when it ends.
for fw in "${FWS[@]}"; do
    run_tests "$fw" > "$LOGS/$fw.log" 2>&1 &
    PID[$fw]=$!
done
for fw in "${FWS[@]}"; do
    if wait "${PID[$fw]}"; then rc=0; else rc=$?; status=1; fi
    echo "===== integrations: $fw (exit $rc) ====="
    cat "$LOGS/$fw.log"
done
rm -rf "$LOGS"
echo "integrations: total $((SECONDS - T0)) s"
exit $status
