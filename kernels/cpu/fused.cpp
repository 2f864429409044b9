// Fused element-wise steps of a Llama layer for the CPU: each replaces 8-20 small PyTorch ops (and
// their dispatch, which at decode batch sizes costs more than the arithmetic) with one pass.
//
// The results match the unfused PyTorch code of services/executor/layers.py bit for bit in
// bfloat16, except where a float32 reduction (the RMSNorm mean) adds in another order: every
// intermediate is rounded to the activation dtype where PyTorch's op sequence rounds it.
//   add_rmsnorm:  s = x + r (rounded); y = w * round(s * rsqrt(mean(s^2) + eps))
//   silu_and_mul: y = round(silu(g)) * u, with g | u the two halves of each row
//   rope:         q, k = rotate-half RoPE in the activation dtype with cos/sin rounded to it (HF)
//   rope_store:   q as rope, k (rotated) and v written straight into their KV pool rows
//   argmax:       torch.argmax(x, -1) of float32 rows (greedy sampling): the first index of the
//                 row's largest value, or of its first NaN
// On CPUs with AVX-512 BF16 the bfloat16 rows of add_rmsnorm and silu_and_mul run 16 values a
// vector: a scalar bfloat16 conversion costs more than the arithmetic around it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "exp16.h"

namespace {

// silu(g) for g below this is zero: e^-g overflows float32 there (e^88.72 = 3.39e38 does not).
constexpr float kSiluZeroBelow = -88.72f;

// Rounds a float to the storage type and back, as a PyTorch op producing that dtype does.
template <typename T> inline float rnd(float v) { return static_cast<float>(static_cast<T>(v)); }

#if defined(__AVX512BF16__)
// bfloat16 rows in AVX-512, 16 values a vector, the last vector of a row masked: widening is
// exact, and vcvtneps2bf16 rounds to nearest even as the scalar cast does, except that it takes
// denormal inputs (below 1.2e-38) as zero, which the scalar cast keeps.
using bf16 = at::BFloat16;

inline __mmask16 tail_mask(int64_t d, int64_t n) {
  return n - d >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - d)) - 1);
}
inline __m512 load_bf16(const bf16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m256i to_bf16(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }
inline __m512 round_bf16(__m512 v) {  // rnd<bf16> of 16 values
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}
inline void store_bf16(bf16* p, __mmask16 m, __m512 v) { _mm256_mask_storeu_epi16(p, m, to_bf16(v)); }

// add_rmsnorm_rows's row for bfloat16: the same roundings, the sum of squares in 16 lanes.
void add_rmsnorm_row_bf16(const bf16* x, const bf16* r, const bf16* w, bf16* out, bf16* sum_out,
                          float* s, int64_t dim, float eps) {
  __m512 squares = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 m = tail_mask(d, dim);
    __m512 v = load_bf16(x + d, m);
    if (r != nullptr) {
      v = round_bf16(_mm512_add_ps(v, load_bf16(r + d, m)));
      store_bf16(sum_out + d, m, v);
    }
    _mm512_mask_storeu_ps(s + d, m, v);
    squares = _mm512_fmadd_ps(v, v, squares);  // masked lanes are zero
  }
  const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(dim) + eps);
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t d = 0; d < dim; d += 16) {
    const __mmask16 m = tail_mask(d, dim);
    const __m512 y = round_bf16(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + d), scale));
    store_bf16(out + d, m, _mm512_mul_ps(load_bf16(w + d, m), y));
  }
}

// silu_and_mul_rows's row for bfloat16, 16 values a vector, all in registers: silu(g) = g / (1 +
// e^-g) in float32, with exp16 and the reciprocal as a 14-bit estimate refined by one Newton
// step, then the roundings. A gate below -88.72 (where e^-g overflows float32) gives zero, as
// PyTorch's silu gives -0; a NaN gate gives NaN. The result differs from PyTorch's by one
// bfloat16 step in about 0.05% of the outputs (|g| up to 10).
void silu_and_mul_row_bf16(const bf16* g, const bf16* u, bf16* o, int64_t inter) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t d = 0; d < inter; d += 16) {
    const __mmask16 m = tail_mask(d, inter);
    const __m512 x = load_bf16(g + d, m);
    const __m512 e = radixserve_simd::exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m512 y = _mm512_add_ps(one, e);
    // 1 / y: the 14-bit estimate and one Newton step; 0 unless x > -88.72 (NaN and -inf
    // included), where e^-x may be infinite (or, far out, no longer exp16's) and x / y is zero.
    __m512 r = _mm512_rcp14_ps(y);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(y, r, _mm512_set1_ps(2.f)));
    r = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(kSiluZeroBelow), _CMP_GT_OQ), r);
    const __m512 silu = round_bf16(_mm512_mul_ps(x, r));
    store_bf16(o + d, m, _mm512_mul_ps(silu, load_bf16(u + d, m)));
  }
}
#endif

