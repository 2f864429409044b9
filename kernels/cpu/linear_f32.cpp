// Small-batch linear layers for float32 activations on AVX2 + FMA CPUs,
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), x and y float32, with W stored as
//   - float32, as it is;
//   - int8 with one scale per output channel: y = scale[n] * sum_k x q (q converted exactly);
//   - int4 in groups of g input features: W[n, k] = q[n, k] * scale[n, k / g] + zero[n, k / g],
//     q in [0, 15] packed two to a byte in blocks of 32 features: byte i of a block holds feature
//     i in its low nibble and feature i + 16 in its high one (GGUF's Q4 order). The weight is
//     expanded in float32 as one fused multiply-add, then multiplied like a float32 weight.
//
// At decode batch sizes a linear layer's time is reading its weights, and torch's own kernels do
// that slowly on CPUs without AVX-512 (its int8 and int4 kernels fall back to scalar code there).
// These kernels stream each block of 4 output channels, 32 features at a time, through 8-wide
// FMAs for 2 rows of x at a time. With more than kDirectRows rows a quantized block is first
// expanded into a float32 buffer (in L1), so its expansion is paid once, not once per pair of rows
// (measured here: expanding in registers is faster up to 8 rows). Sums are float32 in a fixed order
// (k ascending within each of 8 lanes, then the lanes as a tree), the same for every row whatever
// the batch size. K must be a multiple of 32 (of the group size for int4); the Python side
// (kernels/cpu/linear.py) checks and falls back to PyTorch otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

constexpr int kRowsPerTile = 2;    // rows of x computed together
constexpr int kChannels = 4;       // output channels per block
constexpr int64_t kGrain = 8;      // blocks per thread task at least
constexpr int64_t kDirectRows = 8; // up to this many rows, quantized weights expand in registers
constexpr int64_t kPrefetchChannels = 8;

inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// Each weight source gives the 32 weights of channel n at feature k (a multiple of 32) as four
// vectors of 8 float32.
struct F32Weights {
  const float* w;
  int64_t K;
  inline void load(int64_t n, int64_t k, __m256 out[4]) const {
    const float* p = w + n * K + k;
    for (int i = 0; i < 4; ++i) out[i] = _mm256_loadu_ps(p + 8 * i);
  }
  inline void prefetch(int64_t n, int64_t k) const {
    _mm_prefetch(reinterpret_cast<const char*>(w + n * K + k), _MM_HINT_T0);
  }
};

// int8 weights converted to float32 (exact), unscaled.
struct Int8Weights {
  const int8_t* q;
  int64_t K;
  inline void load(int64_t n, int64_t k, __m256 out[4]) const {
    const int8_t* p = q + n * K + k;
    for (int i = 0; i < 4; ++i)
      out[i] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i))));
  }
  inline void prefetch(int64_t n, int64_t k) const {
    _mm_prefetch(reinterpret_cast<const char*>(q + n * K + k), _MM_HINT_T0);
  }
};

// int4 weights expanded to q * scale + zero in float32 (one fused multiply-add each).
struct Int4Weights {
  const uint8_t* q;     // [N, K / 2]
  const float* scale;   // [N, K / g]
  const float* zero;    // [N, K / g]
  int64_t K, groups, group_shift;  // groups per channel, log2 of the group size
  inline void load(int64_t n, int64_t k, __m256 out[4]) const {
    const __m128i bytes =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + n * (K / 2) + k / 2));
    const __m128i nibble = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(bytes, nibble);                      // features 0..15
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);  // features 16..31
    const int64_t g = n * groups + (k >> group_shift);
    const __m256 s = _mm256_broadcast_ss(scale + g), z = _mm256_broadcast_ss(zero + g);
    const __m128i parts[4] = {lo, _mm_unpackhi_epi64(lo, lo), hi, _mm_unpackhi_epi64(hi, hi)};
    for (int i = 0; i < 4; ++i)
      out[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), s, z);
  }
  inline void prefetch(int64_t n, int64_t k) const {
    _mm_prefetch(reinterpret_cast<const char*>(q + n * (K / 2) + k / 2), _MM_HINT_T0);
  }
};

