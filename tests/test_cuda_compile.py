"""csrc/cuda/*.cu compile with plain nvcc (no torch headers), for sm_80 and sm_90, without a GPU.

The CUDA kernels of lpreg._C are torch-free on purpose (house style: the binding file alone
touches at::Tensor), so that these checks run on a CPU-only CI machine. None of them runs the
device code: the GPU-marked tests in test_token_stats_native.py do, where a device exists.

Checked here, with setup.py's nvcc flags (-O3 --use_fast_math):
- every .cu compiles warning-free for both architectures (one cubin each where cuobjdump exists);
- no kernel spills registers or uses a stack frame (ptxas -v);
- the PTX of every kernel whose operands share an element size moves the row with 16-byte
  loads (ld.global.v4; forward: pass 1 and pass 2) and, in the backward, 16-byte stores;
- the forward keeps its chunk maxima for block skipping in dynamic shared memory;
- by inspection of the source, the ignore_index guard of issue 8 (ignore_guard_problems);
- executed on the CPU (g++ and a host emulation of the CUDA the kernels use, below): issue 8's
  example gives a zero gradient on the ignored row (and NaN once the guard is removed), and the
  kernels, block skipping included, agree with the C++ CPU kernel.
"""

import glob
import math
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
TOKEN_STATS = os.path.join(ROOT, "csrc", "cuda", "token_stats.cu")
NVCC = shutil.which("nvcc") or (
    os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
)
ARCHS = ("80", "90")
FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-I", os.path.join(ROOT, "csrc")]  # as setup.py

needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc is not installed")


def _nvcc(args, timeout=600):
    cmd = [NVCC, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda/ holds no .cu file"


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_nvcc_compiles_without_spills(source, tmp_path):
    obj = tmp_path / (os.path.basename(source) + ".o")
    args = ["-c", source, "-o", str(obj), *FLAGS, "--threads", "0", "-Werror", "all-warnings", "-Xptxas", "-v"]
    for arch in ARCHS:
        args += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    proc = _nvcc(args)
    assert obj.stat().st_size > 0
    # ptxas -v: per kernel and architecture, "N bytes stack frame, N bytes spill stores, N bytes spill loads"
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    assert frames, f"no ptxas resource report:\n{proc.stderr}"
    assert all(f == ("0", "0", "0") for f in frames), f"stack frame or spills:\n{proc.stderr}"
    cuobjdump = shutil.which("cuobjdump") or os.path.join(os.path.dirname(NVCC), "cuobjdump")
    if os.path.exists(cuobjdump):  # one cubin per requested architecture
        listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True).stdout
        for arch in ARCHS:
            assert f"sm_{arch}" in listing, f"no sm_{arch} code in {obj}:\n{listing}"


@needs_nvcc
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_nvcc_compiles_as_cxx20(source, tmp_path):
    """setup.py passes nvcc the C++ standard of the installed torch's headers: C++20 from torch 2.14."""
    obj = tmp_path / (os.path.basename(source) + ".o")
    flags = [f for f in FLAGS if not f.startswith("-std=")] + ["-std=c++20"]
    _nvcc(["-c", source, "-o", str(obj), *flags, "--threads", "0", "-Werror", "all-warnings",
           "-gencode", "arch=compute_90,code=sm_90"])
    assert obj.stat().st_size > 0


# ---- PTX of the token-statistics kernels ------------------------------------------------

_SIZES = {"f": 4, "13__nv_bfloat16": 2, "6__half": 2}  # Itanium-mangled template arguments
_TYPE = r"(f|13__nv_bfloat16|6__half|S3_)"


