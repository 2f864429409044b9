// bfloat16 linear layers on AMX tiles, y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]), over the
// panels of linear.cpp (pack_panels: panels[b][k / 2][c][2] = W[16 b + c][k]).
//
// That layout is also the B operand of AMX's tdpbf16ps: a tile of 16 rows of 64 bytes holds 32
// input features (16 pairs) of 16 output channels, and in the panels those 1,024 bytes are
// contiguous. So a tile of up to 16 rows of x (32 features each) times one block of 16 channels
// is one tileloadd of x, one of the panel and one tdpbf16ps into a 16 x 16 float32 tile.
// Up to 16 rows, one x tile runs kBlocks blocks (64 channels) at a time, their sums in tiles 0-3,
// x in tile 4 and the weights alternating between tiles 5 and 6. More rows go in row tiles of two
// x tiles, as even as they go, each weight tile feeding both, over the same panel (then in L2);
// where the tiles hold more rows than x, the last x tiles start early, so that none reads past
// x. Each row tile also fetches into L2 its share of the next panel (as the panels of
// linear.cpp do), so the memory streams while the tiles compute.
//
// oneDNN's bfloat16 GEMM also runs on AMX tiles, but adds 30-50 us per call at decode batch sizes.
// Measured on a 2-vCPU Intel Xeon (AMX) over the 120 decoder linears of SmolLM2-135M (distinct
// random weights): see SMALL_BATCH_ROWS, AMX_TILE_ROWS, AMX_MIN_ROWS and AMX_PANEL_ROWS in
// services/executor/packed_linear.py (which also runs this kernel on prefill batches of the
// layers where oneDNN keeps to one thread).
//
// Output (m, n) is the tile unit's float32 sum over pairs of features for k ascending in steps of
// 32, the same for every row whatever the batch size, the row tiles or the threads; it is rounded
// to bfloat16 once (round to nearest even). K must be a multiple of 32.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "amx_tiles.h"

