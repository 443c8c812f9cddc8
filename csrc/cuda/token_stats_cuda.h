// CUDA token-statistics kernels (csrc/cuda/token_stats.cu): host launchers on raw pointers.
// No torch headers: the .cu compiles with plain nvcc on a machine without a GPU.
#pragma once

#include <cuda_runtime_api.h>

#include "token_stats_args.h"

namespace lpreg::cuda {

// Launch the forward on `stream`: one block per row, with up to 32 KiB of dynamic shared
// memory for its block skipping (the chunk maxima). Returns the launch error, if any
// (cudaErrorInvalidValue for an unsupported dtype or N >= 2^31).
cudaError_t token_stats_fwd(const TokenStatsFwdArgs& args, cudaStream_t stream);

// Launch the backward on `stream`: one block per row, writes every element of args.grad.
cudaError_t token_stats_bwd(const TokenStatsBwdArgs& args, cudaStream_t stream);

// Launch the vocabulary-parallel halves of the forward on a shard (csrc/cuda/token_stats_shard.cu,
// partials in row_partials.h): one block per row each.
cudaError_t token_stats_shard_pass1(const ShardPass1Args& args, cudaStream_t stream);
cudaError_t token_stats_shard_pass2(const ShardPass2Args& args, cudaStream_t stream);

}  // namespace lpreg::cuda