def _kernels(ptx):
    """{(kind, TX, TY, has_proxy): body} of every token_stats_{fwd,bwd}_kernel entry."""
    out = {}
    for m in re.finditer(r"\.entry (\S*token_stats_(fwd|bwd)_kernelI" + _TYPE + _TYPE + r"Lb([01])E\S*)\(", ptx):
        tx = m.group(3)
        ty = tx if m.group(4) == "S3_" else m.group(4)  # S3_: the first template argument again
        end = ptx.find("\n}", m.end())
        out[(m.group(2), tx, ty, m.group(5) == "1")] = ptx[m.end():end]
    return out


@pytest.fixture(scope="module")
def ptx(tmp_path_factory):
    if NVCC is None or not os.path.exists(NVCC):
        pytest.skip("nvcc is not installed")
    path = tmp_path_factory.mktemp("ptx") / "token_stats.ptx"
    _nvcc(["-ptx", TOKEN_STATS, "-o", str(path), *FLAGS, "-arch=compute_90"])
    return path.read_text()


def test_every_kernel_is_instantiated(ptx):
    kernels = _kernels(ptx)
    # forward and backward: on-policy for 3 dtypes, plus a proxy of each of 3 dtypes
    assert len([k for k in kernels if k[0] == "fwd"]) == 12, sorted(kernels)
    assert len([k for k in kernels if k[0] == "bwd"]) == 12, sorted(kernels)


def test_sixteen_byte_loads_and_stores(ptx):
    for (kind, tx, ty, proxy), body in _kernels(ptx).items():
        if _SIZES[tx] != _SIZES[ty]:
            continue  # operands of different element sizes run the scalar path by design
        loads = len(re.findall(r"ld\.global(\.nc)?\.v4\.", body))
        # forward: pass 1 and pass 2, each reading x (and y with a proxy); backward: one pass
        want = (2 if kind == "fwd" else 1) * (2 if proxy else 1)
        assert loads >= want, f"{kind} {tx}/{ty} proxy={proxy}: {loads} 16-byte loads, want >= {want}"
        if kind == "bwd":
            assert re.search(r"st\.global(\.wb)?\.v4\.", body), f"bwd {tx}/{ty}: no 16-byte gradient store"


def test_forward_keeps_chunk_maxima_in_dynamic_shared_memory(ptx):
    # block skipping: pass 1 records each chunk's max in `extern __shared__ float chunk_max[]`
    assert re.search(r"\.extern \.shared \.align \d+ \.b8 \S*chunk_max\S*\[\]", ptx), "no dynamic shared chunk_max"
    for (kind, tx, ty, proxy), body in _kernels(ptx).items():
        uses = "chunk_max" in body
        # operands of different element sizes run the scalar path, which has no chunks
        want = kind == "fwd" and _SIZES[tx] == _SIZES[ty]
        assert uses == want, f"{kind} {tx}/{ty} proxy={proxy}: chunk_max used={uses}"


# ---- issue 8: the ignore_index guard, by inspection -------------------------------------

def _kernel_source(src, name):
    start = src.index(f"__global__ void {name}(")
    return src[start:src.index("\n}\n", start)]


def ignore_guard_problems(src):
    """What breaks the ignored-row invariant of csrc/cuda/token_stats.cu (empty when it holds).

    Backward: an early branch on `label == a.ignore_index` that writes a zero gradient and
    returns, before row_stats is read and before any exp. Forward: the same branch writing
    zero outputs, before the row is walked.
    """
    problems = []
    guard = re.compile(r"if \(a\.labels && label == a\.ignore_index\) \{(?P<body>.*?)\n  \}", re.S)
    for kernel, zero, before in (("token_stats_bwd_kernel", r"gr\[c\] = from_f<TX>\(0\.f\)",
                                  ("row_stats", "__expf", "walk_row")),
                                 ("token_stats_fwd_kernel", r"a\.logp\[row\] = .*= 0\.f;", ("walk_row",))):
        body = _kernel_source(src, kernel)
        m = guard.search(body)
        if m is None:
            problems.append(f"{kernel}: no `if (a.labels && label == a.ignore_index)` branch")
            continue
        if not re.search(zero, m.group("body")) or not m.group("body").rstrip().endswith("return;"):
            problems.append(f"{kernel}: the ignored-row branch must write zeros and return")
        for token in before:
            first = body.find(token)
            if first != -1 and first < m.start():
                problems.append(f"{kernel}: `{token}` comes before the ignored-row branch")
    return problems


