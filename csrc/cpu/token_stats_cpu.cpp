// Fused Lp-Reg token statistics on the CPU (docs/spec.md §1, §2 and §4).
//
// Per row, with x = z / T and the proxy source y = proxy / T (y = x on-policy):
//
//   lse = logsumexp(x)          H = log s - t / s,  s = sum e^(x-m), t = sum e^(x-m) (x-m)
//   K   = {i : y_i >= cutoff} U {argmax y}
//         cutoff = max y + log kappa (min_p) | lse_y + log tau (fixed; +inf when max y < cutoff)
//   lse_K = logsumexp_K(y)      kl = log1p(dropped / kept) on-policy,
//                               kl = E_q[y - x] + lse - lse_K with a proxy
//   grad_z = (g_logp (e_label - p) + g_kl (p - q) - g_H p (log p + H)) / T
//   z is the logit transform of the raw logits (csrc/logit_transform.h), applied as each block is
//   loaded; the backward multiplies by dz/dx (1 - (z / c)^2 with a soft-cap c; the scale s is
//   folded into 1/T). Without a soft-cap nothing changes: no tanh, the same bits.
//
// The row-statistics contract (outputs, row_stats = [lse, H, lse_K, cutoff, argmax_y], ignored
// and NaN rows) is the one documented in kernels/token_stats.py; the slots are named in
// csrc/row_stats.h. Ignored-row invariant: an ignored row is skipped before any arithmetic,
// its forward writes zeros, and its backward writes exact zeros without reading row_stats.
//
// Design: one thread owns a row (at::parallel_for over rows), so every sum is accumulated in
// the same order whatever the thread count: results are bitwise independent of it. A row is
// walked in blocks of kBlock elements converted to fp32 (times 1/T) into a stack buffer that
// stays in L1; the block is then reduced with at::vec::Vectorized (Sleef exp, 1 ulp).
// Memory traffic per row: forward reads the logits twice (pass 1: max / sum / entropy
// moment with a per-block online rescale; pass 2: the kept-set sums, which need the final
// max and cutoff), backward reads them once and writes the gradient once. Work: one exp per
// element in pass 1 (two with a proxy); pass 2 exponentiates only the candidates that pass 1
// could not rule out of K (see online_block), a few percent of a peaked row. A soft-capped row
// (V <= kStoredRowMax) keeps pass 1's transformed values in a per-thread row buffer that pass 2 reads,
// so a tanh is taken once per element in the forward however many candidates the row holds (a flat
// row's can be a quarter of it). Temporaries: two or three 8 KiB buffers, V / 2048 floats and, under a
// soft-cap, one or two V-float row buffers per thread; nothing of size N x V.
// Limits: any V >= 1, fp32 / bf16 / fp16 / fp64 storage (fp64 is read as fp32, as the other
// backends do), rows of unit stride, accumulation in fp32.

#include "cpu/token_stats_cpu.h"

#include "cpu/vec_tanh.h"

