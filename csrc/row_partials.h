// Vocabulary-parallel row partials: what one rank's shard of a row contributes before the ranks
// combine them (lpreg/_vocab_parallel.py; docs/spec.md §6). The layout is defined once, in
// lpreg/_contract.py (PASS1_SLOTS, PASS2_SLOTS); these constants name the same slots for C++ and
// CUDA, and tests/test_vocab_parallel_kernels.py checks that the two agree.
//
// Pass 1, (N, kPass1Width) fp32, from the shard alone: max, sum e^(x - max) and entropy moment
// sum e^(x - max)(x - max) of x; max of y, ("fixed") sum e^(y - max y) and first argmax of y (a
// local column); and 1 when the shard holds a NaN or a +inf. An ignored row: -inf, 0, 0, -inf, 0,
// -1, 0. Pass 2, (N, kPass2Width) fp32, given each row's combined cutoff, max of y and argmax: the
// kept sum e^(y - max y) over the shard, and with a proxy the cross term e^(y - max y)(y - x)
// (+inf at x = -inf); an ignored row: zeros.
#pragma once

namespace lpreg {

constexpr int kPartMax = 0;
constexpr int kPartSum = 1;
constexpr int kPartMoment = 2;
constexpr int kPartMaxY = 3;
constexpr int kPartSumY = 4;
constexpr int kPartArgmaxY = 5;
constexpr int kPartBad = 6;
constexpr int kPass1Width = 7;
constexpr int kPartKept = 0;
constexpr int kPartCross = 1;
constexpr int kPass2Width = 2;

}  // namespace lpreg
