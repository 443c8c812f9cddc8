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
// The row walker, the reductions and the two passes are device functions in row_walk.cuh, which
// the vocabulary-parallel passes (token_stats_shard.cu) share; the backward takes a shard's first
// global column (vocab_offset: labels and the argmax slot are global columns).


#include "cuda/row_walk.cuh"
#include "cuda/token_stats_cuda.h"
#include "row_epilogue.h"

namespace lpreg::cuda {
namespace {

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
  __shared__ RowSmem sm;
  extern __shared__ float chunk_max[];  // chunk_cap floats: max of y per chunk (pass 1)
  const TX* xr = static_cast<const TX*>(a.logits) + row * a.logits_row_stride;
  const TY* yr = kHasProxy ? static_cast<const TY*>(a.proxy) + row * a.proxy_row_stride : nullptr;
  const bool fixed = a.fixed;

  // pass 1: online max / sum / entropy moment of x, max / sum of y, first argmax of y, NaNs,
  // and the max of y of every chunk
  const Xform xf{a.inv_temperature, a.softcap};
  const RowPass1 p = row_pass1<TX, TY, kHasProxy>(xr, yr, a.V, xf, fixed,
                                                  RecordChunks{chunk_max, chunk_cap}, sm);
  const float m = p.sx.m, my = p.sy.m;
  RowResult r{};
  // NaN anywhere, a row of -inf only (max -inf) or a +inf (max +inf: no finite softmax): NaN
  // outputs, and a NaN lse makes the backward NaN for the whole row (docs/spec.md §4)
  r.bad = p.any_nan || !(m > -INFINITY && m < INFINITY) || !(my > -INFINITY && my < INFINITY);
  if (fixed) {
    r.cutoff = my + logf(p.sy.s) + a.log_threshold;
    if (my < r.cutoff) r.cutoff = INFINITY;  // no token reaches tau: K = {first argmax}
  } else {
    r.cutoff = my + a.log_threshold;
  }
  r.argmax_y = p.argmax_y;
  const float my_ref = r.bad ? 0.f : my;

  // pass 2: kept-set sums over the chunks that can hold a kept token only (row_pass1's barriers
  // made the chunk maxima visible to every warp)
  float kept, cross;
  row_pass2<TX, TY, kHasProxy>(xr, yr, a.V, xf, r.cutoff, my_ref, r.argmax_y,
                               KeptChunks{chunk_max, chunk_cap, r.cutoff, r.argmax_y}, sm, kept, cross);

  if (threadIdx.x == 0) {
    r.lse = m + logf(p.sx.s);
    r.entropy = logf(p.sx.s) - p.sx.t / p.sx.s;
    r.lse_kept = my_ref + logf(kept);
    // on-policy my = m: kl = lse - lse_K = log(s / kept), >= 0 up to rounding (K in the row);
    // the clamp keeps a NaN (fmaxf would turn it into 0)
    const float kl_on = logf(p.sx.s / kept);
    r.kl = kHasProxy ? cross / kept + r.lse - r.lse_kept : (kl_on < 0.f ? 0.f : kl_on);
    float logp = 0.f, proxy_logp = 0.f;
    if (a.labels && label >= 0 && label < a.V) {
      const float x_lab = xf(to_f(xr[label]));
      label_logps(r, label, x_lab, kHasProxy ? xf(to_f(yr[label])) : x_lab, logp, proxy_logp);
    } else if (a.labels) {  // out of range (the public API rejects it first): NaN, no wild read
      logp = proxy_logp = NAN;
    }
    store_row(a, row, r, logp, proxy_logp);
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
  // the label and the argmax as columns of this shard (out of [0, V) where another shard holds them)
  const int64_t col_label = a.labels ? label - a.vocab_offset : -1;
  const int64_t argmax_y = st[kStatArgmax] < 0.f ? -1 : static_cast<int64_t>(st[kStatArgmax]) - a.vocab_offset;
  // per-row coefficients, already divided by T
  const float inv_t = a.inv_temperature;
  const float c_logp = (a.g_logp && a.labels) ? a.g_logp[row] * inv_t : 0.f;
  const float c_kl = a.g_kl ? a.g_kl[row] * inv_t : 0.f;
  const float c_h = a.g_entropy ? a.g_entropy[row] * inv_t : 0.f;
  const bool use_kl = a.g_kl != nullptr, use_h = a.g_entropy != nullptr;
  const float softcap = a.softcap;
  walk_row<TX, TY, kHasProxy, true>(xr, yr, gr, a.V, Xform{inv_t, softcap}, [&](int64_t c, float x, float y) -> float {
    const float logp = x - lse;
    const float p = __expf(logp);
    float g = c_logp * ((c == col_label ? 1.f : 0.f) - p);  // g_logp (e_label - p)
    if (use_kl) {                                      // g_kl (p - q)
      const float yv = kHasProxy ? y : x;
      const float q = (yv >= cutoff || c == argmax_y) ? __expf(yv - lse_kept) : 0.f;
      g += c_kl * (p - q);
    }
    if (use_h) g -= c_h * (x == -INFINITY ? 0.f : p * (logp + entropy));  // -g_H p (log p + H)
    return softcap > 0.f ? g * transform_slope(x, softcap) : g;  // the chain rule through a soft-cap
  });
}

// Chunks of a row of V elements of type T (at most kMaxChunks): ceil(vectors / 32), an upper
// bound for any start alignment since the vector part holds at most V / (16 / sizeof(T)) loads.
template <typename T>
int64_t chunks_for(int64_t V) {
  const int64_t vectors = V / (16 / static_cast<int64_t>(sizeof(T)));
  const int64_t chunks = (vectors + 31) / 32;
  return chunks < kMaxChunks ? chunks : kMaxChunks;
}

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
