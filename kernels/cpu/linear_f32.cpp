// Small-batch linear layers for float32 activations on AVX2 + FMA CPUs,
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), x and y float32, with W stored as
//   - float32, as it is;
//   - int8 with one scale per output channel: y = scale[n] * sum_k x q (q converted exactly);
//   - int4 in groups of g input features: W[n, k] = q[n, k] * scale[n, k / g] + zero[n, k / g],
//     q in [0, 15] packed two to a byte in blocks of 32 features: byte i of a block holds feature
//     i in its low nibble and feature i + 16 in its high one (GGUF's Q4 order). The weight is
//     expanded in float32 as one fused multiply-add, then multiplied like a float32 weight.
//
// Quantized weights are stored in blocks of 4 output channels x 32 features, in the order the
// dot-product tiles read them: q[N4][K / 32][4][32] for int8 (32 bytes per channel) and
// [N4][K / 32][4][16] for int4 (16), scale and zero [N4][K / g][4], N4 = ceil(N / 4), channels
// past N zero (kernels/cpu/linear.py makes them: block_int8, block_int4). A tile then reads one
// sequential stream where rows of [N, K] gave it 4 (and 8 more for int4's scales and zeros).
// Measured on a 2-core AVX2 host over SmolLM2-135M's 120 decoder linears at one row, with int4
// nibbles also widened as 32-bit lanes (and, shift) instead of as bytes: int8 6.6-7.4 -> 5.9-6.4
// ms, int4 10.5-11.4 -> 7.7-8.1 ms. Panel tiles read a channel's blocks 128 (int8) or 64 (int4)
// bytes apart, and prefetch the next panel as they expand one: at 16 and 32 rows within 4% of
// rows of [N, K].
//
// Float32, bfloat16, int8 and int4 weights can also be packed once into panels of 16 output
// channels (kernels/cpu/linear.py's pack_panels16 and pack_int4_panels16; channels past N zero),
// for linear_f32_panels, linear_bf16_f32_panels (x and outputs bfloat16: x widened to float32 once,
// each output rounded once), linear_int8_f32_panels and linear_int4_f32_panels: a tile of up to 6
// rows x 16 channels keeps its 12 sums in registers, and each step over k expands the panel's 16
// weights once for all its rows (bfloat16 widened and int8 converted exactly, int4 as above) and
// broadcasts one value of each row (2 + 6 loads for 12 FMAs with float32 weights, nothing reduced
// across lanes); a float32 or bfloat16 panel for a batch of 5 to 16 rows is taken by all its tiles
// in turn 128 steps at a time (span_panel), so it is read from memory once and in order (bfloat16
// widened once, by the first tile), and a bfloat16 or quantized panel serving more rows than that
// (quantized: more than kExpandRows) is expanded once into a float32 buffer instead (bfloat16: by
// the first tile of a row block as it computes, as in a span). Every output is one float32 sum over
// k ascending (int8: scaled after), so a row's result does not depend on the rest of its batch.
// Threads take runs of panels from a shared counter (about kChunksPerThread runs each) and sweep
// the rows in blocks whose x stays in L2 (kPackedBlockBytes). Measured on a 2-core AVX2 host over
// SmolLM2-135M's 120 decoder linears in float32 (distinct weights, read from memory): 17.8 ms at
// one row (the FMA kernel below 18.8), 29.1 at 8 (oneDNN's packed GEMM 40.9), 60.2 at 32 (73.9),
// 111 at 64 (133), 806 at 512 (808) and 1,484 at 1,024 (1,540).
//
// At decode batch sizes a linear layer's time is reading its weights, and torch's own kernels do
// that slowly on CPUs without AVX-512 (its int8 and int4 kernels fall back to scalar code there).
// These kernels stream each block of 4 output channels, 32 features at a time, through 8-wide
// FMAs for 2 rows of x at a time, quantized weights expanded in registers. With more than
// kDirectRows rows, quantized weights run a register-blocked outer product instead (panel_tile):
// 6 channels expanded once into a buffer, x transposed into tiles of 16 rows, 12 accumulators of
// 8 rows each, so a broadcast weight serves 16 rows and a vector of x 6 channels (measured on a
// 2-core AVX2 host over SmolLM2-135M's 120 decoder linears in int8: 61 ms at 32 rows, against
// 118 ms for expanding the weight and multiplying with torch). Sums are float32 in a fixed order
// (k ascending within each of the 8 residues k mod 8, then the 8 partial sums as a tree), the
// same on both paths, so a row's result never depends on how many rows came with it. K must be a
// multiple of 32 (of the group size for int4); the Python side (kernels/cpu/linear.py) checks and
// falls back to PyTorch otherwise.
//
// The int8 and int4 kernels (blocks and panels) also take bfloat16 x, for bfloat16 models on CPUs
// without AVX-512, where torch's bfloat16 GEMM and its int8 and int4 kernels run scalar code: x is
// widened to float32 (exact), the sums are the same float32 sums, and each output is rounded to
// bfloat16 once (in_float32).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tasks.h"

namespace {

constexpr int kRowsPerTile = 2;    // rows of x computed together
constexpr int kChannels = 4;       // output channels per block
constexpr int64_t kGrain = 8;      // blocks per thread task at least
constexpr int64_t kDirectRows = 8; // up to this many quantized rows, the dot-product tiles
constexpr int64_t kPrefetchChannels = 8;
constexpr int kPanel = 6;           // output channels of a panel tile
constexpr int kTileRows = 16;       // rows of x in a panel tile (two vectors of 8)
constexpr int64_t kBlockBytes = 192 * 1024;  // transposed x a thread sweeps per panel (in L2)
constexpr int64_t kPanelLanes = 16;  // output channels of a packed panel
constexpr int kPackedRows = 6;       // rows of a packed-panel tile (12 accumulators)
constexpr int64_t kExpandRows = 12;  // above this many rows quantized panels are expanded once
                                     // (bfloat16 ones above kSpanMaxRows, after spans)
constexpr int64_t kPackedBlockBytes = 256 * 1024;  // rows of x a thread sweeps per panel (in L2)
// Chunks of panels per thread (about) that run_packed's threads take from a shared counter, so
// that a thread the OS deschedules (the other services share the cores) or that runs slower does
// not hold up the others at the end of the call. Over SmolLM2-135M's 120 decoder linears in
// float32 on a 2-core AVX2 host (9 runs alternating with a static split into equal halves,
// medians): 60.8 against 64.6 ms at 32 rows and 396 against 454 at 256; with another process
// taking a quarter of one core 76.7 against 79.8 and 417 against 486; 1 and 8 rows within 3%.
constexpr int64_t kChunksPerThread = 8;

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

// Offset of channel n's features [k, k + 32) in blocks of 4 channels x 32 features of `bytes`
// bytes per channel and block (k a multiple of 32).
inline int64_t block_offset(int64_t n, int64_t k, int64_t K, int64_t bytes) {
  return ((n >> 2) * (K >> 5) + (k >> 5)) * 4 * bytes + (n & 3) * bytes;
}

// int8 weights converted to float32 (exact), unscaled; q in blocks (see the header).
struct Int8Weights {
  const int8_t* q;
  int64_t K;
  inline const int8_t* at(int64_t n, int64_t k) const { return q + block_offset(n, k, K, 32); }
  inline void load(int64_t n, int64_t k, __m256 out[4]) const {
    const int8_t* p = at(n, k);
    for (int i = 0; i < 4; ++i)
      out[i] = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i))));
  }
  inline void prefetch(int64_t n, int64_t k) const {
    _mm_prefetch(reinterpret_cast<const char*>(at(n, k)), _MM_HINT_T0);
  }
};

