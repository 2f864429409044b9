// Small-batch linear layers for the CPU, y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), with W
// stored as bfloat16 or as int8 with one scale per output channel (in panels, below), or as int4
// with a scale and a zero per 32 input features (below, "int4"); x is bfloat16.
//
// At decode batch sizes (a few rows) a linear layer reads every weight once per step, so its time
// is the weight bytes over memory bandwidth plus a fixed cost per call. Here oneDNN's bfloat16 GEMM
// pays 20-30 us per call on top of that and torch's int8 kernel reads at about 10 GB/s; these
// kernels stream the weights, fetched ahead into L2, straight into AVX-512 BF16 dot products
// (vdpbf16ps: 32 bfloat16 products per instruction, summed in pairs into 16 float32 lanes).
// Fetching into L2 rather than L1 leaves L1's few outstanding misses to the loads: on a 2-core
// AMD EPYC (no AMX) the 120 decoder layers of SmolLM2-135M at one row took 10 against 15 ms that
// way (a kernel over the row-major weight, which the panels below have since replaced).
// The int4 kernel reads the weight rows (blocks of 4 output channels spread over the threads,
// rows of x 4 at a time through each block while its weights are in L1); its sums are float32 in
// a fixed order (k ascending within each of 16 lanes, the lanes then added as a tree), the same
// for every row whatever the batch size up to 4 rows, and from 5; the result is rounded to
// bfloat16 once. K must be a multiple of 32 (int4: 64); the Python side (kernels/cpu/linear.py,
// and the layers' construction for int4) checks and falls back to PyTorch otherwise.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = at::BFloat16;
constexpr int kRowsPerTile = 4;    // rows of x computed together
constexpr int kChannels = 4;       // output channels per block
constexpr int64_t kGrain = 16;     // blocks per thread task at least
constexpr int64_t kPrefetchChannels = 8;  // weights fetched ahead, in output channels
constexpr int64_t kInt4DirectRows = 4;    // int4: rows computed from the nibbles; more: expanded

inline float bf16_to_float(bf16 v) { return static_cast<float>(v); }

// 32 int8 values at p converted to bfloat16 (exact: |q| <= 128 fits bfloat16's 8-bit
// significand). Such an integer converts to a float32 whose low 16 bits are zero, so its bfloat16
// is the high half, which one word permute gathers from both float32 vectors: about half the time
// per weight of widening to 16 bits first and rounding with vcvtne2ps2bf16 (30 against 58 ps on
// one core of the EPYC described above).
inline __m512i int8_to_bf16x32(const int8_t* p) {
  const __m512 lo = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  const __m512 hi = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
  const __m512i high_words =
      _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                       27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  return _mm512_permutex2var_epi16(_mm512_castps_si512(lo), high_words, _mm512_castps_si512(hi));
}

// A block of int4 channels n0 .. n0 + C - 1 already converted to bfloat16 (by
// `expand_int4_block`), so that a batch's row tiles share one conversion instead
// of each repeating it; prefetches still go to the source's rows ahead.
template <typename Source>
struct ConvertedBlock {
  const bf16* w;  // [C, K]
  int64_t n0, K;
  const Source& source;
  inline __m512i load(int64_t n, int64_t k) const {
    return _mm512_loadu_si512(w + (n - n0) * K + k);
  }
  inline void prefetch(int64_t n, int64_t k) const { source.prefetch(n, k); }
};

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

