// Attention over the paged KV pool, for the CPU: keys and values are read straight from the pool
// through the request→KV-slot table (no gather copy).
//
// Decode (one query token per request): a task is one request (all its heads, so each slot's K/V
// row is read as one contiguous run) or, when there are too few requests to keep every thread
// busy, one (request, kv head) pair. The G query heads that share a kv head are computed together,
// so each K/V row is read once. At head dim 64 the inner loops are vector code: AVX-512 BF16 pair
// dot products for bfloat16 queries over bfloat16 or float8 pools (attend_head_bf16), AVX-512
// float32 for float32 queries (attend_head_x16), AVX2 + FMA float32 on CPUs without AVX-512
// (attend_head_f32). grouped_decode_attention takes decode requests in groups that share their
// first slots and gives each the same output; on CPUs without AVX-512 a task is up to 8 members of
// a group and one kv head, reading each block of the shared keys once for all of them
// (attend_group_f32).
//
// Queries and pools share a dtype, float32 queries read bfloat16 pools (--kv-cache-dtype
// bfloat16 under a float32 model), or float32 or bfloat16 queries read float8 e5m2 pools
// (--kv-cache-dtype fp8_e5m2; dispatch_dtypes): every kernel is a template over the query type TQ
// and the pool type T, and widens narrower keys and values to float32 as it loads them (exact).
// The AVX-512 BF16 pair dot products need bfloat16 on both sides: float8 keys (and, in extend,
// values) are converted to bfloat16 for them (exact too), float32 queries take the float32 paths.
//
// Extend (a request's new tokens after its cached prefix, causal): a task is one (request, kv head,
// block of up to 16 new tokens); query j of the request sees keys 0 .. prefix + j. In bfloat16
// with AVX-512 BF16 (extend_block_bf16) its G x 16 query rows are the vector lanes of pair dot
// products for q . k and p . v, the probabilities rounded to bfloat16; otherwise they are
// multiplied against blocks of 16 keys converted to float and transposed, so the inner loops are
// plain vector FMAs with no horizontal sums.
//
// Shared prefixes (cascade): rows whose first `length` table entries are the same slots attend
// that span once for all their query tokens (a task is one (group, kv head, block of 16 tokens),
// the extend block without the causal mask), returning partial outputs and log-sum-exps; the
// decode and extend kernels then run over each row's own keys only (from a start position) and
// also return log-sum-exps, and `merge_attention_states_` combines the two parts of every token.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "exp16.h"
#include "tasks.h"

namespace {

inline void load_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, sizeof(float) * n); }
inline void load_row(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}
// float8 e5m2 (OCP FP8; --kv-cache-dtype fp8_e5m2) is the top byte of the IEEE half of the same
// value, so a byte shifted left by 8 is a half, which F16C widens to float32 exactly.
inline void load_row(const at::Float8_e5m2* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX2__)
  const uint8_t* s = reinterpret_cast<const uint8_t*>(src);
  for (; i + 8 <= n; i += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(b), 8)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// s[0 .. n) ← softmax(s[0 .. n)), with exp vectorized (libmvec) through the simd reduction.
// Returns the log-sum-exp of the input (n >= 1).
inline float softmax_in_place(float* s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t l = 0; l < n; ++l) m = std::max(m, s[l]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t l = 0; l < n; ++l) {
    s[l] = std::exp(s[l] - m);
    sum += s[l];
  }
  const float inv = 1.f / sum;
  for (int64_t l = 0; l < n; ++l) s[l] *= inv;
  return m + std::log(sum);
}

#if defined(__AVX2__) || defined(__AVX512F__)
constexpr int64_t kDim = 64;  // the head dim of the vector decode kernels

// Fetches the 64 values of one K/V row (4 cache lines in float32, 2 in bfloat16, 1 in float8)
// into L2.
template <typename T>
inline void prefetch_row(const T* p) {
  const char* c = reinterpret_cast<const char*>(p);
  for (size_t i = 0; i < kDim * sizeof(T); i += 64) _mm_prefetch(c + i, _MM_HINT_T1);
}
#endif

#if defined(__AVX512F__)
// Decode attention with AVX-512. attend_head_bf16 (bfloat16 queries over bfloat16 or float8
// pools, on CPUs with AVX-512 BF16) computes q . k and p . v as bf16 pair dot products (p
// rounded to bfloat16, weigh_group_bf16); attend_head_x16 (float32 queries, and bfloat16 ones
// elsewhere) q . k in float32, 16 lanes, each key widened once per block of 16 keys, and p . v
// in float32. Both reduce 16 keys' vector sums together, and hold the output rows in registers
// for p . v. head_dim must be 64.

using radixserve_simd::exp16;  // exp16.h
using radixserve_simd::reduce16;

// 16 values → 16 float32, exactly (see load_row).
inline __m512 widen16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 widen16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 widen16(const at::Float8_e5m2* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtph_ps(_mm256_slli_epi16(_mm256_cvtepu8_epi16(raw), 8));
}

// Keys' and values' loops fetch the slot kAhead keys ahead of the one they read (a slot's
// row lies anywhere in the pool) into L2, leaving L1's few outstanding misses to the loads.
// Measured on a 2-core AMD EPYC (AVX-512 BF16, no AMX) over 30 layers of SmolLM2-135M's bfloat16
// pools, batch 16 at context 1,000, slots scattered: 65 ms with no prefetch, 40 ms 16 keys ahead
// into L1, 21 ms 16 ahead into L2, 15-18 ms 32 ahead, no better at 48 or 64.
constexpr int64_t kAhead = 32;

#if defined(__AVX512BW__)
// 32 float8 e5m2 values → 32 bfloat16 ones, exactly (every float8 value is a bfloat16 one): a
// normal value keeps its sign, mantissa and unbiased exponent (the exponent field + 112, the
// difference of the two biases); zero and the subnormals m x 2^-16 (exponent field 0) come from a
// table of four; infinities and NaNs keep their mantissa under bfloat16's all-ones exponent.
inline __m512i fp8_to_bf16(const at::Float8_e5m2* p) {
  alignas(64) static const uint16_t kSubnormal[32] = {0, 0x3780, 0x3800, 0x3840};
  const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi16(0x7f));
  const __m512i exponent = _mm512_and_si512(b, _mm512_set1_epi16(0x7c));
  __m512i out = _mm512_add_epi16(_mm512_slli_epi16(mag, 5), _mm512_set1_epi16(0x3800));
  out = _mm512_mask_permutexvar_epi16(out, _mm512_testn_epi16_mask(exponent, exponent), mag,
                                      _mm512_load_si512(kSubnormal));
  const __mmask32 special = _mm512_cmpeq_epi16_mask(exponent, _mm512_set1_epi16(0x7c));
  const __m512i mantissa = _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(3)), 5);
  out = _mm512_mask_mov_epi16(out, special, _mm512_or_si512(mantissa, _mm512_set1_epi16(0x7f80)));
  const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(b, _mm512_set1_epi16(0x80)), 8);
  return _mm512_or_si512(out, sign);
}
#endif

// Key rows in the dtype a kernel computes with: float32 (widened, exact) or bfloat16 (from
// float8, exact).
template <typename T>
inline void convert_row(const T* src, float* dst) {
  for (int c = 0; c < 4; ++c) _mm512_storeu_ps(dst + 16 * c, widen16(src + 16 * c));
}
#if defined(__AVX512BW__)
inline void convert_row(const at::Float8_e5m2* src, at::BFloat16* dst) {
  _mm512_storeu_si512(dst, fp8_to_bf16(src));
  _mm512_storeu_si512(dst + 32, fp8_to_bf16(src + 32));
}
#endif

// rows[0 .. 16) ← keys l0 .. l0 + 15 (< len; past it the last one is repeated) as values of Out:
// the pool's own rows where it holds Out, else rows of `scratch` ([16, 64]) converted from them;
// the keys kAhead further on are fetched into L2.
template <typename Out, typename T, typename KeyRow>
inline void key_block(const KeyRow& key_row, int64_t l0, int64_t len, Out* scratch,
                      const Out** rows) {
  const int64_t n = std::min<int64_t>(16, len - l0);
  for (int64_t j = l0 + kAhead; j < std::min(l0 + kAhead + 16, len); ++j) {
    prefetch_row(key_row(j));
  }
  for (int64_t j = 0; j < 16; ++j) {
    if (j >= n) {
      rows[j] = rows[n - 1];  // lanes past n: their scores are not stored
    } else if constexpr (std::is_same_v<T, Out>) {
      rows[j] = key_row(l0 + j);
    } else {
      convert_row(key_row(l0 + j), scratch + j * kDim);
      rows[j] = scratch + j * kDim;
    }
  }
}

// out[g][0 .. 64) = sum over l of p[g * len + l] * v[slots[l] * stride + 0 .. 64), for g < G, in
// float32: the output rows are held in registers (G x 4 vectors); G is a template argument so
// that they stay there (see weigh_values, 5-15 % on the AVX2 kernel; here the same sums run in
// the same order as with a run-time head count). With `prefetch`, the row kAhead keys ahead is
// fetched.
template <int G, typename T>
inline void weigh_values16(const float* p, int64_t len, const T* v, int64_t stride,
                           const int64_t* slots, bool prefetch, float* out) {
  __m512 o[G][4];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < 4; ++c) o[g][c] = _mm512_setzero_ps();
  for (int64_t l = 0; l < len; ++l) {
    if (prefetch && l + kAhead < len) prefetch_row(v + slots[l + kAhead] * stride);
    const T* vl = v + slots[l] * stride;
    const __m512 vc[4] = {widen16(vl), widen16(vl + 16), widen16(vl + 32), widen16(vl + 48)};
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * len + l]);
      for (int c = 0; c < 4; ++c) o[g][c] = _mm512_fmadd_ps(w, vc[c], o[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + g * kDim + c * 16, o[g][c]);
}

// Softmax of the group's score rows (lse, nullable, gets their log-sum-exps), then out[g] = p_g . v
// for the group's query heads, four at a time.
template <typename T>
inline void weigh_group16(float* scores, int64_t len, const T* v_pool, const int64_t* slots,
                          int64_t kv_heads, int64_t hk, int64_t group, float* out, float* lse) {
  for (int64_t g = 0; g < group; ++g) {
    const float l = softmax_in_place(scores + g * len, len);
    if (lse != nullptr) lse[g] = l;
  }
  const T* v = v_pool + hk * kDim;
  const int64_t stride = kv_heads * kDim;
  for (int64_t l = 0; l < std::min(kAhead, len); ++l) prefetch_row(v + slots[l] * stride);
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const float* p = scores + g0 * len;
    float* o = out + g0 * kDim;
    switch (std::min<int64_t>(4, group - g0)) {
      case 4: weigh_values16<4>(p, len, v, stride, slots, g0 == 0, o); break;
      case 3: weigh_values16<3>(p, len, v, stride, slots, g0 == 0, o); break;
      case 2: weigh_values16<2>(p, len, v, stride, slots, g0 == 0, o); break;
      default: weigh_values16<1>(p, len, v, stride, slots, g0 == 0, o); break;
    }
  }
}

// q: [group, 64] of this kv head; pools [slots, kv_heads, 64]; keys slots[0 .. len); scores:
// [group, len] scratch; out: [group, 64] float32; lse: [group] or null. Float32 arithmetic:
// each block of 16 keys is widened once into a float32 scratch (4 KB, in L1), which every query
// head of the group then reads.
template <typename TQ, typename T>
inline void attend_head_x16(const TQ* q, const T* k_pool, const T* v_pool, const int64_t* slots,
                            int64_t len, int64_t kv_heads, int64_t hk, int64_t group,
                            float scale, float* scores, float* out, float* lse) {
  alignas(64) float kf[16 * kDim];
  const __m512 vscale = _mm512_set1_ps(scale);
  auto key_row = [&](int64_t l) { return k_pool + (slots[l] * kv_heads + hk) * kDim; };
  for (int64_t l = 0; l < std::min(kAhead, len); ++l) prefetch_row(key_row(l));
  for (int64_t l0 = 0; l0 < len; l0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - l0);
    const float* rows[16];
    key_block<float, T>(key_row, l0, len, kf, rows);
    for (int64_t g = 0; g < group; ++g) {
      const TQ* qg = q + g * kDim;
      const __m512 q0 = widen16(qg), q1 = widen16(qg + 16), q2 = widen16(qg + 32),
                   q3 = widen16(qg + 48);
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) {
        const float* k = rows[j];
        acc[j] = _mm512_fmadd_ps(
            q3, _mm512_loadu_ps(k + 48),
            _mm512_fmadd_ps(q2, _mm512_loadu_ps(k + 32),
                            _mm512_fmadd_ps(q1, _mm512_loadu_ps(k + 16),
                                            _mm512_mul_ps(q0, _mm512_loadu_ps(k)))));
      }
      const __m512 s = _mm512_mul_ps(reduce16(acc), vscale);
      _mm512_mask_storeu_ps(scores + g * len + l0, (__mmask16)((1u << n) - 1), s);
    }
  }
  weigh_group16(scores, len, v_pool, slots, kv_heads, hk, group, out, lse);
}
#endif