#include "logit_transform.h"
#include "row_epilogue.h"

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace lpreg::cpu {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int64_t kBlock = 2048;  // fp32 elements per block buffer (8 KiB)
static_assert(kBlock % 64 == 0, "block must hold whole vectors of every width");
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// the longest soft-capped row whose transformed values the forward keeps between its passes (256 KiB:
// in a core's L2 cache); a longer one transforms pass 2's candidate vectors again
constexpr int64_t kStoredRowMax = int64_t{1} << 16;

inline int64_t round_up(int64_t n) { return (n + kW - 1) / kW * kW; }

// max that propagates NaN, like at::vec::maximum
inline float nanmax(float a, float b) { return (a != a || b != b) ? kNaN : std::max(a, b); }

// e (y - x), a kept token's share of the KL's cross term sum_K e^(y-my) (y - x): +inf where
// x = -inf, since q > 0 = p there makes KL(q || p) = +inf even when e = e^(y-my) underflows
// fp32 to 0 (0 * inf would be NaN). A NaN in x or y stays NaN.
inline float cross_term(float e, float y, float x) { return x == -kInf ? kInf : e * (y - x); }
inline Vec cross_term(const Vec& e, const Vec& y, const Vec& x) {
  return Vec::blendv(e * (y - x), Vec(kInf), x == Vec(-kInf));
}

inline float hsum(const Vec& v) {  // fixed left-to-right order
  alignas(64) float buf[kW];
  v.store(buf);
  float acc = 0.f;
  for (int64_t i = 0; i < kW; ++i) acc += buf[i];
  return acc;
}

inline float hmax(const Vec& v) {
  alignas(64) float buf[kW];
  v.store(buf);
  float acc = -kInf;
  for (int64_t i = 0; i < kW; ++i) acc = nanmax(acc, buf[i]);
  return acc;
}

// The soft-cap of logit_transform.h on a vector of u = raw s / (T c): cap tanh(u) (vec_tanh.h: 2.5 ulp).
// Every soft-capped value of this file comes from here, lane for lane, so that the passes and the
// label agree bit for bit on which tokens are kept.
inline Vec softcap_vec(const Vec& u, float cap) { return vec_tanh(u) * Vec(cap); }

inline float softcap_one(float u, float cap) {
  alignas(64) float b[kW];
  softcap_vec(Vec(u), cap).store(b);
  return b[0];
}

// x' of one raw logit (the label's): as load_block computes it.
inline float transform_one(float raw, float inv_temperature, float cap) {
  return cap > 0.f ? softcap_one(raw * (inv_temperature / cap), cap) : raw * inv_temperature;
}

// dst[0, n) = x' of the raw logits src[0, n): float(src) * scale, or with a soft-cap (cap > 0)
// cap * tanh(float(src) * scale / cap) (logit_transform.h); dst[n, round_up(n)) = -inf (neutral for
// every sum below: e^(-inf) = 0, never kept, never the max). cap = 0 with scale = s / (T c) loads
// u, the soft-cap's argument, untransformed (pass 2 transforms only the vectors it needs).
template <typename T>
void load_block(const T* src, int64_t n, float scale, float cap, float* dst) {
  const float pre = cap > 0.f ? scale / cap : scale;
  const Vec vs(pre);
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + kW <= n; i += kW) (Vec::loadu(src + i) * vs).store(dst + i);
  } else if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    using VT = at::vec::Vectorized<T>;
    for (; i + VT::size() <= n; i += VT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VT::loadu(src + i));
      (lo * vs).store(dst + i);
      (hi * vs).store(dst + i + kW);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * pre;
  if (cap > 0.f) {  // the soft-cap, whole vectors (the tail's padding lanes are finite meanwhile)
    for (int64_t j = n; j < round_up(n); ++j) dst[j] = 0.f;
    for (int64_t j = 0; j < round_up(n); j += kW) softcap_vec(Vec::loadu(dst + j), cap).store(dst + j);
  }
  for (; i < round_up(n); ++i) dst[i] = -kInf;
}

// A lower bound of {u : cap tanh(u) >= thr} (soft-capped pass 2): a vector whose every lane is below it
// holds no candidate, so it is skipped without a tanh. atanh(thr / cap), less a margin m = 0.05 (1 + |a|)
// that covers the error of the computed cap tanh(u): tanh(a) - tanh(a - m) >= 5.6e-7 for every thr / cap
// in (-1 + 1e-6, 1 - 1e-6) (least at -1 + 1e-6), against at most 9e-8 of vec_tanh.h's tanh plus 6e-8 of
// the product with cap, in units of cap. thr / cap is clamped below 1 - 1e-6; at or below -1 + 1e-6 (or
// NaN) every lane is a candidate.
inline float raw_threshold(float thr, float cap) {
  const double r = static_cast<double>(thr) / cap;
  if (!(r > -1.0 + 1e-6)) return -kInf;
  const double a = std::atanh(std::min(r, 1.0 - 1e-6));
  return static_cast<float>(a - 0.05 * (1.0 + std::fabs(a)));
}

