// 16-float vectors (GCC vector extensions: one AVX-512 register, two AVX2 ones) and the
// vector e^x shared by the CPU kernels of `griffin_jax/cpu_kernels.py`.

#pragma once

#include <cstdint>
#include <cstring>

namespace griffin {

constexpr int64_t kLanes = 16;
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64), aligned(4)));

inline v16 Load(const float* p) { return *reinterpret_cast<const v16*>(p); }
inline void Store(float* p, v16 x) { std::memcpy(p, &x, sizeof(v16)); }
inline v16 Splat(float x) { return v16{} + x; }

// e^x for x <= 0 (values less their row's max): 2^n * p(r) with x = n ln 2 + r, |r| <= ln2 / 2,
// p a degree-6 polynomial (~2 ulp); exactly 0 below -87 (e^-87 ~ 1.6e-38, f32's normal floor).
inline v16 Exp(v16 x) {
  const v16 lo = Splat(-87.0f);
  const v16 y = x < lo ? lo : x;
  const v16 shift = Splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v16 t = y * Splat(1.44269504f) + shift;
  const v16 n = t - shift;
  v16 r = y - n * Splat(0.693145752f);
  r = r - n * Splat(1.42860677e-6f);
  v16 p = Splat(1.9875691500e-4f);
  p = p * r + Splat(1.3981999507e-3f);
  p = p * r + Splat(8.3334519073e-3f);
  p = p * r + Splat(4.1665795894e-2f);
  p = p * r + Splat(1.6666665459e-1f);
  p = p * r + Splat(5.0000001201e-1f);
  p = p * (r * r) + r + Splat(1.0f);
  const i16 bits = ((reinterpret_cast<const i16&>(t) - 0x4B400000) + 127) << 23;
  const v16 e = p * reinterpret_cast<const v16&>(bits);
  return x < lo ? v16{} : e;
}

}  // namespace griffin
