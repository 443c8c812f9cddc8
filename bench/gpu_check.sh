#!/usr/bin/env bash
# One command for a CUDA machine (no internet needed; torch, triton, nvcc, pytest and
# pytest-benchmark installed):
#
#   bash bench/gpu_check.sh            # results under $LPREG_CHECK_DIR (default /tmp/lpreg_gpu_check)
#
# 1. installs lpreg editable with its CUDA extension, for this GPU's architecture only
# 2. runs the GPU-marked tests (pytest -m gpu tests)
# 3. runs the GPU-marked benchmarks, saving pytest-benchmark JSON
# 4. measures device-to-device copy bandwidth (a 1 GiB torch copy, timed with CUDA events)
# 5. prints, LAST, one table row per benchmark whose extra_info carries `provider`, `gbps`
#    (or `tflops`) and `peak_mem_mb`: backend, ms, GB/s, fraction of copy bandwidth, peak memory
# Budget: under 8 minutes (timeouts: install 150 s, tests 100 s, benchmarks 200 s).
# Exit status: non-zero when the install or a test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${LPREG_CHECK_DIR:-/tmp/lpreg_gpu_check}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="$(python -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST
fi
start=$SECONDS

echo "== 1. install (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
if ! timeout 150 pip install --no-build-isolation --no-deps -e . >"$OUT/install.log" 2>&1; then
  tail -40 "$OUT/install.log"
  echo "install failed (log: $OUT/install.log)"
  exit 1
fi
python -c 'import lpreg._C as c; assert c.with_cuda, "lpreg._C was built without CUDA"; print("lpreg._C: cuda", c.with_cuda, "cpu isa", c.cpu_isa)' || exit 1

echo "== 2. GPU tests ($((SECONDS - start)) s so far)"
timeout 100 python -m pytest -q -m gpu tests -p no:cacheprovider >"$OUT/tests.log" 2>&1
test_rc=$?
tail -15 "$OUT/tests.log"

echo "== 3. GPU benchmarks ($((SECONDS - start)) s so far)"
timeout 200 python -m pytest -q -m gpu bench -p no:cacheprovider --benchmark-enable \
  --benchmark-json="$OUT/bench.json" --benchmark-columns=min,median,mean,rounds >"$OUT/bench.log" 2>&1
bench_rc=$?
tail -15 "$OUT/bench.log"

echo "== 4. copy bandwidth ($((SECONDS - start)) s so far)"
python - "$OUT/copy.json" <<'EOF'
import json, sys
import torch

src = torch.empty(2**30, dtype=torch.uint8, device="cuda").fill_(1)
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
times = []
for _ in range(10):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    dst.copy_(src)
    b.record()
    b.synchronize()
    times.append(a.elapsed_time(b))
ms = sorted(times)[len(times) // 2]
gbps = 2 * src.numel() / (ms * 1e-3) / 1e9  # read + write, as the kernels' compulsory bytes
json.dump({"ms": ms, "gbps": gbps, "device": torch.cuda.get_device_name()}, open(sys.argv[1], "w"))
print(f"device-to-device copy of 1 GiB: {ms:.3f} ms, {gbps:.0f} GB/s (read + write)")
EOF

echo "== 5. summary ($((SECONDS - start)) s in all; tests rc=$test_rc, benchmarks rc=$bench_rc; logs in $OUT)"
python - "$OUT/bench.json" "$OUT/copy.json" <<'EOF'
import json, os, sys

bench = json.load(open(sys.argv[1])) if os.path.exists(sys.argv[1]) else {"benchmarks": []}
copy = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) else {}
copy_gbps = copy.get("gbps")
rows = []
for b in bench.get("benchmarks", []):
    info = b.get("extra_info", {})
    if "provider" not in info or "peak_mem_mb" not in info or not ("gbps" in info or "tflops" in info):
        continue
    ms = info.get("ms") or (b["stats"]["mean"] * 1e3 if b.get("stats") else None)
    rate = info.get("gbps")
    frac = f"{rate / copy_gbps:.2f}" if rate and copy_gbps else "-"
    rate_s = f"{rate:.1f} GB/s" if rate else (f"{info['tflops']:.1f} TFLOP/s" if info.get("tflops") else "-")
    peak = info.get("peak_mem_mb")
    rows.append((b.get("group") or b["name"], info["provider"], f"{ms:.2f}" if ms else "-", rate_s, frac,
                 f"{peak:.0f}" if peak is not None else "-"))
head = ("benchmark", "backend", "ms", "throughput", "of copy", "peak MiB")
widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
print(f"copy bandwidth: {copy_gbps:.0f} GB/s on {copy.get('device')}" if copy_gbps else "copy bandwidth: n/a")
for r in [head] + rows:
    print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
EOF
[ "$test_rc" -eq 0 ] || exit "$test_rc"
