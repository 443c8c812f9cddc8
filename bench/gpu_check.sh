#!/usr/bin/env bash
# The GPU check, as one command on a bare CUDA machine that has this working tree (no
# internet needed: torch, triton, nvcc, pytest and pytest-benchmark already installed):
#
#   bash bench/gpu_check.sh                           # every step; results in bench/results/
#   bash bench/gpu_check.sh --only bench-token-stats  # rerun one step (or a comma list), then results
#   bash bench/gpu_check.sh --skip tests              # every step but these
#   bash bench/gpu_check.sh --cpu                     # the machinery on a CPU machine, tiny shapes
#   bash bench/gpu_check.sh --list                    # the steps
#   bash bench/gpu_check.sh --wheels                  # HERE, with PyPI: fetch the wheels the GPU
#                                                     # machine lacks for bench-trl-step into .whl/
#
# Steps, in order. Each writes only its own files in the state directory, so that any step
# can be rerun alone and `results` then merges the latest output of every step:
#   install             pip install -e . with the CUDA extension for this GPU's architecture
#                       only; skipped when lpreg._C imports with CUDA from this tree and csrc/,
#                       setup.py, pyproject.toml and torch are what the last install here saw
#                       (a stamp in the state directory); `--only install` forces it
#   copy                device-to-device copy bandwidth (bench/gpu_results.py copy)
#   matmul              bf16 matmul rate on the fused-linear GPU shape (gpu_results.py matmul)
#   tests               the GPU-marked tests: pytest -m gpu tests
#   bench-token-stats   pytest -m gpu bench/test_bench_token_stats.py  -> bench-token-stats.json; with a
#                       Gemma-style head (issue 30): V = 262,144, bf16, logit_softcap = 30, and the
#                       same shape without the soft-cap (the ratio of the two is the soft-cap's cost)
#   bench-fused-linear  pytest -m gpu bench/test_bench_fused_linear.py -> bench-fused-linear.json
#   bench-trl-step      pytest -m gpu bench/test_bench_trl_step.py -> bench-trl-step.json: one GRPO
#                       step in TRL (generation included), TRL's own loss against LpRegGRPOTrainer
#                       unfused and fused. Needs trl: where it does not import, the step installs
#                       the wheels of LPREG_WHEELS (default .whl/, made by --wheels on a machine
#                       with PyPI, carried to the GPU machine) into the state directory, offline
#   bench-other         every other GPU benchmark: pytest -m gpu bench (those three files left
#                       out) -> bench-other.json
#   results             always last: <results dir>/<device>.json and <device>.md (environment:
#                       device, driver, torch / triton / CUDA versions, git revision; each step's
#                       exit status and seconds; copy and matmul rates; every benchmark row),
#                       and the Markdown table printed LAST
# Budget: 8 minutes on an H100 / H200, the install included (bench-trl-step alone: about 2 to 3).
# Each step runs under its own timeout, cut to what is left of LPREG_CHECK_BUDGET seconds (default
# 480); a step with no time left is recorded as rc 124 and can be rerun alone.
# Environment: PYTHON (default python3), LPREG_CHECK_DIR (state: logs, stamps, step outputs;
# default /tmp/lpreg_gpu_check, /tmp/lpreg_cpu_check with --cpu), LPREG_RESULTS_DIR (default
# bench/results; with --cpu the state directory's results/, never bench/results), MAX_JOBS,
# TORCH_CUDA_ARCH_LIST (default: this GPU's), LPREG_WHEELS (bench-trl-step's wheels; default .whl).
# Exit status: non-zero when a step that ran failed (the results are written all the same).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
STEPS=(install copy matmul tests bench-token-stats bench-fused-linear bench-trl-step bench-other)
PY="${PYTHON:-python3}"
CPU=0
ONLY=""
SKIP=""
WHEELS_ONLY=0
CMDLINE="bash bench/gpu_check.sh${*:+ $*}"

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY="${2:?--only needs a step name}"; shift 2 ;;
    --only=*) ONLY="${1#--only=}"; shift ;;
    --skip) SKIP="${2:?--skip needs a step name}"; shift 2 ;;
    --skip=*) SKIP="${1#--skip=}"; shift ;;
    --cpu) CPU=1; shift ;;
    --list) printf '%s\n' "${STEPS[@]}" results; exit 0 ;;
    --wheels) WHEELS_ONLY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for s in ${ONLY//,/ } ${SKIP//,/ }; do
  case " ${STEPS[*]} results " in
    *" $s "*) ;;
    *) echo "gpu_check.sh: unknown step '$s'; steps: ${STEPS[*]} results" >&2; exit 2 ;;
  esac
done