// v with its lanes [live, kW) set to -inf (the padding of a block's last vector).
inline Vec pad_tail(const Vec& v, int64_t live) {
  alignas(64) float b[kW];
  v.store(b);
  for (int64_t j = live; j < kW; ++j) b[j] = -kInf;
  return Vec::loadu(b);
}

// g[0, n) *= dx'/dx / inv_temperature at x'[0, n) (logit_transform.h): the chain rule through a
// soft-cap, 1 - (x' / cap)^2; nothing to do without one (the scale is in the coefficients).
inline void softcap_chain(const float* xb, int64_t n, float cap, float* g) {
  const Vec vinv(1.f / cap), one(1.f);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    const Vec u = Vec::loadu(xb + i) * vinv;
    (Vec::loadu(g + i) * (one - u * u)).store(g + i);
  }
  for (; i < n; ++i) g[i] *= transform_slope(xb[i], cap);
}

// dst[0, n) = T(src[0, n)), rounding to nearest even.
template <typename T>
void store_block(const float* src, int64_t n, T* dst) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + kW <= n; i += kW) Vec::loadu(src + i).store(dst + i);
  } else if constexpr (std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>) {
    using VT = at::vec::Vectorized<T>;
    for (; i + VT::size() <= n; i += VT::size()) {
      at::vec::convert_from_float<T>(Vec::loadu(src + i), Vec::loadu(src + i + kW)).store(dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

inline float block_max(const float* b, int64_t nv) {
  Vec acc(-kInf);
  for (int64_t i = 0; i < nv; i += kW) acc = at::vec::maximum(acc, Vec::loadu(b + i));
  return hmax(acc);
}

// Online logsumexp over one block: (m, s[, t, d]) describe the elements seen so far relative
// to m; the block moves the reference to m' = max(m, block max), rescaling
//   s' = s e^(m-m'),   t' = e^(m-m') (t + s (m-m'))   [t = sum e^(x-m)(x-m), for the entropy]
// then adds sum e^(x-m') and sum e^(x-m')(x-m') (0 where e = 0: x = -inf gives 0 * -inf).
// With kDrop it also sums d = sum e^(x-m') over the block's elements below thr = m' + log k.
// Every later cutoff (max + log kappa, or lse + log tau with lse >= max) is >= thr, so these
// elements are surely dropped from K, and pass 2 needs an exp only for the candidates >= thr.
// Returns thr, which pass 2 reads back per block (so both passes classify alike).
template <bool kWithT, bool kDrop>
float online_block(const float* b, int64_t nv, float bmax, float log_threshold, float& m, float& s, float& t,
                   float& d) {
  const float m_new = nanmax(m, bmax);
  const float m_ref = (m_new == -kInf) ? 0.f : m_new;
  const float scale = std::exp(m - m_ref);
  if (kWithT) t = scale * (t + (s > 0.f ? s * (m - m_ref) : 0.f));
  s *= scale;
  if (kDrop) d *= scale;
  m = m_new;
  const float thr = m_ref + log_threshold;
  const Vec vm(m_ref), vthr(thr), zero(0.f);
  Vec acc_s(0.f), acc_t(0.f), acc_d(0.f);
  for (int64_t i = 0; i < nv; i += kW) {
    const Vec x = Vec::loadu(b + i);
    const Vec dx = x - vm;
    const Vec e = dx.exp();
    acc_s = acc_s + e;
    if (kWithT) acc_t = acc_t + Vec::blendv(zero, e * dx, e > zero);
    if (kDrop) acc_d = acc_d + Vec::blendv(e, zero, x >= vthr);
  }
  s += hsum(acc_s);
  if (kWithT) t += hsum(acc_t);
  if (kDrop) d += hsum(acc_d);
  return thr;
}

// A row's sums after pass 1. m, s, t: max / sum / entropy moment of x; d: the sum of the surely
// dropped elements (on-policy, relative to m); my, sy: max / sum of y; argmax_y: its first argmax
// ("fixed"; -1 otherwise); thr[blk]: the candidate threshold of each block for pass 2.
struct Pass1 {
  float m = -kInf, s = 0.f, t = 0.f, d = 0.f, my = -kInf, sy = 0.f;
  int64_t argmax_y = static_cast<int64_t>(kNoArgmax);
};

// Pass 1 over a row (or a shard of one): online max / sum / entropy moment of x (and, on-policy,
// the sum of surely dropped elements); max / sum of y; first argmax of y; per block the candidate
// threshold. xb, yb: kBlock-float buffers; thr: one float per block. rows: null, or RowStore's
// buffers, which then keep the row's loaded x (and y) for pass 2.
struct RowStore {
  float* x;
  float* y;
};

template <typename TX, typename TY>
Pass1 pass1_row(const RowInputs& in, const TX* xr, const TY* yr, float log_threshold, bool fixed, float* xb,
                float* yb, float* thr, const RowStore* rows = nullptr) {
  Pass1 r;
  float unused = 0.f;
  float best = -kInf;  // running max for the first-argmax search ("fixed" only)
  for (int64_t start = 0, blk = 0; start < in.V; start += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, in.V - start), nv = round_up(n);
    if (rows) {  // blocks start at multiples of kBlock, so block by block they fill [0, round_up(V))
      xb = rows->x + start;
      if (yr) yb = rows->y + start;
    }
    load_block(xr + start, n, in.inv_temperature, in.softcap, xb);
    const float bx = block_max(xb, nv);
    float by = bx;
    const float* ysrc = xb;
    if (yr) {
      online_block<true, false>(xb, nv, bx, 0.f, r.m, r.s, r.t, unused);
      load_block(yr + start, n, in.inv_temperature, in.softcap, yb);
      by = block_max(yb, nv);
      thr[blk] = online_block<false, false>(yb, nv, by, log_threshold, r.my, r.sy, unused, unused);
      ysrc = yb;
    } else {
      thr[blk] = online_block<true, true>(xb, nv, bx, log_threshold, r.m, r.s, r.t, r.d);
    }
    if (fixed && by > best) {  // strict: an earlier block keeps a tie, as the first index
      best = by;
      int64_t j = 0;
      while (ysrc[j] != by) ++j;
      r.argmax_y = start + j;
    }
  }
  if (!yr) {
    r.my = r.m;
    r.sy = r.s;
  }
  return r;
}

// Pass 2 over a row (or a shard): kept = sum_K e^(y - my_ref) over the candidates y >= thr[blk]
// only (thr = nullptr: the cutoff itself), a vector without one costing a compare; with a proxy
// other += sum_K e^(y-my)(y-x), on-policy other += the candidates below the cutoff (the dropped
// sum). The argmax, when it is in K only as the argmax (cutoff = +inf), is taken out of the vector
// sums and added alone. rows: pass 1's RowStore of this row, read (and written at the argmax)
// instead of loading the row again, or null.
template <typename TX, typename TY>
void pass2_row(const RowInputs& in, const TX* xr, const TY* yr, float cutoff, float my_ref, int64_t argmax_y,
               const float* thr, float* xb, float* yb, float& kept_sum, float& other, const RowStore* rows = nullptr) {
  const Vec vcut(cutoff), vmy(my_ref), zero(0.f);
  constexpr int kNoLane = (1 << kW) - 1;  // zero_mask() of an all-false comparison
  // With a soft-cap and no RowStore the blocks are loaded as u, untransformed, and only a vector with
  // a lane u >= raw_threshold (a superset of the candidates) is soft-capped: a peaked row's pass 2
  // then costs a compare per vector, not a tanh per element. A stored row is transformed already.
  const float cap = in.softcap;
  const bool capped = cap > 0.f && rows == nullptr;
  const float load_scale = cap > 0.f ? in.inv_temperature / cap : in.inv_temperature;
  for (int64_t start = 0, blk = 0; start < in.V; start += kBlock, ++blk) {
    const int64_t n = std::min(kBlock, in.V - start), nv = round_up(n);
    if (rows) {
      xb = rows->x + start;
      if (yr) yb = rows->y + start;
    } else {
      load_block(xr + start, n, load_scale, 0.f, xb);
      if (yr) load_block(yr + start, n, load_scale, 0.f, yb);
    }
    float* ybuf = yr ? yb : xb;
    float lone_y = 0.f, lone_x = 0.f;
    bool lone = false;
    if (argmax_y >= start && argmax_y < start + n) {
      const int64_t j = argmax_y - start;
      lone_y = capped ? softcap_one(ybuf[j], cap) : ybuf[j];
      lone = !(lone_y >= cutoff);
      if (lone) {
        lone_x = capped ? softcap_one(xb[j], cap) : xb[j];
        ybuf[j] = capped ? kNaN : -kInf;  // out of the vector sums (a NaN u is never a candidate)
      }
    }
    const float thr_b = thr ? thr[blk] : cutoff;
    const Vec vthr(thr_b), vthr_u(capped ? raw_threshold(thr_b, cap) : 0.f);
    Vec acc_k(0.f), acc_o(0.f);
    for (int64_t i = 0; i < nv; i += kW) {
      Vec y = Vec::loadu(ybuf + i);
      if (capped) {
        if ((y >= vthr_u).zero_mask() == kNoLane) continue;
        y = softcap_vec(y, cap);
        if (i + kW > n) y = pad_tail(y, n - i);  // the padding stays -inf
      }
      const Vec cand = y >= vthr;
      if (cand.zero_mask() == kNoLane) continue;
      const Vec e = (y - vmy).exp();
      const Vec kept = y >= vcut;  // a subset of cand
      acc_k = acc_k + Vec::blendv(zero, e, kept);
      if (yr) {
        const Vec x = capped ? softcap_vec(Vec::loadu(xb + i), cap) : Vec::loadu(xb + i);
        acc_o = acc_o + Vec::blendv(zero, cross_term(e, y, x), kept);
      } else {
        acc_o = acc_o + Vec::blendv(Vec::blendv(zero, e, cand), zero, kept);
      }
    }
    kept_sum += hsum(acc_k);
    other += hsum(acc_o);
    if (lone) {
      const float e = std::exp(lone_y - my_ref);
      kept_sum += e;
      if (yr) other += cross_term(e, lone_y, lone_x);
    }
  }
}

template <typename TX, typename TY>
const TX* x_row(const RowInputs& in, int64_t row) {
  return static_cast<const TX*>(in.logits) + row * in.logits_row_stride;
}

template <typename TX, typename TY>
const TY* y_row(const RowInputs& in, int64_t row) {
  return in.proxy ? static_cast<const TY*>(in.proxy) + row * in.proxy_row_stride : nullptr;
}

inline bool ignored(const RowInputs& in, int64_t row) { return in.labels && in.labels[row] == in.ignore_index; }

template <typename TX, typename TY>
void fwd_rows(const TokenStatsFwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float xb[kBlock];
  alignas(64) float yb[kBlock];
  std::vector<float> thr((a.V + kBlock - 1) / kBlock);  // per block: candidate threshold of pass 2
  const RowInputs& in = a;
  // A soft-capped row of at most kStoredRowMax elements keeps its transformed x (and y) for pass 2,
  // which then reads them instead of taking a tanh again: round_up(V) floats each, per thread.
  const bool store = in.softcap > 0.f && in.V <= kStoredRowMax;
  std::vector<float> stored_x(store ? round_up(in.V) : 0), stored_y(store && in.proxy ? round_up(in.V) : 0);
  const RowStore stored{stored_x.data(), stored_y.data()};
  const RowStore* rows = store ? &stored : nullptr;
  for (int64_t row = begin; row < end; ++row) {
    if (ignored(in, row)) {  // ignored row: zeros, no gradient
      store_ignored_row(a, row);
      continue;
    }
    const TX* xr = x_row<TX, TY>(in, row);
    const TY* yr = y_row<TX, TY>(in, row);
    const Pass1 p = pass1_row(in, xr, yr, a.log_threshold, a.fixed, xb, yb, thr.data(), rows);
    RowResult r{};
    // NaN anywhere propagates into m / my through the NaN-propagating max; all -inf: m = -inf;
    // a +inf: m = +inf. Each makes the row's outputs NaN.
    r.bad = !std::isfinite(p.m) || !std::isfinite(p.my);
    r.lse = p.m + std::log(p.s);
    r.entropy = std::log(p.s) - p.t / p.s;
    if (a.fixed) {  // >= every block's thr (fp32 addition is monotone)
      r.cutoff = p.my + std::log(p.sy) + a.log_threshold;
      if (p.my < r.cutoff) r.cutoff = kInf;  // no token reaches tau: K = {first argmax}
    } else {
      r.cutoff = p.my + a.log_threshold;
    }
    r.argmax_y = p.argmax_y;
    const float my_ref = r.bad ? 0.f : p.my;
    // pass 2: kept = sum_K e^(y-my); cross (proxy) or drop = d (pass 1) + candidates below the cutoff
    float kept_sum = 0.f, other = yr ? 0.f : p.d;
    pass2_row(in, xr, yr, r.cutoff, my_ref, p.argmax_y, thr.data(), xb, yb, kept_sum, other, rows);
    r.lse_kept = my_ref + std::log(kept_sum);
    r.kl = yr ? other / kept_sum + r.lse - r.lse_kept : std::log1p(other / kept_sum);
    float logp = 0.f, proxy_logp = 0.f;
    if (in.labels) {
      const int64_t label = in.labels[row];
      const float x_lab = transform_one(static_cast<float>(xr[label]), in.inv_temperature, in.softcap);
      label_logps(r, label, x_lab,
                  yr ? transform_one(static_cast<float>(yr[label]), in.inv_temperature, in.softcap) : x_lab, logp,
                  proxy_logp);
    }
    store_row(a, row, r, logp, proxy_logp);
  }
}

// Vocabulary-parallel pass 1 (row_partials.h): pass1_row over the shard, written as partials.
template <typename TX, typename TY>
void shard_pass1_rows(const ShardPass1Args& a, int64_t begin, int64_t end) {
  alignas(64) float xb[kBlock];
  alignas(64) float yb[kBlock];
  std::vector<float> thr((a.V + kBlock - 1) / kBlock);
  for (int64_t row = begin; row < end; ++row) {
    float* part = a.partials + row * kPass1Width;
    if (ignored(a, row)) {
      store_neutral_pass1(part);
      continue;
    }
    const Pass1 p = pass1_row(a, x_row<TX, TY>(a, row), y_row<TX, TY>(a, row), 0.f, a.fixed, xb, yb,
                              thr.data());
    part[kPartMax] = p.m;
    part[kPartSum] = p.s;
    part[kPartMoment] = p.t;
    part[kPartMaxY] = p.my;
    part[kPartSumY] = (a.fixed || !a.proxy) ? p.sy : 0.f;  // only "fixed" needs it (on-policy it is s)
    part[kPartArgmaxY] = static_cast<float>(p.argmax_y);
    // a NaN propagates into the max; a +inf has no finite softmax
    part[kPartBad] = (std::isnan(p.m) || p.m == kInf || std::isnan(p.my) || p.my == kInf) ? 1.f : 0.f;
  }
}

// Vocabulary-parallel pass 2 (row_partials.h): the kept sums given the combined statistics; the
// combined cutoff is final, so it is also the candidate threshold.
template <typename TX, typename TY>
void shard_pass2_rows(const ShardPass2Args& a, int64_t begin, int64_t end) {
  alignas(64) float xb[kBlock];
  alignas(64) float yb[kBlock];
  for (int64_t row = begin; row < end; ++row) {
    float* part = a.partials + row * kPass2Width;
    float kept_sum = 0.f, other = 0.f;
    if (!ignored(a, row)) {
      pass2_row(a, x_row<TX, TY>(a, row), y_row<TX, TY>(a, row), a.cutoff[row], a.max_y[row],
                a.argmax[row], nullptr, xb, yb, kept_sum, other);
    }
    part[kPartKept] = kept_sum;
    part[kPartCross] = a.proxy ? other : 0.f;
  }
}

template <typename TX, typename TY>
void bwd_rows(const TokenStatsBwdArgs& a, int64_t begin, int64_t end) {
  alignas(64) float xb[kBlock];
  alignas(64) float yb[kBlock];
  alignas(64) float gb[kBlock];
  const RowInputs& in = a;
  const bool has_proxy = in.proxy != nullptr;
  const int64_t V = in.V;
  const float inv_t = in.inv_temperature;
  for (int64_t row = begin; row < end; ++row) {
    TX* gr = static_cast<TX*>(a.grad) + row * a.grad_row_stride;
    if (ignored(in, row)) {  // the ignored-row invariant: exact zeros, no p
      std::fill(gr, gr + V, static_cast<TX>(0.f));
      continue;
    }
    // the label and the argmax as columns of this shard (out of [0, V) when another shard holds them)
    const int64_t label = in.labels ? in.labels[row] - a.vocab_offset : -1;
    const TX* xr = x_row<TX, TY>(in, row);
    const TY* yr = y_row<TX, TY>(in, row);
    const float* st = a.row_stats + row * kRowStatsWidth;
    const float lse = st[kStatLse], entropy = st[kStatEntropy], lse_kept = st[kStatLseKept];
    const float cutoff = st[kStatCutoff];
    const int64_t argmax_y = st[kStatArgmax] < 0.f ? -1 : static_cast<int64_t>(st[kStatArgmax]) - a.vocab_offset;
    // per-row coefficients, already divided by T
    const float c_logp = (a.g_logp && in.labels) ? a.g_logp[row] * inv_t : 0.f;
    const float c_kl = a.g_kl ? a.g_kl[row] * inv_t : 0.f;
    const float c_h = a.g_entropy ? a.g_entropy[row] * inv_t : 0.f;
    const bool use_kl = a.g_kl != nullptr, use_h = a.g_entropy != nullptr;
    // on-policy q = e^(x - lse_K) = p e^(lse - lse_K): one exp per element instead of two
    const float q_over_p = std::exp(lse - lse_kept);
    const Vec vlse(lse), vh(entropy), vcut(cutoff), vlk(lse_kept), vqp(q_over_p), zero(0.f);
    const Vec vcl(c_logp), vck(c_kl), vch(c_h);
    for (int64_t start = 0; start < V; start += kBlock) {
      const int64_t n = std::min(kBlock, V - start), nv = round_up(n);
      load_block(xr + start, n, inv_t, in.softcap, xb);
      const bool proxy_kl = has_proxy && use_kl;
      if (proxy_kl) load_block(yr + start, n, inv_t, in.softcap, yb);
      for (int64_t i = 0; i < nv; i += kW) {
        const Vec x = Vec::loadu(xb + i);
        const Vec logp = x - vlse;
        const Vec p = logp.exp();
        Vec g = zero - vcl * p;  // g_logp (e_label - p); the e_label part is added below
        if (use_kl) {
          Vec q;
          if (proxy_kl) {
            const Vec y = Vec::loadu(yb + i);
            q = Vec::blendv(zero, (y - vlk).exp(), y >= vcut);
          } else {
            q = Vec::blendv(zero, p * vqp, x >= vcut);
          }
          g = g + vck * (p - q);  // g_kl (p - q)
        }
        if (use_h) {  // - g_H p (log p + H), with 0 log 0 = 0 wherever p = 0 (x = -inf, or x - lse
          // rounding to -inf in a row spread beyond the fp32 range); a NaN p stays NaN
          g = g - vch * Vec::blendv(p * (logp + vh), zero, p == zero);
        }
        g.store(gb + i);
      }
      if (label >= start && label < start + n) gb[label - start] += c_logp;
      if (use_kl && argmax_y >= start && argmax_y < start + n) {  // argmax kept alone (cutoff = +inf)
        const float y_a = proxy_kl ? yb[argmax_y - start] : xb[argmax_y - start];
        if (!(y_a >= cutoff)) gb[argmax_y - start] -= c_kl * std::exp(y_a - lse_kept);
      }
      if (in.softcap > 0.f) softcap_chain(xb, n, in.softcap, gb);
      store_block(gb, n, gr + start);
    }
  }
}

template <typename F>
void dispatch(Dtype d, F&& f) {
  switch (d) {
    case Dtype::kFloat32: f(static_cast<float*>(nullptr)); break;
    case Dtype::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    case Dtype::kFloat16: f(static_cast<c10::Half*>(nullptr)); break;
    case Dtype::kFloat64: f(static_cast<double*>(nullptr)); break;
  }
}

// rows per task: enough elements (about 64K) to amortise a task, at least one row
inline int64_t grain(int64_t V) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(V, 1)); }