// int4 weights expanded to q * scale + zero in float32 (one fused multiply-add each); q, scale
// and zero in blocks (see the header).
struct Int4Weights {
  const uint8_t* q;     // [ceil(N / 4), K / 32, 4, 16]
  const float* scale;   // [ceil(N / 4), K / g, 4]
  const float* zero;    // [ceil(N / 4), K / g, 4]
  int64_t K, groups, group_shift;  // groups per channel, log2 of the group size
  inline const uint8_t* at(int64_t n, int64_t k) const { return q + block_offset(n, k, K, 16); }
  inline int64_t group(int64_t n, int64_t k) const {
    return ((n >> 2) * groups + (k >> group_shift)) * 4 + (n & 3);
  }
  inline void load(int64_t n, int64_t k, __m256 out[4]) const {
    const uint8_t* p = at(n, k);
    const int64_t g = group(n, k);
    const __m256 s = _mm256_broadcast_ss(scale + g), z = _mm256_broadcast_ss(zero + g);
    // bytes 0-7 hold features 0-7 (low nibbles) and 16-23 (high), bytes 8-15 features 8-15, 24-31
    const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i hi =
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)));
    const __m256i nibble = _mm256_set1_epi32(15);
    const __m256i parts[4] = {_mm256_and_si256(lo, nibble), _mm256_and_si256(hi, nibble),
                              _mm256_srli_epi32(lo, 4), _mm256_srli_epi32(hi, 4)};
    for (int i = 0; i < 4; ++i) out[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(parts[i]), s, z);
  }
  inline void prefetch(int64_t n, int64_t k) const {
    _mm_prefetch(reinterpret_cast<const char*>(at(n, k)), _MM_HINT_T0);
    const int64_t g = group(n, k);
    _mm_prefetch(reinterpret_cast<const char*>(scale + g), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(zero + g), _MM_HINT_T0);
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

// Runs every block of channels through the dot-product tiles. finish(m, n, sum) stores a value.
template <typename W, typename Finish>
void run(const float* x, int64_t M, int64_t K, int64_t N, const W& weights,
         const Finish& finish) {
  const int64_t blocks = (N + kChannels - 1) / kChannels;
  at::parallel_for(0, blocks, kGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kChannels;
      block_rows(x, M, K, weights, n0, std::min<int64_t>(kChannels, N - n0), finish);
    }
  });
}

// a + b, lane by lane, as one instruction the compiler cannot regroup with other additions (this
// file is built with -ffast-math, under which _mm256_add_ps may be reassociated).
inline __m256 add_as_written(__m256 a, __m256 b) {
  __m256 sum;
  asm("vaddps %2, %1, %0" : "=x"(sum) : "x"(a), "x"(b));
  return sum;
}

// The tree in which the dot-product tiles reduce their 8 lanes (hsum): lane i holds the sum over
// k = i mod 8, and the result is ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)).
inline __m256 lane_tree(const __m256 p[8]) {
  const __m256 a = add_as_written(add_as_written(p[0], p[4]), add_as_written(p[2], p[6]));
  const __m256 b = add_as_written(add_as_written(p[1], p[5]), add_as_written(p[3], p[7]));
  return add_as_written(a, b);
}

// In place: r[j] lane i = r[i] lane j before (an 8 x 8 transpose of floats).
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// Panel tiles read features by residue: feature k = 8i + j is stored at j * (K / 8) + i, so that
// each residue's features lie together. out[j * (K / 8) + i] = channel n of `weights` at 8i + j,
// expanded to float32 (K a multiple of 32: blocks of 64 features, and a last one of 32).
template <typename W>
inline void expand_by_residue(const W& weights, int64_t n, int64_t K, float* out) {
  const int64_t I = K / 8;
  for (int64_t k = 0; k < K; k += 64) {
    __m256 r[8];
    const bool full = k + 64 <= K;
    weights.load(n, k, r);  // rows i = k / 8 .. k / 8 + 3
    weights.prefetch(n + kPanel, k);  // the same channel of the next panel
    if (full) {
      weights.load(n, k + 32, r + 4);
      weights.prefetch(n + kPanel, k + 32);
    } else {
      for (int i = 4; i < 8; ++i) r[i] = _mm256_setzero_ps();
    }
    transpose8(r);
    const int64_t i0 = k / 8;
    for (int j = 0; j < 8; ++j) {
      if (full)
        _mm256_storeu_ps(out + j * I + i0, r[j]);
      else
        _mm_storeu_ps(out + j * I + i0, _mm256_castps256_ps128(r[j]));
    }
  }
}

// out[c * 16 + r] = sum_k W[c][k] * x[r][k] for kPanel channels c and V * 8 rows r, from w
// (kPanel channels expanded by `expand_by_residue`, K apart) and xt (one tile of x, by residue:
// row r of feature 8i + j at (j * (K / 8) + i) * 16 + r). Each residue j is one pass over
// i = 0, 1, ... (feature k ascending), a broadcast weight times a vector of 8 rows fused into
// kPanel x V accumulators; then the 8 residues' sums are added in the tree of `hsum`, so every
// sum is bit for bit the one the dot-product tiles compute.
template <int V>
inline void panel_tile(const float* xt, const float* w, int64_t K, float* out) {
  const int64_t I = K / 8;
  __m256 partial[8][kPanel][V];
  for (int j = 0; j < 8; ++j) {
    __m256 acc[kPanel][V];
    for (int c = 0; c < kPanel; ++c)
      for (int v = 0; v < V; ++v) acc[c][v] = _mm256_setzero_ps();
    const float* xj = xt + j * I * kTileRows;
    const float* wj = w + j * I;
    for (int64_t i = 0; i < I; ++i) {
      __m256 xv[V];
      for (int v = 0; v < V; ++v) xv[v] = _mm256_loadu_ps(xj + i * kTileRows + 8 * v);
      for (int c = 0; c < kPanel; ++c) {
        const __m256 wc = _mm256_broadcast_ss(wj + c * K + i);
        for (int v = 0; v < V; ++v) acc[c][v] = _mm256_fmadd_ps(xv[v], wc, acc[c][v]);
      }
    }
    for (int c = 0; c < kPanel; ++c)
      for (int v = 0; v < V; ++v) partial[j][c][v] = acc[c][v];
  }
  for (int c = 0; c < kPanel; ++c)
    for (int v = 0; v < V; ++v) {
      __m256 p[8];
      for (int j = 0; j < 8; ++j) p[j] = partial[j][c][v];
      _mm256_storeu_ps(out + c * kTileRows + 8 * v, lane_tree(p));
    }
}

