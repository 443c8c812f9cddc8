// CPU token-statistics kernels (csrc/cpu/token_stats_cpu.cpp): raw pointers in, no at::Tensor.
#pragma once

#include "token_stats_args.h"

namespace lpreg::cpu {

// Forward over rows [0, N) in parallel; see token_stats_cpu.cpp for the math.
void token_stats_fwd(const TokenStatsFwdArgs& args);

// Backward over rows [0, N) in parallel: writes every element of args.grad.
void token_stats_bwd(const TokenStatsBwdArgs& args);

// Vocabulary-parallel halves of the forward over rows [0, N) of a shard (row_partials.h).
void token_stats_shard_pass1(const ShardPass1Args& args);
void token_stats_shard_pass2(const ShardPass2Args& args);

// The vector instruction set this file was compiled for ("avx512", "avx2" or "default").
const char* compiled_isa();

}  // namespace lpreg::cpu
