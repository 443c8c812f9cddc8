// tanh of a vector of fp32 lanes for the CPU kernels' soft-cap (token_stats_cpu.cpp: softcap_vec): about
// 0.5 ns an element on one AVX2 core, against 2.2 ns for at::vec's Sleef tanh (1 ulp), at 2.5 ulp. Plain
// at::vec code, the same formula lane for lane in every ISA build; the figures below are the AVX2 build's
// (the portable build's fmadd rounds each product apart; its error is not measured).
//
// With a = min(|u|, kTanhClamp) and em = e^(2a) - 1 >= 0:
//
//   tanh |u| = em / (em + 2),   tanh u = sign(u) tanh |u|
//
// em is expm1 by range reduction: 2a = k ln2 + f, k = round(2a / ln2) in [0, 27], |f| <= ln2 / 2 (ln2 in two
// parts, k ln2_hi exact), e^(2a) - 1 = 2^k expm1(f) + (2^k - 1), one FMA; 2^k - 1 is exact for k <= 24 and
// within 2^-27 relative above, where it no longer matters. expm1(f) = f + f^2 (1/2 + f (c3 + f (c4 + f (c5 +
// f c6)))), c3..c6 a minimax fit of relative error 1.4e-8 on [-ln2/2, ln2/2] (bench/fit_softcap_tanh.py fits
// them). No cancellation anywhere: em and em + 2 are positive, and a relative error d of em moves the
// quotient by only d 2 / (em + 2) relatively, so tanh's error is that of the last roundings and the fit's.
//
// Accuracy, measured over every fp32 u in [0, kTanhClamp] and -u against float64 tanh
// (bench/fit_softcap_tanh.py --measure, which first checks that its build of this file agrees bit for
// bit with the compiled op; tests/test_softcap_tanh_accuracy.py checks the bounds through the op on a
// dense grid): at most 2.475 ulp of the result (at u = 0.0609) and 8.93e-8 absolute (at u = 3.81).
// Odd: tanh(-u) = -tanh(u) bit for bit (the sign is restored by XOR). Saturates: from |u| = 9.010914 (the
// first fp32 from which float64 tanh also rounds to 1) the result is exactly +-1, and so for +-inf
// (clamped). NaN stays NaN (clamp_max keeps a NaN, and so does every later step).
#pragma once

#include <ATen/cpu/vec/vec.h>

namespace lpreg::cpu {

constexpr float kTanhClamp = 9.125f;  // above 9.010914, from where tanh rounds to 1; keeps k <= 27

inline at::vec::Vectorized<float> vec_tanh(const at::vec::Vectorized<float>& u) {
  using Vec = at::vec::Vectorized<float>;
  const Vec sign = u & Vec(-0.f);
  const Vec a = at::vec::clamp_max(u.abs(), Vec(kTanhClamp));  // a NaN stays NaN
  const Vec y = a + a;
  const Vec k = (y * Vec(1.44269504088896341f)).round();  // y / ln2, to nearest
  Vec f = at::vec::fmadd(k, Vec(-0.693145751953125f), y);  // y - k ln2_hi, exact
  f = at::vec::fmadd(k, Vec(-1.42860676533018704e-06f), f);  // - k ln2_lo
  Vec p = at::vec::fmadd(Vec(1.3898224569857121e-03f), f, Vec(8.3660408854484558e-03f));
  p = at::vec::fmadd(p, f, Vec(4.1666854172945023e-02f));
  p = at::vec::fmadd(p, f, Vec(1.6666549444198608e-01f));
  p = at::vec::fmadd(p, f, Vec(0.5f));
  const Vec em_f = at::vec::fmadd(p, f * f, f);  // expm1(f)
  // 2^k from its bits: (k + 127) 2^23 is an integer float, exact; converted, it is 2^k's bit pattern
  const Vec bits = at::vec::fmadd(k, Vec(8388608.f), Vec(1065353216.f));
  const Vec two_k = at::vec::cast<float>(at::vec::convert_to_int_of_same_size(bits));
  const Vec em = at::vec::fmadd(two_k, em_f, two_k - Vec(1.f));  // e^y - 1
  return (em / (em + Vec(2.f))) ^ sign;
}

}  // namespace lpreg::cpu