namespace {

using bf16 = at::BFloat16;
constexpr int64_t kLanes = 16;     // output channels per block (a tile's columns, float32)
constexpr int64_t kTileRows = 16;  // rows of x per row tile at most
constexpr int64_t kTileK = 32;     // input features per tdpbf16ps
constexpr int64_t kBlocks = 4;     // blocks of 16 channels per row tile

using radixserve_amx::tiles_available;  // amx_tiles.h
using radixserve_amx::TileConfig;

// Up to 16 rows (one x tile): tiles 0-3 hold the sums of 4 blocks, `rows` x 16 float32; tile 4
// x, `rows` x 32 bfloat16; tiles 5 and 6 the weights, 16 pairs x 16 channels. More rows (two x
// tiles of `rows` each): tiles 0-3 the sums of 2 blocks x 2 x tiles, tiles 4 and 5 x, tiles 6 and
// 7 the weights.
void configure(int64_t rows, int x_tiles) {
  TileConfig cfg;
  const int weights = x_tiles == 1 ? 5 : 6;
  for (int t = 0; t < weights + 2; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = static_cast<uint8_t>(t < weights ? rows : 16);
  }
  _tile_loadconfig(&cfg);
}

// Fetches into L2 the 32-feature step at `w` of blocks [0, NB) of the panel `ahead` elements on.
template <int NB>
inline void fetch_ahead(const bf16* w, int64_t ahead, int64_t block_stride) {
  for (int j = 0; j < NB; ++j) {
    const char* next = reinterpret_cast<const char*>(w + ahead + j * block_stride);
    for (int line = 0; line < 16; ++line) _mm_prefetch(next + line * 64, _MM_HINT_T1);
  }
}

// One x tile (the configured rows at `x`, row stride K) against NB blocks of `panel` (block
// stride K * 16), the sums left in tiles 0..NB-1 and stored into `sums` (16 x 16 float32 a
// block). Fetches into L2 the 32-feature steps s of the panel `ahead` elements on with
// s % tiles == tile.
template <int NB>
inline void one_x_tile(const bf16* x, int64_t K, const bf16* panel, int64_t ahead, int64_t tile,
                       int64_t tiles, float* sums) {
  const int64_t block_stride = K * kLanes, x_stride = K * 2;
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (NB > 2) _tile_zero(2);
  if constexpr (NB > 3) _tile_zero(3);
  for (int64_t s = 0, k = 0; k < K; ++s, k += kTileK) {
    const bf16* w = panel + k * kLanes;
    if (s % tiles == tile) fetch_ahead<NB>(w, ahead, block_stride);
    _tile_loadd(4, x + k, x_stride);
    _tile_loadd(5, w, 64);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NB > 1) {
      _tile_loadd(6, w + block_stride, 64);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (NB > 2) {
      _tile_loadd(5, w + 2 * block_stride, 64);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (NB > 3) {
      _tile_loadd(6, w + 3 * block_stride, 64);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  constexpr int64_t kSums = kTileRows * kLanes;
  _tile_stored(0, sums, 64);
  if constexpr (NB > 1) _tile_stored(1, sums + kSums, 64);
  if constexpr (NB > 2) _tile_stored(2, sums + 2 * kSums, 64);
  if constexpr (NB > 3) _tile_stored(3, sums + 3 * kSums, 64);
}

// Two x tiles of the configured rows (at x and x1, which may overlap) against NB (1 or 2)
// blocks, so that every weight tile loaded feeds two products: sums of block j, x tile i in tile
// 2 j + i, stored into `sums` at (2 j + i) * 256. Fetches ahead as one_x_tile does.
template <int NB>
inline void two_x_tiles(const bf16* x, const bf16* x1, int64_t K, const bf16* panel,
                        int64_t ahead, int64_t tile, int64_t tiles, float* sums) {
  const int64_t block_stride = K * kLanes, x_stride = K * 2;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (NB > 1) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0, k = 0; k < K; ++s, k += kTileK) {
    const bf16* w = panel + k * kLanes;
    if (s % tiles == tile) fetch_ahead<NB>(w, ahead, block_stride);
    _tile_loadd(4, x + k, x_stride);
    _tile_loadd(5, x1 + k, x_stride);
    _tile_loadd(6, w, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if constexpr (NB > 1) {
      _tile_loadd(7, w + block_stride, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  constexpr int64_t kSums = kTileRows * kLanes;
  _tile_stored(0, sums, 64);
  _tile_stored(1, sums + kSums, 64);
  if constexpr (NB > 1) {
    _tile_stored(2, sums + 2 * kSums, 64);
    _tile_stored(3, sums + 3 * kSums, 64);
  }
}

// Adds the bias to `rows` rows of float32 sums (16 a row, 64 bytes apart) of the block whose
// first channel is n0, rounds them to bfloat16 and writes them to out rows m0.., channels below
// N only.
inline void finish(const float* sums, int64_t rows, const bf16* bias, bf16* out, int64_t N,
                   int64_t m0, int64_t n0) {
  const int64_t lanes = std::min<int64_t>(kLanes, N - n0);
  const __mmask16 mask = (__mmask16)((1u << lanes) - 1);
  const __m512 b =
      bias == nullptr
          ? _mm512_setzero_ps()
          : _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(mask, bias + n0));
  for (int64_t m = 0; m < rows; ++m) {
    const __m256bh y = _mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(sums + m * kLanes), b));
    _mm256_mask_storeu_epi16(out + (m0 + m) * N + n0, mask, (__m256i)y);
  }
}

// The first rows a and b of the two x tiles (`rows` rows each) of row tile `tile` of x [M, K],
// so that every row of x is in some tile and none reads past its end: where the tiles hold more
// than M rows, the last row tile starts early (with one row tile, its second x tile does), and
// its x tiles may overlap the ones before. Rows in two tiles are computed twice, to the same
// values (see the top).
inline void pair_rows(int64_t tile, int64_t rows, int64_t M, int64_t& a, int64_t& b) {
  a = std::min<int64_t>(tile * 2 * rows, std::max<int64_t>(M - 2 * rows, 0));
  b = std::min<int64_t>(a + rows, M - rows);
}

// x [M, K], panels [blocks, K * 16] -> out [M, N]: each thread an equal run of blocks, kBlocks at
// a time (a panel), every row tile over each panel: one x tile of all M rows (M <= 16, tiles 1)
// or `tiles` pairs of x tiles of tile_rows rows (pair_rows).
void run(const bf16* x, int64_t M, int64_t tile_rows, int x_tiles, int64_t tiles, int64_t K,
         int64_t N, int64_t blocks, const bf16* w, const bf16* bias, bf16* out) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), blocks);
  constexpr int64_t kSums = kTileRows * kLanes;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    configure(tile_rows, x_tiles);
    alignas(64) float sums[kBlocks * kSums];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b0 = blocks * t / threads, b1 = blocks * (t + 1) / threads;
      for (int64_t p = b0; p < b1; p += kBlocks) {
        const int64_t nb = std::min<int64_t>(kBlocks, b1 - p);
        const bf16* panel = w + p * K * kLanes;
        const int64_t ahead = nb * K * kLanes;
        for (int64_t tile = 0; tile < tiles; ++tile) {
          if (x_tiles == 1) {
            switch (nb) {
              case 4: one_x_tile<4>(x, K, panel, ahead, tile, tiles, sums); break;
              case 3: one_x_tile<3>(x, K, panel, ahead, tile, tiles, sums); break;
              case 2: one_x_tile<2>(x, K, panel, ahead, tile, tiles, sums); break;
              default: one_x_tile<1>(x, K, panel, ahead, tile, tiles, sums); break;
            }
            for (int64_t j = 0; j < nb; ++j)
              finish(sums + j * kSums, M, bias, out, N, 0, (p + j) * kLanes);
            continue;
          }
          int64_t r0[2];
          pair_rows(tile, tile_rows, M, r0[0], r0[1]);
          for (int64_t j = 0; j < nb; j += 2) {
            const bf16* pair = panel + j * K * kLanes;
            if (nb - j >= 2) {
              two_x_tiles<2>(x + r0[0] * K, x + r0[1] * K, K, pair, ahead, tile, tiles, sums);
            } else {
              two_x_tiles<1>(x + r0[0] * K, x + r0[1] * K, K, pair, ahead, tile, tiles, sums);
            }
            for (int64_t jj = j; jj < std::min<int64_t>(j + 2, nb); ++jj) {
              for (int i = 0; i < 2; ++i) {
                finish(sums + (2 * (jj - j) + i) * kSums, tile_rows, bias, out, N, r0[i],
                       (p + jj) * kLanes);
              }
            }
          }
        }
      }
    }
    _tile_release();
  });
}