WHEELS="${LPREG_WHEELS:-$ROOT/.whl}"
if [ "$WHEELS_ONLY" -eq 1 ]; then
  # The GPU machine's image has torch, transformers, accelerate, pyarrow, xxhash, ... but not trl,
  # datasets, dill, multiprocess: these, for its Python (3.12), at the versions the TRL tests use.
  # Pure-Python wheels, about 2 MiB together; carry the folder with the tree (`.whl/` is ignored).
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${LPREG_WHEELS_PYTHON:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$WHEELS" 'trl>=1.16,<1.17' 'datasets==5.2.0' 'dill>=0.3.0,<0.4.2' 'multiprocess<0.70.20' || exit 1
  ls -l "$WHEELS"
  exit 0
fi

if [ "$CPU" -eq 1 ]; then
  STATE="${LPREG_CHECK_DIR:-/tmp/lpreg_cpu_check}"
  RESULTS="${LPREG_RESULTS_DIR:-$STATE/results}"
  CPU_FLAG=(--cpu)
else
  STATE="${LPREG_CHECK_DIR:-/tmp/lpreg_gpu_check}"
  RESULTS="${LPREG_RESULTS_DIR:-bench/results}"
  CPU_FLAG=()
fi
mkdir -p "$STATE"
BUDGET="${LPREG_CHECK_BUDGET:-480}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
start=$SECONDS
failed=0

selected() {  # is step $1 to run?
  if [ -n "$ONLY" ]; then
    case ",$ONLY," in *",$1,"*) ;; *) return 1 ;; esac
  fi
  case ",$SKIP," in *",$1,"*) return 1 ;; esac
  return 0
}

record() {  # record step $1's exit status $2 and seconds $3 in steps.tsv (replacing an older line)
  local f="$STATE/steps.tsv"
  touch "$f"
  { grep -v "^$1	" "$f"; printf '%s\t%s\t%s\n' "$1" "$2" "$3"; } >"$f.tmp"
  mv "$f.tmp" "$f"
}

run_step() {  # run_step NAME LIMIT_S CMD...: under min(LIMIT_S, budget left), log in $STATE/NAME.log
  local name="$1" limit="$2"
  shift 2
  local left=$((BUDGET - (SECONDS - start)))
  [ "$left" -lt "$limit" ] && limit="$left"
  echo "== $name ($((SECONDS - start)) s so far; limit ${limit} s; log $STATE/$name.log)"
  local t0=$SECONDS rc
  if [ "$limit" -lt 5 ]; then
    echo "   no time left in the ${BUDGET} s budget: rerun with --only $name" | tee "$STATE/$name.log"
    rc=124
  else
    # bash -c: `timeout` runs programs, and the steps below are exported shell functions
    timeout "$limit" bash -c '"$@"' "$name" "$@" >"$STATE/$name.log" 2>&1
    rc=$?
  fi
  record "$name" "$rc" "$((SECONDS - t0))"
  if [ "$rc" -ne 0 ]; then
    tail -30 "$STATE/$name.log"
    echo "   $name FAILED (rc=$rc$([ "$rc" -eq 124 ] && echo ', timed out'))"
    echo "   rerun it alone: bash bench/gpu_check.sh --only $name"
    failed=1
  else
    tail -3 "$STATE/$name.log"
  fi
  return "$rc"
}

# ---- steps --------------------------------------------------------------------------------

source_hash() {
  { "$PY" -c 'import torch; print(torch.__version__)'; echo "${TORCH_CUDA_ARCH_LIST:-}";
    cat setup.py pyproject.toml; find csrc -type f | LC_ALL=C sort | xargs cat; } | sha256sum | cut -d' ' -f1
}

installed_here() {  # lpreg imports from this tree, with a CUDA-enabled lpreg._C (any lpreg._C with --cpu)
  "$PY" - "$ROOT" "$CPU" <<'EOF'
import os, sys
import lpreg
import lpreg._C as c
root, cpu = sys.argv[1], sys.argv[2] == "1"
assert os.path.realpath(lpreg.__file__).startswith(os.path.realpath(root) + os.sep), lpreg.__file__
assert cpu or c.with_cuda, "lpreg._C was built without CUDA"
print(f"lpreg from {os.path.dirname(lpreg.__file__)}; lpreg._C: cuda {c.with_cuda}, cpu isa {c.cpu_isa}")
EOF
}

step_install() {
  if [ "$CPU" -eq 1 ]; then  # never reinstall a developer's environment: check it only
    installed_here
    return
  fi
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')" || return 1
    export TORCH_CUDA_ARCH_LIST
  fi
  local want
  want="$(source_hash)"
  if [ "$ONLY" != "install" ] && [ "$(cat "$STATE/install.stamp" 2>/dev/null)" = "$want" ] && installed_here; then
    echo "install: up to date (stamp $STATE/install.stamp), skipped"
    return 0
  fi
  echo "pip install -e . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . || return 1
  installed_here || return 1
  echo "$want" >"$STATE/install.stamp"
}

