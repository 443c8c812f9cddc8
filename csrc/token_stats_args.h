// Argument bundles shared by the C++ (csrc/cpu) and CUDA (csrc/cuda) token-statistics
// kernels. Plain C++: no torch, no CUDA headers, so that `nvcc` and `g++` both compile it
// on a machine without a GPU.
//
// The row-statistics contract is documented in kernels/token_stats.py: the forward writes
// logp, proxy_logp, kl, entropy (N,) fp32 and row_stats (N, kRowStatsWidth) fp32
// [lse, H, lse_K, cutoff, argmax_y] (slots named in row_stats.h, with the ignored-row
// invariant); the backward reads row_stats back and writes the gradient (N, V) in the
// logits' dtype. For vocabulary-parallel rows the forward is split in two passes over this
// rank's shard (ShardPass1Args, ShardPass2Args; partials named in row_partials.h), and the
// backward takes the shard's first global column (vocab_offset).
#pragma once

#include <cstdint>

#include "row_partials.h"
#include "row_stats.h"

namespace lpreg {

// Element type of a logits / proxy / gradient buffer. Computation is always fp32.
enum class Dtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// The rows every kernel reads. Each bundle below is one (a base: `a.logits`, `a.labels`, ...
// read alike in every kernel); the layout is the base's fields, then the bundle's own.
struct RowInputs {
  const void* logits;     // (N, V), rows of unit stride
  const void* proxy;      // (N, V) or nullptr (on-policy: the proxy is the logits)
  const int64_t* labels;  // (N,) or nullptr; a row whose label is ignore_index is skipped
  Dtype logits_dtype;
  Dtype proxy_dtype;
  // shapes / strides (in elements)
  int64_t N;
  int64_t V;
  int64_t logits_row_stride;
  int64_t proxy_row_stride;
  // scalars
  float inv_temperature;  // the multiplier s / T of the raw logits (logit_transform.h)
  int64_t ignore_index;
  float softcap;  // c / T of a soft-capped head, 0 without a soft-cap (logit_transform.h)
};

struct TokenStatsFwdArgs : RowInputs {
  // outputs
  float* logp;        // (N,)
  float* proxy_logp;  // (N,)
  float* kl;          // (N,)
  float* entropy;     // (N,)
  float* row_stats;   // (N, kRowStatsWidth), contiguous
  float log_threshold;  // log(kappa) for "min_p", log(tau) for "fixed"
  bool fixed;
};

struct TokenStatsBwdArgs : RowInputs {
  void* grad;  // (N, V) in logits_dtype
  const float* row_stats;  // (N, kRowStatsWidth), contiguous
  const float* g_logp;     // (N,) or nullptr (then no logp term)
  const float* g_kl;       // (N,) or nullptr
  const float* g_entropy;  // (N,) or nullptr
  int64_t grad_row_stride;
  int64_t vocab_offset;  // the shard's first global column: labels and the argmax slot are global
};

// Vocabulary-parallel pass 1: partials (N, kPass1Width) of this shard, needing nothing else.
struct ShardPass1Args : RowInputs {
  float* partials;  // (N, kPass1Width), contiguous
  bool fixed;
};

// Vocabulary-parallel pass 2: partials (N, kPass2Width) given the rows' combined statistics.
struct ShardPass2Args : RowInputs {
  float* partials;         // (N, kPass2Width), contiguous
  const float* cutoff;     // (N,): y_i >= cutoff keeps column i
  const float* max_y;      // (N,): the reference of the kept sums (max of y; 0 for a bad row)
  const int64_t* argmax;   // (N,): the row's first argmax as a column of this shard, -1 elsewhere
};

}  // namespace lpreg