// rows(TX tag, TY tag, begin, end) over the rows in parallel, for the storage types of the logits and
// the proxy (tags are null pointers of those types; without a proxy TY is never read and is TX)
template <typename Args, typename F>
void parallel_rows(const Args& a, F&& rows) {
  if (a.N == 0) return;
  dispatch(a.logits_dtype, [&](auto* tx) {
    dispatch(a.proxy ? a.proxy_dtype : a.logits_dtype, [&](auto* ty) {
      at::parallel_for(0, a.N, grain(a.V), [&](int64_t b, int64_t e) { rows(tx, ty, b, e); });
    });
  });
}

template <typename P>
using Elem = std::remove_pointer_t<P>;

}  // namespace

// Alike but for the row function each runs: the four plain functions token_stats_cpu.h declares.
void token_stats_fwd(const TokenStatsFwdArgs& a) {
  parallel_rows(a, [&](auto* tx, auto* ty, int64_t b, int64_t e) {
    fwd_rows<Elem<decltype(tx)>, Elem<decltype(ty)>>(a, b, e);
  });
}

void token_stats_bwd(const TokenStatsBwdArgs& a) {
  parallel_rows(a, [&](auto* tx, auto* ty, int64_t b, int64_t e) {
    bwd_rows<Elem<decltype(tx)>, Elem<decltype(ty)>>(a, b, e);
  });
}

void token_stats_shard_pass1(const ShardPass1Args& a) {
  parallel_rows(a, [&](auto* tx, auto* ty, int64_t b, int64_t e) {
    shard_pass1_rows<Elem<decltype(tx)>, Elem<decltype(ty)>>(a, b, e);
  });
}

void token_stats_shard_pass2(const ShardPass2Args& a) {
  parallel_rows(a, [&](auto* tx, auto* ty, int64_t b, int64_t e) {
    shard_pass2_rows<Elem<decltype(tx)>, Elem<decltype(ty)>>(a, b, e);
  });
}

const char* compiled_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

}  // namespace lpreg::cpu