#if defined(__AVX512BF16__)
using PairRow = uint32_t;  // two bfloat16 values, the first in the low half

// A PairRow of bfloat16 probabilities read from a row that exp_row_bf16 wrote over float32
// scores (may_alias: the memory was declared float).
typedef PairRow __attribute__((may_alias)) ProbPair;

// The first n lanes of a 16-lane mask (all 16 for n >= 16).
inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
}

// The softmax numerators of one row of n >= 0 scores for the pair dot products of p . v:
// p[l] = exp(s[l] - max) rounded to bfloat16, written as a bfloat16 row over the start of s
// (each block of 16 is read before it is overwritten), with p[n] = 0 when n is odd (the last
// key's partner, one more lane of the last store). Returns the max; *sum gets the float32 sum of
// the unrounded p (0 and -inf for n = 0).
inline float exp_row_bf16(float* s, int64_t n, float* sum) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t l = 0; l < n; l += 16) {
    const __mmask16 k = first_lanes(n - l);
    vmax = _mm512_mask_max_ps(vmax, k, vmax, _mm512_maskz_loadu_ps(k, s + l));
  }
  const float m = _mm512_reduce_max_ps(vmax);
  const __m512 vm = _mm512_set1_ps(m);
  at::BFloat16* p = reinterpret_cast<at::BFloat16*>(s);
  __m512 vz = _mm512_setzero_ps();
  for (int64_t l = 0; l < n; l += 16) {
    const __mmask16 k = first_lanes(n - l);
    const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + l), vm);
    const __m512 e = _mm512_maskz_mov_ps(k, exp16(x));
    vz = _mm512_add_ps(vz, e);
    const __mmask16 w = first_lanes(n - l + (n & 1));
    _mm256_mask_storeu_epi16(p + l, w, (__m256i)_mm512_cvtneps_pbh(e));  // lanes >= n - l: 0
  }
  *sum = _mm512_reduce_add_ps(vz);
  return m;
}

// out[g][0 .. 64) = inv[g] x the sum over keys l < len of p_g[l] v_l, for g < G: p_g the
// bfloat16 numerators of exp_row_bf16 (pr[g], read as pairs of keys), each pair of keys' value
// rows interleaved dim by dim (vpunpck{l,h}wd: the four vectors hold dims 8k + 0..3, 8k + 4..7,
// and those + 32) for pair dot products; the float32 sums are put back in dim order at the end.
// With `prefetch`, the rows kAhead keys ahead are fetched.
template <int G>
inline void weigh_pairs(const ProbPair* const* pr, int64_t len, const at::BFloat16* v,
                        int64_t stride, const int64_t* slots, bool prefetch, const float* inv,
                        float* out) {
  __m512 o[G][4];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < 4; ++c) o[g][c] = _mm512_setzero_ps();
  for (int64_t l = 0; l < len; l += 2) {
    if (prefetch) {
      if (l + kAhead < len) prefetch_row(v + slots[l + kAhead] * stride);
      if (l + kAhead + 1 < len) prefetch_row(v + slots[l + kAhead + 1] * stride);
    }
    const at::BFloat16* va = v + slots[l] * stride;
    const at::BFloat16* vb = l + 1 < len ? v + slots[l + 1] * stride : va;  // its p is 0
    const __m512i a0 = _mm512_loadu_si512(va), a1 = _mm512_loadu_si512(va + 32);
    const __m512i b0 = _mm512_loadu_si512(vb), b1 = _mm512_loadu_si512(vb + 32);
    const __m512bh x[4] = {(__m512bh)_mm512_unpacklo_epi16(a0, b0),
                           (__m512bh)_mm512_unpackhi_epi16(a0, b0),
                           (__m512bh)_mm512_unpacklo_epi16(a1, b1),
                           (__m512bh)_mm512_unpackhi_epi16(a1, b1)};
    for (int g = 0; g < G; ++g) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(pr[g][l / 2]));
      for (int c = 0; c < 4; ++c) o[g][c] = _mm512_dpbf16_ps(o[g][c], w, x[c]);
    }
  }
  const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i hi =
      _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int g = 0; g < G; ++g) {
    const __m512 s = _mm512_set1_ps(inv[g]);
    float* og = out + g * kDim;
    for (int h = 0; h < 2; ++h) {
      const __m512 e = o[g][2 * h], f = o[g][2 * h + 1];
      _mm512_storeu_ps(og + 32 * h, _mm512_mul_ps(_mm512_permutex2var_ps(e, lo, f), s));
      _mm512_storeu_ps(og + 32 * h + 16, _mm512_mul_ps(_mm512_permutex2var_ps(e, hi, f), s));
    }
  }
}

// The softmax of the group's score rows (lse, nullable, gets their log-sum-exps) and
// out[g] = p_g . v, four query heads at a time. p = exp(s - max) is rounded to bfloat16 for the
// pair dot products and the float32 sums divided by the float32 sum of the unrounded p at the
// end, as the extend kernel (extend_block_bf16) and torch's scaled_dot_product_attention on the
// CPU compute bfloat16 attention; outputs differ from a float32 p . v by about one bfloat16
// rounding of the output. Against the float32 p . v (weigh_group16: a value row widened and
// multiplied by each head's p, 23 vector instructions a key for 3 heads, broadcasts included;
// here 11.5), over 30 layers of SmolLM2-135M's bfloat16 pools on a 2-core AMD EPYC (AVX-512
// BF16, no AMX), batch 16 at context 1,000, in-process A/B (medians of 7-30 rounds): 259 -> 198
// us a layer with the pools in cache (as the rows of a shared prefix find them), 457-486 ->
// 438-472 from memory, where a loop that only reads the same rows takes 446-457. Float8 values
// keep weigh_group16: converting each to bfloat16 (fp8_to_bf16) made the kernel slower (466
// against 449 us a layer from memory, 411 against 389 in cache).
inline void weigh_group_bf16(float* scores, int64_t len, const at::BFloat16* v_pool,
                             const int64_t* slots, int64_t kv_heads, int64_t hk, int64_t group,
                             float* out, float* lse) {
  const ProbPair* pr[8];
  float inv[8];
  for (int64_t g = 0; g < group; ++g) {
    float z;
    const float m = exp_row_bf16(scores + g * len, len, &z);
    inv[g] = z > 0.f ? 1.f / z : 0.f;  // no keys: zeros, as weigh_group16
    if (lse != nullptr) lse[g] = m + std::log(z);
    pr[g] = reinterpret_cast<const ProbPair*>(scores + g * len);
  }
  const at::BFloat16* v = v_pool + hk * kDim;
  const int64_t stride = kv_heads * kDim;
  for (int64_t l = 0; l < std::min(kAhead, len); ++l) prefetch_row(v + slots[l] * stride);
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    float* o = out + g0 * kDim;
    switch (std::min<int64_t>(4, group - g0)) {
      case 4: weigh_pairs<4>(pr + g0, len, v, stride, slots, g0 == 0, inv + g0, o); break;
      case 3: weigh_pairs<3>(pr + g0, len, v, stride, slots, g0 == 0, inv + g0, o); break;
      case 2: weigh_pairs<2>(pr + g0, len, v, stride, slots, g0 == 0, inv + g0, o); break;
      default: weigh_pairs<1>(pr + g0, len, v, stride, slots, g0 == 0, inv + g0, o); break;
    }
  }
}
#endif

#if defined(__AVX512BF16__)
// Decode attention of one request's G query heads over one kv head's bfloat16 or float8 keys,
// with AVX-512 BF16: q . k as bf16 pair dot products into float32 (the products of two bf16
// values are exact in float32, as when both are widened first), 16 keys at a time, then p . v
// as pair dot products too (weigh_group_bf16). Float8 keys are converted to bfloat16 (exactly,
// fp8_to_bf16) a block of 16 at a time into a 2 KB scratch, float8 values as they are read.
//
// q: [group, 64] of this kv head; pools [slots, kv_heads, 64]; keys slots[0 .. len); scores:
// [group, len] scratch; out: [group, 64] float32; lse: [group] or null. group <= 8.
template <typename T>
inline void attend_head_bf16(const at::BFloat16* q, const T* k_pool, const T* v_pool,
                             const int64_t* slots, int64_t len, int64_t kv_heads, int64_t hk,
                             int64_t group, float scale, float* scores, float* out, float* lse) {
  alignas(64) at::BFloat16 kb[16 * kDim];
  __m512bh qv[8][2];
  for (int64_t g = 0; g < group; ++g) {
    qv[g][0] = (__m512bh)_mm512_loadu_si512(q + g * kDim);
    qv[g][1] = (__m512bh)_mm512_loadu_si512(q + g * kDim + 32);
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  auto key_row = [&](int64_t l) { return k_pool + (slots[l] * kv_heads + hk) * kDim; };
  for (int64_t l = 0; l < std::min(kAhead, len); ++l) prefetch_row(key_row(l));
  for (int64_t l0 = 0; l0 < len; l0 += 16) {
    const int64_t n = std::min<int64_t>(16, len - l0);
    const at::BFloat16* rows[16];
    key_block<at::BFloat16, T>(key_row, l0, len, kb, rows);
    for (int64_t g = 0; g < group; ++g) {
      __m512 acc[16];
      for (int64_t j = 0; j < 16; ++j) {
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(rows[j]);
        const __m512bh k1 = (__m512bh)_mm512_loadu_si512(rows[j] + 32);
        acc[j] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), qv[g][0], k0),
                                  qv[g][1], k1);
      }
      const __m512 s = _mm512_mul_ps(reduce16(acc), vscale);
      _mm512_mask_storeu_ps(scores + g * len + l0, (__mmask16)((1u << n) - 1), s);
    }
  }
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    weigh_group_bf16(scores, len, v_pool, slots, kv_heads, hk, group, out, lse);
  } else {  // float8 values: widened to float32 as they are read (see weigh_group_bf16)
    weigh_group16(scores, len, v_pool, slots, kv_heads, hk, group, out, lse);
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
// Decode attention of one request's G query heads over one kv head's keys, with AVX2 and FMA in
// float32, for CPUs without AVX-512: values of every pool dtype are widened to float32 as they
// are loaded (exact): q . k for 4 keys and up to 3 query heads at a time (score_keys4), then
// p . v with the output rows held in registers, 3 heads and half a row at a time.
// The keys' and values' slots are fetched ahead (rows of a request are scattered over the pool).
// head_dim must be 64.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const at::Float8_e5m2* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtph_ps(_mm_slli_epi16(_mm_cvtepu8_epi16(b), 8));
}

// Keys ahead of the one read whose rows are fetched, as kAhead for the bfloat16 kernel: into L2,
// leaving L1's few outstanding misses to the loads. Measured with float32 queries on a 2-core
// AMD EPYC (AVX-512 BF16, no AMX; float32 queries then ran these AVX2 kernels), `bench-executor
// --dtypes float32` at batch 16, medians of three runs, against 8 keys ahead into L1: 280.8 ->
// 173.2 ms a step at context 4,000, 97.7 -> 90.2 at 1,000; over a bfloat16 pool 159.5 -> 126.1 at
// 4,000.
constexpr int64_t kAheadF32 = 32;

// The most members of a group that attend_group_f32 takes in one task; larger groups are cut
// into tasks of this many (each reads the span once).
constexpr int64_t kGroupMembers = 8;