// x [M, K] → tiles of 16 rows by residue (see panel_tile), rows past M zero.
std::vector<float> transpose_tiles(const float* x, int64_t M, int64_t K) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows, I = K / 8;
  std::vector<float> xt(tiles * K * kTileRows, 0.0f);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* dst = xt.data() + t * K * kTileRows;
      const int64_t rows = std::min<int64_t>(kTileRows, M - t * kTileRows);
      for (int64_t r = 0; r < rows; ++r) {
        const float* src = x + (t * kTileRows + r) * K;
        for (int64_t k = 0; k < K; ++k) dst[((k & 7) * I + (k >> 3)) * kTileRows + r] = src[k];
      }
    }
  });
  return xt;
}

// Like `run`, through panel tiles (quantized weights, more than kDirectRows rows): each thread
// takes a range of panels (kPanel channels), and for each block of tiles (kBlockBytes of
// transposed x, kept in L2) expands each of its panels once into a buffer and runs every tile of
// the block over it.
template <typename W, typename Finish>
void run_panels(const float* x, int64_t M, int64_t K, int64_t N, const W& weights,
                const Finish& finish) {
  const std::vector<float> xt = transpose_tiles(x, M, K);
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  const int64_t block = std::max<int64_t>(1, kBlockBytes / (K * kTileRows * 4));
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 4, [&](int64_t p0, int64_t p1) {
    // channels past N (a partial last panel) hold zero or stale weights; their sums are discarded
    std::vector<float> w(kPanel * K, 0.0f);
    alignas(32) float out[kPanel * kTileRows];
    for (int64_t t0 = 0; t0 < tiles; t0 += block) {
      const int64_t t1 = std::min(tiles, t0 + block);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * kPanel;
        const int64_t channels = std::min<int64_t>(kPanel, N - n0);
        for (int64_t c = 0; c < channels; ++c)
          expand_by_residue(weights, n0 + c, K, w.data() + c * K);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t m0 = t * kTileRows;
          const int64_t rows = std::min<int64_t>(kTileRows, M - m0);
          const float* tile_x = xt.data() + t * K * kTileRows;
          if (rows > 8)
            panel_tile<2>(tile_x, w.data(), K, out);
          else
            panel_tile<1>(tile_x, w.data(), K, out);
          for (int64_t c = 0; c < channels; ++c)
            for (int64_t r = 0; r < rows; ++r) finish(m0 + r, n0 + c, out[c * kTileRows + r]);
        }
      }
    }
  });
}

// Quantized weights: the dot-product tiles up to kDirectRows rows, panel tiles above.
template <typename W, typename Finish>
void run_quantized(const float* x, int64_t M, int64_t K, int64_t N, const W& weights,
                   const Finish& finish) {
  if (M > kDirectRows)
    run_panels(x, M, K, N, weights, finish);
  else
    run(x, M, K, N, weights, finish);
}

// K of an input x [M, K] (any shape other than 2-D refused).
int64_t features_of(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "x must be a contiguous [M, K] tensor");
  return x.size(1);
}

// Checks x is a contiguous [M, K] float32 (or, with `bfloat16`, bfloat16) tensor, K a multiple
// of `multiple`.
void check_input(const torch::Tensor& x, int64_t K, int64_t multiple, bool bfloat16 = false) {
  const bool dtype_ok =
      x.scalar_type() == at::kFloat || (bfloat16 && x.scalar_type() == at::kBFloat16);
  TORCH_CHECK(x.dim() == 2 && dtype_ok && x.is_contiguous(), "x must be a contiguous [M, K] ",
              bfloat16 ? "float32 or bfloat16" : "float32", " tensor");
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

// bfloat16 <-> float32 for small calls (up to kScalarConvert elements) of the kernels that take
// bfloat16 x, without a dispatched torch op (at one row two of those cost a fifth of a small
// layer's time); larger ones convert with torch's vectorized, threaded copies. Widening is exact;
// narrowing rounds to nearest even and keeps NaN a quiet NaN, bit for bit as c10::BFloat16 does.
constexpr int64_t kScalarConvert = 1 << 16;
inline float widen(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline uint16_t narrow(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN (this file builds -ffast-math)
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// y [M, N] in x's dtype from compute(xf, yf), which fills yf [M, N] float32 from xf [M, K]
// float32: x as it is for float32; for bfloat16, x widened (exact) and each output rounded to
// bfloat16 once.
template <typename Compute>
torch::Tensor in_float32(const torch::Tensor& x, int64_t N, const Compute& compute) {
  const int64_t M = x.size(0), K = x.size(1);
  if (x.scalar_type() == at::kFloat) {
    auto out = torch::empty({M, N}, x.options());
    compute(x.data_ptr<float>(), out.data_ptr<float>());
    return out;
  }
  if (M * std::max(K, N) > kScalarConvert) {
    const torch::Tensor xf = x.to(at::kFloat);
    auto out = torch::empty({M, N}, xf.options());
    compute(xf.data_ptr<float>(), out.data_ptr<float>());
    return out.to(at::kBFloat16);
  }
  std::vector<float> xf(M * K), sums(M * N);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < M * K; ++i) xf[i] = widen(xp[i]);
  compute(xf.data(), sums.data());
  auto out = torch::empty({M, N}, x.options());
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < M * N; ++i) o[i] = narrow(sums[i]);
  return out;
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
  run(x.data_ptr<float>(), M, K, N, F32Weights{w.data_ptr<float>(), K},
      [&](int64_t m, int64_t n, float s) { o[m * N + n] = b ? s + b[n] : s; });
  return out;
}

// One packed panel of 16 output channels: load(k, w) gives the 16 weights of features k .. k +
// kStep - 1 as w[step][0 .. 2), two vectors of 8 float32 each, from
// - float32, [K][16];
// - bfloat16, [K][16], widened to float32 (exact);
// - int8, [K][16], converted exactly (the scale is applied after the sum);
// - int4, [K / 2][16] bytes (feature 2i in the low nibble of byte (i, c), 2i + 1 in the high),
//   expanded as q * scale + zero in one fused multiply-add like Int4Weights, with scale and
//   zero [K / g][16] float32.
struct F32Lanes {
  static constexpr int kStep = 1;
  static constexpr int64_t kStepBytes = kPanelLanes * sizeof(float);  // one 64-byte line a step
  const float* p;
  inline void load(int64_t k, __m256 w[1][2]) const {
    w[0][0] = _mm256_loadu_ps(p + k * kPanelLanes);
    w[0][1] = _mm256_loadu_ps(p + k * kPanelLanes + 8);
  }
};
struct Bf16Lanes {
  static constexpr int kStep = 1;
  static constexpr int64_t kStepBytes = kPanelLanes * sizeof(uint16_t);  // half a line a step
  const uint16_t* p;
  inline void load(int64_t k, __m256 w[1][2]) const {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + k * kPanelLanes));
    w[0][0] = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(b)), 16));
    w[0][1] = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(b, 1)), 16));
  }
};
struct Int8Lanes {
  static constexpr int kStep = 1;
  const int8_t* p;
  inline void load(int64_t k, __m256 w[1][2]) const {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + k * kPanelLanes));
    w[0][0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    w[0][1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(q, q)));
  }
};
struct Int4Lanes {
  static constexpr int kStep = 2;
  const uint8_t* q;
  const float* scale;
  const float* zero;
  int group_shift;
  inline void load(int64_t k, __m256 w[2][2]) const {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k / 2 * kPanelLanes));
    const __m256i lo = _mm256_cvtepu8_epi32(b);                         // channels 0-7
    const __m256i hi = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(b, b));  // channels 8-15
    const int64_t g = (k >> group_shift) * kPanelLanes;
    const __m256 s0 = _mm256_loadu_ps(scale + g), s1 = _mm256_loadu_ps(scale + g + 8);
    const __m256 z0 = _mm256_loadu_ps(zero + g), z1 = _mm256_loadu_ps(zero + g + 8);
    const __m256i nibble = _mm256_set1_epi32(15);
    w[0][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(lo, nibble)), s0, z0);
    w[0][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(hi, nibble)), s1, z1);
    w[1][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4)), s0, z0);
    w[1][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4)), s1, z1);
  }
};

