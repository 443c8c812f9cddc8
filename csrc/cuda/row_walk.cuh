// Device building blocks of the CUDA token-statistics kernels (csrc/cuda/token_stats.cu, the whole
// row; csrc/cuda/token_stats_shard.cu, the two passes over a vocabulary shard): conversions, the
// row walker with 16-byte loads and its chunk policies, the online reductions, and the two passes
// of the forward as device functions. Torch-free: nvcc compiles it without a GPU, and
// tests/test_cuda_compile.py runs it on the CPU through its host emulation.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "logit_transform.h"
#include "token_stats_args.h"

namespace lpreg::cuda {
namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ uint32_t bits16(__half v) { return __half_as_ushort(v); }

// Store 16 / sizeof(T) fp32 values, rounded to T, to the 16-byte aligned p as one 16-byte
// store. __stwb (st.global.wb.v4): a plain store of a uint4, filled through a T* or not,
// is split by the compiler into 4 or 8 scalar stores.
template <typename T>
__device__ __forceinline__ void store16(T* p, const float* v) {
  uint32_t w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if constexpr (sizeof(T) == 4) {
      w[k] = __float_as_uint(v[k]);
    } else {
      w[k] = bits16(from_f<T>(v[2 * k])) | (bits16(from_f<T>(v[2 * k + 1])) << 16);
    }
  }
  __stwb(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
}

// elements before p + head is 16-byte aligned (V when p is not even element-aligned)
template <typename T>
__device__ __forceinline__ int64_t head_len(const T* p, int64_t V) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T) != 0) return V;
  const int64_t h = static_cast<int64_t>((16 - a % 16) % 16 / sizeof(T));
  return h < V ? h : V;
}

// Block skipping policies of walk_row: which chunks (one warp's 32 consecutive vectors) to
// visit, and what to record of each.
struct AllChunks {  // visit everything, record nothing (the backward); record() only runs with kRecord
  static constexpr bool kRecord = false;
  __device__ __forceinline__ bool visit(int64_t, int64_t, int64_t) const { return true; }
};

struct RecordChunks {  // pass 1: max of y of chunk j into chunk_max[j] (chunks past cap: none)
  static constexpr bool kRecord = true;
  float* chunk_max;
  int64_t cap;
  __device__ __forceinline__ bool visit(int64_t, int64_t, int64_t) const { return true; }
  __device__ __forceinline__ void record(int64_t j, float v) const {
    if (j < cap) chunk_max[j] = v;
  }
};

struct KeptChunks {  // pass 2: only the chunks that can hold a kept token
  static constexpr bool kRecord = false;
  const float* chunk_max;
  int64_t cap;
  float cutoff;
  int64_t argmax;  // -1 when unused
  // chunk j covers columns [c_lo, c_hi); its max is known only for j < cap
  __device__ __forceinline__ bool visit(int64_t j, int64_t c_lo, int64_t c_hi) const {
    return j >= cap || chunk_max[j] >= cutoff || (argmax >= c_lo && argmax < c_hi);
  }
};

// The logit transform of a row's raw values (logit_transform.h): x' = xf(raw) = raw * inv_t, or
// softcap * tanh(raw * inv_t / softcap) with a soft-cap (softcap > 0; a warp-uniform branch).
struct Xform {
  float inv_t, softcap;
  __device__ __forceinline__ float operator()(float v) const { return transform_logit(v, inv_t, softcap); }
};

