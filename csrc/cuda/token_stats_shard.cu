// The forward of the token statistics on a vocabulary shard, in its two passes (docs/spec.md §6),
// torch-free. Rank r of a tensor-parallel group holds columns [r W, r W + V) of each row;
// lpreg/_vocab_parallel.py combines the ranks' partials (csrc/row_partials.h) between the passes:
//
//   pass 1 (the shard alone): m, s = sum e^(x-m), t = sum e^(x-m)(x-m); max y, ("fixed") sum
//          e^(y - max y) and first argmax of y (a local column); 1 if a NaN or +inf is present
//   pass 2 (given the rows' combined cutoff, max of y and argmax): kept = sum_K e^(y - max y) and,
//          with a proxy, cross = sum_K e^(y - max y)(y - x) (+inf at x = -inf)
//
// Both are the device functions of the whole-row kernel (row_walk.cuh: one block per row, 16-byte
// loads, warp-shuffle then shared-memory reductions, fp32 accumulation). Pass 2 has no chunk
// maxima from pass 1 (a second launch), so it reads the whole shard again: the sharded forward
// reads the logits twice, the whole-row one about once. An ignored row (label == ignore_index) is
// not read: pass 1 writes the neutral partials, pass 2 zeros.
// Limits: N < 2^31 rows, any V >= 1, fp32 / bf16 / fp16 storage.

#include "cuda/row_walk.cuh"
#include "cuda/token_stats_cuda.h"
#include "row_epilogue.h"

namespace lpreg::cuda {
namespace {

template <typename TX, typename TY, bool kHasProxy>
__global__ void token_stats_shard_pass1_kernel(const ShardPass1Args a) {
  const int64_t row = blockIdx.x;
  float* part = a.partials + row * kPass1Width;
  if (a.labels && a.labels[row] == a.ignore_index) {  // ignored row: never read
    if (threadIdx.x == 0) store_neutral_pass1(part);
    return;
  }
  __shared__ RowSmem sm;
  const TX* xr = static_cast<const TX*>(a.logits) + row * a.logits_row_stride;
  const TY* yr = kHasProxy ? static_cast<const TY*>(a.proxy) + row * a.proxy_row_stride : nullptr;
  const RowPass1 p = row_pass1<TX, TY, kHasProxy>(xr, yr, a.V, Xform{a.inv_temperature, a.softcap}, a.fixed,
                                                  AllChunks{}, sm);
  if (threadIdx.x == 0) {
    part[kPartMax] = p.sx.m;
    part[kPartSum] = p.sx.s;
    part[kPartMoment] = p.sx.t;
    part[kPartMaxY] = p.sy.m;
    part[kPartSumY] = (a.fixed || !kHasProxy) ? p.sy.s : 0.f;  // only "fixed" needs it (on-policy it is s)
    part[kPartArgmaxY] = static_cast<float>(p.argmax_y);
    // a +inf has no finite softmax (push() keeps it as the max); a NaN is counted aside
    part[kPartBad] = (p.any_nan || p.sx.m == INFINITY || p.sy.m == INFINITY) ? 1.f : 0.f;
  }
}

template <typename TX, typename TY, bool kHasProxy>
__global__ void token_stats_shard_pass2_kernel(const ShardPass2Args a) {
  const int64_t row = blockIdx.x;
  float* part = a.partials + row * kPass2Width;
  if (a.labels && a.labels[row] == a.ignore_index) {  // ignored row: never read
    if (threadIdx.x == 0) part[kPartKept] = part[kPartCross] = 0.f;
    return;
  }
  __shared__ RowSmem sm;
  const TX* xr = static_cast<const TX*>(a.logits) + row * a.logits_row_stride;
  const TY* yr = kHasProxy ? static_cast<const TY*>(a.proxy) + row * a.proxy_row_stride : nullptr;
  float kept, cross;
  row_pass2<TX, TY, kHasProxy>(xr, yr, a.V, Xform{a.inv_temperature, a.softcap}, a.cutoff[row], a.max_y[row],
                               a.argmax[row], AllChunks{}, sm, kept, cross);
  if (threadIdx.x == 0) {
    part[kPartKept] = kept;
    part[kPartCross] = kHasProxy ? cross : 0.f;
  }
}

// launch(TX tag, TY tag, has_proxy) for the storage types of the logits and, with a proxy, of the
// proxy; the launch error, or cudaErrorInvalidValue for an unsupported dtype or N >= 2^31
template <typename Launch>
cudaError_t launch_rows(const RowInputs& a, Launch&& launch) {
  if (a.N == 0) return cudaSuccess;
  if (a.N >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  bool proxy_ok = true;
  const bool ok = dispatch(a.logits_dtype, [&](auto tx) {
    if (a.proxy == nullptr) {
      launch(tx, tx, std::false_type{});
      return;
    }
    proxy_ok = dispatch(a.proxy_dtype, [&](auto ty) { launch(tx, ty, std::true_type{}); });
  });
  return (ok && proxy_ok) ? cudaGetLastError() : cudaErrorInvalidValue;
}

}  // namespace

cudaError_t token_stats_shard_pass1(const ShardPass1Args& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.N)), block(threads_for(a.V));
  return launch_rows(a, [&](auto tx, auto ty, auto has_proxy) {
    token_stats_shard_pass1_kernel<Tag<decltype(tx)>, Tag<decltype(ty)>, decltype(has_proxy)::value>
        <<<grid, block, 0, stream>>>(a);
  });
}

cudaError_t token_stats_shard_pass2(const ShardPass2Args& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.N)), block(threads_for(a.V));
  return launch_rows(a, [&](auto tx, auto ty, auto has_proxy) {
    token_stats_shard_pass2_kernel<Tag<decltype(tx)>, Tag<decltype(ty)>, decltype(has_proxy)::value>
        <<<grid, block, 0, stream>>>(a);
  });
}

}  // namespace lpreg::cuda
