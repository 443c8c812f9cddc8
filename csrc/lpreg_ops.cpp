// The only file of lpreg._C that touches at::Tensor: op schemas, argument checks, output
// allocation, the CUDA device / stream, and dispatch to the torch-free kernels in csrc/cpu
// and csrc/cuda.
//
// Ops (namespace lpreg_C; the Python package owns the namespace `lpreg` through
// torch.library.custom_op, and both cannot define the same namespace):
//   lpreg_C::token_stats_fwd(logits (N, V), labels (N,)?, proxy (N, V)?, inv_temperature,
//       fixed, log_threshold, ignore_index) -> (logp, proxy_logp, kl, entropy (N,) fp32,
//       row_stats (N, 5) fp32)
//   lpreg_C::token_stats_bwd(logits, labels?, proxy?, row_stats, g_logp?, g_kl?, g_entropy?,
//       inv_temperature, ignore_index, vocab_offset=0) -> grad (N, V) in the logits' dtype
//   lpreg_C::token_stats_shard_pass1(logits, labels?, proxy?, inv_temperature, fixed, ignore_index)
//       -> partials (N, 7) fp32, and lpreg_C::token_stats_shard_pass2(logits, labels?, proxy?,
//       inv_temperature, cutoff, max_y, argmax, ignore_index) -> partials (N, 2) fp32: the two halves
//       of the forward on a vocabulary shard (row_partials.h)
// Each op takes a trailing `softcap=0.`: with the logit transform folded in by the Python glue,
// inv_temperature is s / T and softcap is c / T (0: no soft-cap); see logit_transform.h.
// Fake (meta) implementations are registered in Python (lpreg/_native.py).

#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "cpu/token_stats_cpu.h"
#include "token_stats_args.h"

#ifdef LPREG_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/token_stats_cuda.h"
#endif

namespace lpreg {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

Dtype to_dtype(const Tensor& t, const char* name, bool allow_double) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kFloat16;
    case at::kDouble:
      if (allow_double) return Dtype::kFloat64;
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "lpreg_C: ", name, " must be float32, bfloat16 or float16",
                  allow_double ? " (or float64 on the CPU)" : "", ", got ", t.scalar_type(), " on ", t.device());
  }
  return Dtype::kFloat32;
}

void check_rows(const Tensor& logits, const OptTensor& labels, const OptTensor& proxy, int64_t ignore_index,
                bool label_range) {
  TORCH_CHECK(logits.dim() == 2, "lpreg_C: logits must be 2-D (N, V), got ", logits.dim(), "-D shape ",
              logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, "lpreg_C: logits must have V >= 1, got shape ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1 || logits.size(1) == 1 || logits.size(0) == 0,
              "lpreg_C: logits rows must have unit stride, got strides ", logits.strides());
  if (labels) {
    TORCH_CHECK(labels->scalar_type() == at::kLong, "lpreg_C: labels must be int64, got ", labels->scalar_type());
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == logits.size(0), "lpreg_C: labels must have shape (",
                logits.size(0), ",), got ", labels->sizes());
    TORCH_CHECK(labels->device() == logits.device(), "lpreg_C: labels must be on ", logits.device(), ", got ",
                labels->device());
    if (label_range && labels->is_cpu() && labels->numel() > 0) {
      // the C++ kernels read logits[row, label]: refuse a wild read (on CUDA the check would
      // cost a device sync; the kernel writes NaN for such a row instead)
      const Tensor bad = labels->lt(0).logical_or(labels->ge(logits.size(1))).logical_and(labels->ne(ignore_index));
      if (bad.any().item<bool>()) {
        TORCH_CHECK(false, "lpreg_C: labels must be in [0, ", logits.size(1), ") or ignore_index=", ignore_index,
                    ", got ", labels->masked_select(bad)[0].item<int64_t>());
      }
    }
  }
  if (proxy) {
    TORCH_CHECK(proxy->sizes() == logits.sizes(), "lpreg_C: proxy must have the shape of logits ", logits.sizes(),
                ", got ", proxy->sizes());
    TORCH_CHECK(proxy->device() == logits.device(), "lpreg_C: proxy must be on ", logits.device(), ", got ",
                proxy->device());
    TORCH_CHECK(proxy->stride(1) == 1 || proxy->size(1) == 1 || proxy->size(0) == 0,
                "lpreg_C: proxy rows must have unit stride, got strides ", proxy->strides());
  }
}

