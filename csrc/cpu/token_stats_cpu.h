// CPU token-statistics kernels (csrc/cpu/token_stats_cpu.cpp): raw pointers in, no at::Tensor.
#pragma once

#include "token_stats_args.h"

namespace lpreg::cpu {

// Forward over rows [0, N) in parallel; see token_stats_cpu.cpp for the math.
void token_stats_fwd(const TokenStatsFwdArgs& args);

// Backward over rows [0, N) in parallel: writes every element of args.grad.
void token_stats_bwd(const TokenStatsBwdArgs& args);

// The vector instruction set this file was compiled for ("avx512", "avx2" or "default").
const char* compiled_isa();

}  // namespace lpreg::cpu