// Panels whose tiles fetch ahead (accumulate's kFetch and kEvery): those of 16-bit or 32-bit
// floats, read from memory a line every one or two steps.
template <typename Lanes>
constexpr bool kFetchable = std::is_same_v<Lanes, F32Lanes> || std::is_same_v<Lanes, Bf16Lanes>;

// Steps over k a float32 panel tile that fetches (kFetch) reads ahead: 32 steps of 64 bytes, 2 KB
// (16 steps ran 3-6 % slower over the decoder linears at 8 to 256 rows; 64 even at 8 and 32
// rows, 6 % slower at 256).
constexpr int64_t kFetchSteps = 32;

// Adds to acc[r][0..1] (the sums of row r of x, K apart, over a packed panel's 16 channels) the
// products of the panel's steps [k0, k1), k ascending, one FMA chain per sum, unrolled four steps
// at a time. With kFetch (float32 and bfloat16 panels, kFetchable) each step also fetches the
// panel's line kFetchSteps float32 steps (2 KB) ahead into L1 (a bfloat16 step is half a line, so
// each line is asked for twice; near the panel's end, lines past it: a hint only, which never
// faults). With kEvery > 0 (kFetchable panels) every kEvery-th step from k0 also fetches one
// line into L2, from the address `far` on (see panel_rows and span_panel; an address past the
// tensor is a hint only, which never faults). With kSpill each step's 16 weights, as loaded
// (widened), are also stored at spill[(k - k0) * 16], for the tiles after this one (span_panel,
// widening_rows).
template <int R, bool kFetch, int kEvery, typename Lanes, bool kSpill = false>
inline void accumulate(const float* x, int64_t K, const Lanes& panel, int64_t k0, int64_t k1,
                       __m256 (&acc)[R][2], uintptr_t far = 0, float* spill = nullptr) {
  static_assert(!kFetch || kFetchable<Lanes>, "fetches float32 and bfloat16 panels only");
  static_assert(kEvery == 0 || kFetchable<Lanes>, "fetches float32 and bfloat16 panels only");
  static_assert(!kSpill || Lanes::kStep == 1, "spills panels of one step a load");
#pragma GCC unroll 4
  for (int64_t k = k0; k < k1; k += Lanes::kStep) {
    __m256 w[Lanes::kStep][2];
    if constexpr (kFetch) {
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(panel.p) + k * Lanes::kStepBytes +
                              kFetchSteps * F32Lanes::kStepBytes;
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
    }
    if constexpr (kEvery > 0) {
      if ((k - k0) % kEvery == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(far + (k - k0) / kEvery * 64), _MM_HINT_T1);
      }
    }
    panel.load(k, w);
    if constexpr (kSpill) {
      _mm256_store_ps(spill + (k - k0) * kPanelLanes, w[0][0]);
      _mm256_store_ps(spill + (k - k0) * kPanelLanes + 8, w[0][1]);
    }
    for (int step = 0; step < Lanes::kStep; ++step) {
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x + r * K + k + step);
        acc[r][0] = _mm256_fmadd_ps(xb, w[step][0], acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xb, w[step][1], acc[r][1]);
      }
    }
  }
}

// out[r * N + c] = sums[r][c] * scale[c] (+ bias[c]) for `rows` rows and the `valid` first
// channels of a panel; out, scale (nullable: 1) and bias (nullable) start at its first channel.
inline void store_sums(const float (*sums)[kPanelLanes], int64_t rows, const float* scale,
                       const float* bias, float* out, int64_t N, int64_t valid) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < valid; ++c) {
      const float y = scale != nullptr ? sums[r][c] * scale[c] : sums[r][c];
      out[r * N + c] = bias != nullptr ? y + bias[c] : y;
    }
}

// Calls tile(std::integral_constant<int, rows>()) for 1 to kPackedRows rows (a run-time count).
template <typename Tile>
inline void with_rows(int64_t rows, const Tile& tile) {
  switch (rows) {
    case 1: tile(std::integral_constant<int, 1>()); break;
    case 2: tile(std::integral_constant<int, 2>()); break;
    case 3: tile(std::integral_constant<int, 3>()); break;
    case 4: tile(std::integral_constant<int, 4>()); break;
    case 5: tile(std::integral_constant<int, 5>()); break;
    default: tile(std::integral_constant<int, 6>()); break;
  }
}

// out[r * N + c] = (x[r] . W[n0 + c]) * scale[c] (+ bias[c]) for R rows of x (K apart) and the
// `valid` first channels of one packed panel, all its steps in one pass (accumulate, which also
// says what kFetch and kEvery fetch; `next` is its `far`); out, scale (nullable: 1) and bias
// (nullable) start at channel n0.
// With kSpill the tile also stores the panel's weights, widened, at spill[k * 16] (accumulate).
template <int R, bool kFetch, typename Lanes, int kEvery = 0, bool kSpill = false>
inline void packed_tile(const float* x, int64_t K, const Lanes& panel, const float* scale,
                        const float* bias, float* out, int64_t N, int64_t valid,
                        const char* next = nullptr, float* spill = nullptr) {
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  accumulate<R, kFetch, kEvery, Lanes, kSpill>(x, K, panel, 0, K, acc,
                                               reinterpret_cast<uintptr_t>(next), spill);
  // Through a buffer rather than stored from `acc` lane by lane: indexing `acc` with a run-time
  // channel count made GCC keep it in memory, storing all 12 sums at every step (half the speed).
  alignas(32) float sums[R][kPanelLanes];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(sums[r], acc[r][0]);
    _mm256_store_ps(sums[r] + 8, acc[r][1]);
  }
  store_sums(sums, R, scale, bias, out, N, valid);
}

