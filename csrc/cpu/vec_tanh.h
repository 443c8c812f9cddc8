// tanh of a vector of fp32 lanes for the CPU kernels' soft-cap (token_stats_cpu.cpp: softcap_vec): about
// 0.37 ns an element on one AVX2 core, against 2.2 ns for at::vec's Sleef tanh (1 ulp), at 2.5 ulp. Plain
// at::vec code, the same formula lane for lane in every ISA build; the figures below are the AVX2 build's
// (the portable build's fmadd rounds each product apart: 2.46 ulp, 8.89e-8 on every 64th fp32 of the range).
//
// With a = min(|u|, kTanhClamp) and em = e^(2a) - 1 >= 0:
//
//   tanh |u| = em / (em + 2),   tanh u = sign(u) tanh |u|
//
// em is expm1 by range reduction: a = k ln2 / 2 + g, k = round(2a / ln2) in [0, 26], |g| <= ln2 / 4, and
// e^(2a) - 1 = 2^(k+1) (expm1(2g) / 2) + (2^k - 1), one FMA (2^k - 1 is exact for k <= 24, within 2^-27
// relative above, where it no longer matters). expm1(2g) / 2 = g + g^2 (1 + g (d3 + g (d4 + g (d5 + g d6))))
// with d_n = 2^(n-1) c_n, c3..c6 a minimax fit of expm1(f) = f + f^2 (1/2 + f (c3 + ...)) of relative
// error 1.4e-8 on |f| <= ln2 / 2 (bench/fit_softcap_tanh.py fits them). ln2 / 2 is one fp32: its error,
// 1e-9 k in g, moves e^(2a) by 2e-9 k relatively, which em / (em + 2) scales down by 2 / (em + 2), less
// than 2^(1.5 - k).
// No cancellation anywhere: em and em + 2 are positive, and a relative error d of em moves the quotient by
// only d 2 / (em + 2) relatively, so tanh's error is that of the last roundings and the fit's.
//
// Accuracy, measured over every fp32 u in [0, kTanhClamp] and -u against float64 tanh
// (bench/fit_softcap_tanh.py --measure, which first checks that its build of this file agrees bit for
// bit with the compiled op; tests/test_softcap_tanh_accuracy.py checks the bounds through the op on a
// dense grid): at most 2.475 ulp of the result (at u = 0.0609) and 8.94e-8 absolute (at u = 3.47).
// Odd: tanh(-u) = -tanh(u) bit for bit (the sign is restored by XOR). Saturates: from |u| = 9.010792 the
// result is exactly +-1 (float64 tanh rounds to 1 from 13 ln2 = 9.010913; in between, the true value is
// within 0.51 ulp of 1), and so for +-inf (clamped). NaN stays NaN (clamp_max keeps a NaN, and so does
// every later step).
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace lpreg::cpu {

constexpr float kTanhClamp = 9.125f;  // above 13 ln2 = 9.010913, from where tanh rounds to 1; keeps k <= 26

inline at::vec::Vectorized<float> vec_tanh(const at::vec::Vectorized<float>& u) {
  using Vec = at::vec::Vectorized<float>;
  const Vec sign = u & Vec(-0.f);
  const Vec a = at::vec::clamp_max(u.abs(), Vec(kTanhClamp));  // a NaN stays NaN
  const Vec k = (a * Vec(2.88539004325866699f)).round();  // 2a / ln2, to nearest
  const Vec g = at::vec::fmadd(k, Vec(-0.346573591232299805f), a);  // a - k ln2 / 2 = f / 2
  Vec p = at::vec::fmadd(Vec(4.44743186235427856e-02f), g, Vec(1.33856654167175293e-01f));
  p = at::vec::fmadd(p, g, Vec(3.33334833383560181e-01f));
  p = at::vec::fmadd(p, g, Vec(6.66661977767944336e-01f));
  p = at::vec::fmadd(p, g, Vec(1.f));
  const Vec em_half = at::vec::fmadd(p, g * g, g);  // expm1(f) / 2
  // 2^(k+1) from its bits: (k + 128) 2^23 is an integer float, exact; converted, it is 2^(k+1)'s bits
  const Vec bits = at::vec::fmadd(k, Vec(8388608.f), Vec(1073741824.f));
  const Vec two_k1 = at::vec::cast<float>(at::vec::convert_to_int_of_same_size(bits));
  const Vec em = at::vec::fmadd(two_k1, em_half, at::vec::fmadd(two_k1, Vec(0.5f), Vec(-1.f)));  // e^2a - 1
  return (em / (em + Vec(2.f))) ^ sign;
}

}  // namespace lpreg::cpu