// x [M, K] bf16 @ W^T (+ bias [N] bf16) with W as linear.cpp's pack_panels packed it
// ([ceil(N / 16), K * 16] bf16) -> [M, N] bf16.
torch::Tensor linear_bf16_amx(torch::Tensor x, torch::Tensor panels, int64_t N,
                              c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(tiles_available(), "this process may not use AMX tiles (arch_prctl refused)");
  TORCH_CHECK(panels.dim() == 2 && panels.scalar_type() == at::kBFloat16 &&
                  panels.is_contiguous(),
              "panels must be a contiguous [blocks, K * 16] bfloat16 tensor (pack_panels)");
  TORCH_CHECK(N > 0 && (N + kLanes - 1) / kLanes == panels.size(0), "N = ", N, " does not fit ",
              panels.size(0), " blocks of 16 channels");
  const int64_t K = panels.size(1) / kLanes, M = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous [M, K] bfloat16 tensor");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " features, the weight ", K);
  TORCH_CHECK(K % kTileK == 0, "K = ", K, " must be a multiple of ", kTileK);
  const bf16* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == N &&
                    bias->is_contiguous(),
                "bias must be a contiguous [N] bfloat16 tensor");
    b = bias->data_ptr<bf16>();
  }
  auto out = torch::empty({M, N}, x.options());
  if (M == 0) return out;
  // Up to 16 rows: one x tile of M rows; more: row tiles of two x tiles, up to 32 rows each, as
  // even as they go, read from x itself (pair_rows). (A copy of x padded with zero rows to whole
  // tiles cost a zeroed tensor and a copy, 15-40 us a call from 17 to 127 rows.)
  const int x_tiles = M <= kTileRows ? 1 : 2;
  const int64_t tiles = (M + x_tiles * kTileRows - 1) / (x_tiles * kTileRows);
  const int64_t tile_rows = (M + tiles * x_tiles - 1) / (tiles * x_tiles);
  run(x.data_ptr<bf16>(), M, tile_rows, x_tiles, tiles, K, N, panels.size(0),
      panels.data_ptr<bf16>(), b, out.data_ptr<bf16>());
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tiles_available", &tiles_available,
        "whether this process may use AMX tiles (asks Linux once)");
  m.def("linear_bf16_amx", &linear_bf16_amx,
        "x [M, K] bf16 @ panels (pack_panels) ^T (+ bias) -> [M, N] bf16, on AMX tiles");
}