// Checks panels is a contiguous [ceil(N / 16), width] tensor of `type`, `what` naming it.
void check_panels(const torch::Tensor& panels, at::ScalarType type, int64_t N, int64_t width,
                  const char* what = "panels") {
  const int64_t P = (N + kPanelLanes - 1) / kPanelLanes;
  TORCH_CHECK(N > 0 && panels.scalar_type() == type && panels.is_contiguous() &&
                  panels.dim() == 2 && panels.size(0) == P && panels.size(1) == width,
              what, " must be contiguous ", c10::toString(type), " [", P, ", ", width, "] for ",
              N, " channels");
}

// packed_tile for 1 to kPackedRows rows (a run-time count).
template <bool kFetch, typename Lanes, int kEvery = 0>
inline void packed_rows(int64_t rows, const float* x, int64_t K, const Lanes& panel,
                        const float* scale, const float* bias, float* out, int64_t N,
                        int64_t valid, const char* next = nullptr) {
  with_rows(rows, [&](auto r) {
    packed_tile<decltype(r)::value, kFetch, Lanes, kEvery>(x, K, panel, scale, bias, out, N,
                                                           valid, next);
  });
}

// packed_rows for 1 to kPackedRows rows of a bfloat16 panel, fetched 2 KB ahead, whose tile also
// stores the panel's weights, widened, at spill[k * 16] for k in [0, K) (32-byte aligned).
inline void widening_rows(int64_t rows, const float* x, int64_t K, const Bf16Lanes& panel,
                          const float* scale, const float* bias, float* out, int64_t N,
                          int64_t valid, float* spill) {
  with_rows(rows, [&](auto r) {
    packed_tile<decltype(r)::value, true, Bf16Lanes, 0, true>(x, K, panel, scale, bias, out, N,
                                                              valid, nullptr, spill);
  });
}

// packed_rows for a float32 tile that also fetches its share of the next panel into L2, one line
// every `every` steps (2 or 4) from `next`.
template <bool kFetch>
inline void packed_rows_next(int64_t every, int64_t rows, const float* x, int64_t K,
                             const F32Lanes& panel, const float* bias, float* out, int64_t N,
                             int64_t valid, const char* next) {
  if (every == 2) {
    packed_rows<kFetch, F32Lanes, 2>(rows, x, K, panel, nullptr, bias, out, N, valid, next);
  } else {
    packed_rows<kFetch, F32Lanes, 4>(rows, x, K, panel, nullptr, bias, out, N, valid, next);
  }
}

// Steps of a span (span_panel): 8 KB of a float32 panel, which every row tile computes in turn.
constexpr int64_t kSpanSteps = 128;
// Batches (rows of x) whose float32 and bfloat16 panels run span_panel: 5 to 16 (one to three
// tiles).
constexpr int64_t kSpanMinRows = 5;
constexpr int64_t kSpanMaxRows = 16;

// Rows [m0, m_end) of x (at most kSpanMaxRows), in tiles of balanced sizes, through one float32
// panel read from memory (out, scale and bias as in panel_rows), a span of kSpanSteps steps at a
// time: every tile computes a span before any computes the next, its sums kept in a buffer
// between spans. The span then stays in L1 while the tiles take it, and the panel is read from
// memory once, in order: the first tile fetches the span's lines kFetchSteps ahead into L1, and
// each tile fetches its share of the next span into L2 (one line every `tiles` steps), so the
// next span streams in while this one is computed (after the last span, the next panel's first;
// past the tensor for its last panel, a hint only). Each sum is still one FMA chain over k
// ascending, so the outputs are those of a tile that runs the whole panel in one pass.
//
// A bfloat16 panel's span (4 KB) is widened by its first tile as it computes (fetching 2 KB
// ahead), which stores the widened weights into an 8 KB float32 buffer on the stack that the
// other tiles take (a lone tile of 5 or 6 rows needs none): each weight is widened once, not once
// a tile, and while the FMAs of the first tile run.
// The tiles' fetches of the next span ask for half as many lines (a line is two bfloat16 steps),
// one every 2 * `tiles` steps.
template <typename Lanes>
void span_panel(const float* x, int64_t m0, int64_t m_end, int64_t K, int64_t N,
                const Lanes& lanes, const float* scale, const float* bias, float* out,
                int64_t n0, int64_t valid) {
  static_assert(kFetchable<Lanes>, "spans of float32 and bfloat16 panels only");
  constexpr bool kWiden = !std::is_same_v<Lanes, F32Lanes>;
  alignas(32) float sums[kSpanMaxRows][kPanelLanes];
  alignas(64) float widened[kWiden ? kSpanSteps * kPanelLanes : 1];
  const int64_t tiles = (m_end - m0 + kPackedRows - 1) / kPackedRows;
  for (int64_t k0 = 0; k0 < K; k0 += kSpanSteps) {
    const int64_t k1 = std::min(K, k0 + kSpanSteps), share = (k1 - k0 + tiles - 1) / tiles;
    int64_t m = m0;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t rows = (m_end - m) / (tiles - t);
      const float* xr = x + m * K;
      float(*tile_sums)[kPanelLanes] = sums + (m - m0);
      // the next span's steps [t * share, (t + 1) * share)
      const uintptr_t far =
          reinterpret_cast<uintptr_t>(lanes.p) + (k1 + t * share) * Lanes::kStepBytes;
      with_rows(rows, [&](auto r) {
        constexpr int R = decltype(r)::value;
        __m256 acc[R][2];
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
          acc[i][0] = k0 == 0 ? _mm256_setzero_ps() : _mm256_load_ps(tile_sums[i]);
          acc[i][1] = k0 == 0 ? _mm256_setzero_ps() : _mm256_load_ps(tile_sums[i] + 8);
        }
        // each tile fetches one line every `tiles` steps (bfloat16: every 2 * `tiles`)
        static_assert(kSpanMaxRows <= 3 * kPackedRows, "tiles of a span: 1 to 3");
        if constexpr (kWiden) {
          // the first tile widens the span as it computes, the others take the buffer (whose
          // step 0 is the span's step k0)
          if (tiles == 1) {
            accumulate<R, true, 2>(xr, K, lanes, k0, k1, acc, far);
          } else if (t == 0) {
            if (tiles == 2) {
              accumulate<R, true, 4, Lanes, true>(xr, K, lanes, k0, k1, acc, far, widened);
            } else {
              accumulate<R, true, 6, Lanes, true>(xr, K, lanes, k0, k1, acc, far, widened);
            }
          } else {
            const F32Lanes span{widened};
            tiles == 2 ? accumulate<R, false, 4>(xr + k0, K, span, 0, k1 - k0, acc, far)
                       : accumulate<R, false, 6>(xr + k0, K, span, 0, k1 - k0, acc, far);
          }
        } else if (tiles == 1) {
          accumulate<R, true, 1>(xr, K, lanes, k0, k1, acc, far);
        } else if (t == 0) {
          tiles == 2 ? accumulate<R, true, 2>(xr, K, lanes, k0, k1, acc, far)
                     : accumulate<R, true, 3>(xr, K, lanes, k0, k1, acc, far);
        } else {
          tiles == 2 ? accumulate<R, false, 2>(xr, K, lanes, k0, k1, acc, far)
                     : accumulate<R, false, 3>(xr, K, lanes, k0, k1, acc, far);
        }
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) {
          _mm256_store_ps(tile_sums[i], acc[i][0]);
          _mm256_store_ps(tile_sums[i] + 8, acc[i][1]);
        }
      });
      m += rows;
    }
  }
  store_sums(sums, m_end - m0, scale, bias, out + m0 * N + n0, N, valid);
}