template <typename T>
void add_rmsnorm_rows(const T* x, const T* r, const T* w, T* out, T* sum_out, int64_t rows,
                      int64_t dim, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> s(dim);
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      for (int64_t i = begin; i < end; ++i) {
        add_rmsnorm_row_bf16(x + i * dim, r == nullptr ? nullptr : r + i * dim, w, out + i * dim,
                             sum_out == nullptr ? nullptr : sum_out + i * dim, s.data(), dim,
                             eps);
      }
      return;
    }
#endif
    for (int64_t i = begin; i < end; ++i) {
      const T* xi = x + i * dim;
      float ss = 0.f;
      if (r != nullptr) {
        const T* ri = r + i * dim;
        T* si = sum_out + i * dim;
        for (int64_t d = 0; d < dim; ++d) {
          const T v = static_cast<T>(static_cast<float>(xi[d]) + static_cast<float>(ri[d]));
          si[d] = v;
          s[d] = static_cast<float>(v);
        }
      } else {
        for (int64_t d = 0; d < dim; ++d) s[d] = static_cast<float>(xi[d]);
      }
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < dim; ++d) ss += s[d] * s[d];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
      T* oi = out + i * dim;
      for (int64_t d = 0; d < dim; ++d) {
        oi[d] = static_cast<T>(static_cast<float>(w[d]) * rnd<T>(s[d] * inv));
      }
    }
  });
}

template <typename T>
void silu_and_mul_rows(const T* x, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      for (int64_t i = begin; i < end; ++i) {
        silu_and_mul_row_bf16(x + i * 2 * inter, x + i * 2 * inter + inter, out + i * inter,
                              inter);
      }
      return;
    }
#endif
    for (int64_t i = begin; i < end; ++i) {
      const T* g = x + i * 2 * inter;
      const T* u = g + inter;
      T* o = out + i * inter;
      for (int64_t d = 0; d < inter; ++d) {
        const float gv = static_cast<float>(g[d]);
        // e^-g overflows below g = -88.72, where PyTorch's silu gives -0; under -ffast-math
        // g / inf is NaN, so those gates give zero (and e^-g stops short of the overflow).
        const float e = std::exp(std::min(-gv, -kSiluZeroBelow));
        const float silu = gv < kSiluZeroBelow ? 0.f : rnd<T>(gv / (1.f + e));
        o[d] = static_cast<T>(silu * static_cast<float>(u[d]));
      }
    }
  });
}

// Rotates `heads` heads of one token: src (row stride `dim`) → dst, rotate-half layout.
template <typename T>
inline void rotate(const T* src, T* dst, int64_t heads, int64_t dim, const float* c,
                   const float* s) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const T* x = src + h * dim;
    T* y = dst + h * dim;
    for (int64_t d = 0; d < half; ++d) {
      const float x1 = static_cast<float>(x[d]), x2 = static_cast<float>(x[d + half]);
      const float cd = c[d], sd = s[d];
      y[d] = static_cast<T>(rnd<T>(x1 * cd) - rnd<T>(x2 * sd));
      y[d + half] = static_cast<T>(rnd<T>(x2 * cd) + rnd<T>(x1 * sd));
    }
  }
}

// Rotates token t's q heads into q_out row t and its k heads into k_row(t); with v_row, also
// copies its v heads (after the k heads in qkv) to v_row(t).
template <typename T, typename KRow, typename VRow>
void rope_rows(const T* qkv, int64_t qkv_stride, const int64_t* pos, const float* cos,
               const float* sin, T* q_out, const KRow& k_row, const VRow& v_row, int64_t tokens,
               int64_t heads, int64_t kv_heads, int64_t dim) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> c(half), s(half);
    for (int64_t t = begin; t < end; ++t) {
      const float* ct = cos + pos[t] * half;
      const float* st = sin + pos[t] * half;
      for (int64_t d = 0; d < half; ++d) {  // HF casts cos/sin to the activation dtype first
        c[d] = rnd<T>(ct[d]);
        s[d] = rnd<T>(st[d]);
      }
      const T* row = qkv + t * qkv_stride;
      rotate<T>(row, q_out + t * heads * dim, heads, dim, c.data(), s.data());
      rotate<T>(row + heads * dim, k_row(t), kv_heads, dim, c.data(), s.data());
      if constexpr (!std::is_same_v<VRow, std::nullptr_t>) {
        std::memcpy(v_row(t), row + (heads + kv_heads) * dim, sizeof(T) * kv_heads * dim);
      }
    }
  });
}

