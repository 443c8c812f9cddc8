// Fused Lp-Reg token statistics on CUDA (docs/spec.md §1, §2 and §4), torch-free.
//
// Per row, with x = z / T and the proxy source y = proxy / T (y = x on-policy):
//
//   lse = logsumexp(x)          H = log s - t / s,  s = sum e^(x-m), t = sum e^(x-m) (x-m)
//   K   = {i : y_i >= cutoff} U {argmax y}
//         cutoff = max y + log kappa (min_p) | lse_y + log tau (fixed; +inf when max y < cutoff)
//   lse_K = logsumexp_K(y)      kl = lse - lse_K = log(s / kept sum), >= 0, on-policy,
//                               kl = E_q[y - x] + lse - lse_K with a proxy
//   grad_z = (g_logp (e_label - p) + g_kl (p - q) - g_H p (log p + H)) / T
//
// Row-statistics contract (outputs, row_stats = [lse, H, lse_K, cutoff, argmax_y], NaN rows):
// kernels/token_stats.py and docs/spec.md §5; the slots are named in csrc/row_stats.h.
//
// Ignored rows (label == ignore_index), the invariant this file keeps: the forward writes zero
// outputs and zeroed row_stats (argmax -1) without reading the row; the backward decides
// "ignored" from the label alone, before it reads row_stats, and writes a zero gradient
// without reading the logits. It never recomputes p = e^(x - lse) from the zeroed lse of an
// ignored row: with lse = 0, e^x overflows fp32 once max x > 88 and 0 * inf = NaN (issue 8).
//
// Layout: one block per row (grid = N), 128-512 threads by V. Each thread walks its columns
// with 16-byte loads (8 bf16/fp16 or 4 fp32 per load; the backward's gradient with 16-byte
// stores) once the row pointer is 16-byte aligned; a scalar head handles the unaligned start
// and a scalar tail V mod 8; rows whose operands are misaligned relative to each other (or
// of different element sizes) run scalar.
// Per-thread partials (online max/sum/entropy moment, first argmax) are merged with warp
// shuffles, then across warps through shared memory. Accumulation is fp32.
//
// Block skipping in the forward: the vector part of a row is cut into chunks, one warp's 32
// consecutive 16-byte loads (256 bf16/fp16 or 128 fp32 columns). Pass 1 records each chunk's
// max of y in shared memory (dynamic, 4 bytes a chunk, at most kMaxChunks = 8192 chunks,
// 32 KiB; chunks past that are never skipped). Pass 2 (the kept-set sums, which need the
// final max and cutoff) re-reads only the chunks whose max reaches the cutoff or that hold
// the argmax, plus the scalar head and tail; skipped chunks hold no kept token, so the sums
// are exact. On-policy kl therefore comes from pass 1's whole sum s (kl = log(s / kept))
// and not from a dropped-token sum, as in the Triton kernel.
// Memory traffic: forward reads the row once plus the chunks that can hold a kept token (one
// or two for a peaked row; all of them for a row that is flat within log(1/kappa), and all
// of a scalar-path row); backward reads the row once (twice with a proxy) and writes the
// gradient once: about 3 N V elements for forward + backward.
// Limits: N < 2^31 rows, any V >= 1 (offsets are int64), fp32 / bf16 / fp16 storage.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/token_stats_cuda.h"

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

