// Row-statistics layout of the token-statistics kernels (csrc/cpu, csrc/cuda): the slots of one
// row of row_stats, (N, kRowStatsWidth) fp32, which the forward writes and the backward reads.
// The layout is defined once, in lpreg/_contract.py (read by the Triton and PyTorch paths);
// these constants name the same slots for C++ and CUDA, and tests/test_token_stats_ops.py
// checks that the two definitions agree.
//
// Ignored-row invariant: a row whose label is ignore_index describes no distribution. The
// forward writes zero outputs and zero statistics (argmax -1) for it without reading its
// logits; the backward writes an exact zero gradient for it without reading its statistics
// or computing p or q (p = exp(x - 0) would overflow for a logit above about 88, and the
// zero upstream coefficients times inf would be NaN).
#pragma once

namespace lpreg {

constexpr int kStatLse = 0;      // logsumexp(x), x = z / T
constexpr int kStatEntropy = 1;  // H(p)
constexpr int kStatLseKept = 2;  // logsumexp over the kept set K of y
constexpr int kStatCutoff = 3;   // y_i >= cutoff keeps token i
constexpr int kStatArgmax = 4;   // first argmax of y ("fixed" mode), as float; kNoArgmax otherwise
constexpr int kRowStatsWidth = 5;
constexpr float kNoArgmax = -1.f;  // the argmax slot of "min_p" rows and of ignored rows

}  // namespace lpreg