// Runs the tiles over all rows and channels; finish(m, n, sum) stores the output value.
template <typename W, typename Finish>
void run(const bf16* x, int64_t M, int64_t K, int64_t N, const W& weights, const Finish& finish) {
  const int64_t blocks = (N + kChannels - 1) / kChannels;
  at::parallel_for(0, blocks, kGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kChannels;
      run_block(x, M, K, weights, n0, std::min<int64_t>(kChannels, N - n0), finish);
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

// ---- Panels: bfloat16 weights packed for the vector lanes to be output channels ----------------
//
// A kernel over the row-major weight puts 32 input features in a vector and sums each (row,
// channel) pair's lanes at the end; at 16 rows and more that horizontal sum, the finish per value
// and 4 x 4 tiles made it compute-bound well below the machine's dot-product rate (see the int4
// kernel, which still reads rows). Here the weight is packed once, at load
// time, as panels[b][k / 2][c][2] = W[16 b + c][k] (pairs of input features of 16 output channels,
// the operand layout of vdpbf16ps), and a tile of up to kPanelRows rows x kPanelBlocks blocks of
// 16 channels keeps its 24 float32 sums in registers (with 3 weight vectors and a broadcast, 28
// of the 32): each step loads one 64-byte pair vector per block and broadcasts one (x[2i],
// x[2i + 1]) pair per row, so every load feeds several dot products and no sum is reduced across
// lanes. Output (m, n) is the float32 sum over pairs of features in ascending order, in lane
// n % 16 of one accumulator, whatever the rows, tiles or threads; it is rounded to bfloat16 once
// (round to nearest even, as static_cast does).
// Measured on a 2-core AMD EPYC (AVX-512 BF16, no AMX) over 120 layers of the shapes of
// SmolLM2-135M's decoder linears (random distinct weights, read from memory): 8.3-8.8 against
// 9.5-12.5 ms (the row-major kernel) and 10.1-11.8 ms (oneDNN, packed) at 16 rows; 13.9-15.5
// against 17.8-22.6 and 14.4-17.2 ms at 32; 21.2 against 37.0 and 26.5 ms at 64; oneDNN ahead
// at 128 (42.2 against 47.5 ms; with the fetch ahead below, the panels then led up to 256, see
// services/executor/packed_linear.py). One layer whose weights stay in cache ran at 820-870
// GFLOP/s from 16 rows (oneDNN 680-710) on that host;
// on a host of about half its dot-product rate (bf16_dot_peak below: 463 GFLOP/s on a 2-vCPU
// EPYC of family 25, model 17) the model's linears run at about 85% of the peak from 64 rows
// (docs/benchmarks.md).
// Every tile, a lone one too, also fetches its share of the next panel into L2
// (Bf16PanelFetchingAhead): from two tiles on, the later ones computed from L2 while the memory
// idled, and the next panel's first tile then waited on it. Over the same
// 120 layers on a day that EPYC ran at half its usual rate, medians of three runs alternating
// with the code before: 16 rows 10.5 against 12.6 ms, 32 rows 18.1 against 20.3, 64 rows 34.6
// against 37.2; a fetch distance of two or three panels, or into L1, was slower.
// int8 weights (one scale per channel) are packed the same way, a byte each, and converted to
// bfloat16 (exact) by the first row tile as it computes, into a scratch the later tiles read;
// meanwhile the next panel is fetched into L2. Converting in a pass of its own before the tiles
// left the memory idle while the tiles computed and the cores idle while it converted: over the
// 120 decoder linears and the 49,152 x 576 LM head on a day that EPYC ran at half its usual rate,
// 27.7 against 24.2 ms for bfloat16 at 32 rows; converting in the first tile and fetching ahead,
// 22.6-23.2 against 24.5-24.8 ms (8 rows: 8.2 against 11.1; 16: 12.7-12.9 against 15.0-15.3).
// With one tile (then up to 6 rows) nothing is stored. That layout then led the rows one at every
// row count (one row: 4.1 against 4.2 ms, 3: 4.6 against 5.4, 6: 5.4 against 10.8) and the float
// GEMM over the converted weight up to 512 rows at least (64: 42.6 against 64; 512: 341 against
// 380 ms), so int8 layers keep only this copy.
// On CPUs with AMX, bfloat16 panels run on the tiles instead (linear_amx.cpp, same layout).
// Tiles of 8 rows x 3 blocks replaced 6 x 4: 8 rows in one tile read each panel once, and
// SmolLM2-135M's layers give each thread 18, 30 or 96 blocks, whole panels of 3, where panels of
// 4 left one of 2 in two of the three. The 120 decoder linears of its shapes (random distinct
// weights, from memory; nine alternating rounds, medians, a 2-vCPU EPYC of family 25, model 17)
// at 1, 8, 12, 16 and 32 rows: 6.75 against 6.89, 7.22 against 7.60, 7.85 against 8.23, 9.54
// against 10.08 and 16.95 against 17.42 ms; a second run 7.13 against 7.12 ms at one row, 7.02
// against 7.38 at 8, 9.66 against 10.12 at 16, 17.87 against 18.67 at 32 and 33.65 against 34.39
// at 64; int8 weights at 1, 8, 16 and 32 rows: 3.69 against 4.04, 5.30 against 7.16 (one tile
// now, no converted copy), 9.70 against 10.51 and 18.11 against 19.04 ms. Tiles of 12 x 2 led at
// 8 and 12 rows only.
constexpr int kPanelRows = 8;    // rows per tile
constexpr int kPanelBlocks = 3;  // blocks of 16 output channels per tile
constexpr int64_t kLanes = 16;

// w [N, K] bf16 or int8 (K even) -> [ceil(N / 16), K * 16] of its dtype, channels past N zero.
torch::Tensor pack_panels(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kChar),
              "w must be an [N, K] bfloat16 or int8 tensor");
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + kLanes - 1) / kLanes;
  TORCH_CHECK(K % 2 == 0, "K = ", K, " must be even");
  auto padded = torch::zeros({blocks * kLanes, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({blocks, kLanes, K / 2, 2}).permute({0, 2, 1, 3}).contiguous().view(
      {blocks, K * kLanes});
}

// A panel of bfloat16 weights: load(o) gives the 32 values at element o (block j's pair i is at
// o = j * K * 16 + i * 32).
struct Bf16Panel {
  static constexpr bool kFetchesAhead = false;
  const bf16* w;
  inline __m512i load(int64_t o) const { return _mm512_loadu_si512(w + o); }
};

// A bfloat16 panel read from memory by row tile `tile` of `tiles`, which meanwhile fetches into
// L2 its share of the panel `ahead` elements on: pair steps tile, tile + tiles, ... of each block
// (panel_tile issues them), so that the fetches of the next panel are spread over all the tiles
// of this one. Without them the memory idled while the later tiles computed from L2, and the
// first tile of the next panel waited on it.
struct Bf16PanelFetchingAhead {
  static constexpr bool kFetchesAhead = true;
  const bf16* w;
  int64_t ahead, tile, tiles;
  inline __m512i load(int64_t o) const { return _mm512_loadu_si512(w + o); }
};

// A panel of int8 weights (pack_panels' layout) converted to bfloat16 as it is read, each value
// also stored into `dst` (unless null) at the same place for the row tiles after this one; the
// panel `ahead` elements on is fetched into L2 meanwhile, so that it streams in while this one
// computes (past the last panel too: a prefetch does not fault).
struct Int8PanelConverting {
  static constexpr bool kFetchesAhead = false;  // load() fetches ahead itself
  const int8_t* q;
  bf16* dst;
  int64_t ahead;
  inline __m512i load(int64_t o) const {
    if (o % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(q + o + ahead), _MM_HINT_T1);
    const __m512i v = int8_to_bf16x32(q + o);
    if (dst != nullptr) _mm512_storeu_si512(dst + o, v);
    return v;
  }
};

// Rows [0, MT) of x (row stride K) against blocks [0, NT) of `panel` (block stride K * 16);
// writes out[m * N + n0 + ...], the first `last_lanes` channels of the last block only.
// With `scale` (int8 weights), the sums are multiplied by scale[n] before the bias is added.
template <int MT, int NT, typename Panel>
inline void panel_tile(const bf16* x, int64_t K, const Panel& panel, const bf16* scale,
                       const bf16* bias, bf16* out, int64_t N, int64_t n0, int64_t last_lanes) {
  const int64_t pairs = K / 2, block_stride = K * kLanes;
  const int32_t* xp = reinterpret_cast<const int32_t*>(x);
  __m512 acc[MT][NT];
  for (int m = 0; m < MT; ++m)
    for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_setzero_ps();
  [[maybe_unused]] int64_t next_fetch = 0;
  if constexpr (Panel::kFetchesAhead) next_fetch = panel.tile;
  for (int64_t i = 0; i < pairs; ++i) {
    if constexpr (Panel::kFetchesAhead) {
      if (i == next_fetch) {
        const bf16* ahead = panel.w + panel.ahead + i * 2 * kLanes;
        for (int j = 0; j < NT; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(ahead + j * block_stride), _MM_HINT_T1);
        next_fetch += panel.tiles;
      }
    }
    __m512bh w[NT];
    for (int j = 0; j < NT; ++j) w[j] = (__m512bh)panel.load(j * block_stride + i * 2 * kLanes);
    for (int m = 0; m < MT; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[m * pairs + i]);
      for (int j = 0; j < NT; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv, w[j]);
    }
  }
  for (int j = 0; j < NT; ++j) {
    const __mmask16 mask = j == NT - 1 ? (__mmask16)((1u << last_lanes) - 1) : (__mmask16)0xFFFF;
    const __m512 b = bias == nullptr
                         ? _mm512_setzero_ps()
                         : _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(
                               mask, bias + n0 + j * kLanes));
    const __m512 s = scale == nullptr
                         ? _mm512_set1_ps(1.f)
                         : _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(
                               mask, scale + n0 + j * kLanes));
    for (int m = 0; m < MT; ++m) {
      const __m512 v = scale == nullptr ? acc[m][j] : _mm512_mul_ps(acc[m][j], s);
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(v, b));
      _mm256_mask_storeu_epi16(out + m * N + n0 + j * kLanes, mask, (__m256i)y);
    }
  }
}