// The index of the first largest value of x[0 .. n), or of the first NaN: torch.argmax's result.
// torch runs a scalar loop (about 20 us a row of SmolLM2's 49,152 logits on a 2-core AMD EPYC);
// with AVX-512 each of 16 lanes (AVX2: 8) keeps its largest value and the first index holding it
// (a later equal value does not replace it), and the lanes are merged at the end: the largest
// value, the smallest index among the lanes holding it. NaN never compares greater, so a row
// with one is scanned again for it. NaN is recognised by its bits (exponent all ones, mantissa
// not zero): the build's -ffast-math lets the compiler assume float comparisons never see one.
// Rows of 49,152 logits on a 2-core AVX2 host: 24 against torch's 133 us for one row, 194
// against 2,018 us for 32.
inline bool is_nan_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits & 0x7FFFFFFFu) > 0x7F800000u;
}

int64_t argmax_row(const float* x, int64_t n) {
  int64_t start = 1, best_index = 0;
  float best = x[0];
  bool nan = is_nan_bits(x[0]);
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 lane_best = _mm512_loadu_ps(x);
    __m512i lane_index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512i index = lane_index;
    const __m512i step = _mm512_set1_epi32(16);
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512i infinity = _mm512_set1_epi32(0x7F800000);
    const auto nans = [&](__m512 v) {
      return _mm512_cmpgt_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), magnitude), infinity);
    };
    __mmask16 unordered = nans(lane_best);
    for (start = 16; start + 16 <= n; start += 16) {
      const __m512 v = _mm512_loadu_ps(x + start);
      index = _mm512_add_epi32(index, step);
      const __mmask16 greater = _mm512_cmp_ps_mask(v, lane_best, _CMP_GT_OQ);
      lane_best = _mm512_mask_mov_ps(lane_best, greater, v);
      lane_index = _mm512_mask_mov_epi32(lane_index, greater, index);
      unordered |= nans(v);
    }
    nan = unordered != 0;
    best = _mm512_reduce_max_ps(lane_best);
    const __mmask16 holders = _mm512_cmp_ps_mask(lane_best, _mm512_set1_ps(best), _CMP_EQ_OQ);
    best_index = _mm512_mask_reduce_min_epi32(holders, lane_index);
  }
#elif defined(__AVX2__)
  if (n >= 8) {  // as above, in 8 lanes, merged by a scalar loop
    __m256 lane_best = _mm256_loadu_ps(x);
    __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i index = lane_index;
    const __m256i step = _mm256_set1_epi32(8);
    const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
    const __m256i infinity = _mm256_set1_epi32(0x7F800000);
    const auto nans = [&](__m256 v) {
      return _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_castps_si256(v), magnitude), infinity);
    };
    __m256i unordered = nans(lane_best);
    for (start = 8; start + 8 <= n; start += 8) {
      const __m256 v = _mm256_loadu_ps(x + start);
      index = _mm256_add_epi32(index, step);
      const __m256 greater = _mm256_cmp_ps(v, lane_best, _CMP_GT_OQ);
      lane_best = _mm256_blendv_ps(lane_best, v, greater);
      lane_index = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(lane_index),
                                                        _mm256_castsi256_ps(index), greater));
      unordered = _mm256_or_si256(unordered, nans(v));
    }
    nan = !_mm256_testz_si256(unordered, unordered);
    alignas(32) float bests[8];
    alignas(32) int32_t indices[8];
    _mm256_store_ps(bests, lane_best);
    _mm256_store_si256(reinterpret_cast<__m256i*>(indices), lane_index);
    best = bests[0];
    best_index = indices[0];
    for (int lane = 1; lane < 8; ++lane) {
      if (bests[lane] > best || (bests[lane] == best && indices[lane] < best_index)) {
        best = bests[lane];
        best_index = indices[lane];
      }
    }
  }
#endif
  for (int64_t i = start; i < n; ++i) {  // the tail, or the whole row without AVX2
    if (x[i] > best) {
      best = x[i];
      best_index = i;
    }
    nan = nan || is_nan_bits(x[i]);
  }
  if (nan) {
    for (int64_t i = 0; i < n; ++i)
      if (is_nan_bits(x[i])) return i;
  }
  return best_index;
}