// Call f(col, x, y) for every column this thread owns, in increasing column order, with
// x, y the fp32 values through xf (y = 0 without kHasY). With kOut, f returns the gradient
// of that column, stored to g in TX. 16-byte loads / stores where all operands are aligned
// alike; a scalar head up to the first aligned column and a scalar tail. The vector part
// runs in warp-uniform chunks of 32 vectors (chunk j = vectors [32 j, 32 j + 32)), which
// `chunks` may skip (warp-uniform branch) or record the max of (y, or x without kHasY).
template <typename TX, typename TY, bool kHasY, bool kOut, typename F, typename C = AllChunks>
__device__ __forceinline__ void walk_row(const TX* x, const TY* y, TX* g, int64_t V, const Xform& xf, F&& f,
                                         const C& chunks = C{}) {
  constexpr int kN = 16 / sizeof(TX);
  int64_t head = head_len(x, V);
  if (kHasY && (sizeof(TY) != sizeof(TX) || head_len(y, V) != head)) head = V;
  if (kOut && head_len(g, V) != head) head = V;
  auto scalar = [&](int64_t c) {
    const float xv = xf(to_f(x[c])), yv = kHasY ? xf(to_f(y[c])) : 0.f;
    if constexpr (kOut) {
      g[c] = from_f<TX>(f(c, xv, yv));
    } else {
      f(c, xv, yv);
    }
  };
  for (int64_t c = threadIdx.x; c < head; c += blockDim.x) scalar(c);
  const int64_t nvec = (V - head) / kN;
  const int lane = threadIdx.x & 31;
  // every lane of a warp runs the same iterations (the warp max below needs all 32)
  for (int64_t i0 = threadIdx.x - lane; i0 < nvec; i0 += blockDim.x) {
    const int64_t c_lo = head + i0 * kN;
    if (!chunks.visit(i0 >> 5, c_lo, c_lo + 32 * kN)) continue;
    const int64_t i = i0 + lane;
    float vmax = -INFINITY;
    if (i < nvec) {
      const int64_t c0 = head + i * kN;
      const uint4 rx = *reinterpret_cast<const uint4*>(x + c0);
      const TX* ex = reinterpret_cast<const TX*>(&rx);
      float xv[kN], yv[kN];
#pragma unroll
      for (int k = 0; k < kN; ++k) xv[k] = xf(to_f(ex[k]));
      if constexpr (kHasY && sizeof(TY) == sizeof(TX)) {
        const uint4 ry = *reinterpret_cast<const uint4*>(y + c0);
        const TY* ey = reinterpret_cast<const TY*>(&ry);
#pragma unroll
        for (int k = 0; k < kN; ++k) yv[k] = xf(to_f(ey[k]));
      } else {
#pragma unroll
        for (int k = 0; k < kN; ++k) yv[k] = 0.f;
      }
      if constexpr (C::kRecord) {
#pragma unroll
        for (int k = 0; k < kN; ++k) vmax = fmaxf(vmax, kHasY ? yv[k] : xv[k]);
      }
      if constexpr (kOut) {
        float gv[kN];
#pragma unroll
        for (int k = 0; k < kN; ++k) gv[k] = f(c0 + k, xv[k], yv[k]);
        store16(g + c0, gv);
      } else {
#pragma unroll
        for (int k = 0; k < kN; ++k) f(c0 + k, xv[k], yv[k]);
      }
    }
    if constexpr (C::kRecord) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) vmax = fmaxf(vmax, __shfl_xor_sync(0xffffffffu, vmax, o));
      if (lane == 0) chunks.record(i0 >> 5, vmax);
    }
  }
  for (int64_t c = head + nvec * kN + threadIdx.x; c < V; c += blockDim.x) scalar(c);
}

// ---- reductions -------------------------------------------------------------------------

// Online logsumexp state: s = sum e^(v-m), t = sum e^(v-m) (v-m) over the values seen.
struct Online {
  float m, s, t;
};

// Move a state to the reference mm >= st.m: s' = s e^(m-mm), t' = e^(m-mm) (t + s (m-mm)).
__device__ __forceinline__ void rebase(Online& st, float mm) {
  if (st.s > 0.f) {
    const float r = __expf(st.m - mm);
    st.t = r * (st.t + st.s * (st.m - mm));
    st.s *= r;
  }
  st.m = mm;
}

// Add one value (kT: also the entropy moment t). One exp per value: either the new value
// becomes the reference (e^0 = 1) or it is added relative to the current one.
template <bool kT>
__device__ __forceinline__ void push(Online& st, float v) {
  if (v > st.m) {
    rebase(st, v);
    st.s += 1.f;
  } else if (v > -INFINITY) {  // -inf adds nothing; NaN is counted by the caller
    const float d = v - st.m;
    const float e = __expf(d);
    st.s += e;
    if (kT) st.t += e * d;
  }
}

__device__ __forceinline__ void merge(Online& a, Online b) {
  const float mm = fmaxf(a.m, b.m);
  if (mm == -INFINITY) return;
  rebase(a, mm);
  rebase(b, mm);
  a.s += b.s;
  a.t += b.t;
}

// First argmax: larger value wins, ties go to the smaller column.
struct ArgMax {
  float v;
  int64_t i;
};

__device__ __forceinline__ void merge(ArgMax& a, ArgMax b) {
  if (b.v > a.v || (b.v == a.v && b.i >= 0 && (a.i < 0 || b.i < a.i))) a = b;
}