// out[g][0 .. 64) (+)= sum over l < len of p[g * p_stride + l] * v[slots[l] * stride + 0 .. 64),
// for g < G, added to out's values with `accumulate`, else from zero, the sums taken in key order
// either way: the output rows are held in registers (G x 4 vectors), half a row at a time. G is a
// template argument so that they stay there: with a run-time head count the compiler kept them on
// the stack, and decode attention took 5-15 % longer. The rows kAheadF32 keys ahead of keys
// l < ahead are fetched during the first half. Not inlined: inlined into the decode task loop,
// the compiler kept one of the sums on the stack, and over 4 requests x 512 positions of float32
// pools in cache (4 query heads, 4 kv heads) decode attention took 21.8 ms against 17.5 for 300
// calls.
template <int G, typename T>
__attribute__((noinline)) void weigh_values(const float* p, int64_t p_stride, int64_t len,
                                            const T* v, int64_t stride, const int64_t* slots,
                                            int64_t ahead, bool accumulate, float* out) {
  for (int64_t half = 0; half < kDim; half += 32) {
    __m256 o[G][4];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) {
        o[g][c] = accumulate ? _mm256_loadu_ps(out + g * kDim + half + 8 * c)
                             : _mm256_setzero_ps();
      }
    for (int64_t l = 0; l < len; ++l) {
      if (half == 0 && l < ahead) prefetch_row(v + slots[l + kAheadF32] * stride);
      const T* vl = v + slots[l] * stride + half;
      __m256 w[G];
      for (int g = 0; g < G; ++g) w[g] = _mm256_broadcast_ss(p + g * p_stride + l);
      for (int c = 0; c < 4; ++c) {
        const __m256 vc = load8(vl + 8 * c);
        for (int g = 0; g < G; ++g) o[g][c] = _mm256_fmadd_ps(w[g], vc, o[g][c]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(out + g * kDim + half + 8 * c, o[g][c]);
  }
}

// s[g * len + j] = scale x (q_g . k_j) for the keys j < n (<= 4) of rows[0 .. 4) and the G query
// heads of q ([G, 64] float32): each 8 values of a key are loaded (and widened) once for all G
// heads, whose 4 x G vector sums are held in registers (the queries are read from memory by the
// FMAs) and reduced 4 keys at a time by horizontal adds, pairing the lanes as the 8-key
// reduction of one head did before (the same sums in the same order, so the same scores).
template <int G, typename T>
inline void score_keys4(const float* q, const T* const* rows, __m256 vscale, float* s, int64_t len,
                        int64_t n) {
  __m256 acc[G][4];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < 4; ++j) acc[g][j] = _mm256_setzero_ps();
  for (int64_t c = 0; c < kDim; c += 8) {
    for (int j = 0; j < 4; ++j) {
      const __m256 k = load8(rows[j] + c);
      for (int g = 0; g < G; ++g)
        acc[g][j] = _mm256_fmadd_ps(k, _mm256_loadu_ps(q + g * kDim + c), acc[g][j]);
    }
  }
  for (int g = 0; g < G; ++g) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[g][0], acc[g][1]),
                                    _mm256_hadd_ps(acc[g][2], acc[g][3]));
    const __m128 r = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)),
                                _mm256_castps256_ps128(vscale));
    if (n == 4) {
      _mm_storeu_ps(s + g * len, r);
    } else {
      alignas(16) float tmp[4];
      _mm_store_ps(tmp, r);
      std::memcpy(s + g * len, tmp, sizeof(float) * n);
    }
  }
}

// weigh_values for n query heads (1 .. 3) of one kv head.
template <typename T>
inline void weigh_heads(int64_t n, const float* p, int64_t p_stride, int64_t len, const T* v,
                        int64_t stride, const int64_t* slots, int64_t ahead, bool accumulate,
                        float* out) {
  switch (std::min<int64_t>(3, n)) {
    case 3: weigh_values<3>(p, p_stride, len, v, stride, slots, ahead, accumulate, out); break;
    case 2: weigh_values<2>(p, p_stride, len, v, stride, slots, ahead, accumulate, out); break;
    default: weigh_values<1>(p, p_stride, len, v, stride, slots, ahead, accumulate, out); break;
  }
}

// score_keys4 for n query heads (1 .. 3) of one kv head.
template <typename T>
inline void score_heads(int64_t n, const float* q, const T* const* rows, __m256 vscale, float* s,
                        int64_t len, int64_t keys) {
  switch (std::min<int64_t>(3, n)) {
    case 3: score_keys4<3>(q, rows, vscale, s, len, keys); break;
    case 2: score_keys4<2>(q, rows, vscale, s, len, keys); break;
    default: score_keys4<1>(q, rows, vscale, s, len, keys); break;
  }
}

// q: [group, 64] of this kv head, widened into qw ([group, 64] float32 scratch) for bfloat16;
// pools [slots, kv_heads, 64]; keys slots[0 .. len); scores: [group, len] scratch; out:
// [group, 64] float32; lse: [group] or null.
template <typename TQ, typename T>
inline void attend_head_f32(const TQ* q, const T* k_pool, const T* v_pool, const int64_t* slots,
                            int64_t len, int64_t kv_heads, int64_t hk, int64_t group, float scale,
                            float* qw, float* scores, float* out, float* lse) {
  const __m256 vscale = _mm256_set1_ps(scale);
  auto row = [&](const T* pool, int64_t l) { return pool + (slots[l] * kv_heads + hk) * kDim; };
  const float* qf;
  if constexpr (std::is_same_v<TQ, float>) {
    qf = q;
  } else {
    load_row(q, qw, group * kDim);
    qf = qw;
  }
  for (int64_t l = 0; l < std::min<int64_t>(kAheadF32, len); ++l) prefetch_row(row(k_pool, l));
  for (int64_t l0 = 0; l0 < len; l0 += 4) {
    const int64_t n = std::min<int64_t>(4, len - l0);
    const T* rows[4];
    for (int64_t j = 0; j < 4; ++j) rows[j] = row(k_pool, l0 + std::min(j, n - 1));
    for (int64_t j = l0 + kAheadF32; j < std::min(l0 + kAheadF32 + 4, len); ++j) {
      prefetch_row(row(k_pool, j));
    }
    for (int64_t g0 = 0; g0 < group; g0 += 3) {
      score_heads(group - g0, qf + g0 * kDim, rows, vscale, scores + g0 * len + l0, len, n);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float l = softmax_in_place(scores + g * len, len);
    if (lse != nullptr) lse[g] = l;
  }
  for (int64_t l = 0; l < std::min<int64_t>(kAheadF32, len); ++l) prefetch_row(row(v_pool, l));
  for (int64_t g0 = 0; g0 < group; g0 += 3) {
    const float* p = scores + g0 * len;
    const T* v = v_pool + hk * kDim;
    const int64_t stride = kv_heads * kDim;
    float* o = out + g0 * kDim;
    weigh_heads(group - g0, p, len, len, v, stride, slots, g0 == 0 ? len - kAheadF32 : 0, false,
                o);
  }
}

// Values of a shared span weighed kSpanChunk keys at a time for every member of a group in turn,
// so that the chunk's rows, read from memory for the first member, are in L1 for the others.
constexpr int64_t kSpanChunk = 64;

// Decode attention of kv head hk for the members of a group of requests whose first `span` keys
// are the same slots (slots[m][0 .. span), read through slots[0]): as attend_head_f32 for each
// member, with every score and every output sum the same, but each block of 4 shared keys is
// read once for all members' query heads, and each chunk of shared values once for all. q[m]:
// member m's [group, 64] query heads of this kv head; slots[m], lens[m]: its keys (lens[m] >=
// span >= 1); out[m]: its [group, 64] float32 output; qw: [members, group, 64] float32 scratch
// (bfloat16 queries); scores: [members, group, max len] scratch.
template <typename TQ, typename T>
void attend_group_f32(const TQ* const* q, const int64_t* const* slots, const int64_t* lens,
                      int64_t members, int64_t span, const T* k_pool, const T* v_pool,
                      int64_t kv_heads, int64_t hk, int64_t group, float scale, float* qw,
                      float* scores, float* const* out) {
  const __m256 vscale = _mm256_set1_ps(scale);
  const int64_t stride = kv_heads * kDim, max_len = *std::max_element(lens, lens + members);
  const int64_t* shared = slots[0];
  auto row = [&](const T* pool, const int64_t* s, int64_t l) {
    return pool + s[l] * stride + hk * kDim;
  };
  const float* qf[kGroupMembers];
  for (int64_t m = 0; m < members; ++m) {
    if constexpr (std::is_same_v<TQ, float>) {
      qf[m] = q[m];
    } else {
      load_row(q[m], qw + m * group * kDim, group * kDim);
      qf[m] = qw + m * group * kDim;
    }
  }
  auto sc = [&](int64_t m) { return scores + m * group * max_len; };
  // q . k: the shared blocks of 4 keys (those wholly inside the span), then each member's own.
  const int64_t whole = span / 4 * 4;
  for (int64_t l = 0; l < std::min(kAheadF32, whole); ++l) prefetch_row(row(k_pool, shared, l));
  for (int64_t l0 = 0; l0 < whole; l0 += 4) {
    const T* rows[4];
    for (int64_t j = 0; j < 4; ++j) rows[j] = row(k_pool, shared, l0 + j);
    for (int64_t j = l0 + kAheadF32; j < std::min(l0 + kAheadF32 + 4, whole); ++j) {
      prefetch_row(row(k_pool, shared, j));
    }
    for (int64_t m = 0; m < members; ++m) {
      for (int64_t g0 = 0; g0 < group; g0 += 3) {
        score_heads(group - g0, qf[m] + g0 * kDim, rows, vscale, sc(m) + g0 * lens[m] + l0,
                    lens[m], 4);
      }
    }
  }
  for (int64_t m = 0; m < members; ++m) {
    const int64_t len = lens[m];
    for (int64_t l = whole; l < std::min(whole + kAheadF32, len); ++l) {
      prefetch_row(row(k_pool, slots[m], l));
    }
    for (int64_t l0 = whole; l0 < len; l0 += 4) {
      const int64_t n = std::min<int64_t>(4, len - l0);
      const T* rows[4];
      for (int64_t j = 0; j < 4; ++j) rows[j] = row(k_pool, slots[m], l0 + std::min(j, n - 1));
      for (int64_t j = l0 + kAheadF32; j < std::min(l0 + kAheadF32 + 4, len); ++j) {
        prefetch_row(row(k_pool, slots[m], j));
      }
      for (int64_t g0 = 0; g0 < group; g0 += 3) {
        score_heads(group - g0, qf[m] + g0 * kDim, rows, vscale, sc(m) + g0 * len + l0, len, n);
      }
    }
    for (int64_t g = 0; g < group; ++g) softmax_in_place(sc(m) + g * len, len);
  }
  // p . v: the span kSpanChunk keys at a time for every member, then each member's own keys.
  const T* v = v_pool + hk * kDim;
  for (int64_t l = 0; l < std::min(kAheadF32, span); ++l) prefetch_row(row(v_pool, shared, l));
  for (int64_t c0 = 0; c0 < span; c0 += kSpanChunk) {
    const int64_t n = std::min(kSpanChunk, span - c0);
    const int64_t ahead = std::clamp<int64_t>(span - kAheadF32 - c0, 0, n);
    for (int64_t m = 0; m < members; ++m) {
      for (int64_t g0 = 0; g0 < group; g0 += 3) {
        weigh_heads(group - g0, sc(m) + g0 * lens[m] + c0, lens[m], n, v, stride, shared + c0,
                    m == 0 && g0 == 0 ? ahead : 0, c0 > 0, out[m] + g0 * kDim);
      }
    }
  }
  for (int64_t m = 0; m < members; ++m) {
    const int64_t own = lens[m] - span;
    if (own == 0) continue;
    for (int64_t l = 0; l < std::min(kAheadF32, own); ++l) {
      prefetch_row(row(v_pool, slots[m] + span, l));
    }
    for (int64_t g0 = 0; g0 < group; g0 += 3) {
      weigh_heads(group - g0, sc(m) + g0 * lens[m] + span, lens[m], own, v, stride,
                  slots[m] + span, g0 == 0 ? own - kAheadF32 : 0, span > 0,
                  out[m] + g0 * kDim);
    }
  }
}
#endif

// Attends the query heads of kv heads [h0, h1) of one request.
template <typename TQ, typename T>
void attend(const TQ* q, const T* k_pool, const T* v_pool, const int64_t* slots, int64_t len,
            int64_t h0, int64_t h1, int64_t kv_heads, int64_t group, int64_t dim, float scale,
            float* qf, float* row, float* scores, float* out, float* lse) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<TQ, at::BFloat16> && !std::is_same_v<T, float>) {
    if (dim == kDim && group <= 8) {
      for (int64_t hk = h0; hk < h1; ++hk) {
        const int64_t first = (hk - h0) * group;  // this kv head's query heads within the task
        attend_head_bf16(q + hk * group * dim, k_pool, v_pool, slots, len, kv_heads, hk, group,
                         scale, scores, out + first * dim,
                         lse != nullptr ? lse + first : nullptr);
      }
      return;
    }
  }