// Rows [m0, m_end) of x through one panel, in tiles of balanced sizes (8 rows as 4 + 4). With
// `fetch` (a float32 panel read from memory) and more than one tile, the first tile fetches the
// panel ahead of its loads, so that it comes from memory at the rate of a stream and the later
// tiles find it in the caches. Over SmolLM2-135M's 120 decoder linears in float32 on a 2-core
// AVX2 host (a script calling this kernel with random weights, 11 runs alternating with the code
// before, medians), the unrolled loop and this fetch took 36.3 against 42.5 ms at 8 rows, 52.4
// against 53.9 at 16, 62.6 against 67.4 at 32, 101.9 against 107.5 at 64 and 431 against 499 at
// 256; one row (one tile, no fetch) stayed within the runs' spread (24.3 against 23.5 ms).
// With `next` (the next float32 panel, given only when there is no scale) and more than one
// tile, the first tiles also fetch that panel into L2, spread over their loops so that it
// streams in while this one is computed: 4 tiles a quarter each, one line every 4 steps (2 or 3
// tiles: 2 tiles, every 2 steps). The first tile of the next panel then reads it from L2 rather
// than from memory (the last panel of a thread's chunk fetches the next chunk's first, which
// the other thread may take: a hint that may go unused). Over the same 120 linears (as above,
// 11 runs alternating with the code before, medians, two runs): 0.90 and 0.96 of the time at 8
// rows (28.5 against 29.6 ms), 0.94 and 0.95 at 16 (35.1 against 37.0) and at 32 (54.6 against
// 57.7), 1.00 and 1.02 at 64, 1.01 at 256, where the panels are computed long enough for them
// to stream in anyway. One row is left alone: fetching the next panel there too took 1.14
// times as long.
//
// With `spans` (a float32 panel read from memory, a batch of kSpanMinRows to kSpanMaxRows rows),
// a block of kSpanMinRows rows or more runs span_panel instead. Over the same 120 linears
// (`python -m kernels.cpu.bench --kernel linear --batch M --against REV`, 31 rounds alternating
// with the code before; the median of the rounds' ratios, and of the fastest rounds' in
// brackets), three passes: 5 rows 1.01, 0.94, 1.01; 6 rows 0.90, 0.91, 0.94; 8 rows 0.97, 0.94,
// 1.00; 12 rows 0.97, 0.97, 0.95; 16 rows 1.01 (0.90), 0.95, 0.98 (0.93); outputs bit for bit
// the same. Earlier scripts gave 2 to 4 rows 1.03-1.07 times the time in spans, and 17 to 32
// rows 1.00-1.09, where the compute outlasts the panel's read anyway.
//
// A bfloat16 panel in a batch of 1 to 4 rows (`fetch`; one tile) has its tile fetch ahead too
// (larger batches run spans or expand the panel, except row blocks of layers wider than 3,640
// input features, which fetch nothing, as before): over the same linears (`python -m
// kernels.cpu.bench --kernel linear --linear-dtype bfloat16 --against REV`, 21 rounds), 0.86 and
// 0.85 of the time at one row and 0.89 at 4, outputs bit for bit the same.
template <typename Lanes>
void panel_rows(const float* x, int64_t m0, int64_t m_end, int64_t K, int64_t N,
                const Lanes& panel, const float* scale, const float* bias, float* out,
                int64_t n0, int64_t valid, bool fetch, const float* next = nullptr,
                bool spans = false) {
  const int64_t tiles = (m_end - m0 + kPackedRows - 1) / kPackedRows;
  if constexpr (kFetchable<Lanes>) {
    if (spans && m_end - m0 >= kSpanMinRows) {
      span_panel(x, m0, m_end, K, N, panel, scale, bias, out, n0, valid);
      return;
    }
  }
  const int64_t every = tiles >= 4 ? 4 : 2;  // tiles that fetch the next panel, steps a line
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t rows = (m_end - m0) / (tiles - t);
    const float* xr = x + m0 * K;
    float* o = out + m0 * N + n0;
    if constexpr (std::is_same_v<Lanes, F32Lanes>) {
      if (next != nullptr && tiles > 1 && scale == nullptr && t < every) {
        // tile t fetches the next panel's lines [t * K / every, (t + 1) * K / every) (a line is
        // one step's 16 weights)
        const char* from = reinterpret_cast<const char*>(next + t * K / every * kPanelLanes);
        if (fetch && t == 0) {
          packed_rows_next<true>(every, rows, xr, K, panel, bias, o, N, valid, from);
        } else {
          packed_rows_next<false>(every, rows, xr, K, panel, bias, o, N, valid, from);
        }
        m0 += rows;
        continue;
      }
    }
    if constexpr (kFetchable<Lanes>) {
      // a bfloat16 tile fetches when alone (run_packed gives `fetch` for batches of 1 to 4 rows)
      if (fetch && t == 0 && (tiles > 1 || !std::is_same_v<Lanes, F32Lanes>)) {
        packed_rows<true>(rows, xr, K, panel, scale, bias, o, N, valid);
        m0 += rows;
        continue;
      }
    }
    packed_rows<false>(rows, xr, K, panel, scale, bias, o, N, valid);
    m0 += rows;
  }
}