__device__ __forceinline__ Online shfl(Online v, int o) {
  return {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o),
          __shfl_xor_sync(0xffffffffu, v.t, o)};
}
__device__ __forceinline__ ArgMax shfl(ArgMax v, int o) {
  return {__shfl_xor_sync(0xffffffffu, v.v, o), __shfl_xor_sync(0xffffffffu, v.i, o)};
}
__device__ __forceinline__ float shfl(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ void merge(float& a, float b) { a += b; }

// Reduce a per-thread value over the block with merge() (symmetric, so every lane of the
// xor butterfly holds the same bits); every thread gets the result. `smem` holds 32 values;
// blockDim.x is a multiple of 32, at most 1024; `ident` is merge()'s neutral element.
template <typename T>
__device__ __forceinline__ T block_reduce(T v, T* smem, T ident) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge(v, shfl(v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  __syncthreads();  // smem may still be read by the previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < n_warps ? smem[lane] : ident;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge(v, shfl(v, o));
  return v;
}

// ---- the forward's two passes ------------------------------------------------------------

// Shared memory of one row's block reductions (each reduction waits for the previous one's reads).
struct RowSmem {
  Online online[32];
  ArgMax arg[32];
  float sum[32];
};

struct RowPass1 {
  Online sx, sy;     // online max / sum / entropy moment of x; max / sum of y (= sx on-policy)
  int64_t argmax_y;  // first argmax of y ("fixed"; -1 otherwise)
  bool any_nan;      // a NaN in x or y
};

// Pass 1 over a row, or a vocabulary shard of one: online max / sum / entropy moment of x, max /
// sum of y, first argmax of y ("fixed"), NaNs; `chunks` may record each chunk's max of y. Every
// thread gets the block's result.
template <typename TX, typename TY, bool kHasProxy, typename C>
__device__ __forceinline__ RowPass1 row_pass1(const TX* xr, const TY* yr, int64_t V, const Xform& xf, bool fixed,
                                              const C& chunks, RowSmem& sm) {
  Online sx{-INFINITY, 0.f, 0.f}, sy{-INFINITY, 0.f, 0.f};
  ArgMax best{-INFINITY, -1};
  int nan_seen = 0;
  walk_row<TX, TY, kHasProxy, false>(xr, yr, nullptr, V, xf, [&](int64_t c, float x, float y) {
    nan_seen |= (x != x);
    push<true>(sx, x);
    if (kHasProxy) {
      nan_seen |= (y != y);
      push<false>(sy, y);
    }
    const float yv = kHasProxy ? y : x;
    if (fixed && yv > best.v) best = {yv, c};  // strict: the first maximum of this thread
  }, chunks);
  RowPass1 r;
  r.any_nan = __syncthreads_or(nan_seen);
  r.sx = block_reduce(sx, sm.online, Online{-INFINITY, 0.f, 0.f});
  r.sy = kHasProxy ? block_reduce(sy, sm.online, Online{-INFINITY, 0.f, 0.f}) : r.sx;
  r.argmax_y = fixed ? block_reduce(best, sm.arg, ArgMax{-INFINITY, -1}).i : -1;
  return r;
}

// Pass 2: the kept-set sums relative to my_ref, kept = sum_K e^(y-my) and, with a proxy,
// cross = sum_K e^(y-my)(y-x), over the chunks `chunks` visits. Every thread gets the sums.
template <typename TX, typename TY, bool kHasProxy, typename C>
__device__ __forceinline__ void row_pass2(const TX* xr, const TY* yr, int64_t V, const Xform& xf, float cutoff,
                                          float my_ref, int64_t argmax_y, const C& chunks, RowSmem& sm, float& kept,
                                          float& cross) {
  kept = 0.f;
  cross = 0.f;
  walk_row<TX, TY, kHasProxy, false>(xr, yr, nullptr, V, xf, [&](int64_t c, float x, float y) {
    const float yv = kHasProxy ? y : x;
    if (yv >= cutoff || c == argmax_y) {
      const float e = __expf(yv - my_ref);
      kept += e;
      // +inf at x = -inf: q > 0 = p makes KL = +inf even where e underflows (0 * inf = NaN)
      if (kHasProxy) cross += x == -INFINITY ? INFINITY : e * (yv - x);
    }
  }, chunks);
  kept = block_reduce(kept, sm.sum, 0.f);
  if (kHasProxy) cross = block_reduce(cross, sm.sum, 0.f);
}

// ---- launch helpers (host) ---------------------------------------------------------------

inline int threads_for(int64_t V) { return V <= 2048 ? 128 : (V <= 16384 ? 256 : 512); }

// f(tag) with tag a null pointer of the storage type; false for an unsupported dtype
template <typename F>
bool dispatch(Dtype d, F&& f) {
  switch (d) {
    case Dtype::kFloat32: f(static_cast<float*>(nullptr)); return true;
    case Dtype::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); return true;
    case Dtype::kFloat16: f(static_cast<__half*>(nullptr)); return true;
    default: return false;
  }
}

template <typename T>
using Tag = typename std::remove_pointer<T>::type;

}  // namespace
}  // namespace lpreg::cuda