#endif
#if defined(__AVX512F__)
  if (dim == kDim) {
    for (int64_t hk = h0; hk < h1; ++hk) {
      const int64_t first = (hk - h0) * group;  // this kv head's query heads within the task
      attend_head_x16(q + hk * group * dim, k_pool, v_pool, slots, len, kv_heads, hk, group,
                      scale, scores, out + first * dim, lse != nullptr ? lse + first : nullptr);
    }
    return;
  }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if (dim == kDim) {  // qf holds the task's query heads, so one kv head's fit
    for (int64_t hk = h0; hk < h1; ++hk) {
      const int64_t first = (hk - h0) * group;  // this kv head's query heads within the task
      attend_head_f32(q + hk * group * dim, k_pool, v_pool, slots, len, kv_heads, hk, group,
                      scale, qf, scores, out + first * dim, lse != nullptr ? lse + first : nullptr);
    }
    return;
  }
#endif
  const int64_t nh = (h1 - h0) * group;  // query heads handled
  const int64_t width = (h1 - h0) * dim;  // floats of the K/V row slice
  load_row(q + h0 * group * dim, qf, nh * dim);
  for (int64_t i = 0; i < nh * dim; ++i) qf[i] *= scale;
  for (int64_t l = 0; l < len; ++l) {
    load_row(k_pool + (slots[l] * kv_heads + h0) * dim, row, width);
    for (int64_t h = 0; h < nh; ++h) {
      const float* qh = qf + h * dim;
      const float* kh = row + (h / group) * dim;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < dim; ++d) s += qh[d] * kh[d];
      scores[h * len + l] = s;
    }
  }
  for (int64_t h = 0; h < nh; ++h) {
    const float l = softmax_in_place(scores + h * len, len);
    if (lse != nullptr) lse[h] = l;
  }
  std::fill(out, out + nh * dim, 0.f);
  for (int64_t l = 0; l < len; ++l) {
    load_row(v_pool + (slots[l] * kv_heads + h0) * dim, row, width);
    for (int64_t h = 0; h < nh; ++h) {
      const float p = scores[h * len + l];
      const float* vh = row + (h / group) * dim;
      float* oh = out + h * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) oh[d] += p * vh[d];
    }
  }
}

// Request b attends keys key_starts[b] .. seq_lens[b] - 1 (from 0 when key_starts is null);
// lse ([B, H], nullable) receives each head's log-sum-exp. Queries are TQ, pools T.
template <typename TQ, typename T>
void run(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
         const torch::Tensor& table, const torch::Tensor& rows, const int64_t* key_starts,
         const torch::Tensor& seq_lens, double scale, torch::Tensor& out, float* lse) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_pool.size(1), group = heads / kv_heads;
  const int64_t table_stride = table.stride(0);
  const TQ* qp = q.data_ptr<TQ>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  int64_t max_len = 1;
  for (int64_t b = 0; b < batch; ++b) max_len = std::max(max_len, lp[b]);
  // Whole requests per task read each slot's K/V row as one contiguous run; with too few requests
  // to keep every thread busy, split each request by kv head instead.
  const int64_t split = batch >= 4 * at::get_num_threads() ? 1 : kv_heads;
  const int64_t span = kv_heads / split;
  at::parallel_for(0, batch * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(span * group * dim), row(span * dim), scores(span * group * max_len);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / split, h0 = (task % split) * span;
      const int64_t first = key_starts != nullptr ? key_starts[b] : 0;
      const int64_t* slots = tp + rp[b] * table_stride + first;
      const int64_t offset = (b * heads + h0 * group) * dim;
      float* lse_b = lse != nullptr ? lse + b * heads + h0 * group : nullptr;
      attend<TQ, T>(qp + (b * heads) * dim, kp, vp, slots, lp[b] - first, h0, h0 + span, kv_heads,
                group, dim, static_cast<float>(scale), qf.data(), row.data(), scores.data(),
                op + offset, lse_b);
    }
  });
}


constexpr int64_t kQueryBlock = 16;  // new tokens per extend task
constexpr int64_t kKeyBlock = 16;    // keys per inner block (one 512-bit vector of floats)
constexpr int64_t kValueBlock = 64;  // keys whose values the AVX2 extend widens at a time

// 16 floats; GCC and Clang map it to one AVX-512 register (two AVX2 ones elsewhere).
typedef float vfloat __attribute__((vector_size(kKeyBlock * sizeof(float))));