// out [M, N] = x [M, K] through the packed panels lanes(p) of N channels (see the header). A
// bfloat16 or quantized panel that serves more than kExpandRows rows (three tiles or more; a
// bfloat16 one only past the batches of spans) is expanded to float32 once, into a buffer of the
// thread, and the tiles read that: over the 120
// decoder linears at 32 rows, converting in every tile took int8 72.7 and int4 89.4 ms, expanding
// once 64.4 and 65.8 (float32 weights 60.2); at 8 rows (two tiles) expanding was slower, 33.8
// against 22.3 ms for int8.
// The expanded weights are the ones the tiles would compute, so the sums do not change.
// A bfloat16 panel is expanded by the first tile of each row block as it computes (fetching the
// panel 2 KB ahead, widening_rows), where a loop of its own had the FMA units wait while it read
// and widened the panel: over the 120 decoder linears (`python -m kernels.cpu.bench --kernel
// linear --linear-dtype bfloat16 --batch M --against REV`, 15 rounds, the median of the rounds'
// ratios, two passes) 0.86-0.89 of the time at 17 rows, 0.91 at 24, 0.90 at 32, 0.93-0.96 at 64
// and 128, 0.95-0.98 at 256.
template <typename MakeLanes>
void run_packed(const float* x, int64_t M, int64_t K, int64_t N, const MakeLanes& lanes,
                const float* scale, const float* bias, float* out) {
  using Lanes = decltype(lanes(0));
  constexpr bool kConverted = !std::is_same_v<Lanes, F32Lanes>;  // not float32 as stored
  const int64_t P = (N + kPanelLanes - 1) / kPanelLanes;
  const int64_t block =
      std::max<int64_t>(kPackedRows, kPackedBlockBytes / (K * 4) / kPackedRows * kPackedRows);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), P));
  const int64_t chunk = std::max<int64_t>(1, P / (workers * kChunksPerThread));
  const int64_t chunks = (P + chunk - 1) / chunk;
  // batches measured faster in spans (their row blocks then hold at most kSpanMaxRows rows)
  const bool spans = kFetchable<Lanes> && M >= kSpanMinRows && M <= kSpanMaxRows;
  radixserve_tasks::for_each_task(
      chunks,
      [&] {
        // 8 floats more, for the 32-byte alignment of a bfloat16 tile's stores (widening_rows)
        const bool expands = kConverted && M > kExpandRows && !spans;
        return std::vector<float>(expands ? K * kPanelLanes + 8 : 0);
      },
      [&](int64_t c, std::vector<float>& buffer) {
        float* const expanded = reinterpret_cast<float*>(
            (reinterpret_cast<uintptr_t>(buffer.data()) + 31) & ~static_cast<uintptr_t>(31));
        const int64_t p0 = c * chunk, p1 = std::min(P, p0 + chunk);
        for (int64_t mb = 0; mb < M; mb += block) {
          const int64_t m_end = std::min(M, mb + block);
          for (int64_t p = p0; p < p1; ++p) {
            const int64_t n0 = p * kPanelLanes, valid = std::min<int64_t>(kPanelLanes, N - n0);
            const float* ps = scale != nullptr ? scale + n0 : nullptr;
            const float* pb = bias != nullptr ? bias + n0 : nullptr;
            const Lanes panel = lanes(p);
            if (kConverted && m_end - mb > kExpandRows && !spans) {
              int64_t m = mb;
              if constexpr (std::is_same_v<Lanes, Bf16Lanes>) {
                // bfloat16: the first tile widens the panel as it computes (see the header)
                const int64_t rows = (m_end - mb) / ((m_end - mb + kPackedRows - 1) / kPackedRows);
                widening_rows(rows, x + mb * K, K, panel, ps, pb, out + mb * N + n0, N, valid,
                              expanded);
                m += rows;
              } else {
                for (int64_t k = 0; k < K; k += Lanes::kStep) {
                  __m256 w[Lanes::kStep][2];
                  panel.load(k, w);
                  for (int step = 0; step < Lanes::kStep; ++step) {
                    _mm256_storeu_ps(expanded + (k + step) * kPanelLanes, w[step][0]);
                    _mm256_storeu_ps(expanded + (k + step) * kPanelLanes + 8, w[step][1]);
                  }
                }
              }
              panel_rows(x, m, m_end, K, N, F32Lanes{expanded}, ps, pb, out, n0, valid, false);
            } else {
              const float* next = nullptr;
              if constexpr (!kConverted) {
                if (p + 1 < P) next = lanes(p + 1).p;
              }
              // float32 panels fetch ahead at every batch size, bfloat16 ones for 1 to 4 rows
              const bool fetch = !kConverted || (kFetchable<Lanes> && M < kSpanMinRows);
              panel_rows(x, mb, m_end, K, N, panel, ps, pb, out, n0, valid, fetch, next, spans);
            }
          }
        }
      });
}

// x [M, K] f32, panels [ceil(N / 16), K * 16] f32 (packed, see the header), bias [N] f32 or
// None -> [M, N] f32.
torch::Tensor linear_f32_panels(torch::Tensor x, torch::Tensor panels, int64_t N,
                                c10::optional<torch::Tensor> bias) {
  const int64_t K = features_of(x), M = x.size(0);
  check_input(x, K, 1);
  check_panels(panels, at::kFloat, N, K * kPanelLanes);
  auto out = torch::empty({M, N}, x.options());
  const float* p = panels.data_ptr<float>();
  run_packed(
      x.data_ptr<float>(), M, K, N, [&](int64_t b) { return F32Lanes{p + b * K * kPanelLanes}; },
      nullptr, bias_ptr(bias, N), out.data_ptr<float>());
  return out;
}

// x [M, K] bf16, panels [ceil(N / 16), K * 16] bf16 (packed, see the header), bias [N] bf16 or
// None -> [M, N] bf16: x and the bias widened to float32, each output one float32 sum (plus the
// bias) rounded to bfloat16 once (products of bfloat16 values are exact in float32).
torch::Tensor linear_bf16_f32_panels(torch::Tensor x, torch::Tensor panels, int64_t N,
                                     c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 2 &&
                  x.is_contiguous(),
              "x must be a contiguous [M, K] bfloat16 CPU tensor");
  const int64_t M = x.size(0), K = x.size(1);
  check_panels(panels, at::kBFloat16, N, K * kPanelLanes);
  std::vector<float> bf;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == N && bias->is_contiguous(),
                "bias must be a contiguous bfloat16 tensor of ", N, " elements");
    const uint16_t* bp = reinterpret_cast<const uint16_t*>(bias->data_ptr<at::BFloat16>());
    bf.resize(N);
    for (int64_t n = 0; n < N; ++n) bf[n] = widen(bp[n]);
  }
  const uint16_t* p = reinterpret_cast<const uint16_t*>(panels.data_ptr<at::BFloat16>());
  const float* b = bf.empty() ? nullptr : bf.data();
  return in_float32(x, N, [&](const float* xf, float* out) {
    run_packed(
        xf, M, K, N, [&](int64_t i) { return Bf16Lanes{p + i * K * kPanelLanes}; }, nullptr, b,
        out);
  });
}

// x [M, K] f32 or bf16, panels [ceil(N / 16), K * 16] int8 (packed q), scale [N] f32, bias [N]
// f32 or None -> [M, N] in x's dtype; y = (sum_k x q) * scale (+ bias) in float32 (see
// in_float32).
torch::Tensor linear_int8_f32_panels(torch::Tensor x, torch::Tensor panels, torch::Tensor scale,
                                     c10::optional<torch::Tensor> bias) {
  const int64_t K = features_of(x), M = x.size(0), N = scale.numel();
  check_input(x, K, 1, true);
  check_panels(panels, at::kChar, N, K * kPanelLanes);
  const float* s = f32_ptr(scale, N, "scale");
  const float* b = bias_ptr(bias, N);
  const int8_t* p = panels.data_ptr<int8_t>();
  return in_float32(x, N, [&](const float* xf, float* out) {
    run_packed(
        xf, M, K, N, [&](int64_t i) { return Int8Lanes{p + i * K * kPanelLanes}; }, s, b, out);
  });
}