// out[m * C + c] = x[m] . W[n0 + c] in float32, for M rows and C channels.
template <int M, int C, typename W>
inline void tile(const float* x, int64_t K, const W& weights, int64_t n0, float* out) {
  __m256 acc[M][C];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    for (int c = 0; c < C; ++c) {
      __m256 wv[4];
      weights.load(n0 + c, k, wv);
      weights.prefetch(n0 + c + kPrefetchChannels, k);
      for (int m = 0; m < M; ++m)
        for (int i = 0; i < 4; ++i)
          acc[m][c] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8 * i), wv[i], acc[m][c]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) out[m * C + c] = hsum(acc[m][c]);
}

template <int C, typename W>
inline void tile_rows(int64_t rows, const float* x, int64_t K, const W& weights, int64_t n0,
                      float* out) {
  if (rows == 2)
    tile<2, C>(x, K, weights, n0, out);
  else
    tile<1, C>(x, K, weights, n0, out);
}

// All rows through channels [n0, n0 + channels) of `weights`, into sums [rows][kChannels].
template <typename W, typename Finish>
void block_rows(const float* x, int64_t M, int64_t K, const W& weights, int64_t n0,
                int64_t channels, const Finish& finish) {
  float sums[kRowsPerTile * kChannels];
  for (int64_t m0 = 0; m0 < M; m0 += kRowsPerTile) {
    const int64_t rows = std::min<int64_t>(kRowsPerTile, M - m0);
    const float* xm = x + m0 * K;
    if (channels == kChannels) {
      tile_rows<kChannels>(rows, xm, K, weights, n0, sums);
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t c = 0; c < kChannels; ++c) finish(m0 + m, n0 + c, sums[m * kChannels + c]);
    } else {  // the last, partial block: one channel at a time
      for (int64_t c = 0; c < channels; ++c) {
        tile_rows<1>(rows, xm, K, weights, n0 + c, sums);
        for (int64_t m = 0; m < rows; ++m) finish(m0 + m, n0 + c, sums[m]);
      }
    }
  }
}

// out[0 .. K) = channel n of `weights` expanded to float32.
template <typename W>
inline void expand_channel(const W& weights, int64_t n, int64_t K, float* out) {
  __m256 wv[4];
  for (int64_t k = 0; k < K; k += 32) {
    weights.load(n, k, wv);
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + k + 8 * i, wv[i]);
  }
}

// Runs every block of channels; `expand` says whether a block is first written out as float32
// (quantized weights with more than kDirectRows rows). finish(m, n, sum) stores a value.
template <typename W, typename Finish>
void run(const float* x, int64_t M, int64_t K, int64_t N, const W& weights, bool expand,
         const Finish& finish) {
  const int64_t blocks = (N + kChannels - 1) / kChannels;
  at::parallel_for(0, blocks, kGrain, [&](int64_t b0, int64_t b1) {
    std::vector<float> buffer(expand ? kChannels * K : 0);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kChannels;
      const int64_t channels = std::min<int64_t>(kChannels, N - n0);
      if (!expand) {
        block_rows(x, M, K, weights, n0, channels, finish);
        continue;
      }
      for (int64_t c = 0; c < channels; ++c)
        expand_channel(weights, n0 + c, K, buffer.data() + c * K);
      const F32Weights expanded{buffer.data(), K};
      block_rows(x, M, K, expanded, 0, channels,
                 [&](int64_t m, int64_t c, float s) { finish(m, n0 + c, s); });
    }
  });
}

void check_input(const torch::Tensor& x, int64_t K, int64_t multiple) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous [M, K] float32 tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " features, the weight ", K);
  TORCH_CHECK(K % multiple == 0, "K = ", K, " must be a multiple of ", multiple);
}

const float* f32_ptr(const torch::Tensor& t, int64_t numel, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.numel() == numel && t.is_contiguous(), what,
              " must be a contiguous float32 tensor of ", numel, " elements");
  return t.data_ptr<float>();
}

const float* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t N) {
  return bias.has_value() ? f32_ptr(*bias, N, "bias") : nullptr;
}

