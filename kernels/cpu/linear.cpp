// Small-batch linear layers for the CPU, y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), with W
// stored as bfloat16 or as int8 with one scale per output channel; x is bfloat16.
//
// At decode batch sizes (a few rows) a linear layer reads every weight once per step, so its time
// is the weight bytes over memory bandwidth plus a fixed cost per call. Here oneDNN's bfloat16 GEMM
// pays 20-30 us per call on top of that and torch's int8 kernel reads at about 10 GB/s; these
// kernels stream the weight rows, fetched 8 channels ahead into L2, straight into AVX-512 BF16
// dot products (vdpbf16ps: 32 bfloat16 products per instruction, summed in pairs into 16 float32
// lanes). Fetching into L2 rather than L1 leaves L1's few outstanding misses to the loads: on a
// 2-core AMD EPYC (no AMX) the 120 decoder layers of SmolLM2-135M at one row took 10 against
// 15 ms that way, int8 5.3 against 6.8 ms.
//   - bfloat16: the weight row as it is;
//   - int8: q converted to bfloat16 (exact: |q| <= 127 fits bfloat16's 8-bit significand), the
//     float32 sum scaled by the channel's scale at the end: y = scale[n] * sum_k x q.
// Sums are float32 in a fixed order (k ascending within each of 16 lanes, the lanes then added as
// a tree), the same for every row whatever the batch size; the result is rounded to bfloat16 once.
// Blocks of 4 output channels are spread over the threads; rows of x go 4 at a time through each
// block while its weights are in L1. With int8 weights and more than 4 rows, a block is converted
// to bfloat16 once, into a scratch the row tiles share (converting per tile made the kernel
// compute-bound: over SmolLM2-135M's 120 decoder linears on that EPYC, 26.5 against 18.0 ms at
// 32 rows, 56 against 33 ms at 64). K must be a multiple of 32; the Python side
// (kernels/cpu/linear.py) checks and falls back to PyTorch otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

using bf16 = at::BFloat16;
constexpr int kRowsPerTile = 4;    // rows of x computed together
constexpr int kChannels = 4;       // output channels per block
constexpr int64_t kGrain = 16;     // blocks per thread task at least
constexpr int64_t kPrefetchChannels = 8;  // weights fetched ahead, in output channels

inline float bf16_to_float(bf16 v) { return static_cast<float>(v); }

// 32 bfloat16 weights of a bfloat16 row at element k.
struct Bf16Weights {
  const bf16* w;
  int64_t K;
  inline __m512i load(int64_t n, int64_t k) const {
    return _mm512_loadu_si512(w + n * K + k);
  }
  inline void prefetch(int64_t n, int64_t k) const {
    _mm_prefetch(reinterpret_cast<const char*>(w + n * K + k), _MM_HINT_T1);
  }
};

// 32 int8 weights at element k, converted to bfloat16 (exact).
struct Int8Weights {
  const int8_t* q;
  int64_t K;
  inline __m512i load(int64_t n, int64_t k) const {
    const __m512i q16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(q + n * K + k)));
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(q16)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(q16, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  }
  inline void prefetch(int64_t n, int64_t k) const {
    _mm_prefetch(reinterpret_cast<const char*>(q + n * K + k), _MM_HINT_T1);
  }
};

// A block of int8 channels n0 .. n0 + C - 1 already converted to bfloat16 (by `convert_block`),
// so that a batch's row tiles share one conversion instead of each repeating it; prefetches still
// go to the int8 rows ahead.
struct ConvertedBlock {
  const bf16* w;  // [C, K]
  int64_t n0, K;
  const Int8Weights& source;
  inline __m512i load(int64_t n, int64_t k) const {
    return _mm512_loadu_si512(w + (n - n0) * K + k);
  }
  inline void prefetch(int64_t n, int64_t k) const { source.prefetch(n, k); }
};

// dst[c * K + k] = bfloat16(q[n0 + c, k]) for c < channels.
inline void convert_block(const Int8Weights& weights, int64_t n0, int64_t channels, bf16* dst) {
  const int64_t K = weights.K;
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t k = 0; k < K; k += 32)
      _mm512_storeu_si512(dst + c * K + k, weights.load(n0 + c, k));
}

// out[m * C + c] = x[m] . W[n0 + c] in float32, for M rows and C channels.
template <int M, int C, typename W>
inline void tile(const bf16* x, int64_t K, const W& weights, int64_t n0, float* out) {
  __m512 acc[M][C];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512i wv[C];
    for (int c = 0; c < C; ++c) wv[c] = weights.load(n0 + c, k);
    for (int c = 0; c < C; ++c) weights.prefetch(n0 + c + kPrefetchChannels, k);
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * K + k);
      for (int c = 0; c < C; ++c)
        acc[m][c] = _mm512_dpbf16_ps(acc[m][c], (__m512bh)xv, (__m512bh)wv[c]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) out[m * C + c] = _mm512_reduce_add_ps(acc[m][c]);
}

