// The logit transform of scaled and soft-capped LM heads (lpreg/logit_transform.py; docs/spec.md
// "The logit transform"), as the C++ and CUDA kernels apply it to each raw logit x they read. The
// Python glue folds the scale s, the soft-cap c and the temperature T into two constants
// (lpreg/_contract.py: transform_constants): RowInputs::inv_temperature = s / T and
// RowInputs::softcap = c / T (0: no soft-cap). Then
//
//   x' = z / T = softcap tanh(x inv_temperature / softcap)    (softcap > 0)
//   x' = x inv_temperature                                    (softcap = 0: the exact path without one)
//   dx'/dx = inv_temperature (1 - (x' / softcap)^2)  |  inv_temperature
//
// The soft-cap maps -inf to -softcap and +inf to +softcap; a NaN stays NaN. Plain C++ that nvcc
// also compiles for the device.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define LPREG_XFORM_HD __host__ __device__
#else
#define LPREG_XFORM_HD
#endif

namespace lpreg {

// x' of one raw logit x.
LPREG_XFORM_HD inline float transform_logit(float x, float inv_temperature, float softcap) {
  return softcap > 0.f ? softcap * tanhf(x * (inv_temperature / softcap)) : x * inv_temperature;
}

// dx'/dx divided by inv_temperature, at x' = transform_logit(x): 1 - (x' / softcap)^2 (0 where tanh
// saturates), or 1 without a soft-cap.
LPREG_XFORM_HD inline float transform_slope(float x_t, float softcap) {
  if (!(softcap > 0.f)) return 1.f;
  const float u = x_t / softcap;
  return 1.f - u * u;
}

}  // namespace lpreg