void check_cpu_contiguous(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

// x, residual (optional): [T, dim]; weight: [dim]; all one dtype (float32 or bfloat16).
// Returns (out, x + residual) — the sum is empty when residual is not given.
std::vector<torch::Tensor> add_rmsnorm(torch::Tensor x, c10::optional<torch::Tensor> residual,
                                       torch::Tensor weight, double eps) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(weight, "weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "shapes");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype must match x");
  const bool has_res = residual.has_value();
  if (has_res) {
    check_cpu_contiguous(*residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual must match x");
  }
  auto out = torch::empty_like(x);
  auto sum = has_res ? torch::empty_like(x) : torch::empty({0}, x.options());
  const int64_t rows = x.size(0), dim = x.size(1);
  if (x.scalar_type() == torch::kBFloat16) {
    using T = at::BFloat16;
    add_rmsnorm_rows<T>(x.data_ptr<T>(), has_res ? residual->data_ptr<T>() : nullptr,
                        weight.data_ptr<T>(), out.data_ptr<T>(),
                        has_res ? sum.data_ptr<T>() : nullptr, rows, dim, eps);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "dtype must be float32 or bfloat16");
    add_rmsnorm_rows<float>(x.data_ptr<float>(), has_res ? residual->data_ptr<float>() : nullptr,
                            weight.data_ptr<float>(), out.data_ptr<float>(),
                            has_res ? sum.data_ptr<float>() : nullptr, rows, dim, eps);
  }
  return {out, sum};
}

// x: [T, 2 * inter] (gate | up) → [T, inter].
torch::Tensor silu_and_mul(torch::Tensor x) {
  check_cpu_contiguous(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "x must be [T, 2 * intermediate]");
  const int64_t rows = x.size(0), inter = x.size(1) / 2;
  auto out = torch::empty({rows, inter}, x.options());
  if (x.scalar_type() == torch::kBFloat16) {
    silu_and_mul_rows<at::BFloat16>(x.data_ptr<at::BFloat16>(), out.data_ptr<at::BFloat16>(),
                                    rows, inter);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "dtype must be float32 or bfloat16");
    silu_and_mul_rows<float>(x.data_ptr<float>(), out.data_ptr<float>(), rows, inter);
  }
  return out;
}

// The checks of rope's arguments (see rope); returns the positions.
const int64_t* check_rope_args(const torch::Tensor& qkv, const torch::Tensor& positions,
                               const torch::Tensor& cos, const torch::Tensor& sin, int64_t heads,
                               int64_t kv_heads, int64_t dim) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 2 && qkv.stride(1) == 1, "qkv rows");
  TORCH_CHECK(qkv.size(1) >= (heads + kv_heads) * dim && dim % 2 == 0, "qkv width / head_dim");
  check_cpu_contiguous(positions, "positions");
  check_cpu_contiguous(cos, "cos");
  check_cpu_contiguous(sin, "sin");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.size(0) == qkv.size(0),
              "positions must be int64 [T]");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.sizes() == cos.sizes() &&
                  cos.size(1) == dim / 2, "cos/sin must be float32 [max_positions, dim / 2]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t t = 0; t < qkv.size(0); ++t) {
    TORCH_CHECK(pos[t] >= 0 && pos[t] < cos.size(0), "position ", pos[t],
                " is outside the rotary table (", cos.size(0), " positions)");
  }
  return pos;
}

// Calls fn(T()) with T the element type of x: bfloat16 or float32 (else raises).
template <typename Fn>
void dispatch_float(const torch::Tensor& x, const Fn& fn) {
  if (x.scalar_type() == torch::kBFloat16) {
    fn(at::BFloat16());
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kFloat32, "dtype must be float32 or bfloat16");
    fn(float());
  }
}