inline vfloat load_vec(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store_vec(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
inline void store_scores(float* dst, vfloat v, int64_t n) {
  float tmp[kKeyBlock];
  std::memcpy(tmp, &v, sizeof(v));
  std::memcpy(dst, tmp, sizeof(float) * n);
}

#if defined(__AVX512BF16__)
// Extend attention for bfloat16 pools at head dim 64, with AVX-512 BF16. A task's query rows
// (r = j * G + g: query i0 + j, head hk * G + g), padded with zero queries to R, a multiple of 16,
// are the vector lanes. q . k is the pair dot product of 16 rows' (q[2i], q[2i + 1]) with one
// key's (k[2i], k[2i + 1]) broadcast straight from the pool, so keys are never transposed (the
// products of two bfloat16 values are exact in float32, the sums float32); the softmax runs down
// the key axis on whole vectors of rows. p . v is a pair dot product too: each row's
// probabilities of two keys, (p[l], p[l + 1]) relative to the row's maximum and rounded to
// bfloat16, against the two keys' values (v_l[d], v_{l+1}[d]) broadcast; the sums are float32 and
// divided by the float32 sum of the unrounded probabilities at the end. This is how torch's
// scaled_dot_product_attention computes bfloat16 attention on the CPU (its flash kernel rounds
// the unnormalised probabilities to the query dtype for the p . v GEMM), so outputs differ from a
// float32 p . v by about one bfloat16 rounding of the output. It halves the p . v instructions;
// with the one-pass softmax below (exp16), `radixserve bench-executor` prefill steps of
// SmolLM2-135M on a 2-core AMD EPYC (AVX-512 BF16, no AMX), medians of three, went from 4,999
// to 4,122 ms for 4,096 tokens, 756 to 684 ms for 1,024, and 411 to 369 ms for 7 x 64 after a
// shared 1,000-token cached prefix (docs/benchmarks.md).
// Rows r0 .. r0 + 16 * RG of sT[l * R + r] = q_r . k_l for the keys l < n_keys, key_row(l)
// being key l's 64 bfloat16 values; mx[r] becomes the max of itself and the row's scores of keys
// l < common (NaN scores ignored).
template <int RG, typename KeyRow>
void extend_scores_bf16(const PairRow* qT, int64_t R, int64_t r0, const KeyRow& key_row,
                        int64_t n_keys, int64_t common, float* sT, float* mx) {
  constexpr int KB = RG <= 3 ? 8 : 4;  // keys per block: RG x KB accumulators, 24 at most
  __m512 top[RG];
  for (int rg = 0; rg < RG; ++rg) top[rg] = _mm512_loadu_ps(mx + r0 + 16 * rg);
  for (int64_t l = 0; l < std::min(kAhead, n_keys); ++l) prefetch_row(key_row(l));
  for (int64_t l0 = 0; l0 < n_keys; l0 += KB) {
    const int64_t n = std::min<int64_t>(KB, n_keys - l0);
    const PairRow* kr[KB];
    for (int j = 0; j < KB; ++j) {
      kr[j] = reinterpret_cast<const PairRow*>(key_row(l0 + std::min<int64_t>(j, n - 1)));
    }
    for (int64_t l = l0 + kAhead; l < std::min(l0 + kAhead + KB, n_keys); ++l) {
      prefetch_row(key_row(l));
    }
    __m512 acc[RG][KB];
    for (int rg = 0; rg < RG; ++rg)
      for (int j = 0; j < KB; ++j) acc[rg][j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < kDim / 2; ++i) {
      __m512bh qv[RG];
      for (int rg = 0; rg < RG; ++rg) {
        qv[rg] = (__m512bh)_mm512_loadu_si512(qT + i * R + r0 + 16 * rg);
      }
      for (int j = 0; j < KB; ++j) {
        const __m512bh kb = (__m512bh)_mm512_set1_epi32(static_cast<int>(kr[j][i]));
        for (int rg = 0; rg < RG; ++rg) acc[rg][j] = _mm512_dpbf16_ps(acc[rg][j], qv[rg], kb);
      }
    }
    for (int j = 0; j < n; ++j)
      for (int rg = 0; rg < RG; ++rg) {
        _mm512_storeu_ps(sT + (l0 + j) * R + r0 + 16 * rg, acc[rg][j]);
        if (l0 + j < common) top[rg] = _mm512_max_ps(acc[rg][j], top[rg]);  // NaN: ignored
      }
  }
  for (int rg = 0; rg < RG; ++rg) _mm512_storeu_ps(mx + r0 + 16 * rg, top[rg]);
}

// Rows r0 .. r0 + 16 * RG of oT[d * R + r] = the sum over key pairs i < n_pairs of the pair dot
// product of pT[i * R + r] (row r's probabilities of keys 2i, 2i + 1, bfloat16) and vT[i * 64 + d]
// (the two keys' values at dim d, bfloat16), in float32.
template <int RG>
void extend_values_bf16(const PairRow* pT, int64_t R, int64_t r0, const PairRow* vT,
                        int64_t n_pairs, float* oT) {
  constexpr int DB = RG == 1 ? 16 : (RG <= 3 ? 8 : 4);  // RG x DB accumulators, 24 at most
  for (int64_t d0 = 0; d0 < kDim; d0 += DB) {
    __m512 acc[RG][DB];
    for (int rg = 0; rg < RG; ++rg)
      for (int d = 0; d < DB; ++d) acc[rg][d] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n_pairs; ++i) {
      __m512bh pv[RG];
      for (int rg = 0; rg < RG; ++rg) {
        pv[rg] = (__m512bh)_mm512_loadu_si512(pT + i * R + r0 + 16 * rg);
      }
      const PairRow* vd = vT + i * kDim + d0;
      for (int d = 0; d < DB; ++d) {
        const __m512bh vb = (__m512bh)_mm512_set1_epi32(static_cast<int>(vd[d]));
        for (int rg = 0; rg < RG; ++rg) acc[rg][d] = _mm512_dpbf16_ps(acc[rg][d], pv[rg], vb);
      }
    }
    for (int d = 0; d < DB; ++d)
      for (int rg = 0; rg < RG; ++rg) {
        _mm512_storeu_ps(oT + (d0 + d) * R + r0 + 16 * rg, acc[rg][d]);
      }
  }
}

// dst[0 .. 16) = the pairs (a[i], b[i]) of two rows of 16 bfloat16 values, a[i] in the low half.
inline void pair_rows16(const at::BFloat16* a, const at::BFloat16* b, PairRow* dst) {
  const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
  const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  _mm512_storeu_si512(dst, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
}

// Calls fn(std::integral_constant<int, RG>(), r0) over R rows (a multiple of 16) in chunks of
// RG <= 4 vectors of 16 rows, r0 being the chunk's first row.
template <typename Fn>
void for_row_chunks(int64_t R, const Fn& fn) {
  for (int64_t r0 = 0; r0 < R; r0 += 64) {
    switch (std::min<int64_t>(4, (R - r0) / 16)) {
      case 4: fn(std::integral_constant<int, 4>(), r0); break;
      case 3: fn(std::integral_constant<int, 3>(), r0); break;
      case 2: fn(std::integral_constant<int, 2>(), r0); break;
      default: fn(std::integral_constant<int, 1>(), r0); break;
    }
  }
}

// extend_block (below) for bfloat16 queries over bfloat16 or float8 pools at head dim 64. Float8
// keys are converted to bfloat16 first (exactly, fp8_to_bf16), all the task's keys into one
// scratch; float8 values two at a time, as they are interleaved into pairs.
template <typename T>
void extend_block_bf16(const at::BFloat16* q, int64_t q_stride, const T* k_pool, const T* v_pool,
                       const int64_t* slots, int64_t prefix, bool causal, int64_t i0, int64_t nq,
                       int64_t hk, int64_t kv_heads, int64_t group, float scale, float* out,
                       int64_t out_stride, float* lse, int64_t lse_stride) {
  const int64_t nr = nq * group, R = (nr + 15) / 16 * 16;
  const int64_t n_keys = causal ? prefix + i0 + nq : prefix;
  thread_local std::vector<PairRow> qT, pT, vT;
  thread_local std::vector<float> sT, oT, mx, sum;
  thread_local std::vector<int64_t> visible;
  thread_local std::vector<at::BFloat16> kb, vb;
  auto pool_key = [&](int64_t l) { return k_pool + (slots[l] * kv_heads + hk) * kDim; };
  if constexpr (!std::is_same_v<T, at::BFloat16>) {
    kb.resize(n_keys * kDim);
    for (int64_t l = 0; l < n_keys; ++l) {
      if (l + kAhead < n_keys) prefetch_row(pool_key(l + kAhead));
      convert_row(pool_key(l), kb.data() + l * kDim);
    }
  }
  auto key_row = [&](int64_t l) -> const at::BFloat16* {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      return pool_key(l);
    } else {
      return kb.data() + l * kDim;
    }
  };
  qT.assign(kDim / 2 * R, 0);
  for (int64_t r = 0; r < nr; ++r) {
    const PairRow* qr = reinterpret_cast<const PairRow*>(q + (i0 + r / group) * q_stride +
                                                         (hk * group + r % group) * kDim);
    for (int64_t i = 0; i < kDim / 2; ++i) qT[i * R + r] = qr[i];
  }
  // Softmax down the key axis. Every row sees keys 0 .. common - 1; row r also sees keys up to
  // visible[r] - 1 (its own position, when causal). Padding rows see every key. The rows'
  // maxima over the common keys are taken as their scores are stored, the rest after.
  const int64_t common = causal ? prefix + i0 + 1 : n_keys;
  sT.resize(n_keys * R);
  mx.assign(R, -std::numeric_limits<float>::infinity());
  for_row_chunks(R, [&](auto rg, int64_t r0) {  // chunks of up to 4 x 16 rows
    extend_scores_bf16<decltype(rg)::value>(qT.data(), R, r0, key_row, n_keys, common,
                                            sT.data(), mx.data());
  });
  visible.resize(R);
  sum.resize(R);  // every entry is stored by the pass below
  for (int64_t r = 0; r < R; ++r) {
    visible[r] = causal && r < nr ? prefix + i0 + r / group + 1 : n_keys;
  }
  float* s = sT.data();
  float* m = mx.data();
  float* z = sum.data();
  const int64_t* vis = visible.data();
  for (int64_t l = common; l < n_keys; ++l) {
#pragma omp simd
    for (int64_t r = 0; r < R; ++r) m[r] = l < vis[r] ? std::max(m[r], s[l * R + r]) : m[r];
  }
  // p = exp((s - max) * scale) of keys 2i and 2i + 1 (0 where a row does not see the key, and
  // for a last odd key's partner), summed in float32 and stored as bfloat16 pairs: one pass,
  // 16 rows at a time.
  const int64_t n_pairs = (n_keys + 1) / 2;
  pT.resize(n_pairs * R);
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < R; r += 16) {
    const __m512 vm = _mm512_loadu_ps(m + r);
    __m512i seen_lo, seen_hi;  // keys visible to the 16 rows, as two vectors of 8 int64
    std::memcpy(&seen_lo, vis + r, sizeof(seen_lo));
    std::memcpy(&seen_hi, vis + r + 8, sizeof(seen_hi));
    __m512 vz = _mm512_setzero_ps();
    for (int64_t i = 0; i < n_pairs; ++i) {
      const int64_t l = 2 * i;
      const __m512i key = _mm512_set1_epi64(l);
      const __m512i next = _mm512_set1_epi64(l + 1);
      const __mmask16 sees_a = (__mmask16)(_mm512_cmplt_epi64_mask(key, seen_lo) |
                                           (_mm512_cmplt_epi64_mask(key, seen_hi) << 8));
      const __mmask16 sees_b = (__mmask16)(_mm512_cmplt_epi64_mask(next, seen_lo) |
                                           (_mm512_cmplt_epi64_mask(next, seen_hi) << 8));
      const float* a = s + l * R + r;
      const __m512 pa = _mm512_maskz_mov_ps(
          sees_a, exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(a), vm), vscale)));
      __m512 pb = _mm512_setzero_ps();
      if (l + 1 < n_keys) {
        pb = _mm512_maskz_mov_ps(
            sees_b, exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(a + R), vm), vscale)));
      }
      vz = _mm512_add_ps(vz, _mm512_add_ps(pa, pb));
      const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(pa));
      const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(pb));
      _mm512_storeu_si512(pT.data() + i * R + r, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
    _mm512_storeu_ps(z + r, vz);
  }
  // The values of keys 2i and 2i + 1 as bfloat16 pairs, dim by dim (float8 ones converted to
  // bfloat16 first, exactly; a last odd key paired with zeros).
  vT.resize(n_pairs * kDim);
  const int64_t stride = kv_heads * kDim;
  const T* v = v_pool + hk * kDim;
  auto value_row = [&](int64_t l) -> const at::BFloat16* {
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      return v + slots[l] * stride;
    } else {
      convert_row(v + slots[l] * stride, vb.data() + (l & 1) * kDim);
      return vb.data() + (l & 1) * kDim;
    }
  };
  if (vb.size() != 3 * kDim) {  // two converted rows, then a row of zeros (never written)
    vb.assign(3 * kDim, at::BFloat16(0.f));
  }
  for (int64_t l = 0; l < std::min(kAhead, n_keys); ++l) prefetch_row(v + slots[l] * stride);
  for (int64_t i = 0; i < n_pairs; ++i) {
    for (int64_t l = 2 * i + kAhead; l < std::min(2 * i + kAhead + 2, n_keys); ++l) {
      prefetch_row(v + slots[l] * stride);
    }
    const at::BFloat16* a = value_row(2 * i);
    const at::BFloat16* b = 2 * i + 1 < n_keys ? value_row(2 * i + 1) : vb.data() + 2 * kDim;
    for (int64_t d = 0; d < kDim; d += 16) pair_rows16(a + d, b + d, vT.data() + i * kDim + d);
  }
  oT.resize(kDim * R);
  for_row_chunks(R, [&](auto rg, int64_t r0) {
    extend_values_bf16<decltype(rg)::value>(pT.data(), R, r0, vT.data(), n_pairs, oT.data());
  });
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t j = i0 + r / group, h = hk * group + r % group;
    float* o = out + j * out_stride + h * kDim;
    const float inv = 1.f / z[r];
    for (int64_t d = 0; d < kDim; ++d) o[d] = oT[d * R + r] * inv;
    if (lse != nullptr) lse[j * lse_stride + h] = m[r] * scale + std::log(z[r]);
  }
}
#endif

// Whether extend_block runs extend_block_bf16 (which keeps its own buffers) for queries of TQ
// over pools of T.
template <typename TQ, typename T>
constexpr bool bf16_extend(int64_t dim) {
#if defined(__AVX512BF16__)
  return std::is_same_v<TQ, at::BFloat16> && !std::is_same_v<T, float> && dim == kDim;
#else
  return false;
#endif
}