def test_ignore_index_guard_holds():
    with open(TOKEN_STATS) as f:
        src = f.read()
    assert ignore_guard_problems(src) == []
    assert "never recomputes p = e^(x - lse) from the zeroed lse of an" in src  # the invariant, stated


def test_ignore_index_guard_check_catches_its_removal():
    with open(TOKEN_STATS) as f:
        src = f.read()
    bwd = _kernel_source(src, "token_stats_bwd_kernel")
    guard = re.search(r"  if \(a\.labels && label == a\.ignore_index\) \{.*?\n  \}\n", bwd, re.S).group(0)
    removed = src.replace(bwd, bwd.replace(guard, ""))
    assert any("no `if" in p for p in ignore_guard_problems(removed))
    # the guard moved after the row statistics are read: p would come from a zeroed lse
    stats_read = re.search(r"  const float\* st = a\.row_stats.*?\n", bwd).group(0)
    moved = src.replace(bwd, bwd.replace(guard, "").replace(stats_read, stats_read + guard))
    assert any("row_stats" in p for p in ignore_guard_problems(moved))
    # the branch no longer returns: the row would still be walked
    no_return = src.replace(bwd, bwd.replace(guard, guard.replace("return;", "")))
    assert any("return" in p for p in ignore_guard_problems(no_return))


# ---- the CUDA kernels executed on the CPU ------------------------------------------------
#
# token_stats.cu compiled as host C++ (g++) against a small emulation of the CUDA it uses: one
# OS thread per CUDA thread, __syncthreads as a block barrier, __shfl_xor_sync through a
# per-warp exchange between two warp barriers (so a shuffle not reached by all 32 lanes
# deadlocks instead of passing), dynamic shared memory as a NaN-filled buffer (a chunk read
# before pass 1 wrote it would poison the row). Blocks run one after another. The launchers
# are the real ones (their `<<<...>>>` becomes a call of emu_launch). It checks the kernels'
# logic (block skipping, ignored rows, alignment paths) against the C++ CPU kernel; it says
# nothing about speed or about the device compiler. g++ -fno-strict-aliasing: the kernels
# read a uint4 as TX[], which nvcc allows and g++ -O2 may miscompile.

EMULATION_H = r"""
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#undef __global__
#undef __device__
#undef __forceinline__
#undef __shared__
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
struct EmuDim { unsigned x = 0, y = 0, z = 0; };
inline thread_local EmuDim threadIdx, blockIdx;
inline EmuDim blockDim;
inline std::unique_ptr<std::barrier<>> g_block;
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp;
inline uint64_t g_xch[32][32];
inline std::atomic<int> g_or{0};
inline std::vector<float> g_dyn;
inline void __syncthreads() { g_block->arrive_and_wait(); }
inline int __syncthreads_or(int p) {
  g_block->arrive_and_wait();
  if (p) g_or.fetch_or(1);
  g_block->arrive_and_wait();
  const int r = g_or.load();
  g_block->arrive_and_wait();
  if (threadIdx.x == 0) g_or = 0;
  return r;
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int o) {
  if (mask != 0xffffffffu) std::abort();
  const unsigned w = threadIdx.x / 32, l = threadIdx.x % 32;
  g_warp[w]->arrive_and_wait();
  std::memcpy(&g_xch[w][l], &v, sizeof(T));
  g_warp[w]->arrive_and_wait();
  T r;
  std::memcpy(&r, &g_xch[w][l ^ o], sizeof(T));
  return r;
}
inline float __expf(float x) { return expf(x); }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline void __stwb(uint4* p, uint4 v) { *p = v; }
#define cudaGetLastError() cudaSuccess
template <typename K, typename... A>
void emu_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, K kernel, A... args) {
  blockDim = {block.x, 1, 1};
  g_dyn.assign(smem / sizeof(float) + 1, NAN);
  for (unsigned b = 0; b < grid.x; ++b) {
    g_block = std::make_unique<std::barrier<>>(block.x);
    g_warp.clear();
    for (unsigned w = 0; w < block.x / 32; ++w) g_warp.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < block.x; ++t)
      threads.emplace_back([=] { threadIdx = {t, 0, 0}; blockIdx = {b, 0, 0}; kernel(args...); });
    for (auto& t : threads) t.join();
  }
}
"""