template <int NT, typename Panel>
inline void panel_rows(int64_t rows, const bf16* x, int64_t K, const Panel& panel,
                       const bf16* scale, const bf16* bias, bf16* out, int64_t N, int64_t n0,
                       int64_t last_lanes) {
  switch (rows) {
    case 8: panel_tile<8, NT>(x, K, panel, scale, bias, out, N, n0, last_lanes); break;
    case 7: panel_tile<7, NT>(x, K, panel, scale, bias, out, N, n0, last_lanes); break;
    case 6: panel_tile<6, NT>(x, K, panel, scale, bias, out, N, n0, last_lanes); break;
    case 5: panel_tile<5, NT>(x, K, panel, scale, bias, out, N, n0, last_lanes); break;
    case 4: panel_tile<4, NT>(x, K, panel, scale, bias, out, N, n0, last_lanes); break;
    case 3: panel_tile<3, NT>(x, K, panel, scale, bias, out, N, n0, last_lanes); break;
    case 2: panel_tile<2, NT>(x, K, panel, scale, bias, out, N, n0, last_lanes); break;
    default: panel_tile<1, NT>(x, K, panel, scale, bias, out, N, n0, last_lanes); break;
  }
}

template <typename Panel>
inline void panel_blocks(int64_t nb, int64_t rows, const bf16* x, int64_t K, const Panel& panel,
                         const bf16* scale, const bf16* bias, bf16* out, int64_t N, int64_t n0,
                         int64_t last_lanes) {
  switch (nb) {
    case 3: panel_rows<3>(rows, x, K, panel, scale, bias, out, N, n0, last_lanes); break;
    case 2: panel_rows<2>(rows, x, K, panel, scale, bias, out, N, n0, last_lanes); break;
    default: panel_rows<1>(rows, x, K, panel, scale, bias, out, N, n0, last_lanes); break;
  }
}