// Converts keys [l0, l0 + n) of kv head hk into kt[d * kKeyBlock + j] (zero past n).
template <typename T>
void load_keys_transposed(const T* pool, const int64_t* slots, int64_t l0, int64_t n,
                          int64_t kv_heads, int64_t hk, int64_t dim, float* row, float* kt) {
  for (int64_t j = 0; j < kKeyBlock; ++j) {
    if (j < n) {
      load_row(pool + (slots[l0 + j] * kv_heads + hk) * dim, row, dim);
      for (int64_t d = 0; d < dim; ++d) kt[d * kKeyBlock + j] = row[d];
    } else {
      for (int64_t d = 0; d < dim; ++d) kt[d * kKeyBlock + j] = 0.f;
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
// Extend and shared-span attention with AVX2 and FMA in float32, for CPUs without AVX-512, head
// dim 64 (extend_block's arguments; keys and values of every pool dtype widened exactly). The
// task's query rows r = j * G + g, padded with zero rows to R (a multiple of 8), are the vector
// lanes: the queries, scaled, are transposed once into qT[d * R + r], so q . k for 8 rows is a
// vector of qT times one key's element broadcast, and the keys are never transposed: each block
// of 4 keys is scored for every row (score_keys, 4 keys x 24 rows a tile) while it is in L1.
// Scores land key-major, s[l * R + r]; the causal mask, the maximum and the exp (exp8) run down
// the key axis on whole vectors of rows. p . v gathers 64 value rows into a contiguous block,
// then holds 6 rows x 16 output floats in registers, each row's probability broadcast and each
// value vector loaded once per 6 rows; the outputs are divided by the rows' sums at the end
// (reading the value rows from the pool instead of gathering them took 1.06-1.11 times as
// long). On a 2-vCPU AMD EPYC (Zen 3, AVX2), float32, before the 4-key score tiles, one layer's
// attention for 7 x 64 tokens after a cached 1,000-token prefix took 12.3 ms against 112
// through the portable 16-lane code below; `radixserve bench-executor` prefill steps, medians
// of three, 928 ms against 1,169 through torch's SDPA, 4 x 256 tokens 1,524 against 1,778
// (docs/benchmarks.md). The 4 x 24 score tile, with the keys the outer loop, replaced one of 2
// keys x 48 rows (whose 12 sums left no registers for the 6 vectors of qT, loaded twice a
// step): `python -m kernels.cpu.bench --kernel extend --against` the code before, 11 rounds
// (some 9), outputs bit for bit the same: 7 x 64 tokens after 1,000 positions 0.83 and 0.87 of
// the time (10.5 against 12.6 ms a layer), 2 x 256 new tokens 0.80 and 0.90, bfloat16 pools
// 0.87, 8 query heads a KV head 0.69, one 0.90 and 0.99.
constexpr int kRowVectors = 3;  // vectors of 8 rows scored together (4 keys x 3 = 12 sums)
constexpr int kScoreKeys = 4;   // keys scored together

// s_j[8v + i] = q_{8v+i} . k_j for the kScoreKeys keys j and v < V (qT's rows, stride R): 4 x V
// sums in registers, each 8 rows of qT loaded once a dim for the 4 keys and each key's element
// broadcast once for the V vectors (with 4 x 3 sums, 7 loads for 12 FMAs, where 2 keys x 6
// vectors took 14: 16 registers cannot hold 12 sums and 6 vectors of qT, so each was loaded
// twice). Every score is one FMA chain over d ascending, whatever the tile.
template <int V>
inline void score_keys(const float* qT, int64_t R, const float* const* k, float* const* s) {
  static_assert(V >= 1 && V <= 3, "up to 3 vectors of rows");
  __m256 a[kScoreKeys][V];
  for (int j = 0; j < kScoreKeys; ++j)
    for (int v = 0; v < V; ++v) a[j][v] = _mm256_setzero_ps();
  for (int64_t d = 0; d < kDim; ++d) {
    const float* qd = qT + d * R;
    // Named registers, each held by an empty asm: GCC would otherwise fold the loads into every
    // FMA (an array held this way is stored to the stack every step).
    __m256 q0 = _mm256_loadu_ps(qd), q1 = q0, q2 = q0;
    asm("" : "+x"(q0));
    if constexpr (V > 1) {
      q1 = _mm256_loadu_ps(qd + 8);
      asm("" : "+x"(q1));
    }
    if constexpr (V > 2) {
      q2 = _mm256_loadu_ps(qd + 16);
      asm("" : "+x"(q2));
    }
    for (int j = 0; j < kScoreKeys; ++j) {
      const __m256 b = _mm256_broadcast_ss(k[j] + d);
      a[j][0] = _mm256_fmadd_ps(q0, b, a[j][0]);
      if constexpr (V > 1) a[j][1] = _mm256_fmadd_ps(q1, b, a[j][1]);
      if constexpr (V > 2) a[j][2] = _mm256_fmadd_ps(q2, b, a[j][2]);
    }
  }
  for (int j = 0; j < kScoreKeys; ++j)
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(s[j] + 8 * v, a[j][v]);
}

// acc[k][0 .. 64) += sum over l < n of p[l * R + k] * vb[l][0 .. 64) for the RT rows k < RT:
// RT rows x 16 output floats in registers, each value vector loaded once for the RT rows.
template <int RT>
inline void weigh_rows(const float* p, int64_t R, int64_t n, const float* vb, float* acc) {
  for (int64_t c0 = 0; c0 < kDim; c0 += 16) {
    __m256 o[RT][2];
    for (int k = 0; k < RT; ++k) {
      o[k][0] = _mm256_loadu_ps(acc + k * kDim + c0);
      o[k][1] = _mm256_loadu_ps(acc + k * kDim + c0 + 8);
    }
    for (int64_t l = 0; l < n; ++l) {
      const __m256 v0 = _mm256_loadu_ps(vb + l * kDim + c0);
      const __m256 v1 = _mm256_loadu_ps(vb + l * kDim + c0 + 8);
      for (int k = 0; k < RT; ++k) {
        const __m256 w = _mm256_broadcast_ss(p + l * R + k);
        o[k][0] = _mm256_fmadd_ps(w, v0, o[k][0]);
        o[k][1] = _mm256_fmadd_ps(w, v1, o[k][1]);
      }
    }
    for (int k = 0; k < RT; ++k) {
      _mm256_storeu_ps(acc + k * kDim + c0, o[k][0]);
      _mm256_storeu_ps(acc + k * kDim + c0 + 8, o[k][1]);
    }
  }
}

// extend_block's task on AVX2 (see above); qT: R x 64, s: n_keys x R, kbuf: 4 x 64, vb:
// kValueBlock x 64, acc: R x 64, stats: 2 x R floats of scratch.
template <typename TQ, typename T>
void extend_block_avx2(const TQ* q, int64_t q_stride, const T* k_pool, const T* v_pool,
                       const int64_t* slots, int64_t prefix, bool causal, int64_t i0, int64_t nq,
                       int64_t hk, int64_t kv_heads, int64_t group, float scale, float* qT,
                       float* s, float* kbuf, float* vb, float* acc, float* stats, float* out,
                       int64_t out_stride, float* lse, int64_t lse_stride) {
  using radixserve_simd::exp8;
  const int64_t nr = nq * group, R = (nr + 7) / 8 * 8, vectors = R / 8;
  const int64_t n_keys = causal ? prefix + i0 + nq : prefix;
  const int64_t stride = kv_heads * kDim;
  // qT[d * R + r] = scale * q_r[d]; padded rows stay 0.
  std::fill(qT, qT + kDim * R, 0.f);
  for (int64_t j = 0; j < nq; ++j) {
    const TQ* qj = q + (i0 + j) * q_stride + hk * group * kDim;
    for (int64_t g = 0; g < group; ++g) {
      load_row(qj + g * kDim, kbuf, kDim);
      for (int64_t d = 0; d < kDim; ++d) qT[d * R + j * group + g] = kbuf[d] * scale;
    }
  }
  auto row = [&](const T* pool, int64_t l) { return pool + slots[l] * stride + hk * kDim; };
  // A key row as float32: straight from a float32 pool, else widened into buf.
  auto key = [&](int64_t l, float* buf) -> const float* {
    if constexpr (std::is_same_v<T, float>) {
      return row(k_pool, l);
    } else {
      load_row(row(k_pool, l), buf, kDim);
      return buf;
    }
  };
  // Each block of 4 keys is scored for every row while its rows are in L1.
  for (int64_t l = 0; l < n_keys; l += kScoreKeys) {
    // the rows kAheadF32 keys ahead, into L2 (the slots are scattered)
    for (int64_t a = l + kAheadF32; a < std::min(l + kAheadF32 + kScoreKeys, n_keys); ++a) {
      prefetch_row(row(k_pool, a));
    }
    const float* k[kScoreKeys];
    float* sj[kScoreKeys];
    for (int64_t j = 0; j < kScoreKeys; ++j) {
      const int64_t lj = std::min(l + j, n_keys - 1);  // past the last key it is scored again
      k[j] = key(lj, kbuf + j * kDim);
      sj[j] = s + lj * R;
    }
    for (int64_t v0 = 0; v0 < vectors; v0 += kRowVectors) {
      float* sv[kScoreKeys];
      for (int j = 0; j < kScoreKeys; ++j) sv[j] = sj[j] + 8 * v0;
      const float* qv = qT + 8 * v0;
      static_assert(kRowVectors == 3, "the cases below take up to 3 vectors");
      switch (std::min<int64_t>(kRowVectors, vectors - v0)) {
        case 3: score_keys<3>(qv, R, k, sv); break;
        case 2: score_keys<2>(qv, R, k, sv); break;
        default: score_keys<1>(qv, R, k, sv); break;
      }
    }
  }
  // Causal: row r sees keys 0 .. prefix + i0 + r / G, so only the last nq keys are masked
  // (padded rows see every key).
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  if (causal) {
    for (int64_t v = 0; v < vectors; ++v) {
      alignas(32) int32_t seen[8];
      for (int64_t i = 0; i < 8; ++i) {
        const int64_t r = 8 * v + i;
        seen[i] = static_cast<int32_t>(r < nr ? prefix + i0 + r / group + 1 : n_keys);
      }
      const __m256i vis = _mm256_load_si256(reinterpret_cast<const __m256i*>(seen));
      for (int64_t l = prefix + i0; l < n_keys; ++l) {
        const __m256 keep =
            _mm256_castsi256_ps(_mm256_cmpgt_epi32(vis, _mm256_set1_epi32(static_cast<int>(l))));
        float* sl = s + l * R + 8 * v;
        _mm256_storeu_ps(sl, _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(sl), keep));
      }
    }
  }
  // p = exp(s - max) in place, masked keys exactly 0; stats: the maxima, then the sums.
  float* maxima = stats;
  float* sums = stats + R;
  const __m256 floor = _mm256_set1_ps(radixserve_simd::kExp8Min);  // exp8's clamp
  for (int64_t v = 0; v < vectors; ++v) {
    __m256 m = neg_inf;
    for (int64_t l = 0; l < n_keys; ++l) m = _mm256_max_ps(m, _mm256_loadu_ps(s + l * R + 8 * v));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t l = 0; l < n_keys; ++l) {
      float* sl = s + l * R + 8 * v;
      const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(sl), m);
      const __m256 p = _mm256_and_ps(exp8(x), _mm256_cmp_ps(x, floor, _CMP_GT_OQ));
      _mm256_storeu_ps(sl, p);
      sum = _mm256_add_ps(sum, p);
    }
    _mm256_storeu_ps(maxima + 8 * v, m);
    _mm256_storeu_ps(sums + 8 * v, sum);
  }
  // acc_r = sum_l p_rl v_l, over blocks of keys whose values are gathered (and widened) into vb
  // once per block, so that the row tiles read them contiguously from L1.
  std::fill(acc, acc + nr * kDim, 0.f);
  for (int64_t l0 = 0; l0 < n_keys; l0 += kValueBlock) {
    const int64_t n = std::min(kValueBlock, n_keys - l0);
    for (int64_t j = 0; j < n; ++j) {
      if (l0 + j + kAheadF32 < n_keys) prefetch_row(row(v_pool, l0 + j + kAheadF32));
      load_row(row(v_pool, l0 + j), vb + j * kDim, kDim);
    }
    const float* p = s + l0 * R;
    int64_t r = 0;
    for (; r + 6 <= nr; r += 6) weigh_rows<6>(p + r, R, n, vb, acc + r * kDim);
    switch (nr - r) {
      case 5: weigh_rows<5>(p + r, R, n, vb, acc + r * kDim); break;
      case 4: weigh_rows<4>(p + r, R, n, vb, acc + r * kDim); break;
      case 3: weigh_rows<3>(p + r, R, n, vb, acc + r * kDim); break;
      case 2: weigh_rows<2>(p + r, R, n, vb, acc + r * kDim); break;
      case 1: weigh_rows<1>(p + r, R, n, vb, acc + r * kDim); break;
      default: break;
    }
  }
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t j = r / group, g = r % group;
    const __m256 inv = _mm256_set1_ps(1.f / sums[r]);
    float* o = out + (i0 + j) * out_stride + (hk * group + g) * kDim;
    for (int64_t c = 0; c < kDim; c += 8) {
      _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(acc + r * kDim + c), inv));
    }
    if (lse != nullptr) lse[(i0 + j) * lse_stride + hk * group + g] = maxima[r] + std::log(sums[r]);
  }
}
#endif

// Queries i0 .. i0 + nq - 1 of one request, the G heads of kv head hk, over the keys at
// slots[0 ..). Causal: query i sits right after `prefix` keys plus i new ones and sees keys
// 0 .. prefix + i; otherwise every query sees keys 0 .. prefix - 1 (a shared span).
// Row r = j * G + g of qf / out is query i0 + j, head hk * G + g; lse (nullable) gets
// lse[(i0 + j) * lse_stride + hk * G + g].
template <typename TQ, typename T>
void extend_block(const TQ* q, int64_t q_stride, const T* k_pool, const T* v_pool,
                  const int64_t* slots, int64_t prefix, bool causal, int64_t i0, int64_t nq,
                  int64_t hk, int64_t kv_heads, int64_t group, int64_t dim, float scale,
                  float* qf, float* scores, float* kt, float* vb, float* row, float* acc,
                  float* out, int64_t out_stride, float* lse, int64_t lse_stride) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<TQ, at::BFloat16> && !std::is_same_v<T, float>) {
    if (bf16_extend<TQ, T>(dim)) {
      extend_block_bf16(q, q_stride, k_pool, v_pool, slots, prefix, causal, i0, nq, hk, kv_heads,
                        group, scale, out, out_stride, lse, lse_stride);
      return;
    }
  }
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
  if (dim == kDim) {
    extend_block_avx2(q, q_stride, k_pool, v_pool, slots, prefix, causal, i0, nq, hk, kv_heads,
                      group, scale, qf, scores, kt, vb, acc, row, out, out_stride, lse,
                      lse_stride);
    return;
  }
