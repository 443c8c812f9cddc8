"""Row-statistics layout: the one definition of the per-row state a forward hands its backward.

Plain Python (no Triton import), read by the Triton kernels (as constexprs), the torch
backends, the custom-op fake kernels and the compiled-extension wrapper; the C++ kernels
name the same slots in csrc/row_stats.h, and tests/test_token_stats_ops.py checks that the
two agree.

token stats, (N, 5) fp32 per row:   [lse, H, lse_K, cutoff, argmax_y]
sparse proxy, (N, 2) fp32 per row:  [lse, H]

Ignored-row invariant (every backend): a row whose label is `ignore_index` describes no
distribution. Its forward writes zero outputs and zero statistics (argmax_y = -1) without
reading its logits, and its backward writes an exact zero gradient without reading the
statistics or computing p or q: the zeros are not a softmax state, and recomputing
p = exp(x - lse) from lse = 0 overflows to inf for a logit above about 88, which then
turns the zero coefficients into NaN (0 * inf).
"""

# token stats
LSE = 0  # logsumexp(x), x = z / T
ENTROPY = 1  # H(p)
LSE_KEPT = 2  # logsumexp over the kept set K of the proxy source y
CUTOFF = 3  # y_i >= cutoff keeps token i
ARGMAX = 4  # first argmax of y ("fixed" mode; -1 where unused), stored as fp32
TOKEN_STATS_SLOTS = ("lse", "entropy", "lse_kept", "cutoff", "argmax_y")
TOKEN_STATS_WIDTH = len(TOKEN_STATS_SLOTS)

# sparse proxy: the first two slots of token stats
SPARSE_PROXY_SLOTS = TOKEN_STATS_SLOTS[:2]
SPARSE_PROXY_WIDTH = len(SPARSE_PROXY_SLOTS)

# the argmax slot of an ignored row, and of "min_p" rows
NO_ARGMAX = -1