// Runs the tiles of x [M, K] over blocks of 16 channels, each thread an equal run of blocks,
// kPanelBlocks at a time, the rows in tiles of at most kPanelRows (as even as they go: 20 rows
// are 6 + 7 + 7). panels.first(p, nb, tiles) gives the panel of blocks p .. p + nb - 1 (block
// stride K * 16) for the first of `tiles` row tiles (an int8 panel keeps its converted copy
// when others follow), and panels.rest(p, nb, tile, tiles) for the others; both are called on
// the thread that runs the tiles, first before rest.
template <typename Panels>
void run_panels(const bf16* x, int64_t M, int64_t K, int64_t N, int64_t blocks, const bf16* scale,
                const bf16* bias, bf16* out, const Panels& panels) {
  const int64_t tiles = (M + kPanelRows - 1) / kPanelRows;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), blocks);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = blocks * t / threads, b1 = blocks * (t + 1) / threads;
      for (int64_t p = b0; p < b1; p += kPanelBlocks) {
        const int64_t nb = std::min<int64_t>(kPanelBlocks, b1 - p);
        const int64_t n0 = p * kLanes;
        const int64_t last_lanes = std::min<int64_t>(kLanes, N - (p + nb - 1) * kLanes);
        for (int64_t tile = 0, m0 = 0; tile < tiles; ++tile) {
          const int64_t m1 = M * (tile + 1) / tiles, rows = m1 - m0;
          const bf16* xm = x + m0 * K;
          bf16* om = out + m0 * N;
          if (tile == 0) {
            panel_blocks(nb, rows, xm, K, panels.first(p, nb, tiles), scale, bias, om, N, n0,
                         last_lanes);
          } else {
            panel_blocks(nb, rows, xm, K, panels.rest(p, nb, tile, tiles), scale, bias, om, N,
                         n0, last_lanes);
          }
          m0 = m1;
        }
      }
    }
  });
}

// bfloat16 panels, read as they are by every row tile.
struct Bf16Panels {
  const bf16* w;
  int64_t K;
  inline Bf16PanelFetchingAhead first(int64_t p, int64_t nb, int64_t tiles) const {
    return rest(p, nb, 0, tiles);
  }
  inline Bf16PanelFetchingAhead rest(int64_t p, int64_t nb, int64_t tile, int64_t tiles) const {
    return {w + p * K * kLanes, nb * K * kLanes, tile, tiles};
  }
};

// int8 panels: the first row tile converts a panel to bfloat16 (exact) into the thread's scratch
// as it computes, and the other tiles read that.
struct Int8Panels {
  const int8_t* q;
  int64_t K;
  static bf16* scratch(int64_t K) {
    thread_local std::vector<bf16> converted;
    converted.resize(kPanelBlocks * K * kLanes);
    return converted.data();
  }
  inline Int8PanelConverting first(int64_t p, int64_t nb, int64_t tiles) const {
    return {q + p * K * kLanes, tiles > 1 ? scratch(K) : nullptr, nb * K * kLanes};
  }
  inline Bf16Panel rest(int64_t, int64_t, int64_t, int64_t) const { return {scratch(K)}; }
};