// x [M, K] f32 or bf16, q int4 panels [ceil(N / 16), K * 8] uint8, scale and zero panels
// [ceil(N / 16), K / group * 16] f32 (W = q * scale + zero), bias [N] f32 or None -> [M, N] in
// x's dtype (see in_float32).
torch::Tensor linear_int4_f32_panels(torch::Tensor x, torch::Tensor q, torch::Tensor scale,
                                     torch::Tensor zero, int64_t group, int64_t N,
                                     c10::optional<torch::Tensor> bias) {
  const int64_t K = features_of(x), M = x.size(0);
  check_input(x, K, 1, true);
  TORCH_CHECK(group >= 2 && (group & (group - 1)) == 0,
              "the group size must be a power of 2, at least 2");
  TORCH_CHECK(K % group == 0, "K = ", K, " must be a multiple of the group size ", group);
  check_panels(q, at::kByte, N, K * kPanelLanes / 2);
  check_panels(scale, at::kFloat, N, K / group * kPanelLanes, "scale");
  check_panels(zero, at::kFloat, N, K / group * kPanelLanes, "zero");
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  const float* b = bias_ptr(bias, N);
  const int64_t gw = K / group * kPanelLanes;
  const int shift = __builtin_ctzll(group);
  return in_float32(x, N, [&](const float* xf, float* out) {
    run_packed(
        xf, M, K, N,
        [&](int64_t i) {
          return Int4Lanes{qp + i * K * kPanelLanes / 2, sp + i * gw, zp + i * gw, shift};
        },
        nullptr, b, out);
  });
}

// Checks q is a contiguous tensor [ceil(N / 4), K / 32, 4, bytes] of `type` (int8 or int4 blocks
// of N output channels, see the header).
void check_blocks(const torch::Tensor& q, at::ScalarType type, int64_t N, int64_t K,
                  int64_t bytes) {
  TORCH_CHECK(q.scalar_type() == type && q.is_contiguous() && q.dim() == 4 &&
                  q.size(0) == (N + 3) / 4 && q.size(1) == K / 32 && q.size(2) == 4 &&
                  q.size(3) == bytes,
              "q must be contiguous blocks [", (N + 3) / 4, ", ", K / 32, ", 4, ", bytes, "] of ",
              N, " channels x ", K, " features");
}

// (scale, zero) of int4 blocks: each a contiguous float32 [ceil(N / 4), K / group, 4].
Int4Weights int4_weights(const torch::Tensor& q, const torch::Tensor& scale,
                         const torch::Tensor& zero, int64_t group, int64_t N, int64_t K) {
  TORCH_CHECK(group >= 32 && (group & (group - 1)) == 0,
              "the group size must be a power of 2, at least 32");
  TORCH_CHECK(K % group == 0, "K = ", K, " must be a multiple of the group size ", group);
  check_blocks(q, at::kByte, N, K, 16);
  const int64_t groups = K / group, padded = (N + 3) / 4 * 4;
  return Int4Weights{q.data_ptr<uint8_t>(), f32_ptr(scale, padded * groups, "scale"),
                     f32_ptr(zero, padded * groups, "zero"), K, groups, __builtin_ctzll(group)};
}

// x [M, K] f32 or bf16, q int8 blocks [ceil(N / 4), K / 32, 4, 32], scale [N] f32, bias [N] f32
// or None -> [M, N] in x's dtype; y = (sum_k x q) * scale (+ bias) in float32 (see in_float32).
torch::Tensor linear_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale,
                          c10::optional<torch::Tensor> bias) {
  const int64_t K = features_of(x), M = x.size(0), N = scale.numel();
  check_input(x, K, 32, true);
  check_blocks(q, at::kChar, N, K, 32);
  const float* s = f32_ptr(scale, N, "scale");
  const float* b = bias_ptr(bias, N);
  const Int8Weights weights{q.data_ptr<int8_t>(), K};
  return in_float32(x, N, [&](const float* xf, float* o) {
    run_quantized(xf, M, K, N, weights, [&](int64_t m, int64_t n, float v) {
      const float y = v * s[n];
      o[m * N + n] = b ? y + b[n] : y;
    });
  });
}

// x [M, K] f32 or bf16, q int4 blocks [ceil(N / 4), K / 32, 4, 16] uint8 (see the header),
// scale and zero [ceil(N / 4), K / group, 4] f32, bias [N] f32 or None -> [M, N] in x's dtype
// (see in_float32).
torch::Tensor linear_int4(torch::Tensor x, torch::Tensor q, torch::Tensor scale,
                          torch::Tensor zero, int64_t group, int64_t N,
                          c10::optional<torch::Tensor> bias) {
  const int64_t K = features_of(x), M = x.size(0);
  check_input(x, K, 32, true);
  const Int4Weights weights = int4_weights(q, scale, zero, group, N, K);
  const float* b = bias_ptr(bias, N);
  return in_float32(x, N, [&](const float* xf, float* o) {
    run_quantized(xf, M, K, N, weights,
                  [&](int64_t m, int64_t n, float v) { o[m * N + n] = b ? v + b[n] : v; });
  });
}

// int4 blocks of N channels x K features (as linear_int4 takes them) -> W [N, K] f32, each
// weight expanded as in linear_int4 (bit for bit the weight that kernel multiplies by).
torch::Tensor dequantize_int4(torch::Tensor q, torch::Tensor scale, torch::Tensor zero,
                              int64_t group, int64_t N) {
  TORCH_CHECK(q.dim() == 4, "q must be int4 blocks [ceil(N / 4), K / 32, 4, 16]");
  const int64_t K = q.size(1) * 32;
  const Int4Weights weights = int4_weights(q, scale, zero, group, N, K);
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
  m.def("linear_f32_panels", &linear_f32_panels, "x [M, K] f32 @ panels^T (+ bias) -> [M, N]");
  m.def("linear_bf16_f32_panels", &linear_bf16_f32_panels,
        "x [M, K] bf16 @ bf16 panels^T (+ bias), float32 sums -> [M, N] bf16");
  m.def("linear_int8_f32_panels", &linear_int8_f32_panels,
        "x [M, K] f32/bf16 @ (int8 panels * scale [N])^T (+ bias) -> [M, N] in x's dtype");
  m.def("linear_int4_f32_panels", &linear_int4_f32_panels,
        "x [M, K] f32/bf16 @ (int4 panels * scale + zero)^T (+ bias) -> [M, N] in x's dtype");
  m.def("linear_int8", &linear_int8,
        "x [M, K] f32/bf16 @ (q int8 blocks * scale [N])^T (+ bias) -> [M, N] in x's dtype");
  m.def("linear_int4", &linear_int4,
        "x [M, K] f32/bf16 @ (q int4 blocks * scale + zero)^T (+ bias) -> [M, N] in x's dtype");
  m.def("dequantize_int4", &dequantize_int4, "int4 blocks -> q * scale + zero, [N, K] f32");
}
