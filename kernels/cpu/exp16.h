// exp of 16 floats and the transposing sum of 16 vectors in AVX-512, shared by the attention
// kernels (attention.cpp, attention_amx.cpp), and exp of 8 floats in AVX2 (attention.cpp, on CPUs
// without AVX-512); part of each one's build key (kernels/cpu/build.py).
#pragma once

namespace radixserve_simd {

// x = n ln 2 + t: log2(e) for n, ln 2 split in two (Cody and Waite) for t; e^t = 1 + t + t^2 P(t)
// with Cephes' expf polynomial P, highest degree first. Shared by exp16 and exp8.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr int kExpDegree = sizeof(kExpPoly) / sizeof(kExpPoly[0]);
// exp8's least input, ln of the least normal float: below it exp8 returns exp8(kExp8Min).
constexpr float kExp8Min = -87.33654f;

}  // namespace radixserve_simd

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#include <immintrin.h>

namespace radixserve_simd {

// exp(x) of 8 floats: exp16's reduction and polynomial, scaled by 2^n built in the exponent bits
// (AVX2 has no vscalefps), so x is first raised to kExp8Min (ln of the least normal float): x <=
// that gives about 1.2e-38 instead of a denormal or 0, which callers that need an exact 0 (masked
// keys at -inf) zero themselves. x >= 88.38 gives infinity (n reaches 128; x is lowered to 88.8
// first so that it stays there), a little early: the callers pass x <= 0 (scores less their
// maximum).
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.8f), _mm256_max_ps(_mm256_set1_ps(kExp8Min), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 t = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
  t = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), t);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < kExpDegree; ++i) p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(t, t), _mm256_add_ps(t, _mm256_set1_ps(1.f)));
  // 2^n for n in [-126, 128]: (n + 127) in the exponent field; 128 gives infinity.
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

}  // namespace radixserve_simd
#endif

#if defined(__AVX512F__)
#include <immintrin.h>

namespace radixserve_simd {

// exp(x) of 16 floats: x = n ln 2 + t with |t| <= ln 2 / 2, e^t by the polynomial above, then
// scaled by 2^n (vscalefps). Within 1 ulp of the correctly rounded value wherever that is a
// normal float (checked at 13.5 million points of [-104, 88.5]);
// exp(0) is 1; x <= -104 gives 0 (or a denormal, without flush-to-zero), x >= 88.8 infinity, NaN
// stays NaN (vmaxps returns its second operand when either is NaN).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 t = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  t = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), t);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < kExpDegree; ++i) p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(t, t), _mm512_add_ps(t, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// r[j] = sum of the 16 lanes of a[j], for j < 16 (a transposing reduction: 45 vector ops).
inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i) {
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // each 128-bit lane: partial sums of keys 4i .. 4i+3
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(e01, e23, _MM_SHUFFLE(3, 1, 3, 1)));
}

}  // namespace radixserve_simd
#endif