int64_t check_panels(const torch::Tensor& panels, at::ScalarType dtype, int64_t N) {
  TORCH_CHECK(panels.dim() == 2 && panels.scalar_type() == dtype && panels.is_contiguous(),
              "panels must be a contiguous [blocks, K * 16] ", dtype, " tensor (pack_panels)");
  TORCH_CHECK(N > 0 && (N + kLanes - 1) / kLanes == panels.size(0), "N = ", N, " does not fit ",
              panels.size(0), " blocks of 16 channels");
  return panels.size(1) / kLanes;
}

// x [M, K] bf16 @ W^T (+ bias [N] bf16) with W as pack_panels packed it -> [M, N] bf16.
torch::Tensor linear_bf16_panels(torch::Tensor x, torch::Tensor panels, int64_t N,
                                 c10::optional<torch::Tensor> bias) {
  const int64_t K = check_panels(panels, at::kBFloat16, N), M = x.size(0);
  check_input(x, K, 2);
  auto out = torch::empty({M, N}, x.options());
  run_panels(x.data_ptr<bf16>(), M, K, N, panels.size(0), nullptr, bias_ptr(bias, N),
             out.data_ptr<bf16>(), Bf16Panels{panels.data_ptr<bf16>(), K});
  return out;
}

// x [M, K] bf16 @ (q [N, K] int8 as pack_panels packed it * scale [N])^T (+ bias [N]) -> [M, N]
// bf16: y = (sum_k x q) * scale (+ bias), rounded once. Each panel is converted to bfloat16
// (exact) once, by its first row tile (Int8Panels).
torch::Tensor linear_int8_panels(torch::Tensor x, torch::Tensor panels, torch::Tensor scale,
                                 int64_t N, c10::optional<torch::Tensor> bias) {
  const int64_t K = check_panels(panels, at::kChar, N), M = x.size(0);
  check_input(x, K, 32);
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.numel() == N && scale.is_contiguous(),
              "scale must be a contiguous [N] bfloat16 tensor");
  auto out = torch::empty({M, N}, x.options());
  run_panels(x.data_ptr<bf16>(), M, K, N, panels.size(0), scale.data_ptr<bf16>(),
             bias_ptr(bias, N), out.data_ptr<bf16>(), Int8Panels{panels.data_ptr<int8_t>(), K});
  return out;
}

// panels [B, K * 16] int8 as pack_panels packed them (B blocks, possibly a slice of a layer's)
// -> W [n, K] bf16, the first n channels of those blocks, exact; for the float GEMM of many rows.
// Each value's bfloat16 is the high half of its float32 (an integer of at most 8 significant
// bits); the blocks are spread over the threads.
torch::Tensor int8_panels_to_bf16(torch::Tensor panels, int64_t n) {
  TORCH_CHECK(panels.dim() == 2 && panels.scalar_type() == at::kChar && panels.is_contiguous() &&
                  panels.size(1) % (2 * kLanes) == 0,
              "panels must be a contiguous [blocks, K * 16] int8 tensor (pack_panels)");
  const int64_t blocks = panels.size(0), K = panels.size(1) / kLanes;
  TORCH_CHECK(n >= 0 && n <= blocks * kLanes, "n = ", n, " channels do not fit ", blocks,
              " blocks of 16");
  auto out = torch::empty({n, K}, panels.options().dtype(at::kBFloat16));
  const int8_t* q = panels.data_ptr<int8_t>();
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<bf16>());
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t c = 0; c < kLanes && b * kLanes + c < n; ++c) {
        const int8_t* src = q + b * K * kLanes + 2 * c;  // pair i of channel c at src + 32 i
        uint16_t* dst = o + (b * kLanes + c) * K;
        for (int64_t k = 0; k < K; ++k) {
          const float v = static_cast<float>(src[(k / 2) * 2 * kLanes + k % 2]);
          uint32_t bits;
          std::memcpy(&bits, &v, sizeof bits);
          dst[k] = static_cast<uint16_t>(bits >> 16);
        }
      }
    }
  });
  return out;
}