step_tests() {
  if [ "$CPU" -eq 1 ]; then  # every gpu-marked test skips here: the run checks collection and exit codes
    "$PY" -m pytest -q -m gpu tests/test_token_stats_native.py -p no:cacheprovider
  else
    "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
  fi
}

step_bench() {  # step_bench FILE JSON CPU_SELECTION
  local json="$STATE/$2"
  rm -f "$json"
  if [ "$CPU" -eq 1 ]; then
    "$PY" -m pytest -q "$1" -k "$3" -p no:cacheprovider --benchmark-enable --benchmark-json="$json"
  else
    "$PY" -m pytest -q -m gpu "$1" -p no:cacheprovider --benchmark-enable --benchmark-json="$json" \
      --benchmark-columns=min,median,mean,rounds
  fi
}

trl_importable() { "$PY" -c 'import trl, datasets, lpreg.integrations.trl' 2>&1; }

step_bench_trl() {  # bench-trl-step: trl from the wheels where it does not import, then the benchmark
  local json="$STATE/bench-trl-step.json" why
  rm -f "$json"
  if ! why="$(trl_importable)"; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
      echo "trl does not import here; installing the wheels of $WHEELS into $STATE/site (offline)"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STATE/site" \
        "$WHEELS"/*.whl || return 1
    fi
    export PYTHONPATH="$STATE/site${PYTHONPATH:+:$PYTHONPATH}"
    if ! why="$(trl_importable)"; then
      echo "$why" | tail -5
      if [ "$CPU" -eq 1 ]; then  # the machinery check: nothing to run without trl, and no failure
        echo "trl does not import here: bench/test_bench_trl_step.py would skip; nothing run"
        return 0
      else
        echo "trl does not import: on a machine with PyPI run 'bash bench/gpu_check.sh --wheels' (wheels into"
        echo "$WHEELS), carry that folder here and rerun: bash bench/gpu_check.sh --only bench-trl-step"
        return 1
      fi
    fi
  fi
  if [ "$CPU" -eq 1 ]; then  # tiny shape, still through the subprocesses and the measurement
    LPREG_BENCH_TINY=1 "$PY" -m pytest -q bench/test_bench_trl_step.py -k "test_cpu_trl_step" -p no:cacheprovider \
      -rs --benchmark-enable --benchmark-json="$json"
  else
    "$PY" -m pytest -q -m gpu bench/test_bench_trl_step.py -p no:cacheprovider -rs --benchmark-enable \
      --benchmark-json="$json" --benchmark-columns=min,median,mean,rounds
  fi
}

step_bench_other() {  # the GPU benchmarks of any other bench file (on a CPU machine they all skip)
  local json="$STATE/bench-other.json"
  rm -f "$json"
  "$PY" -m pytest -q -m gpu bench --ignore=bench/test_bench_token_stats.py --ignore=bench/test_bench_fused_linear.py \
    --ignore=bench/test_bench_trl_step.py -p no:cacheprovider --benchmark-enable --benchmark-json="$json"
  local rc=$?
  [ "$rc" -eq 5 ] && { echo "no other GPU benchmark"; return 0; }  # pytest: nothing collected
  return "$rc"
}

export ROOT PY CPU ONLY STATE WHEELS
export -f installed_here source_hash step_install step_tests step_bench trl_importable step_bench_trl step_bench_other

selected install && run_step install 150 step_install
selected copy && run_step copy 60 "$PY" bench/gpu_results.py copy --out "$STATE/copy.json" ${CPU_FLAG[@]+"${CPU_FLAG[@]}"}
selected matmul && run_step matmul 60 "$PY" bench/gpu_results.py matmul --out "$STATE/matmul.json" ${CPU_FLAG[@]+"${CPU_FLAG[@]}"}
selected tests && run_step tests 120 step_tests
selected bench-token-stats && run_step bench-token-stats 150 \
  step_bench bench/test_bench_token_stats.py bench-token-stats.json "N1024-V32000-float32-cpu or softcap_cpu"
selected bench-fused-linear && run_step bench-fused-linear 90 \
  step_bench bench/test_bench_fused_linear.py bench-fused-linear.json "N1024-H256-fused and not paper and not threshold"
selected bench-trl-step && run_step bench-trl-step 240 step_bench_trl
selected bench-other && run_step bench-other 90 step_bench_other

# --only STEP still refreshes the results, unless --skip results
if selected results || { [ -n "$ONLY" ] && [[ ",$SKIP," != *",results,"* ]]; }; then
  echo "== results ($((SECONDS - start)) s in all; state in $STATE)"
  "$PY" bench/gpu_results.py report --state "$STATE" --results-dir "$RESULTS" --command "$CMDLINE" \
    ${CPU_FLAG[@]+"${CPU_FLAG[@]}"} || failed=1
fi
exit "$failed"
