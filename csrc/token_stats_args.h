// Argument bundles shared by the C++ (csrc/cpu) and CUDA (csrc/cuda) token-statistics
// kernels. Plain C++: no torch, no CUDA headers, so that `nvcc` and `g++` both compile it
// on a machine without a GPU.
//
// The row-statistics contract is documented in kernels/token_stats.py: the forward writes
// logp, proxy_logp, kl, entropy (N,) fp32 and row_stats (N, kRowStatsWidth) fp32
// [lse, H, lse_K, cutoff, argmax_y] (slots named in row_stats.h, with the ignored-row
// invariant); the backward reads row_stats back and writes the gradient (N, V) in the
// logits' dtype.
#pragma once

#include <cstdint>

#include "row_stats.h"

namespace lpreg {

// Element type of a logits / proxy / gradient buffer. Computation is always fp32.
enum class Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

struct TokenStatsFwdArgs {
  // outputs
  float* logp;        // (N,)
  float* proxy_logp;  // (N,)
  float* kl;          // (N,)
  float* entropy;     // (N,)
  float* row_stats;   // (N, kRowStatsWidth), contiguous
  // inputs
  const void* logits;     // (N, V), rows of unit stride
  const void* proxy;      // (N, V) or nullptr (on-policy: the proxy is the logits)
  const int64_t* labels;  // (N,) or nullptr
  Dtype logits_dtype;
  Dtype proxy_dtype;
  // shapes / strides (in elements)
  int64_t N;
  int64_t V;
  int64_t logits_row_stride;
  int64_t proxy_row_stride;
  // scalars
  float inv_temperature;
  float log_threshold;  // log(kappa) for "min_p", log(tau) for "fixed"
  bool fixed;
  int64_t ignore_index;
};

struct TokenStatsBwdArgs {
  // output
  void* grad;  // (N, V) in logits_dtype
  // inputs
  const void* logits;
  const void* proxy;  // or nullptr
  const int64_t* labels;  // or nullptr
  const float* row_stats;  // (N, kRowStatsWidth), contiguous
  const float* g_logp;     // (N,) or nullptr (then no logp term)
  const float* g_kl;       // (N,) or nullptr
  const float* g_entropy;  // (N,) or nullptr
  Dtype logits_dtype;
  Dtype proxy_dtype;
  // shapes / strides (in elements)
  int64_t N;
  int64_t V;
  int64_t logits_row_stride;
  int64_t proxy_row_stride;
  int64_t grad_row_stride;
  // scalars
  float inv_temperature;
  int64_t ignore_index;
};

}  // namespace lpreg