#endif
  const int64_t nr = nq * group;
  // The last query sees keys 0 .. n_keys - 1.
  const int64_t n_keys = causal ? prefix + i0 + nq : prefix;
  for (int64_t j = 0; j < nq; ++j) {
    load_row(q + (i0 + j) * q_stride + hk * group * dim, qf + j * group * dim, group * dim);
  }
  for (int64_t i = 0; i < nr * dim; ++i) qf[i] *= scale;
  // scores[r * n_keys + l] = q_r . k_l
  for (int64_t l0 = 0; l0 < n_keys; l0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, n_keys - l0);
    load_keys_transposed(k_pool, slots, l0, n, kv_heads, hk, dim, row, kt);
    int64_t r = 0;
    for (; r + 4 <= nr; r += 4) {  // four query rows share each load of a key column
      const float *q0 = qf + r * dim, *q1 = q0 + dim, *q2 = q1 + dim, *q3 = q2 + dim;
      vfloat a0 = {}, a1 = {}, a2 = {}, a3 = {};
      for (int64_t d = 0; d < dim; ++d) {
        const vfloat kd = load_vec(kt + d * kKeyBlock);
        a0 += q0[d] * kd;
        a1 += q1[d] * kd;
        a2 += q2[d] * kd;
        a3 += q3[d] * kd;
      }
      store_scores(scores + r * n_keys + l0, a0, n);
      store_scores(scores + (r + 1) * n_keys + l0, a1, n);
      store_scores(scores + (r + 2) * n_keys + l0, a2, n);
      store_scores(scores + (r + 3) * n_keys + l0, a3, n);
    }
    for (; r < nr; ++r) {
      const float* q0 = qf + r * dim;
      vfloat a0 = {};
      for (int64_t d = 0; d < dim; ++d) a0 += q0[d] * load_vec(kt + d * kKeyBlock);
      store_scores(scores + r * n_keys + l0, a0, n);
    }
  }
  // Softmax of each row over the keys its query sees; later keys get probability 0.
  for (int64_t r = 0; r < nr; ++r) {
    float* sr = scores + r * n_keys;
    const int64_t visible = causal ? prefix + i0 + r / group + 1 : n_keys;
    const float l = softmax_in_place(sr, visible);
    std::fill(sr + visible, sr + n_keys, 0.f);
    if (lse != nullptr) lse[(i0 + r / group) * lse_stride + hk * group + r % group] = l;
  }
  // out_r = sum_l p_rl v_l, over blocks of keys converted to float once per block.
  std::fill(acc, acc + nr * dim, 0.f);
  for (int64_t l0 = 0; l0 < n_keys; l0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, n_keys - l0);
    for (int64_t j = 0; j < n; ++j) {
      load_row(v_pool + (slots[l0 + j] * kv_heads + hk) * dim, vb + j * dim, dim);
    }
    for (int64_t r = 0; r < nr; ++r) {
      const float* pr = scores + r * n_keys + l0;
      float* ar = acc + r * dim;
      for (int64_t c = 0; c < dim; c += 4 * kKeyBlock) {  // 64 output floats in registers
        vfloat a0 = load_vec(ar + c), a1 = load_vec(ar + c + 16), a2 = load_vec(ar + c + 32),
               a3 = load_vec(ar + c + 48);
        for (int64_t j = 0; j < n; ++j) {
          const float p = pr[j];
          const float* vj = vb + j * dim + c;
          a0 += p * load_vec(vj);
          a1 += p * load_vec(vj + 16);
          a2 += p * load_vec(vj + 32);
          a3 += p * load_vec(vj + 48);
        }
        store_vec(ar + c, a0);
        store_vec(ar + c + 16, a1);
        store_vec(ar + c + 32, a2);
        store_vec(ar + c + 48, a3);
      }
    }
  }
  for (int64_t j = 0; j < nq; ++j) {
    std::memcpy(out + (i0 + j) * out_stride + hk * group * dim, acc + j * group * dim,
                sizeof(float) * group * dim);
  }
}

using radixserve_tasks::for_each_task;  // tasks.h

// One thread's scratch for extend_block of TQ queries over pools of T: rows_max query rows, up to max_keys
// keys; empty where extend_block_bf16 runs instead (it keeps its own). extend_block_avx2 uses kt
// for four key rows, vb for kValueBlock value rows and row for each row's maximum and sum.
struct Scratch {
  std::vector<float> qf, scores, kt, vb, row, acc;
  template <typename TQ, typename T>
  static Scratch For(int64_t rows_max, int64_t max_keys, int64_t dim) {
    return bf16_extend<TQ, T>(dim) ? Scratch(0, 0, 0) : Scratch(rows_max, max_keys, dim);
  }
  Scratch(int64_t rows_max, int64_t max_keys, int64_t dim)
      : qf(rows_max * dim), scores(rows_max * max_keys), kt(dim * kKeyBlock),
        vb(std::max(kKeyBlock, kValueBlock) * dim), row(std::max(dim, 2 * rows_max)),
        acc(rows_max * dim) {}
};

// Request b's new tokens see keys key_starts[b] .. their own position (from 0 when key_starts
// is null); lse ([T, H], nullable) receives each query head's log-sum-exp.
template <typename TQ, typename T>
void run_extend(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                const torch::Tensor& table, const torch::Tensor& rows, const int64_t* key_starts,
                const torch::Tensor& prefix_lens, const torch::Tensor& extend_lens,
                double scale, torch::Tensor& out, float* lse) {
  const int64_t heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_pool.size(1), group = heads / kv_heads;
  const int64_t batch = rows.size(0), table_stride = table.stride(0);
  const TQ* qp = q.data_ptr<TQ>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = prefix_lens.data_ptr<int64_t>();
  const int64_t* ep = extend_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  // Tasks (request, kv head, query block), those seeing the most keys first.
  struct Task { int64_t b, hk, i0, first_token, keys; };
  std::vector<Task> tasks;
  int64_t first = 0, max_keys = 1;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t start = key_starts != nullptr ? key_starts[b] : 0;
    for (int64_t i0 = 0; i0 < ep[b]; i0 += kQueryBlock) {
      const int64_t keys = pp[b] - start + std::min(i0 + kQueryBlock, ep[b]);
      for (int64_t hk = 0; hk < kv_heads; ++hk) tasks.push_back({b, hk, i0, first, keys});
    }
    max_keys = std::max(max_keys, pp[b] + ep[b]);
    first += ep[b];
  }
  TORCH_CHECK(first == q.size(0), "extend lengths must add up to the query tokens");
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.keys > b.keys; });
  const int64_t rows_max = kQueryBlock * group;
  for_each_task(
      static_cast<int64_t>(tasks.size()),
      [&] { return Scratch::For<TQ, T>(rows_max, max_keys, dim); },
      [&](int64_t t, Scratch& w) {
        const Task& task = tasks[t];
        const int64_t nq = std::min(kQueryBlock, ep[task.b] - task.i0);
        const int64_t first = key_starts != nullptr ? key_starts[task.b] : 0;
        extend_block<TQ, T>(qp + task.first_token * heads * dim, heads * dim, kp, vp,
                        tp + rp[task.b] * table_stride + first, pp[task.b] - first, true, task.i0,
                        nq, task.hk, kv_heads, group, dim, static_cast<float>(scale), w.qf.data(),
                        w.scores.data(), w.kt.data(), w.vb.data(), w.row.data(), w.acc.data(),
                        op + task.first_token * heads * dim, heads * dim,
                        lse != nullptr ? lse + task.first_token * heads : nullptr, heads);
      });
}

// Group g's query tokens tok_offsets[g] .. tok_offsets[g + 1] - 1 of q (all heads) attend keys
// 0 .. prefix_lens[g] - 1 of table row group_rows[g]; each span is read once per (kv head, block
// of 16 tokens), whichever rows the tokens belong to.
template <typename TQ, typename T>
void run_shared(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                const torch::Tensor& table, const torch::Tensor& group_rows,
                const torch::Tensor& tok_offsets, const torch::Tensor& prefix_lens, double scale,
                torch::Tensor& out, torch::Tensor& lse) {
  const int64_t heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_pool.size(1), group = heads / kv_heads;
  const int64_t groups = group_rows.size(0), table_stride = table.stride(0);
  const TQ* qp = q.data_ptr<TQ>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* rp = group_rows.data_ptr<int64_t>();
  const int64_t* op_ = tok_offsets.data_ptr<int64_t>();
  const int64_t* pp = prefix_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  struct Task { int64_t g, hk, i0; };
  std::vector<Task> tasks;
  int64_t max_keys = 1;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i0 = 0; i0 < op_[g + 1] - op_[g]; i0 += kQueryBlock) {
      for (int64_t hk = 0; hk < kv_heads; ++hk) tasks.push_back({g, hk, i0});
    }
    max_keys = std::max(max_keys, pp[g]);
  }
  TORCH_CHECK(op_[groups] == q.size(0), "group offsets must end at the query tokens");
  for (int64_t g = 0; g < groups; ++g) TORCH_CHECK(pp[g] >= 1, "shared spans must be 1 or longer");
  std::stable_sort(tasks.begin(), tasks.end(),
                   [&](const Task& a, const Task& b) { return pp[a.g] > pp[b.g]; });
  const int64_t rows_max = kQueryBlock * group;
  for_each_task(
      static_cast<int64_t>(tasks.size()),
      [&] { return Scratch::For<TQ, T>(rows_max, max_keys, dim); },
      [&](int64_t t, Scratch& w) {
        const Task& task = tasks[t];
        const int64_t first = op_[task.g];
        const int64_t nq = std::min(kQueryBlock, op_[task.g + 1] - first - task.i0);
        extend_block<TQ, T>(qp + first * heads * dim, heads * dim, kp, vp,
                        tp + rp[task.g] * table_stride, pp[task.g], false, task.i0, nq, task.hk,
                        kv_heads, group, dim, static_cast<float>(scale), w.qf.data(),
                        w.scores.data(), w.kt.data(), w.vb.data(), w.row.data(), w.acc.data(),
                        op + first * heads * dim, heads * dim, lp + first * heads, heads);
      });
}

// Decode rows in groups that share the first spans[g] slots of their table rows: the rows
// order[offsets[g] .. offsets[g + 1]) (indices into the batch) form group g. On AVX2 CPUs without
// AVX-512 (head dim 64) each group's span is read once per kv head for up to kGroupMembers of its
// rows (attend_group_f32); the rows in no group, and every row elsewhere, attend as in run. Every
// output is the same as run's.
template <typename TQ, typename T>
void run_grouped(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                 const torch::Tensor& table, const torch::Tensor& rows,
                 const torch::Tensor& seq_lens, const torch::Tensor& order,
                 const torch::Tensor& offsets, const torch::Tensor& spans, double scale,
                 torch::Tensor& out) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(__AVX512F__)
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  if (dim != kDim) {
    run<TQ, T>(q, k_pool, v_pool, table, rows, nullptr, seq_lens, scale, out, nullptr);
    return;
  }
  const int64_t kv_heads = k_pool.size(1), group = heads / kv_heads;
  const int64_t table_stride = table.stride(0), groups = spans.size(0);
  const TQ* qp = q.data_ptr<TQ>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  const int64_t* order_p = order.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* sp = spans.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  // Tasks: (members [m0, m1) of order, kv head) for the groups, (row, kv heads [m0, m1), -1) for
  // the others. A group is cut into tasks of `per_task` members: kGroupMembers, or fewer where the
  // tasks would otherwise be fewer than the threads (down to one member), and then the other rows
  // by kv head, as run splits them.
  struct Task { int64_t g, m0, m1, hk; };
  std::vector<Task> tasks;
  std::vector<char> grouped(batch, 0);
  int64_t max_len = 1;
  for (int64_t b = 0; b < batch; ++b) max_len = std::max(max_len, lp[b]);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t m = off[g]; m < off[g + 1]; ++m) grouped[order_p[m]] = 1;
  }
  const int64_t singles = batch - order.size(0), threads = at::get_num_threads();
  int64_t per_task = kGroupMembers;
  auto count = [&](int64_t per) {
    int64_t n = singles;
    for (int64_t g = 0; g < groups; ++g) n += (off[g + 1] - off[g] + per - 1) / per * kv_heads;
    return n;
  };
  while (per_task > 1 && count(per_task) < threads) per_task = (per_task + 1) / 2;
  const int64_t row_heads = count(per_task) < threads ? 1 : kv_heads;  // a lone row's per task
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t m0 = off[g]; m0 < off[g + 1]; m0 += per_task) {
      const int64_t m1 = std::min(m0 + per_task, off[g + 1]);
      for (int64_t hk = 0; hk < kv_heads; ++hk) tasks.push_back({g, m0, m1, hk});
    }
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h0 = 0; h0 < kv_heads && !grouped[b]; h0 += row_heads) {
      tasks.push_back({b, h0, h0 + row_heads, -1});
    }
  }
  const float fscale = static_cast<float>(scale);
  for_each_task(
      static_cast<int64_t>(tasks.size()),
      [&] {  // queries: a task's members' or a lone row's; scores: its members' or one head's
        return std::array<std::vector<float>, 2>{
            std::vector<float>(std::max(per_task, kv_heads) * group * dim),
            std::vector<float>(per_task * group * max_len)};
      },
      [&](int64_t t, std::array<std::vector<float>, 2>& w) {
        const Task& task = tasks[t];
        if (task.hk < 0) {  // a row in no group, kv heads [m0, m1), as run does
          const int64_t b = task.g;
          attend<TQ, T>(qp + b * heads * dim, kp, vp, tp + rp[b] * table_stride, lp[b], task.m0,
                        task.m1, kv_heads, group, dim, fscale, w[0].data(), nullptr,
                        w[1].data(), op + (b * heads + task.m0 * group) * dim, nullptr);
          return;
        }
        const TQ* qs[kGroupMembers];
        const int64_t* slots[kGroupMembers];
        int64_t lens[kGroupMembers];
        float* outs[kGroupMembers];
        const int64_t members = task.m1 - task.m0, first = task.hk * group;
        for (int64_t m = 0; m < members; ++m) {
          const int64_t b = order_p[task.m0 + m];
          qs[m] = qp + (b * heads + first) * dim;
          slots[m] = tp + rp[b] * table_stride;
          lens[m] = lp[b];
          outs[m] = op + (b * heads + first) * dim;
        }
        attend_group_f32<TQ, T>(qs, slots, lens, members, sp[task.g], kp, vp, kv_heads, task.hk,
                                group, fscale, w[0].data(), w[1].data(), outs);
      });