EMULATION_ENTRY = r"""
extern "C" int emu_fwd(const lpreg::TokenStatsFwdArgs* a) { return (int)lpreg::cuda::token_stats_fwd(*a, nullptr); }
extern "C" int emu_bwd(const lpreg::TokenStatsBwdArgs* a) { return (int)lpreg::cuda::token_stats_bwd(*a, nullptr); }
"""

EMU_MAX_CHUNKS = 4  # the emulated build's shared-memory chunk table: tiny, so that rows overflow it


def _cuda_include():
    roots = [os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(NVCC or "")), "/usr/local/cuda"]
    for root in roots:
        if root and os.path.exists(os.path.join(root, "include", "cuda_bf16.h")):
            return os.path.join(root, "include")
    return None


def build_emulated(src, out_dir, name):
    """Compile token_stats.cu source text for the host with the emulation above; returns the .so path."""
    src = src.replace("extern __shared__ float chunk_max[];", "float* chunk_max = g_dyn.data();")
    src = re.sub(r"constexpr int64_t kMaxChunks = \d+;", f"constexpr int64_t kMaxChunks = {EMU_MAX_CHUNKS};", src)
    src, launches = re.subn(r"([\w:]+<[^;]*?>)<<<(.*?)>>>\((.*?)\);", r"emu_launch(\2, \1, \3);", src)
    assert launches == 4, f"expected 4 kernel launches in token_stats.cu, found {launches}"
    (out_dir / "emulation.h").write_text(EMULATION_H)
    cpp = out_dir / f"{name}.cpp"
    cpp.write_text('#include "emulation.h"\n' + src + EMULATION_ENTRY)
    lib = out_dir / f"lib{name}.so"
    cmd = ["g++", "-std=c++20", "-O2", "-fno-strict-aliasing", "-fPIC", "-shared", "-pthread", "-w",
           "-I", _cuda_include(), "-I", os.path.join(ROOT, "csrc"), "-I", str(out_dir), str(cpp), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"g++ failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}"
    return str(lib)


class EmulatedKernels:
    """ctypes front end of an emulated build: forward / backward on CPU tensors."""

    def __init__(self, lib_path):
        import ctypes

        import torch

        self.torch, self.ctypes = torch, ctypes
        self.lib = ctypes.CDLL(lib_path)
        p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float

        class Rows(ctypes.Structure):  # csrc/token_stats_args.h, field for field: RowInputs, the base
            _fields_ = [("logits", p), ("proxy", p), ("labels", p), ("logits_dtype", ctypes.c_int),
                        ("proxy_dtype", ctypes.c_int), ("N", i64), ("V", i64), ("logits_row_stride", i64),
                        ("proxy_row_stride", i64), ("inv_temperature", f32), ("ignore_index", i64),
                        ("softcap", f32)]

        class Fwd(ctypes.Structure):  # TokenStatsFwdArgs: the base's fields, then its own
            _fields_ = [("rows", Rows), ("logp", p), ("proxy_logp", p), ("kl", p), ("entropy", p), ("row_stats", p),
                        ("log_threshold", f32), ("fixed", ctypes.c_bool)]

        class Bwd(ctypes.Structure):  # TokenStatsBwdArgs
            _fields_ = [("rows", Rows), ("grad", p), ("row_stats", p), ("g_logp", p), ("g_kl", p), ("g_entropy", p),
                        ("grad_row_stride", i64), ("vocab_offset", i64)]

        self.Rows, self.Fwd, self.Bwd = Rows, Fwd, Bwd
        self.dtypes = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

    @staticmethod
    def _ptr(t):
        return None if t is None else t.data_ptr()

    def rows(self, x, labels, proxy, inv_t, ignore_index, softcap=0.0):
        """The RowInputs of (N, V) logits x, (N,) int64 labels or None and a proxy or None; inv_t and
        softcap: the folded logit transform (csrc/logit_transform.h; softcap 0: none)."""
        ptr = self._ptr
        pdt = self.dtypes[(proxy if proxy is not None else x).dtype]
        return self.Rows(ptr(x), ptr(proxy), ptr(labels), self.dtypes[x.dtype], pdt, x.shape[0], x.shape[1],
                         x.stride(0), proxy.stride(0) if proxy is not None else 0, inv_t, ignore_index, softcap)

    def forward(self, x, labels, proxy, inv_t, fixed, log_threshold, ignore_index=-100, softcap=0.0):
        torch, ptr = self.torch, self._ptr
        N, V = x.shape
        outs = [torch.empty(N) for _ in range(4)]
        stats = torch.empty(N, 5)
        a = self.Fwd(self.rows(x, labels, proxy, inv_t, ignore_index, softcap), *map(ptr, outs), ptr(stats),
                     log_threshold, fixed)
        assert self.lib.emu_fwd(self.ctypes.byref(a)) == 0
        return (*outs, stats)

    def backward(self, x, labels, proxy, stats, g_logp, g_kl, g_h, inv_t, ignore_index=-100, vocab_offset=0,
                 softcap=0.0):
        ptr = self._ptr
        N, V = x.shape
        grad = self.torch.empty(N, V, dtype=x.dtype)
        a = self.Bwd(self.rows(x, labels, proxy, inv_t, ignore_index, softcap), ptr(grad), ptr(stats), ptr(g_logp),
                     ptr(g_kl), ptr(g_h), grad.stride(0), vocab_offset)
        assert self.lib.emu_bwd(self.ctypes.byref(a)) == 0
        return grad


needs_emulation = pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None,
                                     reason="g++ or the CUDA headers are not installed")