template <int C, typename W>
inline void tile_rows(int64_t rows, const bf16* x, int64_t K, const W& weights, int64_t n0,
                      float* out) {
  switch (rows) {
    case 4: tile<4, C>(x, K, weights, n0, out); break;
    case 3: tile<3, C>(x, K, weights, n0, out); break;
    case 2: tile<2, C>(x, K, weights, n0, out); break;
    default: tile<1, C>(x, K, weights, n0, out); break;
  }
}

// The tiles of rows m0 .. M - 1 against channels n0 .. n0 + channels - 1 (a block).
template <typename W, typename Finish>
inline void run_block(const bf16* x, int64_t M, int64_t K, const W& weights, int64_t n0,
                      int64_t channels, const Finish& finish) {
  float sums[kRowsPerTile * kChannels];
  for (int64_t m0 = 0; m0 < M; m0 += kRowsPerTile) {
    const int64_t rows = std::min<int64_t>(kRowsPerTile, M - m0);
    const bf16* xm = x + m0 * K;
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

// Runs the tiles over all rows and channels; finish(m, n, sum) stores the output value. With
// int8 weights and more rows than one tile, each block is converted to bfloat16 once first.
template <typename W, typename Finish>
void run(const bf16* x, int64_t M, int64_t K, int64_t N, const W& weights, const Finish& finish) {
  const int64_t blocks = (N + kChannels - 1) / kChannels;
  at::parallel_for(0, blocks, kGrain, [&](int64_t b0, int64_t b1) {
    std::vector<bf16> converted;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kChannels;
      const int64_t channels = std::min<int64_t>(kChannels, N - n0);
      if constexpr (std::is_same_v<W, Int8Weights>) {
        if (M > kRowsPerTile) {
          converted.resize(kChannels * K);
          convert_block(weights, n0, channels, converted.data());
          const ConvertedBlock block{converted.data(), n0, K, weights};
          run_block(x, M, K, block, n0, channels, finish);
          continue;
        }
      }
      run_block(x, M, K, weights, n0, channels, finish);
    }
  });
}

void check_input(const torch::Tensor& x, int64_t K, int64_t multiple) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous [M, K] bfloat16 tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " features, the weight ", K);
  TORCH_CHECK(K % multiple == 0, "K = ", K, " must be a multiple of ", multiple);
}

const bf16* bias_ptr(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == N && bias->is_contiguous(),
              "bias must be a contiguous [N] bfloat16 tensor");
  return bias->data_ptr<bf16>();
}

// x [M, K] bf16, w [N, K] bf16, bias [N] bf16 or None -> [M, N] bf16.
torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              "w must be a contiguous [N, K] bfloat16 tensor");
  const int64_t M = x.size(0), K = w.size(1), N = w.size(0);
  check_input(x, K, 32);
  auto out = torch::empty({M, N}, x.options());
  bf16* o = out.data_ptr<bf16>();
  const bf16* b = bias_ptr(bias, N);
  const Bf16Weights weights{w.data_ptr<bf16>(), K};
  run(x.data_ptr<bf16>(), M, K, N, weights, [&](int64_t m, int64_t n, float s) {
    o[m * N + n] = static_cast<bf16>(b ? s + bf16_to_float(b[n]) : s);
  });
  return out;
}

// x [M, K] bf16, q [N, K] int8, scale [N] bf16, bias [N] bf16 or None -> [M, N] bf16;
// y = (sum_k x q) * scale (+ bias), rounded once.
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale,
                          c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(),
              "q must be a contiguous [N, K] int8 tensor");
  const int64_t M = x.size(0), K = q.size(1), N = q.size(0);
  check_input(x, K, 32);
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.numel() == N && scale.is_contiguous(),
              "scale must be a contiguous [N] bfloat16 tensor");
  auto out = torch::empty({M, N}, x.options());
  bf16* o = out.data_ptr<bf16>();
  const bf16* s = scale.data_ptr<bf16>();
  const bf16* b = bias_ptr(bias, N);
  const Int8Weights weights{q.data_ptr<int8_t>(), K};
  run(x.data_ptr<bf16>(), M, K, N, weights, [&](int64_t m, int64_t n, float v) {
    const float y = v * bf16_to_float(s[n]);
    o[m * N + n] = static_cast<bf16>(b ? y + bf16_to_float(b[n]) : y);
  });
  return out;
}

// q [N, K] int8 -> [N, K] bf16, exact (what q.to(torch::kBFloat16) gives), the rows spread over
// the threads; K a multiple of 32.
torch::Tensor int8_to_bf16(torch::Tensor q) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(),
              "q must be a contiguous [N, K] int8 tensor");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(K % 32 == 0, "K = ", K, " must be a multiple of 32");
  auto out = torch::empty({N, K}, q.options().dtype(at::kBFloat16));
  const Int8Weights weights{q.data_ptr<int8_t>(), K};
  bf16* o = out.data_ptr<bf16>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
    convert_block(weights, n0, n1 - n0, o + n0 * K);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear_bf16", &linear_bf16, "x [M, K] bf16 @ w [N, K] bf16 ^T (+ bias)");
  m.def("linear_int8", &linear_int8, "x [M, K] bf16 @ (q [N, K] int8 * scale [N])^T (+ bias)");
  m.def("int8_to_bf16", &int8_to_bf16, "q [N, K] int8 -> bf16, exact");
}