// The checked rows as the kernels read them. label_range: the kernel reads logits[row, label]
// (the forward), so a label must be a column of these logits; the backward and the shard passes
// only compare columns with it (in a shard, labels are global columns).
RowInputs row_inputs(const Tensor& logits, const OptTensor& labels, const OptTensor& proxy, double inv_temperature,
                     int64_t ignore_index, bool label_range, double softcap) {
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), "lpreg_C: softcap must be finite and >= 0 (0: none), got ",
              softcap);
  check_rows(logits, labels, proxy, ignore_index, label_range);
  const bool on_cuda = logits.is_cuda();
  RowInputs in{};
  in.logits = logits.data_ptr();
  in.proxy = proxy ? proxy->data_ptr() : nullptr;
  in.labels = labels ? labels->data_ptr<int64_t>() : nullptr;
  in.logits_dtype = to_dtype(logits, "logits", !on_cuda);
  in.proxy_dtype = proxy ? to_dtype(*proxy, "proxy", !on_cuda) : in.logits_dtype;
  in.N = logits.size(0);
  in.V = logits.size(1);
  in.logits_row_stride = logits.stride(0);
  in.proxy_row_stride = proxy ? proxy->stride(0) : 0;
  in.inv_temperature = static_cast<float>(inv_temperature);
  in.ignore_index = ignore_index;
  in.softcap = static_cast<float>(softcap);
  return in;
}

// (N,) fp32 contiguous view of an optional per-row upstream gradient
OptTensor per_row(const OptTensor& g, const Tensor& logits, const char* name) {
  if (!g) return std::nullopt;
  TORCH_CHECK(g->dim() == 1 && g->size(0) == logits.size(0), "lpreg_C: ", name, " must have shape (",
              logits.size(0), ",), got ", g->sizes());
  TORCH_CHECK(g->device() == logits.device(), "lpreg_C: ", name, " must be on ", logits.device(), ", got ",
              g->device());
  return g->to(at::kFloat).contiguous();
}

// Run a kernel on the logits' device: kernels.cpu(args) on the CPU, kernels.cuda(args, stream) on
// CUDA (a launch error is reported with `name`). Nothing runs for N = 0.
template <typename Args, typename Cpu, typename Cuda>
void launch(const Tensor& logits, const Args& args, const char* name, Cpu cpu_kernel, Cuda cuda_kernel) {
  if (args.N == 0) return;
#ifdef LPREG_WITH_CUDA
  if (logits.is_cuda()) {
    const c10::cuda::CUDAGuard guard(logits.device());
    const cudaError_t err = cuda_kernel(args, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "lpreg_C: ", name, " CUDA launch failed: ", cudaGetErrorString(err));
    return;
  }
#else
  (void)cuda_kernel;
#endif
  TORCH_INTERNAL_ASSERT(logits.device().is_cpu(), "lpreg_C: no kernel for ", logits.device());
  cpu_kernel(args);
}