def _without_guard(src):
    """token_stats.cu with the backward's ignored-row branch removed (issue 8's defect)."""
    bwd = _kernel_source(src, "token_stats_bwd_kernel")
    guard = re.search(r"  if \(a\.labels && label == a\.ignore_index\) \{.*?\n  \}\n", bwd, re.S).group(0)
    return src.replace(bwd, bwd.replace(guard, ""))


@pytest.fixture(scope="module")
def emulated_builds(tmp_path_factory):
    """{"token_stats": the source as it is, "no_guard": without the ignored-row branch}, built at once."""
    from concurrent.futures import ThreadPoolExecutor

    with open(TOKEN_STATS) as f:
        src = f.read()
    out = tmp_path_factory.mktemp("emu")
    sources = {"token_stats": src, "no_guard": _without_guard(src)}
    with ThreadPoolExecutor(2) as pool:
        libs = {k: pool.submit(build_emulated, v, out, k) for k, v in sources.items()}
        return {k: EmulatedKernels(f.result()) for k, f in libs.items()}


@pytest.fixture(scope="module")
def emulated(emulated_builds):
    return emulated_builds["token_stats"]


def _issue8_example(torch):
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(3, 300, generator=gen) * 30
    z[:, 5] = 120.0  # e^120 overflows fp32
    return z, torch.tensor([1, 2, -100])