// ---- int4: pairs of 32-feature chunks, a scale and a zero per chunk ----------------------------
//
// W[n, k] = (q[n, k] - 8) * scale[n, k / 32] + zero[n, k / 32], q in [0, 15] (torch's int4
// convention; GGUF's Q4_0 / Q4_1 blocks are the same with 32 features a group). The nibbles are
// packed once, at load time (`pack_int4_pairs`): byte (n, 32 p + b) holds q[n, 64 p + b] in its low
// half and q[n, 64 p + 32 + b] in its high half, so one 32-byte load widened to 16-bit lanes
// (vpmovzxbw) gives both chunks of a pair, low nibbles as they are and high ones after a shift;
// one vpermw per chunk maps them through a table to bfloat16 q - 8 (exact, -8 .. 7), which the
// vdpbf16ps dot products take as they come. Each chunk's 16-lane float32 sum is multiplied by its
// scale into the accumulator; the zeros come last, as sum over chunks of zero * (sum of x over
// the chunk): y = sum_j scale_j sum_k x (q - 8) + sum_j zero_j sum_k x. The sum of x per chunk is
// computed once per call, in float32. Per output the order is fixed (chunks ascending, each
// chunk's lanes, then the lanes as a tree, then the zeros), the same for every row whatever the
// batch size up to kInt4DirectRows rows; from there W is expanded (below) and a row's sum runs in
// the bfloat16 kernel's order, again whatever the batch size. The packing reads 0.5 bytes a
// weight and 4 bytes of scale and zero per 32, as torch's int4 layout does in groups of 32.
struct Int4Pairs {
  const uint8_t* q;    // [N, K / 2]
  const bf16* scale;   // [N, K / 32]
  const bf16* zero;    // [N, K / 32]
  int64_t K;
  // the nibbles of features k .. k + 127, once per 64 bytes (k runs in steps of 32)
  inline void prefetch(int64_t n, int64_t k) const {
    if (k % 128 == 0)
      _mm_prefetch(reinterpret_cast<const char*>(q + n * (K / 2) + k / 2), _MM_HINT_T1);
  }
};

// bfloat16 (i & 15) - 8 at word i: vpermw reads the low 5 bits of each index, so the high
// nibble's lowest bit, still in a widened low nibble's lane, selects the same value.
inline __m512i int4_table() {
  alignas(64) static const uint16_t table[32] = {
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,
      0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
      0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};
  return _mm512_load_si512(table);
}

// out[m * C + c] = x[m] . W[n0 + c] in float32, for M rows and C channels; xsum [M, K / 32].
template <int M, int C>
inline void int4_tile(const bf16* x, const float* xsum, const Int4Pairs& w, int64_t n0,
                      const __m512i table, float* out) {
  const int64_t K = w.K, half = K / 2, chunks = K / 32;
  __m512 acc[M][C];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < C; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K / 64; ++p) {
    __m512i lo[C], hi[C];
    __m512 s0[C], s1[C];
    for (int c = 0; c < C; ++c) {
      const int64_t n = n0 + c;
      const __m512i b = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q + n * half + 32 * p)));
      lo[c] = _mm512_permutexvar_epi16(b, table);
      hi[c] = _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table);
      s0[c] = _mm512_set1_ps(bf16_to_float(w.scale[n * chunks + 2 * p]));
      s1[c] = _mm512_set1_ps(bf16_to_float(w.scale[n * chunks + 2 * p + 1]));
      _mm_prefetch(reinterpret_cast<const char*>(w.q + (n + kPrefetchChannels) * half + 32 * p),
                   _MM_HINT_T1);
    }
    for (int m = 0; m < M; ++m) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x + m * K + 64 * p);
      const __m512bh x1 = (__m512bh)_mm512_loadu_si512(x + m * K + 64 * p + 32);
      for (int c = 0; c < C; ++c) {
        const __m512 d0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), x0, (__m512bh)lo[c]);
        const __m512 d1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), x1, (__m512bh)hi[c]);
        acc[m][c] = _mm512_fmadd_ps(d1, s1[c], _mm512_fmadd_ps(d0, s0[c], acc[m][c]));
      }
    }
  }
  for (int c = 0; c < C; ++c) {
    const bf16* z = w.zero + (n0 + c) * chunks;
    for (int m = 0; m < M; ++m) {
      __m512 zs = _mm512_setzero_ps();
      for (int64_t j = 0; j < chunks; j += 16) {
        const __mmask16 mask = chunks - j >= 16 ? (__mmask16)0xFFFF
                                                : (__mmask16)((1u << (chunks - j)) - 1);
        const __m512 zv = _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(mask, z + j));
        zs = _mm512_fmadd_ps(zv, _mm512_maskz_loadu_ps(mask, xsum + m * chunks + j), zs);
      }
      out[m * C + c] = _mm512_reduce_add_ps(acc[m][c]) + _mm512_reduce_add_ps(zs);
    }
  }
}

template <int C>
inline void int4_rows(int64_t rows, const bf16* x, const float* xsum, const Int4Pairs& w,
                      int64_t n0, const __m512i table, float* out) {
  switch (rows) {
    case 4: int4_tile<4, C>(x, xsum, w, n0, table, out); break;
    case 3: int4_tile<3, C>(x, xsum, w, n0, table, out); break;
    case 2: int4_tile<2, C>(x, xsum, w, n0, table, out); break;
    default: int4_tile<1, C>(x, xsum, w, n0, table, out); break;
  }
}