// x [M, K] f32, w [N, K] f32, bias [N] f32 or None -> [M, N] f32.
torch::Tensor linear_f32(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "w must be a contiguous [N, K] float32 tensor");
  const int64_t M = x.size(0), K = w.size(1), N = w.size(0);
  check_input(x, K, 32);
  auto out = torch::empty({M, N}, x.options());
  float* o = out.data_ptr<float>();
  const float* b = bias_ptr(bias, N);
  run(x.data_ptr<float>(), M, K, N, F32Weights{w.data_ptr<float>(), K}, false,
      [&](int64_t m, int64_t n, float s) { o[m * N + n] = b ? s + b[n] : s; });
  return out;
}

// x [M, K] f32, q [N, K] int8, scale [N] f32, bias [N] f32 or None -> [M, N] f32;
// y = (sum_k x q) * scale (+ bias).
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale,
                          c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(),
              "q must be a contiguous [N, K] int8 tensor");
  const int64_t M = x.size(0), K = q.size(1), N = q.size(0);
  check_input(x, K, 32);
  const float* s = f32_ptr(scale, N, "scale");
  auto out = torch::empty({M, N}, x.options());
  float* o = out.data_ptr<float>();
  const float* b = bias_ptr(bias, N);
  run(x.data_ptr<float>(), M, K, N, Int8Weights{q.data_ptr<int8_t>(), K}, M > kDirectRows,
      [&](int64_t m, int64_t n, float v) {
        const float y = v * s[n];
        o[m * N + n] = b ? y + b[n] : y;
      });
  return out;
}

// x [M, K] f32, q [N, K / 2] uint8 (see the header for the packing), scale and zero
// [N, K / group] f32, bias [N] f32 or None -> [M, N] f32.
torch::Tensor linear_int4(torch::Tensor x, torch::Tensor q, torch::Tensor scale,
                          torch::Tensor zero, int64_t group, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(),
              "q must be a contiguous [N, K / 2] uint8 tensor");
  TORCH_CHECK(group >= 32 && (group & (group - 1)) == 0,
              "the group size must be a power of 2, at least 32");
  const int64_t M = x.size(0), K = q.size(1) * 2, N = q.size(0);
  check_input(x, K, group);
  const Int4Weights weights{q.data_ptr<uint8_t>(), f32_ptr(scale, N * (K / group), "scale"),
                            f32_ptr(zero, N * (K / group), "zero"), K, K / group,
                            __builtin_ctzll(group)};
  auto out = torch::empty({M, N}, x.options());
  float* o = out.data_ptr<float>();
  const float* b = bias_ptr(bias, N);
  run(x.data_ptr<float>(), M, K, N, weights, M > kDirectRows,
      [&](int64_t m, int64_t n, float v) { o[m * N + n] = b ? v + b[n] : v; });
  return out;
}

// q [N, K / 2] uint8, scale and zero [N, K / group] f32 -> W [N, K] f32, each weight expanded
// as in linear_int4 (bit for bit the weight that kernel multiplies by).
torch::Tensor dequantize_int4(torch::Tensor q, torch::Tensor scale, torch::Tensor zero,
                              int64_t group) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(),
              "q must be a contiguous [N, K / 2] uint8 tensor");
  TORCH_CHECK(group >= 32 && (group & (group - 1)) == 0,
              "the group size must be a power of 2, at least 32");
  const int64_t K = q.size(1) * 2, N = q.size(0);
  TORCH_CHECK(K % group == 0, "K = ", K, " must be a multiple of ", group);
  const Int4Weights weights{q.data_ptr<uint8_t>(), f32_ptr(scale, N * (K / group), "scale"),
                            f32_ptr(zero, N * (K / group), "zero"), K, K / group,
                            __builtin_ctzll(group)};
  auto out = torch::empty({N, K}, scale.options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) expand_channel(weights, n, K, o + n * K);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_f32", &linear_f32, "x [M, K] f32 @ w [N, K] f32 ^T (+ bias)");
  m.def("linear_int8", &linear_int8, "x [M, K] f32 @ (q [N, K] int8 * scale [N])^T (+ bias)");
  m.def("linear_int4", &linear_int4,
        "x [M, K] f32 @ (q [N, K] int4 * scale [N, K/g] + zero [N, K/g])^T (+ bias)");
  m.def("dequantize_int4", &dequantize_int4, "q [N, K] int4 * scale [N, K/g] + zero [N, K/g]");
}