def _fwd_bwd(fwd, bwd, x, labels, proxy, inv_t, fixed, log_threshold):
    """Forward, then backward with fixed upstream gradients, through either implementation."""
    import torch

    g = [torch.linspace(-1.5, 2.0, x.shape[0]) + k for k in range(3)]
    out = fwd(x, labels, proxy, inv_t, fixed, log_threshold, -100)
    return out, bwd(x, labels, proxy, out[4], *g, inv_t, -100)


@needs_emulation
def test_emulated_cuda_ignored_rows_have_zero_gradient(emulated):
    import torch

    z, labels = _issue8_example(torch)
    for dtype in (torch.float32, torch.bfloat16):
        for proxy in (None, (z + 1.0).to(dtype)):
            out, grad = _fwd_bwd(emulated.forward, emulated.backward, z.to(dtype), labels, proxy, 1 / 0.7, False,
                                 math.log(0.02))
            assert torch.equal(grad[2].float(), torch.zeros(300)) and torch.isfinite(grad.float()).all()
            assert all(o[2].item() == 0.0 for o in out[:4]) and out[4][2].tolist() == [0, 0, 0, 0, -1]


@needs_emulation
def test_emulated_cuda_without_the_guard_gives_nan(emulated_builds):
    # the same build with the backward's ignored-row branch removed: issue 8's NaN comes back,
    # so the test above can fail
    import torch

    broken = emulated_builds["no_guard"]
    z, labels = _issue8_example(torch)
    _, grad = _fwd_bwd(broken.forward, broken.backward, z, labels, None, 1 / 0.7, False, math.log(0.02))
    assert torch.isnan(grad[2]).any()


def _peaked(torch, rows, V, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, V, generator=gen) * 2
    for r in range(rows):
        x[r, torch.randint(0, V, (1 + r % 3,), generator=gen)] = 25.0 - r
    return x


@needs_emulation
def test_emulated_cuda_matches_the_cpu_kernel(emulated):
    # block skipping (peaked rows: most chunks skipped; rows longer than the emulated build's
    # 4-entry chunk table), "fixed" with K = {argmax} alone, unaligned starts, proxies of the
    # same and of another element size, -inf entries, NaN / all -inf / ignored rows
    import torch

    from lpreg import _native

    if not _native.available("cpu"):
        pytest.skip("lpreg._C is not built")
    native_fwd, native_bwd = _native.token_stats_forward, _native.token_stats_backward
    V = 2000  # 128 threads a block; 16 (fp32) or 8 (16-bit) chunks a row, past the 4-entry table
    base = _peaked(torch, 4, V + 3, seed=1)
    flat = torch.randn(3, V + 3, generator=torch.Generator().manual_seed(2)) * 0.1
    flat[:, 300] = 1.0  # the argmax: inside the chunk table (chunk 1 or 2), the other chunks skipped
    special = torch.randn(5, V + 3)  # -inf entries; a NaN; only -inf; a +inf; an ignored row
    special[0, ::7] = -math.inf
    special[1, 7] = math.nan
    special[2] = -math.inf
    special[3, 11] = math.inf
    cases = []
    for dtype, off in ((torch.float32, 0), (torch.float32, 3), (torch.bfloat16, 0), (torch.bfloat16, 3),
                       (torch.float16, 1)):
        x = base.to(dtype)[:, off:off + V]
        labels = torch.tensor([0, 17, V - 1, -100])
        same = (x.float() + 0.3).to(dtype)
        cases += [(x, labels, None, 1.0, False, 0.02), (x, labels, same, 1.25, False, 0.1),
                  (x, labels, (x.float() - 0.2).contiguous(), 1.0, True, 0.05),
                  (flat.to(dtype)[:, off:off + V], torch.tensor([300, 3, 5]), None, 1.0, True, 0.5),
                  (special.to(dtype)[:, off:off + V], torch.tensor([1, 2, 3, 4, -100]), None, 0.8, False, 0.02)]
    special_rows = 0
    for x, labels, proxy, inv_t, fixed, threshold in cases:
        log_t = float(torch.tensor(math.log(threshold), dtype=torch.float32))  # the op's fp32 scalar
        got, got_grad = _fwd_bwd(emulated.forward, emulated.backward, x, labels, proxy, inv_t, fixed, log_t)
        want, want_grad = _fwd_bwd(native_fwd, native_bwd, x, labels, proxy, inv_t, fixed, log_t)
        msg = f"{x.dtype} proxy={None if proxy is None else proxy.dtype} fixed={fixed}"
        # fp32 accumulation of up to V terms in another order on each side: 1e-5
        for a, b in zip(got[:4], want[:4]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True, msg=msg)
        # the gradient, rounded to the logits' dtype: fp32 to 1e-5 of its scale; bf16 / fp16
        # may round the other way: one step of bf16's 8-bit significand, 2^-7 of the scale
        scale = want_grad.float().nan_to_num().abs().max().item()
        tol = 1e-5 if x.dtype == torch.float32 else 2**-7
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=0, atol=tol * scale + 1e-7,
                                   equal_nan=True, msg=msg)
        if x.shape[0] == 5:  # docs/spec.md §4: NaN, all -inf and +inf rows give NaN outputs, no finite gradient
            special_rows += 1
            assert all(torch.isnan(o[1:4]).all() for o in got[:4]), msg
            assert not torch.isfinite(got_grad[1:4].float()).any(), msg
    assert special_rows == 5