// Call f(col, x, y) for every column this thread owns, in increasing column order, with
// x, y the fp32 values times inv_t (y = 0 without kHasY). With kOut, f returns the gradient
// of that column, stored to g in TX. 16-byte loads / stores where all operands are aligned
// alike; a scalar head up to the first aligned column and a scalar tail. The vector part
// runs in warp-uniform chunks of 32 vectors (chunk j = vectors [32 j, 32 j + 32)), which
// `chunks` may skip (warp-uniform branch) or record the max of (y, or x without kHasY).
template <typename TX, typename TY, bool kHasY, bool kOut, typename F, typename C = AllChunks>
__device__ __forceinline__ void walk_row(const TX* x, const TY* y, TX* g, int64_t V, float inv_t, F&& f,
                                         const C& chunks = C{}) {
  constexpr int kN = 16 / sizeof(TX);
  int64_t head = head_len(x, V);
  if (kHasY && (sizeof(TY) != sizeof(TX) || head_len(y, V) != head)) head = V;
  if (kOut && head_len(g, V) != head) head = V;
  auto scalar = [&](int64_t c) {
    const float xv = to_f(x[c]) * inv_t, yv = kHasY ? to_f(y[c]) * inv_t : 0.f;
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
      for (int k = 0; k < kN; ++k) xv[k] = to_f(ex[k]) * inv_t;
      if constexpr (kHasY && sizeof(TY) == sizeof(TX)) {
        const uint4 ry = *reinterpret_cast<const uint4*>(y + c0);
        const TY* ey = reinterpret_cast<const TY*>(&ry);
#pragma unroll
        for (int k = 0; k < kN; ++k) yv[k] = to_f(ey[k]) * inv_t;
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


// ---- forward ----------------------------------------------------------------------------

// Shared memory of the chunk maxima: 4 bytes a chunk, at most this many chunks (32 KiB).
constexpr int64_t kMaxChunks = 8192;

// chunk_cap: entries of the dynamic shared array chunk_max (the launcher sizes both)
template <typename TX, typename TY, bool kHasProxy>
__global__ void token_stats_fwd_kernel(const TokenStatsFwdArgs a, const int64_t chunk_cap) {
  const int64_t row = blockIdx.x;
  float* stats = a.row_stats + row * kRowStatsWidth;
  const int64_t label = a.labels ? a.labels[row] : 0;
  if (a.labels && label == a.ignore_index) {  // ignored row: zeros, the row is never read
    if (threadIdx.x == 0) {
      a.logp[row] = a.proxy_logp[row] = a.kl[row] = a.entropy[row] = 0.f;
      stats[kStatLse] = stats[kStatEntropy] = stats[kStatLseKept] = stats[kStatCutoff] = 0.f;
      stats[kStatArgmax] = kNoArgmax;
    }
    return;
  }
  __shared__ Online sm_online[32];
  __shared__ ArgMax sm_arg[32];
  __shared__ float sm_sum[32];
  extern __shared__ float chunk_max[];  // chunk_cap floats: max of y per chunk (pass 1)
  const TX* xr = static_cast<const TX*>(a.logits) + row * a.logits_row_stride;
  const TY* yr = kHasProxy ? static_cast<const TY*>(a.proxy) + row * a.proxy_row_stride : nullptr;
  const bool fixed = a.fixed;

  // pass 1: online max / sum / entropy moment of x, max / sum of y, first argmax of y, NaNs,
  // and the max of y of every chunk
  Online sx{-INFINITY, 0.f, 0.f}, sy{-INFINITY, 0.f, 0.f};
  ArgMax best{-INFINITY, -1};
  int nan_seen = 0;
  walk_row<TX, TY, kHasProxy, false>(xr, yr, nullptr, a.V, a.inv_temperature, [&](int64_t c, float x, float y) {
    nan_seen |= (x != x);
    push<true>(sx, x);
    if (kHasProxy) {
      nan_seen |= (y != y);
      push<false>(sy, y);
    }
    const float yv = kHasProxy ? y : x;
    if (fixed && yv > best.v) best = {yv, c};  // strict: the first maximum of this thread
  }, RecordChunks{chunk_max, chunk_cap});
  const bool any_nan = __syncthreads_or(nan_seen);
  sx = block_reduce(sx, sm_online, Online{-INFINITY, 0.f, 0.f});
  sy = kHasProxy ? block_reduce(sy, sm_online, Online{-INFINITY, 0.f, 0.f}) : sx;
  if (fixed) best = block_reduce(best, sm_arg, ArgMax{-INFINITY, -1});
  const int64_t argmax_y = fixed ? best.i : -1;
  const float m = sx.m, my = sy.m;
  // NaN anywhere, a row of -inf only (max -inf) or a +inf (max +inf: no finite softmax): NaN
  // outputs, and a NaN lse makes the backward NaN for the whole row (docs/spec.md §4)
  const bool bad = any_nan || !(m > -INFINITY && m < INFINITY) || !(my > -INFINITY && my < INFINITY);
  float cutoff;
  if (fixed) {
    cutoff = my + logf(sy.s) + a.log_threshold;
    if (my < cutoff) cutoff = INFINITY;  // no token reaches tau: K = {first argmax}
  } else {
    cutoff = my + a.log_threshold;
  }
  const float my_ref = bad ? 0.f : my;

  // pass 2: kept-set sums relative to max y, sum_K e^(y-my) and, with a proxy,
  // sum_K e^(y-my)(y-x), over the chunks that can hold a kept token only (block_reduce's
  // barriers above made pass 1's chunk maxima visible to every warp)
  float kept = 0.f, cross = 0.f;
  walk_row<TX, TY, kHasProxy, false>(xr, yr, nullptr, a.V, a.inv_temperature, [&](int64_t c, float x, float y) {
    const float yv = kHasProxy ? y : x;
    if (yv >= cutoff || c == argmax_y) {
      const float e = __expf(yv - my_ref);
      kept += e;
      // +inf at x = -inf: q > 0 = p makes KL = +inf even where e underflows (0 * inf = NaN)
      if (kHasProxy) cross += x == -INFINITY ? INFINITY : e * (yv - x);
    }
  }, KeptChunks{chunk_max, chunk_cap, cutoff, argmax_y});
  kept = block_reduce(kept, sm_sum, 0.f);
  if (kHasProxy) cross = block_reduce(cross, sm_sum, 0.f);

  if (threadIdx.x == 0) {
    const float lse = m + logf(sx.s);
    const float entropy = logf(sx.s) - sx.t / sx.s;
    const float lse_kept = my_ref + logf(kept);
    // on-policy my = m: kl = lse - lse_K = log(s / kept), >= 0 up to rounding (K in the row);
    // the clamp keeps a NaN (fmaxf would turn it into 0)
    const float kl_on = logf(sx.s / kept);
    const float kl = kHasProxy ? cross / kept + lse - lse_kept : (kl_on < 0.f ? 0.f : kl_on);
    float logp = 0.f, proxy_logp = 0.f;
    if (a.labels && label >= 0 && label < a.V) {
      const float x_lab = to_f(xr[label]) * a.inv_temperature;
      const float y_lab = kHasProxy ? to_f(yr[label]) * a.inv_temperature : x_lab;
      logp = x_lab - lse;
      proxy_logp = (y_lab >= cutoff || label == argmax_y) ? y_lab - lse_kept : -INFINITY;
    } else if (a.labels) {  // out of range (the public API rejects it first): NaN, no wild read
      logp = proxy_logp = NAN;
    }
    a.logp[row] = bad ? NAN : logp;
    a.proxy_logp[row] = bad ? NAN : proxy_logp;
    a.kl[row] = bad ? NAN : kl;
    a.entropy[row] = bad ? NAN : entropy;
    stats[kStatLse] = bad ? NAN : lse;  // a NaN lse makes the backward NaN for the whole row
    stats[kStatEntropy] = bad ? NAN : entropy;
    stats[kStatLseKept] = lse_kept;
    stats[kStatCutoff] = cutoff;
    stats[kStatArgmax] = static_cast<float>(argmax_y);  // kNoArgmax (-1) in "min_p"
  }
}

// ---- backward ---------------------------------------------------------------------------

template <typename TX, typename TY, bool kHasProxy>
__global__ void token_stats_bwd_kernel(const TokenStatsBwdArgs a) {
  const int64_t row = blockIdx.x;
  TX* gr = static_cast<TX*>(a.grad) + row * a.grad_row_stride;
  const int64_t label = a.labels ? a.labels[row] : -1;
  if (a.labels && label == a.ignore_index) {
    for (int64_t c = threadIdx.x; c < a.V; c += blockDim.x) gr[c] = from_f<TX>(0.f);
    return;
  }
  const TX* xr = static_cast<const TX*>(a.logits) + row * a.logits_row_stride;
  const TY* yr = kHasProxy ? static_cast<const TY*>(a.proxy) + row * a.proxy_row_stride : nullptr;
  const float* st = a.row_stats + row * kRowStatsWidth;
  const float lse = st[kStatLse], entropy = st[kStatEntropy], lse_kept = st[kStatLseKept];
  const float cutoff = st[kStatCutoff];
  const int64_t argmax_y = static_cast<int64_t>(st[kStatArgmax]);
  // per-row coefficients, already divided by T
  const float inv_t = a.inv_temperature;
  const float c_logp = (a.g_logp && a.labels) ? a.g_logp[row] * inv_t : 0.f;
  const float c_kl = a.g_kl ? a.g_kl[row] * inv_t : 0.f;
  const float c_h = a.g_entropy ? a.g_entropy[row] * inv_t : 0.f;
  const bool use_kl = a.g_kl != nullptr, use_h = a.g_entropy != nullptr;
  walk_row<TX, TY, kHasProxy, true>(xr, yr, gr, a.V, inv_t, [&](int64_t c, float x, float y) -> float {
    const float logp = x - lse;
    const float p = __expf(logp);
    float g = c_logp * ((c == label ? 1.f : 0.f) - p);  // g_logp (e_label - p)
    if (use_kl) {                                      // g_kl (p - q)
      const float yv = kHasProxy ? y : x;
      const float q = (yv >= cutoff || c == argmax_y) ? __expf(yv - lse_kept) : 0.f;
      g += c_kl * (p - q);
    }
    if (use_h) g -= c_h * (x == -INFINITY ? 0.f : p * (logp + entropy));  // -g_H p (log p + H)
    return g;
  });
}

inline int threads_for(int64_t V) { return V <= 2048 ? 128 : (V <= 16384 ? 256 : 512); }

// Chunks of a row of V elements of type T (at most kMaxChunks): ceil(vectors / 32), an upper
// bound for any start alignment since the vector part holds at most V / (16 / sizeof(T)) loads.
template <typename T>
int64_t chunks_for(int64_t V) {
  const int64_t vectors = V / (16 / static_cast<int64_t>(sizeof(T)));
  const int64_t chunks = (vectors + 31) / 32;
  return chunks < kMaxChunks ? chunks : kMaxChunks;
}

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

cudaError_t token_stats_fwd(const TokenStatsFwdArgs& a, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  if (a.N >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(a.N)), block(threads_for(a.V));
  bool proxy_ok = true;
  const bool ok = dispatch(a.logits_dtype, [&](auto tx) {
    using TX = Tag<decltype(tx)>;
    const int64_t cap = chunks_for<TX>(a.V);
    const size_t smem = static_cast<size_t>(cap) * sizeof(float);
    if (a.proxy == nullptr) {
      token_stats_fwd_kernel<TX, TX, false><<<grid, block, smem, stream>>>(a, cap);
      return;
    }
    proxy_ok = dispatch(a.proxy_dtype, [&](auto ty) {
      using TY = Tag<decltype(ty)>;
      // operands of different element sizes run the scalar path: no chunks to record
      const int64_t cap_y = sizeof(TY) == sizeof(TX) ? cap : 0;
      token_stats_fwd_kernel<TX, TY, true><<<grid, block, cap_y * sizeof(float), stream>>>(a, cap_y);
    });
  });
  return (ok && proxy_ok) ? cudaGetLastError() : cudaErrorInvalidValue;
}

cudaError_t token_stats_bwd(const TokenStatsBwdArgs& a, cudaStream_t stream) {
  if (a.N == 0) return cudaSuccess;
  if (a.N >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(a.N)), block(threads_for(a.V));
  // the proxy is only read for the kl term's q
  const bool read_proxy = a.proxy != nullptr && a.g_kl != nullptr;
  bool proxy_ok = true;
  const bool ok = dispatch(a.logits_dtype, [&](auto tx) {
    using TX = Tag<decltype(tx)>;
    if (!read_proxy) {
      token_stats_bwd_kernel<TX, TX, false><<<grid, block, 0, stream>>>(a);
      return;
    }
    proxy_ok = dispatch(a.proxy_dtype, [&](auto ty) {
      using TY = Tag<decltype(ty)>;
      token_stats_bwd_kernel<TX, TY, true><<<grid, block, 0, stream>>>(a);
    });
  });
  return (ok && proxy_ok) ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace lpreg::cuda