#else
  run<TQ, T>(q, k_pool, v_pool, table, rows, nullptr, seq_lens, scale, out, nullptr);
#endif
}

// Calls fn(TQ(), T()) for queries q and pools `pool` of the supported dtypes: both float32, both
// bfloat16, float32 queries over bfloat16 pools (a float32 model's --kv-cache-dtype bfloat16), or
// float32 or bfloat16 queries over float8 e5m2 pools (--kv-cache-dtype fp8_e5m2); each narrower
// key and value is widened to float32 as it is read, or converted to bfloat16 for the pair dot
// products of bfloat16 queries, both exact.
template <typename Fn>
void dispatch_dtypes(const torch::Tensor& q, const torch::Tensor& pool, const Fn& fn) {
  const auto qt = q.scalar_type(), kt = pool.scalar_type();
  if (qt == torch::kBFloat16 && kt == torch::kBFloat16) {
    fn(at::BFloat16(), at::BFloat16());
  } else if (qt == torch::kFloat32 && kt == torch::kBFloat16) {
    fn(float(), at::BFloat16());
  } else if (qt == torch::kBFloat16 && kt == torch::kFloat8_e5m2) {
    fn(at::BFloat16(), at::Float8_e5m2());
  } else if (qt == torch::kFloat32 && kt == torch::kFloat8_e5m2) {
    fn(float(), at::Float8_e5m2());
  } else {
    TORCH_CHECK(qt == torch::kFloat32 && kt == torch::kFloat32,
                "queries and pools must be float32 or bfloat16, or the pools float8_e5m2; the queries "
                "not narrower");
    fn(float(), float());
  }
}

}  // namespace

// out (float32) as q's dtype: itself for float32 queries, rounded to nearest even for bfloat16.
static torch::Tensor in_query_dtype(const torch::Tensor& q, const torch::Tensor& out) {
  if (q.scalar_type() != torch::kBFloat16) return out;
  auto rounded = torch::empty(q.sizes(), q.options().dtype(torch::kBFloat16));
  const float* src = out.data_ptr<float>();
  at::BFloat16* dst = rounded.data_ptr<at::BFloat16>();
  const int64_t n = out.numel();
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 16 <= n; i += 16) {  // vcvtneps2bf16 rounds to nearest even, as the scalar cast
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<at::BFloat16>(src[i]);
  return rounded;
}

// q: [B, H, D]; k_pool, v_pool: [num_slots, Hkv, D] (see dispatch_dtypes);
// table: [rows, context] int64; rows, seq_lens: [B] int64 (keys are positions 0 .. seq_len-1).
// Returns [B, H, D] in q's dtype: the float32 sums rounded to nearest even for bfloat16 q, as
// Tensor.to rounds them (but for denormal values, below 1.2e-38, which vcvtneps2bf16 takes as
// zero).
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor table, torch::Tensor rows,
                                     torch::Tensor seq_lens, double scale) {
  auto out = torch::empty(q.sizes(), q.options().dtype(torch::kFloat32));
  dispatch_dtypes(q, k_pool, [&](auto tq, auto tk) {
    run<decltype(tq), decltype(tk)>(q, k_pool, v_pool, table, rows, nullptr, seq_lens, scale, out,
                                    nullptr);
  });
  return in_query_dtype(q, out);
}

// As paged_decode_attention, with the rows order[offsets[g] .. offsets[g + 1]) (indices into the
// batch; order: [N], offsets: [G + 1], spans: [G], int64) in groups whose table rows start with
// the same spans[g] slots (1 <= spans[g] <= the members' seq_lens; the slots themselves are the
// caller's to check, kernels/cpu/cascade.py), each span read once for the members of its group
// where the CPU's kernel does so (run_grouped). The outputs are the same as
// paged_decode_attention's.
torch::Tensor grouped_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                       torch::Tensor table, torch::Tensor rows,
                                       torch::Tensor seq_lens, torch::Tensor order,
                                       torch::Tensor offsets, torch::Tensor spans, double scale) {
  for (const torch::Tensor* t : {&order, &offsets, &spans, &seq_lens}) {
    TORCH_CHECK(t->scalar_type() == torch::kLong && t->dim() == 1 && t->is_contiguous(),
                "order, offsets, spans and seq_lens must be contiguous 1-D int64 tensors");
  }
  const int64_t batch = q.size(0), groups = spans.size(0);
  TORCH_CHECK(seq_lens.size(0) == batch, "seq_lens needs one entry per query");
  TORCH_CHECK(offsets.size(0) == groups + 1, "offsets needs one entry more than spans");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* order_p = order.data_ptr<int64_t>();
  const int64_t* sp = spans.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[groups] == order.size(0), "offsets must run 0 .. len(order)");
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(off[g] < off[g + 1] && off[g + 1] <= order.size(0),
                "offsets must rise from 0 to len(order), a member or more per group");
    TORCH_CHECK(sp[g] >= 1, "shared spans must be 1 or longer");
  }
  std::vector<char> seen(batch, 0);
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t m = off[g]; m < off[g + 1]; ++m) {
      const int64_t b = order_p[m];
      TORCH_CHECK(b >= 0 && b < batch && !seen[b], "order must name distinct rows of the batch");
      TORCH_CHECK(sp[g] <= lp[b], "a span is longer than a member's keys");
      seen[b] = 1;
    }
  }
  auto out = torch::empty(q.sizes(), q.options().dtype(torch::kFloat32));
  dispatch_dtypes(q, k_pool, [&](auto tq, auto tk) {
    run_grouped<decltype(tq), decltype(tk)>(q, k_pool, v_pool, table, rows, seq_lens, order,
                                            offsets, spans, scale, out);
  });
  return in_query_dtype(q, out);
}

// As paged_decode_attention over keys key_starts[b] .. seq_lens[b] - 1 only (key_starts: [B]
// int64, each < seq_len). Returns out [B, H, D] and lse [B, H], both float32.
std::vector<torch::Tensor> paged_decode_attention_lse(torch::Tensor q, torch::Tensor k_pool,
                                                      torch::Tensor v_pool, torch::Tensor table,
                                                      torch::Tensor rows, torch::Tensor key_starts,
                                                      torch::Tensor seq_lens, double scale) {
  auto out = torch::empty(q.sizes(), q.options().dtype(torch::kFloat32));
  auto lse = torch::empty({q.size(0), q.size(1)}, q.options().dtype(torch::kFloat32));
  const int64_t* ks = key_starts.data_ptr<int64_t>();
  dispatch_dtypes(q, k_pool, [&](auto tq, auto tk) {
    run<decltype(tq), decltype(tk)>(q, k_pool, v_pool, table, rows, ks, seq_lens, scale, out,
                                    lse.data_ptr<float>());
  });
  return {out, lse};
}

// q: [T, H, D], the new tokens of every request back to back; k_pool, v_pool: [num_slots, Hkv, D]
// (as for paged_decode_attention, already holding the new tokens' K/V); table: [rows, context]
// int64; rows, prefix_lens, extend_lens: [B] int64. Returns [T, H, D] float32.
torch::Tensor extend_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                               torch::Tensor table, torch::Tensor rows, torch::Tensor prefix_lens,
                               torch::Tensor extend_lens, double scale) {
  auto out = torch::empty(q.sizes(), q.options().dtype(torch::kFloat32));
  dispatch_dtypes(q, k_pool, [&](auto tq, auto tk) {
    run_extend<decltype(tq), decltype(tk)>(q, k_pool, v_pool, table, rows, nullptr, prefix_lens,
                                           extend_lens, scale, out, nullptr);
  });
  return out;
}

// As extend_attention with request b's keys starting at key_starts[b] (<= prefix_lens[b]).
// Returns out [T, H, D] and lse [T, H], both float32.
std::vector<torch::Tensor> extend_attention_lse(torch::Tensor q, torch::Tensor k_pool,
                                                torch::Tensor v_pool, torch::Tensor table,
                                                torch::Tensor rows, torch::Tensor key_starts,
                                                torch::Tensor prefix_lens,
                                                torch::Tensor extend_lens, double scale) {
  auto out = torch::empty(q.sizes(), q.options().dtype(torch::kFloat32));
  auto lse = torch::empty({q.size(0), q.size(1)}, q.options().dtype(torch::kFloat32));
  const int64_t* ks = key_starts.data_ptr<int64_t>();
  dispatch_dtypes(q, k_pool, [&](auto tq, auto tk) {
    run_extend<decltype(tq), decltype(tk)>(q, k_pool, v_pool, table, rows, ks, prefix_lens,
                                           extend_lens, scale, out, lse.data_ptr<float>());
  });
  return {out, lse};
}

// q: [N, H, D], the query tokens of every group back to back (group g: tok_offsets[g] ..
// tok_offsets[g + 1] - 1; tok_offsets: [G + 1] int64); group g sees keys 0 .. prefix_lens[g] - 1
// (>= 1) of table row group_rows[g] ([G] int64). Returns out [N, H, D] and lse [N, H], float32.
std::vector<torch::Tensor> shared_prefix_attention(torch::Tensor q, torch::Tensor k_pool,
                                                   torch::Tensor v_pool, torch::Tensor table,
                                                   torch::Tensor group_rows,
                                                   torch::Tensor tok_offsets,
                                                   torch::Tensor prefix_lens, double scale) {
  auto out = torch::empty(q.sizes(), q.options().dtype(torch::kFloat32));
  auto lse = torch::empty({q.size(0), q.size(1)}, q.options().dtype(torch::kFloat32));
  dispatch_dtypes(q, k_pool, [&](auto tq, auto tk) {
    run_shared<decltype(tq), decltype(tk)>(q, k_pool, v_pool, table, group_rows, tok_offsets,
                                           prefix_lens, scale, out, lse);
  });
  return {out, lse};
}

// out [T, H, D], lse [T, H] (float32, one attention over some keys) ← merged in place with
// part_out [N, H, D], part_lse [N, H] (the same queries over other keys) at tokens idx [N] int64.
void merge_attention_states_(torch::Tensor out, torch::Tensor lse, torch::Tensor part_out,
                             torch::Tensor part_lse, torch::Tensor idx) {
  const int64_t n = idx.size(0), heads = out.size(1), dim = out.size(2);
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float* po = part_out.data_ptr<float>();
  const float* pl = part_lse.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t h = 0; h < heads; ++h) {
        float* o = op + (ip[i] * heads + h) * dim;
        const float* p = po + (i * heads + h) * dim;
        const float a = lp[ip[i] * heads + h], b = pl[i * heads + h];
        const float m = std::max(a, b);
        const float wa = std::exp(a - m), wb = std::exp(b - m), inv = 1.f / (wa + wb);
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d] = (wa * o[d] + wb * p[d]) * inv;
        lp[ip[i] * heads + h] = m + std::log(wa + wb);
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("extend_attention", &extend_attention,
        "causal attention of new tokens over their cached prefix in the paged KV pool (CPU)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over the paged KV pool (CPU)");
  m.def("grouped_decode_attention", &grouped_decode_attention,
        "decode attention over the paged KV pool, rows in groups sharing a prefix (CPU)");
  m.def("paged_decode_attention_lse", &paged_decode_attention_lse,
        "decode attention over each request's keys from a start position, with log-sum-exp");
  m.def("extend_attention_lse", &extend_attention_lse,
        "extend attention over each request's keys from a start position, with log-sum-exp");
  m.def("shared_prefix_attention", &shared_prefix_attention,
        "attention of groups of query tokens to one shared KV span per group, with log-sum-exp");
  m.def("merge_attention_states_", &merge_attention_states_,
        "merges two partial attentions of the same queries by log-sum-exp (in place)");
}