@needs_emulation
def test_emulated_cuda_soft_cap_matches_the_cpu_kernel(emulated):
    # the logit transform (issue 30): a multiplier and a tanh soft-cap folded into inv_temperature and
    # softcap (csrc/logit_transform.h), forward and backward (the chain rule through tanh), with
    # saturated logits, -inf entries (finite -c under the cap), +inf and NaN rows, a proxy and unaligned rows
    import torch

    from lpreg import _native
    from lpreg._contract import transform_constants

    if not _native.available("cpu"):
        pytest.skip("lpreg._C is not built")
    V, T, s, c = 700, 0.8, 1.5, 10.0
    mult, cap = transform_constants(1 / T, s, c)
    log_t = float(torch.tensor(math.log(0.05), dtype=torch.float32))
    labels = torch.tensor([1, 9, 11, 13, -100])
    for dtype, off in ((torch.float32, 0), (torch.bfloat16, 3)):
        base = _peaked(torch, 5, V + 3, seed=4) * 3
        base[0, off::5] = -math.inf
        base[1, off + 9] = 1e6  # tanh saturates: dz/dx = 0
        base[2, off + 11] = math.inf  # +-c under the cap: an ordinary row
        base[3, off + 13] = math.nan  # NaN stays NaN
        x = base.to(dtype)[:, off:off + V]
        for proxy in (None, (x.float() + 0.3).to(dtype)):
            g = [torch.linspace(-1.5, 2.0, 5) + k for k in range(3)]
            got = emulated.forward(x, labels, proxy, mult, False, log_t, -100, cap)
            want = _native.token_stats_forward(x, labels, proxy, 1 / T, False, log_t, -100, logit_scale=s,
                                               logit_softcap=c)
            for a, b in zip(got[:4], want[:4]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
            assert torch.isnan(got[0][3]) and torch.isfinite(got[0][:3]).all()
            got_grad = emulated.backward(x, labels, proxy, got[4], *g, mult, -100, 0, cap)
            want_grad = _native.token_stats_backward(x, labels, proxy, want[4], *g, 1 / T, -100, 0, logit_scale=s,
                                                     logit_softcap=c)
            scale = want_grad.float().nan_to_num().abs().max().item()
            tol = 1e-5 if dtype == torch.float32 else 2**-7
            torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=0, atol=tol * scale + 1e-7,
                                       equal_nan=True)
            assert got_grad[1, 9] == 0 and got_grad[2, 11] == 0 and torch.isnan(got_grad[3].float()).all()