// Channels n0 .. n0 + channels - 1 of W expanded once and rounded to bfloat16,
// dst[c * K + k] = bf16((q - 8) * scale + zero), for batches past kInt4DirectRows rows: their
// row tiles then share one expansion and run one dot product per 32 weights and row.
inline void expand_int4_block(const Int4Pairs& w, int64_t n0, int64_t channels,
                              const __m512i table, bf16* dst) {
  const int64_t K = w.K, half = K / 2, chunks = K / 32;
  for (int64_t c = 0; c < channels; ++c) {
    const int64_t n = n0 + c;
    for (int64_t p = 0; p < K / 64; ++p) {
      const __m512i b = _mm512_cvtepu8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.q + n * half + 32 * p)));
      const __m512i halves[2] = {_mm512_permutexvar_epi16(b, table),
                                 _mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), table)};
      for (int h = 0; h < 2; ++h) {
        const int64_t j = 2 * p + h;
        const __m512 s = _mm512_set1_ps(bf16_to_float(w.scale[n * chunks + j]));
        const __m512 z = _mm512_set1_ps(bf16_to_float(w.zero[n * chunks + j]));
        const __m512 a = _mm512_fmadd_ps(
            _mm512_cvtpbh_ps((__m256bh)_mm512_castsi512_si256(halves[h])), s, z);
        const __m512 e = _mm512_fmadd_ps(
            _mm512_cvtpbh_ps((__m256bh)_mm512_extracti64x4_epi64(halves[h], 1)), s, z);
        _mm512_storeu_si512(dst + c * K + 32 * j, (__m512i)_mm512_cvtne2ps_pbh(e, a));
      }
    }
  }
}

// The packed weight q [N, K / 2] uint8 (pack_int4_pairs), scale and zero [N, K / 32] bf16, checked
// (K a multiple of 64).
Int4Pairs int4_pairs(const torch::Tensor& q, const torch::Tensor& scale,
                     const torch::Tensor& zero) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kByte && q.is_contiguous(),
              "q must be a contiguous [N, K / 2] uint8 tensor");
  const int64_t N = q.size(0), K = 2 * q.size(1);
  TORCH_CHECK(K % 64 == 0, "K = ", K, " must be a multiple of 64");
  for (const auto* t : {&scale, &zero})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == N && t->size(1) == K / 32,
                "scale and zero must be contiguous [N, K / 32] bfloat16 tensors");
  return {q.data_ptr<uint8_t>(), scale.data_ptr<bf16>(), zero.data_ptr<bf16>(), K};
}

// x [M, K] bf16, the packed weight (int4_pairs), bias [N] bf16 or None -> [M, N] bf16.
torch::Tensor linear_int4(torch::Tensor x, torch::Tensor q, torch::Tensor scale,
                          torch::Tensor zero, c10::optional<torch::Tensor> bias) {
  const Int4Pairs w = int4_pairs(q, scale, zero);
  const int64_t M = x.size(0), K = w.K, N = q.size(0), chunks = K / 32;
  check_input(x, K, 64);
  const bf16* xp = x.data_ptr<bf16>();
  std::vector<float> xsum(M * chunks);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < chunks; ++j) {
      const __m512 v = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(xp + m * K + 32 * j)));
      const __m512 u = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256(
          reinterpret_cast<const __m256i*>(xp + m * K + 32 * j + 16)));
      xsum[m * chunks + j] = _mm512_reduce_add_ps(_mm512_add_ps(v, u));
    }
  auto out = torch::empty({M, N}, x.options());
  bf16* o = out.data_ptr<bf16>();
  const bf16* b = bias_ptr(bias, N);
  auto store = [&](int64_t m, int64_t n, float v) {
    o[m * N + n] = static_cast<bf16>(b ? v + bf16_to_float(b[n]) : v);
  };
  const int64_t blocks = (N + kChannels - 1) / kChannels;
  at::parallel_for(0, blocks, kGrain, [&](int64_t b0, int64_t b1) {
    const __m512i table = int4_table();
    float sums[kRowsPerTile * kChannels];
    std::vector<bf16> expanded;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t n0 = blk * kChannels, channels = std::min<int64_t>(kChannels, N - n0);
      if (M > kInt4DirectRows) {
        expanded.resize(kChannels * K);
        expand_int4_block(w, n0, channels, table, expanded.data());
        const ConvertedBlock<Int4Pairs> block{expanded.data(), n0, K, w};
        run_block(xp, M, K, block, n0, channels, store);
        continue;
      }
      for (int64_t m0 = 0; m0 < M; m0 += kRowsPerTile) {
        const int64_t rows = std::min<int64_t>(kRowsPerTile, M - m0);
        const float* xs = xsum.data() + m0 * chunks;
        if (channels == kChannels) {
          int4_rows<kChannels>(rows, xp + m0 * K, xs, w, n0, table, sums);
          for (int64_t m = 0; m < rows; ++m)
            for (int64_t c = 0; c < kChannels; ++c) store(m0 + m, n0 + c, sums[m * kChannels + c]);
        } else {
          for (int64_t c = 0; c < channels; ++c) {
            int4_rows<1>(rows, xp + m0 * K, xs, w, n0 + c, table, sums);
            for (int64_t m = 0; m < rows; ++m) store(m0 + m, n0 + c, sums[m]);
          }
        }
      }
    }
  });
  return out;
}