#ifdef LPREG_WITH_CUDA
#define LPREG_CUDA_KERNEL(fn) [](const auto& a, cudaStream_t s) { return cuda::fn(a, s); }
#else
#define LPREG_CUDA_KERNEL(fn) nullptr
#endif

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> token_stats_fwd(
    const Tensor& logits, const OptTensor& labels, const OptTensor& proxy, double inv_temperature, bool fixed,
    double log_threshold, int64_t ignore_index, double softcap) {
  TokenStatsFwdArgs a{};
  static_cast<RowInputs&>(a) =
      row_inputs(logits, labels, proxy, inv_temperature, ignore_index, /*label_range=*/true, softcap);
  const int64_t N = a.N;
  auto opts = logits.options().dtype(at::kFloat);
  Tensor logp = at::empty({N}, opts), proxy_logp = at::empty({N}, opts), kl = at::empty({N}, opts);
  Tensor entropy = at::empty({N}, opts), row_stats = at::empty({N, kRowStatsWidth}, opts);
  a.logp = logp.data_ptr<float>();
  a.proxy_logp = proxy_logp.data_ptr<float>();
  a.kl = kl.data_ptr<float>();
  a.entropy = entropy.data_ptr<float>();
  a.row_stats = row_stats.data_ptr<float>();
  a.log_threshold = static_cast<float>(log_threshold);
  a.fixed = fixed;
  launch(logits, a, "token_stats_fwd", cpu::token_stats_fwd, LPREG_CUDA_KERNEL(token_stats_fwd));
  return {logp, proxy_logp, kl, entropy, row_stats};
}

Tensor token_stats_bwd(const Tensor& logits, const OptTensor& labels, const OptTensor& proxy, const Tensor& row_stats,
                       const OptTensor& g_logp, const OptTensor& g_kl, const OptTensor& g_entropy,
                       double inv_temperature, int64_t ignore_index, int64_t vocab_offset, double softcap) {
  TokenStatsBwdArgs a{};
  // the backward only compares columns with the label (a global column when the logits are a shard)
  static_cast<RowInputs&>(a) =
      row_inputs(logits, labels, proxy, inv_temperature, ignore_index, /*label_range=*/false, softcap);
  const int64_t N = a.N;
  TORCH_CHECK(row_stats.scalar_type() == at::kFloat && row_stats.dim() == 2 && row_stats.size(0) == N &&
                  row_stats.size(1) == kRowStatsWidth,
              "lpreg_C: row_stats must be float32 of shape (", N, ", ", kRowStatsWidth, "), got ",
              row_stats.scalar_type(), " ", row_stats.sizes());
  TORCH_CHECK(row_stats.device() == logits.device(), "lpreg_C: row_stats must be on ", logits.device(), ", got ",
              row_stats.device());
  TORCH_CHECK(!g_logp || labels, "lpreg_C: g_logp needs labels (logp is only defined for a sampled token)");
  TORCH_CHECK(vocab_offset >= 0, "lpreg_C: vocab_offset must be >= 0, got ", vocab_offset);
  const Tensor stats = row_stats.contiguous();
  const OptTensor gl = per_row(g_logp, logits, "g_logp"), gk = per_row(g_kl, logits, "g_kl"),
                  gh = per_row(g_entropy, logits, "g_entropy");
  Tensor grad = at::empty({N, a.V}, logits.options());
  a.grad = grad.data_ptr();
  a.row_stats = stats.data_ptr<float>();
  a.g_logp = gl ? gl->data_ptr<float>() : nullptr;
  a.g_kl = gk ? gk->data_ptr<float>() : nullptr;
  a.g_entropy = gh ? gh->data_ptr<float>() : nullptr;
  a.grad_row_stride = grad.stride(0);
  a.vocab_offset = vocab_offset;
  launch(logits, a, "token_stats_bwd", cpu::token_stats_bwd, LPREG_CUDA_KERNEL(token_stats_bwd));
  return grad;
}

Tensor token_stats_shard_pass1(const Tensor& logits, const OptTensor& labels, const OptTensor& proxy,
                               double inv_temperature, bool fixed, int64_t ignore_index, double softcap) {
  ShardPass1Args a{};
  static_cast<RowInputs&>(a) =
      row_inputs(logits, labels, proxy, inv_temperature, ignore_index, /*label_range=*/false, softcap);
  Tensor partials = at::empty({a.N, kPass1Width}, logits.options().dtype(at::kFloat));
  a.partials = partials.data_ptr<float>();
  a.fixed = fixed;
  launch(logits, a, "token_stats_shard_pass1", cpu::token_stats_shard_pass1,
         LPREG_CUDA_KERNEL(token_stats_shard_pass1));
  return partials;
}