// qkv: [T, >= (heads + kv_heads) * dim] rows (q heads then k heads first; any row stride);
// positions: [T] int64; cos, sin: [max_positions, dim / 2] float32. Returns (q [T, heads, dim],
// k [T, kv_heads, dim]) rotated, in qkv's dtype.
std::vector<torch::Tensor> rope(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos,
                                torch::Tensor sin, int64_t heads, int64_t kv_heads, int64_t dim) {
  const int64_t* pos = check_rope_args(qkv, positions, cos, sin, heads, kv_heads, dim);
  const int64_t tokens = qkv.size(0);
  auto q = torch::empty({tokens, heads, dim}, qkv.options());
  auto k = torch::empty({tokens, kv_heads, dim}, qkv.options());
  dispatch_float(qkv, [&](auto zero) {
    using T = decltype(zero);
    T* kp = k.data_ptr<T>();
    rope_rows<T>(qkv.data_ptr<T>(), qkv.stride(0), pos, cos.data_ptr<float>(),
                 sin.data_ptr<float>(), q.data_ptr<T>(),
                 [&](int64_t t) { return kp + t * kv_heads * dim; }, nullptr, tokens, heads,
                 kv_heads, dim);
  });
  return {q, k};
}

// As rope, with the rotated k heads and the v heads (those after the k heads in qkv, which must
// be (heads + 2 * kv_heads) * dim wide) of token t stored straight into row loc[t] of k_pool and
// v_pool ([slots, kv_heads, dim], contiguous, qkv's dtype) instead of returned; loc: [T] int64,
// distinct slots. Returns q [T, heads, dim]. What `rope` and an index_copy_ of k and v into the
// pools do, in one call.
torch::Tensor rope_store(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos,
                         torch::Tensor sin, int64_t heads, int64_t kv_heads, int64_t dim,
                         torch::Tensor k_pool, torch::Tensor v_pool, torch::Tensor loc) {
  const int64_t* pos = check_rope_args(qkv, positions, cos, sin, heads, kv_heads, dim);
  TORCH_CHECK(qkv.size(1) >= (heads + 2 * kv_heads) * dim, "qkv has no v heads after the k heads");
  check_cpu_contiguous(loc, "loc");
  TORCH_CHECK(loc.scalar_type() == torch::kInt64 && loc.dim() == 1 && loc.size(0) == qkv.size(0),
              "loc must be int64 [T]");
  for (const auto* pool : {&k_pool, &v_pool}) {
    check_cpu_contiguous(*pool, "pools");
    TORCH_CHECK(pool->scalar_type() == qkv.scalar_type(), "pools must have qkv's dtype");
    TORCH_CHECK(pool->dim() == 3 && pool->size(1) == kv_heads && pool->size(2) == dim &&
                    pool->size(0) == k_pool.size(0),
                "pools must be [slots, kv_heads, head_dim], both the same size");
  }
  const int64_t tokens = qkv.size(0), slots = k_pool.size(0);
  const int64_t* lp = loc.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(lp[t] >= 0 && lp[t] < slots, "slot ", lp[t], " is outside the pool (", slots,
                " slots)");
  }
  auto q = torch::empty({tokens, heads, dim}, qkv.options());
  dispatch_float(qkv, [&](auto zero) {
    using T = decltype(zero);
    T* kp = k_pool.data_ptr<T>();
    T* vp = v_pool.data_ptr<T>();
    const int64_t row = kv_heads * dim;
    rope_rows<T>(qkv.data_ptr<T>(), qkv.stride(0), pos, cos.data_ptr<float>(),
                 sin.data_ptr<float>(), q.data_ptr<T>(),
                 [&](int64_t t) { return kp + lp[t] * row; },
                 [&](int64_t t) { return vp + lp[t] * row; }, tokens, heads, kv_heads, dim);
  });
  return q;
}

// x: [S, V] float32 (V < 2^31) → [S] int64, torch.argmax(x, -1); rows spread over the threads.
torch::Tensor argmax(torch::Tensor x) {
  check_cpu_contiguous(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.size(1) > 0 &&
                  x.size(1) < (int64_t{1} << 31),
              "x must be float32 [S, V], 0 < V < 2^31");
  const int64_t rows = x.size(0), n = x.size(1);
  auto out = torch::empty({rows}, x.options().dtype(torch::kInt64));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) op[r] = argmax_row(xp + r * n, n);
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("argmax", &argmax, "torch.argmax(x, -1) of float32 rows");
#if defined(__AVX512F__) || defined(__AVX2__)
  m.attr("argmax_vectorized") = true;
#else
  m.attr("argmax_vectorized") = false;
#endif
  m.def("add_rmsnorm", &add_rmsnorm, "residual add + RMSNorm (HF Llama semantics)");
  m.def("silu_and_mul", &silu_and_mul, "SiLU(gate) * up");
  m.def("rope", &rope, "rotate-half RoPE of the q and k heads of a fused qkv projection");
  m.def("rope_store", &rope_store,
        "rope, with k rotated and v stored into the KV pools' rows loc instead of returned");
}