// q [N, K / 2] uint8 (pack_int4_pairs), scale and zero [N, K / 32] bf16 -> W [N, K] bf16,
// bf16((q - 8) * scale + zero) with one float32 fused multiply-add per weight (what linear_int4
// computes with from 5 rows), the channels spread over the threads.
torch::Tensor int4_pairs_to_bf16(torch::Tensor q, torch::Tensor scale, torch::Tensor zero) {
  const Int4Pairs w = int4_pairs(q, scale, zero);
  const int64_t N = q.size(0), K = w.K;
  auto out = torch::empty({N, K}, scale.options());
  bf16* o = out.data_ptr<bf16>();
  at::parallel_for(0, N, std::max<int64_t>(1, 16384 / K), [&](int64_t n0, int64_t n1) {
    expand_int4_block(w, n0, n1 - n0, int4_table(), o + n0 * K);
  });
  return out;
}

// `rounds` x 12 vdpbf16ps on one thread; the sum of its accumulators.
__attribute__((noinline)) float dot_rounds(int64_t rounds) {
  __m512 acc[12];  // distinct starting values: no two sums can be merged into one
  for (int i = 0; i < 12; ++i) acc[i] = _mm512_set1_ps(static_cast<float>(i));
  __m512i a = _mm512_set1_epi16(0x3f80);  // bfloat16 1.0
  __m512i b = _mm512_set1_epi16(0x3c00);  // bfloat16 2^-7
  for (int64_t r = 0; r < rounds; ++r) {
    asm volatile("" : "+v"(a), "+v"(b));  // opaque operands: every product is computed
    for (int i = 0; i < 12; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)a, (__m512bh)b);
  }
  float s = 0.f;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_ps(acc[i]);
  return s;
}

// The bfloat16 dot-product rate of this CPU, in GFLOP/s over every intra-op thread: each thread
// runs `rounds` x 12 vdpbf16ps into 12 independent sums (so that the instruction's latency does
// not limit it), 64 floating-point operations each (16 lanes x 2 products x multiply and add),
// and the rate is their total over the wall time of the parallel region.
// It is the ceiling the panels above run against: a layer of M rows, K inputs and N outputs is
// 2 M K N operations. The operands pass through an empty asm statement each round, so the
// products cannot be computed ahead of the loop, and the sums start apart, so none can stand in
// for another.
double bf16_dot_peak(int64_t rounds) {
  TORCH_CHECK(rounds > 0, "rounds = ", rounds, " must be positive");
  const int64_t threads = at::get_num_threads();
  std::vector<float> sums(threads);  // the sums stay in use, so their arithmetic is kept
  const auto start = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) sums[t] = dot_rounds(rounds);
  });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return static_cast<double>(threads) * rounds * 12 * 64 / seconds / 1e9;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_panels", &pack_panels, "w [N, K] bf16 or int8 -> [ceil(N / 16), K * 16] panels");
  m.def("int8_panels_to_bf16", &int8_panels_to_bf16,
        "int8 panels [B, K * 16] -> the first n channels' weights [n, K] bf16, exact");
  m.def("linear_bf16_panels", &linear_bf16_panels,
        "x [M, K] bf16 @ (panels of W [N, K])^T (+ bias) -> [M, N] bf16");
  m.def("linear_int8_panels", &linear_int8_panels,
        "x [M, K] bf16 @ (panels of q [N, K] int8 * scale [N])^T (+ bias) -> [M, N] bf16");
  m.def("linear_int4", &linear_int4,
        "x [M, K] bf16 @ ((q - 8) * scale + zero per 32 features)^T (+ bias) -> [M, N] bf16");
  m.def("int4_pairs_to_bf16", &int4_pairs_to_bf16,
        "packed int4 pairs, scale, zero -> W [N, K] bf16 = bf16((q - 8) * scale + zero)");
  m.def("bf16_dot_peak", &bf16_dot_peak,
        "GFLOP/s of vdpbf16ps over every intra-op thread, `rounds` x 12 instructions each");
}
