// Fused Lp-Reg token statistics on CUDA (SPEC sections 1, 2 and 4), torch-free.
//
// Per row, with x = z / T and the proxy source y = proxy / T (y = x on-policy):
//
//   lse = logsumexp(x)          H = log s - t / s,  s = sum e^(x-m), t = sum e^(x-m) (x-m)
//   K   = {i : y_i >= cutoff} U {argmax y}
//         cutoff = max y + log kappa (min_p) | lse_y + log tau (fixed; +inf when max y < cutoff)
//   lse_K = logsumexp_K(y)      kl = log1p(dropped / kept) on-policy,
//                               kl = E_q[y - x] + lse - lse_K with a proxy
//   grad_z = (g_logp (e_label - p) + g_kl (p - q) - g_H p (log p + H)) / T
//
// Row-statistics contract (outputs, row_stats = [lse, H, lse_K, cutoff, argmax_y], ignored and
// NaN rows): see kernels/token_stats.py.
//
// Layout: one block per row (grid = N), 128-512 threads by V. Each thread walks its columns
// with 16-byte loads (8 bf16/fp16 or 4 fp32 per load) once the row pointer is 16-byte
// aligned; a scalar head handles the unaligned start and a scalar tail V mod 8; rows whose
// operands are misaligned relative to each other (or of different element sizes) run scalar.
// Per-thread partials (online max/sum/entropy moment, first argmax) are merged with warp
// shuffles, then across warps through shared memory. Accumulation is fp32.
// Memory traffic: forward reads the row twice (pass 2, the kept-set sums, needs the final max
// and cutoff; the second read hits L2 for rows of ordinary size), backward reads the row
// once (twice with a proxy) and writes the gradient once.
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

// elements before p + head is 16-byte aligned (V when p is not even element-aligned)
template <typename T>
__device__ __forceinline__ int64_t head_len(const T* p, int64_t V) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T) != 0) return V;
  const int64_t h = static_cast<int64_t>((16 - a % 16) % 16 / sizeof(T));
  return h < V ? h : V;
}

