// The last step of a token-statistics forward row, shared by the C++ (csrc/cpu) and CUDA
// (csrc/cuda) kernels: the label's log-probabilities, then the four outputs and the row's
// statistics, NaN for a bad row (docs/spec.md §4). Plain C++ that nvcc also compiles for the device.
#pragma once

#include <cmath>
#include <cstdint>

#include "token_stats_args.h"

#if defined(__CUDACC__)
#define LPREG_HOST_DEVICE __host__ __device__
#else
#define LPREG_HOST_DEVICE
#endif

namespace lpreg {

// The statistics of one row, from both passes.
struct RowResult {
  float lse, entropy, lse_kept, cutoff, kl;
  int64_t argmax_y;  // kNoArgmax (-1) in "min_p"
  bool bad;          // a NaN or +inf, or only -inf: NaN outputs, and a NaN lse makes the backward NaN
};

// logp = x_y - lse; proxy_logp = y_y - lse_K when the label is kept (y_y >= cutoff, or it is the
// argmax), else -inf.
LPREG_HOST_DEVICE inline void label_logps(const RowResult& r, int64_t label, float x_lab, float y_lab, float& logp,
                                          float& proxy_logp) {
  logp = x_lab - r.lse;
  proxy_logp = (y_lab >= r.cutoff || label == r.argmax_y) ? y_lab - r.lse_kept : -INFINITY;
}

LPREG_HOST_DEVICE inline void store_row(const TokenStatsFwdArgs& a, int64_t row, const RowResult& r, float logp,
                                        float proxy_logp) {
  float* stats = a.row_stats + row * kRowStatsWidth;
  a.logp[row] = r.bad ? NAN : logp;
  a.proxy_logp[row] = r.bad ? NAN : proxy_logp;
  a.kl[row] = r.bad ? NAN : r.kl;
  a.entropy[row] = r.bad ? NAN : r.entropy;
  stats[kStatLse] = r.bad ? NAN : r.lse;  // a NaN lse makes the backward NaN for the whole row
  stats[kStatEntropy] = r.bad ? NAN : r.entropy;
  stats[kStatLseKept] = r.lse_kept;
  stats[kStatCutoff] = r.cutoff;
  stats[kStatArgmax] = static_cast<float>(r.argmax_y);
}

// An ignored row (label == ignore_index): zero outputs, zero statistics and argmax -1.
LPREG_HOST_DEVICE inline void store_ignored_row(const TokenStatsFwdArgs& a, int64_t row) {
  float* stats = a.row_stats + row * kRowStatsWidth;
  a.logp[row] = a.proxy_logp[row] = a.kl[row] = a.entropy[row] = 0.f;
  stats[kStatLse] = stats[kStatEntropy] = stats[kStatLseKept] = stats[kStatCutoff] = 0.f;
  stats[kStatArgmax] = kNoArgmax;
}

// The neutral pass-1 partials of an ignored row.
LPREG_HOST_DEVICE inline void store_neutral_pass1(float* part) {
  part[kPartMax] = part[kPartMaxY] = -INFINITY;
  part[kPartSum] = part[kPartMoment] = part[kPartSumY] = part[kPartBad] = 0.f;
  part[kPartArgmaxY] = kNoArgmax;
}

}  // namespace lpreg