Tensor token_stats_shard_pass2(const Tensor& logits, const OptTensor& labels, const OptTensor& proxy,
                               double inv_temperature, const Tensor& cutoff, const Tensor& max_y,
                               const Tensor& argmax, int64_t ignore_index, double softcap) {
  ShardPass2Args a{};
  static_cast<RowInputs&>(a) =
      row_inputs(logits, labels, proxy, inv_temperature, ignore_index, /*label_range=*/false, softcap);
  const int64_t N = a.N;
  const std::tuple<const Tensor*, const char*, at::ScalarType> per_row_inputs[] = {
      {&cutoff, "cutoff", at::kFloat}, {&max_y, "max_y", at::kFloat}, {&argmax, "argmax", at::kLong}};
  for (const auto& [t, name, dtype] : per_row_inputs) {
    TORCH_CHECK(t->scalar_type() == dtype && t->dim() == 1 && t->size(0) == N && t->is_contiguous() &&
                    t->device() == logits.device(),
                "lpreg_C: ", name, " must be a contiguous (", N, ",) ", dtype, " tensor on ", logits.device(),
                ", got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  Tensor partials = at::empty({N, kPass2Width}, logits.options().dtype(at::kFloat));
  a.partials = partials.data_ptr<float>();
  a.cutoff = cutoff.data_ptr<float>();
  a.max_y = max_y.data_ptr<float>();
  a.argmax = argmax.data_ptr<int64_t>();
  launch(logits, a, "token_stats_shard_pass2", cpu::token_stats_shard_pass2,
         LPREG_CUDA_KERNEL(token_stats_shard_pass2));
  return partials;
}

}  // namespace
}  // namespace lpreg

TORCH_LIBRARY(lpreg_C, m) {
  m.def(
      "token_stats_fwd(Tensor logits, Tensor? labels, Tensor? proxy, float inv_temperature, bool fixed, "
      "float log_threshold, int ignore_index, float softcap=0.) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "token_stats_bwd(Tensor logits, Tensor? labels, Tensor? proxy, Tensor row_stats, Tensor? g_logp, "
      "Tensor? g_kl, Tensor? g_entropy, float inv_temperature, int ignore_index, int vocab_offset=0, "
      "float softcap=0.) -> Tensor");
  m.def(
      "token_stats_shard_pass1(Tensor logits, Tensor? labels, Tensor? proxy, float inv_temperature, bool fixed, "
      "int ignore_index, float softcap=0.) -> Tensor");
  m.def(
      "token_stats_shard_pass2(Tensor logits, Tensor? labels, Tensor? proxy, float inv_temperature, Tensor cutoff, "
      "Tensor max_y, Tensor argmax, int ignore_index, float softcap=0.) -> Tensor");
}

// the same four ops on each device the extension was built for
#define LPREG_IMPLS(m)                                                  \
  m.impl("token_stats_fwd", &lpreg::token_stats_fwd);                   \
  m.impl("token_stats_bwd", &lpreg::token_stats_bwd);                   \
  m.impl("token_stats_shard_pass1", &lpreg::token_stats_shard_pass1);   \
  m.impl("token_stats_shard_pass2", &lpreg::token_stats_shard_pass2)

TORCH_LIBRARY_IMPL(lpreg_C, CPU, m) { LPREG_IMPLS(m); }

#ifdef LPREG_WITH_CUDA
TORCH_LIBRARY_IMPL(lpreg_C, CUDA, m) { LPREG_IMPLS(m); }
#endif

// `import lpreg._C` loads this library (running the registrations above) and exposes how it
// was built, so that lpreg._native can tell what it may dispatch to.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "lpreg compiled kernels (ops in torch.ops.lpreg_C)",
                                   -1, nullptr};
  PyObject* mod = PyModule_Create(&module_def);
  if (mod == nullptr) return nullptr;
#ifdef LPREG_WITH_CUDA
  PyModule_AddIntConstant(mod, "with_cuda", 1);
#else
  PyModule_AddIntConstant(mod, "with_cuda", 0);
#endif
  PyModule_AddStringConstant(mod, "cpu_isa", lpreg::cpu::compiled_isa());
  return mod;
}