// Call f(col, x, y) for every column this thread owns, in increasing column order, with
// x, y the fp32 values times inv_t (y = 0 without kHasY). With kOut, f returns the gradient
// of that column, stored to g in TX. 16-byte loads / stores where all operands are aligned
// alike; a scalar head up to the first aligned column and a scalar tail.
template <typename TX, typename TY, bool kHasY, bool kOut, typename F>
__device__ __forceinline__ void walk_row(const TX* x, const TY* y, TX* g, int64_t V, float inv_t, F&& f) {
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
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const int64_t c0 = head + i * kN;
    const uint4 rx = *reinterpret_cast<const uint4*>(x + c0);
    const TX* ex = reinterpret_cast<const TX*>(&rx);
    float yv[kN];
    if constexpr (kHasY && sizeof(TY) == sizeof(TX)) {
      const uint4 ry = *reinterpret_cast<const uint4*>(y + c0);
      const TY* ey = reinterpret_cast<const TY*>(&ry);
#pragma unroll
      for (int k = 0; k < kN; ++k) yv[k] = to_f(ey[k]) * inv_t;
    } else {
#pragma unroll
      for (int k = 0; k < kN; ++k) yv[k] = 0.f;
    }
    if constexpr (kOut) {
      uint4 rg;
      TX* eg = reinterpret_cast<TX*>(&rg);
#pragma unroll
      for (int k = 0; k < kN; ++k) eg[k] = from_f<TX>(f(c0 + k, to_f(ex[k]) * inv_t, yv[k]));
      *reinterpret_cast<uint4*>(g + c0) = rg;
    } else {
#pragma unroll
      for (int k = 0; k < kN; ++k) f(c0 + k, to_f(ex[k]) * inv_t, yv[k]);
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

template <typename TX, typename TY, bool kHasProxy>
__global__ void token_stats_fwd_kernel(const TokenStatsFwdArgs a) {
  const int64_t row = blockIdx.x;
  float* stats = a.row_stats + row * kRowStatsWidth;
  const int64_t label = a.labels ? a.labels[row] : 0;
  if (a.labels && label == a.ignore_index) {  // ignored row: zeros (and no gradient)
    if (threadIdx.x == 0) {
      a.logp[row] = a.proxy_logp[row] = a.kl[row] = a.entropy[row] = 0.f;
      stats[0] = stats[1] = stats[2] = stats[3] = 0.f;
      stats[4] = -1.f;
    }
    return;
  }
  __shared__ Online sm_online[32];
  __shared__ ArgMax sm_arg[32];
  __shared__ float sm_sum[32];
  const TX* xr = static_cast<const TX*>(a.logits) + row * a.logits_row_stride;
  const TY* yr = kHasProxy ? static_cast<const TY*>(a.proxy) + row * a.proxy_row_stride : nullptr;
  const bool fixed = a.fixed;

  // pass 1: online max / sum / entropy moment of x, max / sum of y, first argmax of y, NaNs
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
  });
  const bool any_nan = __syncthreads_or(nan_seen);
  sx = block_reduce(sx, sm_online, Online{-INFINITY, 0.f, 0.f});
  sy = kHasProxy ? block_reduce(sy, sm_online, Online{-INFINITY, 0.f, 0.f}) : sx;
  if (fixed) best = block_reduce(best, sm_arg, ArgMax{-INFINITY, -1});
  const int64_t argmax_y = fixed ? best.i : -1;
  const float m = sx.m, my = sy.m;
  const bool bad = any_nan || !(m > -INFINITY) || !(my > -INFINITY);
  float cutoff;
  if (fixed) {
    cutoff = my + logf(sy.s) + a.log_threshold;
    if (my < cutoff) cutoff = INFINITY;  // no token reaches tau: K = {first argmax}
  } else {
    cutoff = my + a.log_threshold;
  }
  const float my_ref = bad ? 0.f : my;

  // pass 2: kept-set sums relative to max y: sum_K e^(y-my), and sum_K e^(y-my)(y-x) with a
  // proxy or the dropped sum on-policy
  float kept = 0.f, other = 0.f;
  walk_row<TX, TY, kHasProxy, false>(xr, yr, nullptr, a.V, a.inv_temperature, [&](int64_t c, float x, float y) {
    const float yv = kHasProxy ? y : x;
    const float e = __expf(yv - my_ref);
    if (yv >= cutoff || c == argmax_y) {
      kept += e;
      if (kHasProxy) other += e * (yv - x);
    } else if (!kHasProxy) {
      other += e;
    }
  });
  kept = block_reduce(kept, sm_sum, 0.f);
  other = block_reduce(other, sm_sum, 0.f);

  if (threadIdx.x == 0) {
    const float lse = m + logf(sx.s);
    const float entropy = logf(sx.s) - sx.t / sx.s;
    const float lse_kept = my_ref + logf(kept);
    const float kl = kHasProxy ? other / kept + lse - lse_kept : log1pf(other / kept);
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
    stats[0] = bad ? NAN : lse;  // a NaN lse makes the backward NaN for the whole row
    stats[1] = bad ? NAN : entropy;
    stats[2] = lse_kept;
    stats[3] = cutoff;
    stats[4] = static_cast<float>(argmax_y);
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
  const float lse = st[0], entropy = st[1], lse_kept = st[2], cutoff = st[3];
  const int64_t argmax_y = static_cast<int64_t>(st[4]);
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
    if (a.proxy == nullptr) {
      token_stats_fwd_kernel<TX, TX, false><<<grid, block, 0, stream>>>(a);
      return;
    }
    proxy_ok = dispatch(a.proxy_dtype, [&](auto ty) {
      using TY = Tag<decltype(ty)>;
      token_stats_fwd_kernel<TX, TY, true><<<grid, block, 0, stream>>>(a);
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
