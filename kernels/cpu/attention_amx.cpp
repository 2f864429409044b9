// Attention on AMX tiles, for bfloat16 queries over bfloat16 KV pools: the extend attention of
// attention.cpp (a request's new tokens over its cached prefix and themselves, causal) and its
// shared-prefix spans (a group's query tokens over one span of keys), with the same entry points
// and results up to float32 summation order (the running maximum, below) and the exponential's
// rounding (the tiles' exp2_16 against exp16); and decode rows grouped by shared prefix in one
// pass (cascade_decode_attention).
//
// A task is up to 32 query tokens (kQueryBlock) of one request or group, or up to 16 decode
// members of a group (kMemberBlock), and every KV head, or one (split_heads): for KV head hk its
// query rows r = i * G + g (token i, query head hk * G + g) in tiles of 16, padded with zero
// queries. It reads one or more segments of keys, each seen by some of its rows (a decode group:
// the span by all, then each member's own keys by that member's rows). Keys go by in blocks of 64
// (kKeys), each gathered once per task and head from the pool and used by every query tile of
// the head that has rows seeing it:
//
// - keys, as rows: tile A of K (16 keys x 32 dims) times tile B of the queries (16 pairs of dims
//   x 16 query rows, built once per task) gives the scores transposed, sT[key][row], in float32;
// - so the online softmax runs down the key axis on whole vectors of 16 query rows, as the extend
//   kernel of attention.cpp does: max, exp (as 2^x, exp2_16) and sums are vertical;
// - each row's probabilities of two keys, rounded to bfloat16, pair up into one 32-bit lane; 16
//   such vectors (32 keys) transposed are tile A of P (16 query rows x 32 keys);
// - values are re-laid as pairs of keys (16 pairs x 16 dims: tile B), so p . v is a tile product
//   into 16 query rows x 16 dims, added to the row's float32 sums after the rescale of its
//   running maximum.
//
// As in attention.cpp (and torch's scaled_dot_product_attention on the CPU), the unnormalised
// probabilities are rounded to bfloat16 for p . v and divided at the end by the float32 sum of
// the unrounded ones.
//
// A decode member's own keys are seen by its G query rows only, G of a tile's 16 lanes, while
// each key would still be gathered, re-laid and transposed as for 16: those rows attend them with
// AVX-512 BF16 vector code instead (own_keys: q . k as attention.cpp's decode kernel computes
// it), folded into the same running maximum, sum and output sums, their probabilities unrounded
// for p . v (where that kernel rounds them to bfloat16 over bfloat16 pools).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "amx_tiles.h"
#include "exp16.h"

namespace {

using bf16 = at::BFloat16;
constexpr int64_t kQueryBlock = 32;  // query tokens per extend or span task
constexpr int64_t kMemberBlock = 16; // decode rows per cascade task
constexpr int64_t kLanes = 16;       // query rows per tile (float32 lanes of a score vector)
constexpr int64_t kKeys = 64;        // keys per block: four score tiles of 16 keys
constexpr int64_t kPair = 32;        // bfloat16 values (16 pairs) per tile row
constexpr int64_t kTile = 16 * 16;   // 32-bit elements per tile
constexpr float kMasked = -1e30f;    // score of a key a row may not see (finite: -ffast-math)
constexpr float kNone = -1e29f;      // a row's maximum before it sees a key: masked keys get 0
constexpr int64_t kAhead = 2;        // blocks of keys fetched ahead
constexpr unsigned int kFlushDenormals = 0x8040;  // MXCSR: flush-to-zero and denormals-are-zero

using radixserve_amx::tiles_available;  // amx_tiles.h
using radixserve_amx::TileConfig;

// All eight tiles 16 rows of 64 bytes: tiles 0-3 hold sums (scores of four key tiles, or p . v
// of four 16-dim chunks), 4 and 6 the A operands, 5 and 7 the B operands.
void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

using radixserve_simd::exp16;     // exp16.h
using radixserve_simd::reduce16;  // exp16.h

// Writes the transpose of the 16 x 16 matrix of 32-bit elements whose rows are r[0..15] to
// dst (16 rows of 64 bytes): dst[j][i] = r[i][j]. Four rounds of 16 shuffles: 32-bit and 64-bit
// interleaves within 128-bit lanes, then two rounds of 128-bit lane shuffles.
inline void transpose16(const __m512i* r, uint32_t* dst) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4i + c], 128-bit lane k: column 4k + c of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);
    const __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    _mm512_storeu_si512(dst + (c + 0) * 16, _mm512_shuffle_i32x4(v0, w0, 0x88));
    _mm512_storeu_si512(dst + (c + 4) * 16, _mm512_shuffle_i32x4(v1, w1, 0x88));
    _mm512_storeu_si512(dst + (c + 8) * 16, _mm512_shuffle_i32x4(v0, w0, 0xdd));
    _mm512_storeu_si512(dst + (c + 12) * 16, _mm512_shuffle_i32x4(v1, w1, 0xdd));
  }
}

// Two probability vectors (16 rows each, keys 2j and 2j + 1) rounded to bfloat16 (nearest even)
// and paired into 32-bit lanes, key 2j in the low half: one vcvtne2ps2bf16 (a's 16 values in the
// low half, b's in the high, each rounded as vcvtneps2bf16 rounds it) and one vpermw that
// interleaves the halves.
inline __m512i pair16(__m512 a, __m512 b) {
  alignas(64) static const uint16_t kInterleave[32] = {0,  16, 1,  17, 2,  18, 3,  19,
                                                       4,  20, 5,  21, 6,  22, 7,  23,
                                                       8,  24, 9,  25, 10, 26, 11, 27,
                                                       12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave),
                                  (__m512i)_mm512_cvtne2ps_pbh(b, a));
}

// 2^y of 16 floats, for the tiles' softmax, which takes e^x as 2^(x log2 e) with log2 e folded
// into the scores' scale (12 vector operations with the subtraction and scaling of the scores,
// where exp16 takes 15): y = n + f with n = round(y), |f| <= 1/2 (f exact); 2^f = 1 + f P(f),
// P of degree 5 with Cephes' exp2f coefficients, highest first (a float64 evaluation of the
// float32 Horner steps at 2 million points of [-1/2, 1/2] was within 1.0e-7 of 2^f, relative);
// scaled by 2^n (vscalefps). y <= -150 gives 0, and so does y < -126 under the flush-to-zero the
// kernel's tasks set; y = 0 gives 1; NaN stays NaN (vmaxps returns its second operand).
inline __m512 exp2_16(__m512 y) {
  constexpr float kPoly[] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                             5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f};
  y = _mm512_max_ps(_mm512_set1_ps(-150.f), y);
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(kPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kPoly[i]));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// Keys slots[0 .. n) that the query rows lanes [lane_lo, lane_hi) of a task see; `vector`: one
// decode member's own keys, which its rows (lane_lo .. lane_lo + G - 1, G the query heads per KV
// head: exactly the lanes) attend with vector code (own_keys), not tiles.
struct Segment {
  const int64_t* slots;
  int64_t n;
  int64_t lane_lo, lane_hi;
  bool vector = false;
};

// One task: nq query tokens of KV heads hk .. hk + heads - 1 (for each head, query row
// r = i * G + g: token i, query head hk * G + g), token i being q's token tokens[i] (tokens null:
// token0 + i), over one or more segments of keys. With `causal`, its one segment is prefix + nq
// keys and token i sees the first prefix + i + 1.
struct Task {
  int64_t token0;
  const int64_t* tokens;
  int64_t nq;
  int64_t hk;
  bool causal;
  int64_t prefix;
  int64_t segment0, n_segments;  // its segments in the call's list
  int64_t keys;                  // keys it reads times its heads: its order and cost estimate
  int64_t heads = 1;             // KV heads it takes: per block of keys, or per own-key segment
};
struct Shape {
  int64_t heads, kv_heads, group, dim, q_stride, out_stride, lse_stride;
  float scale;
  const bf16* q;  // [T, H, D]
  float* out;     // [T, H, D] float32, or null when out16 is set
  float* lse;     // [T, H]; null: not wanted
  bf16* out16;    // [T, H, D] bfloat16 (rounded to nearest even), or null
};

inline int64_t token_of(const Task& task, int64_t i) {
  return task.tokens != nullptr ? task.tokens[i] : task.token0 + i;
}

// One thread's scratch, sized for the largest task.
struct Scratch {
  std::vector<uint32_t> qT;   // [tiles][dim / 32][16 pairs][16 rows]
  std::vector<bf16> kb;       // [64 keys][dim]
  std::vector<bf16> vb;       // [2 halves][dim / 16 chunks][16 key pairs][16 dims x 2]
  std::vector<uint32_t> pb;   // [2 halves][16 rows][16 key pairs]
  std::vector<float> sT;      // [64 keys][16 rows]
  std::vector<float> ob;      // [16 rows][64 dims]
  std::vector<float> mx, sum, acc;  // [tiles * 16], [tiles * 16], [tiles * 16][dim]
  std::vector<int32_t> lim;   // [tiles * 16] keys each row sees
  std::vector<float> own;     // [group][n]: one member's scores, then probabilities (own_keys)
  Scratch(int64_t tiles, int64_t dim)
      : qT(tiles * (dim / kPair) * kTile), kb(kKeys * dim), vb(2 * (dim / 16) * kTile * 2),
        pb(2 * kTile), sT(kKeys * kLanes), ob(kLanes * 64), mx(tiles * kLanes),
        sum(tiles * kLanes), acc(tiles * kLanes * dim), lim(tiles * kLanes) {}
};

// The tiles B of the queries: qT[tile][c][j][m] = (q[d], q[d + 1]) of row 16 tile + m, d = 32 c
// + 2 j; zero for rows past nr.
void load_queries(const Task& task, int64_t hk, const Shape& s, int64_t nr, int64_t tiles,
                  uint32_t* qT) {
  const int64_t chunks = s.dim / kPair;
  for (int64_t tile = 0; tile < tiles; ++tile) {
    for (int64_t c = 0; c < chunks; ++c) {
      __m512i rows[16];
      for (int64_t m = 0; m < kLanes; ++m) {
        const int64_t r = tile * kLanes + m;
        if (r >= nr) {
          rows[m] = _mm512_setzero_si512();
          continue;
        }
        const bf16* q = s.q + token_of(task, r / s.group) * s.q_stride +
                        (hk * s.group + r % s.group) * s.dim + c * kPair;
        rows[m] = _mm512_loadu_si512(q);
      }
      transpose16(rows, qT + (tile * chunks + c) * kTile);
    }
  }
}

// Tile A of keys l0 + 16 t .. of the block: where their 16 slots follow one another, the pool
// itself (rows row_stride elements apart); else their rows copied into kb (zero rows past n).
struct KeyTiles {
  const bf16* base[4];
  int64_t stride[4];  // bytes
};

// Fetches dim bfloat16 values from p (one or more heads of a K or V row) into L2.
inline void prefetch_row(const bf16* p, int64_t dim) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < dim * static_cast<int64_t>(sizeof(bf16)); b += 64) {
    _mm_prefetch(c + b, _MM_HINT_T1);
  }
}

// Gathers keys slots[0 .. n) of KV head hk: K as tiles (KeyTiles), values as pairs of keys into
// vb (zero past n up to the end of the last half used).
void load_keys(const bf16* k_pool, const bf16* v_pool, const int64_t* slots, int64_t hk,
               const Shape& s, int64_t n, bf16* kb, bf16* vb, KeyTiles& keys) {
  const int64_t dim = s.dim, row_stride = s.kv_heads * dim;
  for (int64_t t = 0; t * 16 < n; ++t) {
    const int64_t first = t * 16, count = std::min<int64_t>(16, n - first);
    bool runs = count == 16;
    for (int64_t l = first + 1; runs && l < first + 16; ++l) runs = slots[l] == slots[l - 1] + 1;
    if (runs) {
      keys.base[t] = k_pool + slots[first] * row_stride + hk * dim;
      keys.stride[t] = row_stride * static_cast<int64_t>(sizeof(bf16));
      continue;
    }
    bf16* dst = kb + first * dim;
    for (int64_t l = 0; l < 16; ++l) {
      const bf16* src = k_pool + slots[first + std::min(l, count - 1)] * row_stride + hk * dim;
      for (int64_t d = 0; d < dim; d += kPair) {
        _mm512_storeu_si512(dst + l * dim + d,
                            l < count ? _mm512_loadu_si512(src + d) : _mm512_setzero_si512());
      }
    }
    keys.base[t] = dst;
    keys.stride[t] = dim * static_cast<int64_t>(sizeof(bf16));
  }
  // Element e of a pair row: value e / 2 of key 2j (e even) or of key 2j + 1 (e odd).
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38,
                                               7, 39, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13,
                                               45, 14, 46, 15, 47};
  const __m512i lo_idx = _mm512_load_si512(kLo);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  const int64_t chunks = dim / 16, pairs = n > 32 ? 32 : 16;
  for (int64_t j = 0; j < pairs; ++j) {
    const int64_t a = 2 * j, b = 2 * j + 1;
    bf16* dst = vb + ((j / 16) * chunks * kTile + (j % 16) * 16) * 2;
    for (int64_t h = 0; h < dim / kPair; ++h) {
      const __m512i va = a < n ? _mm512_loadu_si512(v_pool + slots[a] * row_stride +
                                                    hk * dim + h * kPair)
                               : _mm512_setzero_si512();
      const __m512i vv = b < n ? _mm512_loadu_si512(v_pool + slots[b] * row_stride +
                                                    hk * dim + h * kPair)
                               : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + (2 * h) * kTile * 2, _mm512_permutex2var_epi16(va, lo_idx, vv));
      _mm512_storeu_si512(dst + (2 * h + 1) * kTile * 2,
                          _mm512_permutex2var_epi16(va, hi_idx, vv));
    }
  }
}

// The keys of a task's segments one after another, from a position on: where the keys kAhead
// blocks past the ones loading are, to fetch them into L2 meanwhile, across segments.
struct KeyCursor {
  const Segment* segment;
  const Segment* end;
  int64_t l = 0;
  // Up to n slots from here into out; advances past them. Returns how many.
  int64_t take(int64_t n, int64_t* out) {
    int64_t got = 0;
    while (got < n && segment != end) {
      const int64_t k = std::min(n - got, segment->n - l);
      std::memcpy(out + got, segment->slots + l, k * sizeof(int64_t));
      got += k;
      l += k;
      if (l == segment->n) {
        ++segment;
        l = 0;
      }
    }
    return got;
  }
};

// Fetches the K and V rows of KV heads hk .. hk + heads - 1 of slots[0 .. n) into L2.
void fetch_keys(const bf16* k_pool, const bf16* v_pool, const int64_t* slots, int64_t hk,
                int64_t heads, const Shape& s, int64_t n) {
  const int64_t row_stride = s.kv_heads * s.dim;
  for (int64_t l = 0; l < n; ++l) {
    prefetch_row(k_pool + slots[l] * row_stride + hk * s.dim, heads * s.dim);
    prefetch_row(v_pool + slots[l] * row_stride + hk * s.dim, heads * s.dim);
  }
}

// The K and V rows of `heads` KV heads from hk of slots later[0 .. n), fetched into L2 a few at
// a time while a block computes (`upto`), so that the fetches leave the fill buffers free for the
// block's own loads instead of queueing behind one another at its start. `upto` keeps its own
// loop rather than calling fetch_keys over the range: called about 32 times a tile for one or two
// rows each, that was 8-11 % slower over 30 layers of the decode groups (three A/B runs).
struct Fetch {
  const bf16* k_pool;
  const bf16* v_pool;
  const int64_t* later;
  int64_t n, hk, heads, row_stride, dim;
  int64_t done = 0;
  // Fetches the rows of slots done .. target - 1 (at most n).
  void upto(int64_t target) {
    for (const int64_t end = std::min(target, n); done < end; ++done) {
      prefetch_row(k_pool + later[done] * row_stride + hk * dim, heads * dim);
      prefetch_row(v_pool + later[done] * row_stride + hk * dim, heads * dim);
    }
  }
};

// Scores of the block's n keys for one query tile: sT[key][row], float32.
void block_scores(const uint32_t* qT, int64_t chunks, const KeyTiles& k, int64_t n, float* sT) {
  const int64_t key_tiles = (n + 15) / 16;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t d = c * kPair;
    _tile_loadd(5, qT + c * kTile, 64);
    _tile_loadd(4, k.base[0] + d, k.stride[0]);
    _tile_dpbf16ps(0, 4, 5);
    if (key_tiles > 1) {
      _tile_loadd(6, k.base[1] + d, k.stride[1]);
      _tile_dpbf16ps(1, 6, 5);
    }
    if (key_tiles > 2) {
      _tile_loadd(4, k.base[2] + d, k.stride[2]);
      _tile_dpbf16ps(2, 4, 5);
    }
    if (key_tiles > 3) {
      _tile_loadd(6, k.base[3] + d, k.stride[3]);
      _tile_dpbf16ps(3, 6, 5);
    }
  }
  _tile_stored(0, sT, 64);
  if (key_tiles > 1) _tile_stored(1, sT + kTile, 64);
  if (key_tiles > 2) _tile_stored(2, sT + 2 * kTile, 64);
  if (key_tiles > 3) _tile_stored(3, sT + 3 * kTile, 64);
}

// p . v of the block for one query tile: ob[row][d] for dims d0 .. d0 + 63 (pb: the tiles A of
// the probabilities, `halves` of them; vb: the value tiles).
void block_values(const uint32_t* pb, int64_t halves, const bf16* vb, int64_t chunks,
                  int64_t c0, float* ob) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t h = 0; h < halves; ++h) {
    const bf16* v = vb + (h * chunks + c0) * kTile * 2;
    _tile_loadd(4, pb + h * kTile, 64);
    _tile_loadd(5, v, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(7, v + kTile * 2, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_loadd(5, v + 2 * kTile * 2, 64);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(7, v + 3 * kTile * 2, 64);
    _tile_dpbf16ps(3, 4, 7);
  }
  _tile_stored(0, ob, 256);
  _tile_stored(1, ob + 16, 256);
  _tile_stored(2, ob + 32, 256);
  _tile_stored(3, ob + 48, 256);
}

// One block of n keys (loaded: keys, w.vb) for query tile `tile` of a task: the scores, the online
// softmax down the key axis (16 rows per vector; rows outside `lanes`, or with `lim`, whose key
// count lim[m] <= l0 + l, do not see key l) and p . v into the rows' float32 sums. Meanwhile
// `fetch` advances to `goal` (keys kAhead blocks on) in even steps through the softmax: each query
// tile of a head takes an equal part of the head's share (a skipped tile's part goes with the
// next one, and what is left after the head's last tile goes at once).
void attend_block(const Shape& s, const KeyTiles& keys, int64_t n, int64_t tile, __mmask16 lanes,
                  const int32_t* lim, int64_t l0, Scratch& w, Fetch& fetch, int64_t goal) {
  const int64_t chunks = s.dim / kPair, dim = s.dim;
  block_scores(w.qT.data() + tile * chunks * kTile, chunks, keys, n, w.sT.data());
  float* sT = w.sT.data();
  bool masked = lanes != 0xffff;
  __m512i limits = _mm512_setzero_si512();
  if (lim != nullptr) {
    limits = _mm512_loadu_si512(lim);
    masked = masked || l0 + n > *std::min_element(lim, lim + kLanes);
  }
  __m512 top = _mm512_set1_ps(kMasked);
  for (int64_t l = 0; l < n; ++l) {
    __m512 x = _mm512_loadu_ps(sT + l * kLanes);
    if (masked) {
      __mmask16 seen = lanes;
      if (lim != nullptr) {
        seen &= _mm512_cmpgt_epi32_mask(limits, _mm512_set1_epi32(static_cast<int>(l0 + l)));
      }
      x = _mm512_mask_mov_ps(_mm512_set1_ps(kMasked), seen, x);
      _mm512_storeu_ps(sT + l * kLanes, x);
    }
    top = _mm512_max_ps(top, x);
  }
  float* mx = w.mx.data() + tile * kLanes;
  float* sum = w.sum.data() + tile * kLanes;
  const __m512 old = _mm512_loadu_ps(mx);
  const __m512 now = _mm512_max_ps(old, top);
  // e^((x - now) scale) as 2^((x - now) scale log2 e): x - now is exact where the two are
  // within a factor of two; scale log2 e and the product round once each (exp2_16).
  const __m512 scale = _mm512_set1_ps(s.scale * radixserve_simd::kLog2e);
  const __m512 alpha = exp2_16(_mm512_mul_ps(_mm512_sub_ps(old, now), scale));
  auto prob = [&](int64_t l) {  // key l's unnormalised probabilities
    return exp2_16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(sT + l * kLanes), now), scale));
  };
  const int64_t halves = n > 32 ? 2 : 1;
  __m512 total = _mm512_setzero_ps();
  __m512i pairs[16];
  const int64_t start = fetch.done, steps = halves * 16;
  for (int64_t h = 0; h < halves; ++h) {
    for (int64_t j = 0; j < 16; ++j) {
      fetch.upto(start + (goal - start) * (h * 16 + j + 1) / steps);
      const int64_t l = h * 32 + 2 * j;
      __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
      if (l < n) p0 = prob(l);
      if (l + 1 < n) p1 = prob(l + 1);
      total = _mm512_add_ps(total, _mm512_add_ps(p0, p1));
      pairs[j] = pair16(p0, p1);
    }
    transpose16(pairs, w.pb.data() + h * kTile);
  }
  _mm512_storeu_ps(sum, _mm512_fmadd_ps(_mm512_loadu_ps(sum), alpha, total));
  _mm512_storeu_ps(mx, now);
  alignas(64) float alphas[kLanes];
  _mm512_store_ps(alphas, alpha);
  float* acc = w.acc.data() + tile * kLanes * dim;
  for (int64_t c0 = 0; c0 < dim / 16; c0 += 4) {
    block_values(w.pb.data(), halves, w.vb.data(), dim / 16, c0, w.ob.data());
    for (int64_t m = 0; m < kLanes; ++m) {
      const __m512 a = _mm512_set1_ps(alphas[m]);
      float* o = acc + m * dim + c0 * 16;
      const float* b = w.ob.data() + m * 64;
      for (int64_t d = 0; d < 64; d += 16) {
        _mm512_storeu_ps(o + d,
                         _mm512_fmadd_ps(_mm512_loadu_ps(o + d), a, _mm512_loadu_ps(b + d)));
      }
    }
  }
}

// Keys ahead of the one read whose K or V rows own_keys fetches into L2 (as attention.cpp's
// decode kernel).
constexpr int64_t kOwnAhead = 32;

inline __mmask16 first_lanes(int64_t n) {
  return n >= kLanes ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

// acc[g][d0 .. d0 + 64) += sum over l of p[g * n + l] * v_l[d0 .. d0 + 64), for g < G, v_l the
// value row of key l (v_rows(l)), in float32 with the rows' sums held in registers (G x 4
// vectors); with fetch > 0, that many values of the row kOwnAhead keys ahead are fetched.
template <int G, typename VRows>
void own_values(const float* p, int64_t n, const VRows& v_rows, int64_t d0, int64_t fetch,
                int64_t dim, float* acc) {
  __m512 o[G][4];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < 4; ++c) o[g][c] = _mm512_loadu_ps(acc + g * dim + d0 + 16 * c);
  for (int64_t l = 0; l < n; ++l) {
    if (fetch > 0 && l + kOwnAhead < n) prefetch_row(v_rows(l + kOwnAhead), fetch);
    const bf16* v = v_rows(l) + d0;
    __m512 vc[4];
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * c));
      vc[c] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * n + l]);
      for (int c = 0; c < 4; ++c) o[g][c] = _mm512_fmadd_ps(w, vc[c], o[g][c]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + g * dim + d0 + 16 * c, o[g][c]);
}

// One decode member's own keys (segment `seg`: n >= 1 keys seen by its G rows from lane_lo) with
// AVX-512 BF16 vector code: in tiles these rows would fill G of the 16 lanes while every key was
// still gathered, re-laid and transposed as for 16. As attention.cpp's decode kernel does, q . k
// as bfloat16 pair dot products for 16 keys at a time, reduced together (reduce16); then each
// row's running maximum, sum and float32 output sums take all n at once (one rescale); then p . v
// in float32, the probabilities unrounded (that kernel now rounds them, see its
// weigh_group_bf16). q: the member's G query rows [G, dim]; their rows in
// the scratch from row0 + seg.lane_lo; the pass fetches fetch_heads heads of each key's rows
// from hk (0: none, the first head's pass of a task of several fetched them).
void own_keys(const bf16* q, const Segment& seg, int64_t hk, int64_t row0, int64_t fetch_heads,
              const Shape& s, const bf16* k_pool, const bf16* v_pool, Scratch& w) {
  const int64_t group = s.group, dim = s.dim, n = seg.n, r0 = row0 + seg.lane_lo;
  const int64_t pf = fetch_heads * dim;
  const int64_t row_stride = s.kv_heads * dim, chunks = dim / kPair;
  if (static_cast<int64_t>(w.own.size()) < group * n) w.own.resize(group * n);
  float* sc = w.own.data();
  auto k_rows = [&](int64_t l) { return k_pool + seg.slots[l] * row_stride + hk * dim; };
  auto v_rows = [&](int64_t l) { return v_pool + seg.slots[l] * row_stride + hk * dim; };
  for (int64_t l = 0; l < std::min(kOwnAhead, n); ++l) prefetch_row(k_rows(l), pf);
  for (int64_t l0 = 0; l0 < n; l0 += kLanes) {
    const int64_t m = std::min(kLanes, n - l0);
    const bf16* rows[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) rows[j] = k_rows(l0 + std::min(j, m - 1));
    for (int64_t l = l0 + kOwnAhead; l < std::min(l0 + kOwnAhead + kLanes, n); ++l) {
      prefetch_row(k_rows(l), pf);
    }
    for (int64_t g = 0; g < group; ++g) {
      const bf16* qg = q + g * dim;
      __m512 acc[kLanes];
      for (int j = 0; j < kLanes; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512bh qc = (__m512bh)_mm512_loadu_si512(qg + c * kPair);
        for (int j = 0; j < kLanes; ++j) {
          const __m512bh kc = (__m512bh)_mm512_loadu_si512(rows[j] + c * kPair);
          acc[j] = _mm512_dpbf16_ps(acc[j], qc, kc);
        }
      }
      _mm512_mask_storeu_ps(sc + g * n + l0, first_lanes(m), reduce16(acc));
    }
  }
  const __m512 vscale = _mm512_set1_ps(s.scale);
  for (int64_t g = 0; g < group; ++g) {
    float* p = sc + g * n;
    __m512 top = _mm512_set1_ps(kNone);
    for (int64_t l = 0; l < n; l += kLanes) {
      const __mmask16 mask = first_lanes(n - l);
      top = _mm512_mask_max_ps(top, mask, top, _mm512_maskz_loadu_ps(mask, p + l));
    }
    const int64_t r = r0 + g;
    const float old = w.mx[r], now = std::max(old, _mm512_reduce_max_ps(top));
    const __m512 shift = _mm512_set1_ps(now * s.scale);
    __m512 total = _mm512_setzero_ps();
    for (int64_t l = 0; l < n; l += kLanes) {
      const __mmask16 mask = first_lanes(n - l);
      const __m512 e = _mm512_maskz_mov_ps(
          mask, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(mask, p + l), vscale, shift)));
      _mm512_mask_storeu_ps(p + l, mask, e);
      total = _mm512_add_ps(total, e);
    }
    const __m512 alpha = exp16(_mm512_set1_ps((old - now) * s.scale));
    w.sum[r] = w.sum[r] * _mm512_cvtss_f32(alpha) + _mm512_reduce_add_ps(total);
    w.mx[r] = now;
    float* a = w.acc.data() + r * dim;
    for (int64_t d = 0; d < dim; d += 16) {
      _mm512_storeu_ps(a + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), alpha));
    }
  }
  for (int64_t l = 0; l < std::min(kOwnAhead, n); ++l) prefetch_row(v_rows(l), pf);
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const float* p = sc + g0 * n;
    float* acc = w.acc.data() + (r0 + g0) * dim;
    for (int64_t d0 = 0; d0 < dim; d0 += 64) {
      const int64_t fetch = g0 == 0 && d0 == 0 ? pf : 0;
      switch (std::min<int64_t>(4, group - g0)) {
        case 4: own_values<4>(p, n, v_rows, d0, fetch, dim, acc); break;
        case 3: own_values<3>(p, n, v_rows, d0, fetch, dim, acc); break;
        case 2: own_values<2>(p, n, v_rows, d0, fetch, dim, acc); break;
        default: own_values<1>(p, n, v_rows, d0, fetch, dim, acc); break;
      }
    }
  }
}

// The lanes of query tile `tile` within [lo, hi), as a mask.
inline __mmask16 tile_lanes(int64_t tile, int64_t lo, int64_t hi) {
  const int64_t a = std::max<int64_t>(lo - tile * kLanes, 0);
  const int64_t b = std::min<int64_t>(hi - tile * kLanes, kLanes);
  if (a >= b) return 0;
  return static_cast<__mmask16>(((1u << b) - 1) & ~((1u << a) - 1));
}

void run_task(const Task& task, const Segment* segments, const Shape& s, const bf16* k_pool,
              const bf16* v_pool, Scratch& w) {
  // Rows of head hk + j: j * tiles * 16 + r (r = i * G + g, as for one head).
  const int64_t nr = task.nq * s.group, tiles = (nr + kLanes - 1) / kLanes;
  const int64_t dim = s.dim, chunks = dim / kPair, heads = task.heads, per_head = tiles * kLanes;
  for (int64_t j = 0; j < heads; ++j) {
    load_queries(task, task.hk + j, s, nr, tiles, w.qT.data() + j * tiles * chunks * kTile);
    for (int64_t r = 0; r < per_head; ++r) {
      // Padded rows (zero queries, never read) see the keys of the last row.
      const int64_t i = std::min(r, nr - 1) / s.group;
      w.lim[j * per_head + r] = static_cast<int32_t>(task.prefix + i + 1);
      w.mx[j * per_head + r] = kNone;
      w.sum[j * per_head + r] = 0.f;
    }
  }
  std::fill(w.acc.begin(), w.acc.begin() + heads * per_head * dim, 0.f);
  KeyTiles keys;
  const Segment* first = segments + task.segment0;
  KeyCursor ahead{first, first + task.n_segments};
  int64_t later[kKeys];
  for (int64_t b = 0; b < kAhead; ++b) {
    fetch_keys(k_pool, v_pool, later, task.hk, heads, s, ahead.take(kKeys, later));
  }
  for (int64_t sg = 0; sg < task.n_segments; ++sg) {
    const Segment& seg = segments[task.segment0 + sg];
    if (seg.vector) {
      const int64_t token = token_of(task, seg.lane_lo / s.group);
      for (int64_t j = 0; j < heads; ++j) {
        const int64_t hk = task.hk + j;
        // The first head's pass fetches the rows of them all.
        own_keys(s.q + token * s.q_stride + hk * s.group * dim, seg, hk, j * per_head,
                 j == 0 ? heads : 0, s, k_pool, v_pool, w);
      }
      continue;
    }
    const bool causal = task.causal && sg == 0;
    // The padded rows of the last tile go with the segment's last lanes.
    const int64_t lane_hi = seg.lane_hi >= nr ? per_head : seg.lane_hi;
    for (int64_t l0 = 0; l0 < seg.n; l0 += kKeys) {
      const int64_t n = std::min(kKeys, seg.n - l0);
      Fetch fetch{k_pool, v_pool, later, ahead.take(n, later), task.hk, heads,
                  s.kv_heads * dim, dim};
      for (int64_t j = 0; j < heads; ++j) {
        load_keys(k_pool, v_pool, seg.slots + l0, task.hk + j, s, n, w.kb.data(), w.vb.data(),
                  keys);
        const int64_t goal = fetch.n * (j + 1) / heads;
        for (int64_t tile = 0; tile < tiles; ++tile) {
          const __mmask16 lanes = tile_lanes(tile, seg.lane_lo, lane_hi);
          if (lanes == 0) continue;
          const int64_t t = j * tiles + tile;
          const int32_t* lim = causal ? w.lim.data() + t * kLanes : nullptr;
          // causal: no row of this tile sees these keys
          if (causal && l0 >= *std::max_element(lim, lim + kLanes)) continue;
          attend_block(s, keys, n, t, lanes, lim, l0, w, fetch,
                       fetch.n * (j * tiles + tile + 1) / (heads * tiles));
        }
        fetch.upto(goal);
      }
    }
  }
  for (int64_t j = 0; j < heads; ++j) {
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t token = token_of(task, r / s.group);
      const int64_t head = (task.hk + j) * s.group + r % s.group, row = j * per_head + r;
      const __m512 inv = _mm512_set1_ps(1.f / w.sum[row]);
      const float* a = w.acc.data() + row * dim;
      if (s.out16 != nullptr) {
        bf16* o = s.out16 + token * s.out_stride + head * dim;
        for (int64_t d = 0; d < dim; d += 16) {
          const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(a + d), inv));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), (__m256i)y);
        }
      } else {
        float* o = s.out + token * s.out_stride + head * dim;
        for (int64_t d = 0; d < dim; d += 16) {
          _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(a + d), inv));
        }
      }
      if (s.lse != nullptr) {
        s.lse[token * s.lse_stride + head] = w.mx[row] * s.scale + std::log(w.sum[row]);
      }
    }
  }
}

// The time `threads` threads take for tasks of these costs, each thread taking the next task in
// order (largest first) as it finishes one.
int64_t makespan(std::vector<int64_t> costs, int64_t threads) {
  std::stable_sort(costs.begin(), costs.end(), std::greater<int64_t>());
  std::vector<int64_t> busy(std::max<int64_t>(1, threads), 0);
  for (const int64_t c : costs) *std::min_element(busy.begin(), busy.end()) += c;
  return *std::max_element(busy.begin(), busy.end());
}

// Tasks come planned with every KV head (Task::heads): they then read whole slot rows, one after
// another, where a task of one head reads 128 of every 384 bytes. Measured on a 2-core Xeon with
// AMX over SmolLM2-135M's 30 layers: decode groups 11-15 % faster (4 groups of 4 rows over 1,000
// shared positions: 11.84 -> 10.54 ms), 2 x 512 extend tokens after 1,000 cached ones 13 %. But
// they are a third as many: where the threads would then wait on one another longer than that
// gains (three tasks on two threads; one), each task becomes one task per head (same segments).
// The estimate counts a task's keys times its heads, not its query rows.
void split_heads(std::vector<Task>& tasks, int64_t kv_heads, int64_t threads) {
  std::vector<int64_t> whole, per_head;
  for (const Task& t : tasks) {
    whole.push_back(t.keys);
    for (int64_t j = 0; j < t.heads; ++j) per_head.push_back(t.keys / t.heads);
  }
  // Whole-row tasks take about 85 % of the time of their heads apart (the gains above): split
  // only where they would finish later even so.
  if (makespan(whole, threads) * 85 <= makespan(per_head, threads) * 100) return;
  std::vector<Task> split;
  split.reserve(tasks.size() * kv_heads);
  for (const Task& t : tasks) {
    for (int64_t j = 0; j < t.heads; ++j) {
      split.push_back(t);
      split.back().hk = t.hk + j;
      split.back().heads = 1;
      split.back().keys = t.keys / t.heads;
    }
  }
  tasks.swap(split);
}

// Runs the tasks on the intra-op threads, those seeing the most keys first, each thread taking
// the next task as it finishes one; every task writes only its own outputs.
void run_tasks(std::vector<Task>& tasks, const std::vector<Segment>& segments, const Shape& s,
               const torch::Tensor& k_pool, const torch::Tensor& v_pool) {
  TORCH_CHECK(tiles_available(), "this process may not use AMX tiles (arch_prctl refused)");
  const int64_t threads = at::get_num_threads();
  split_heads(tasks, s.kv_heads, threads);
  std::stable_sort(tasks.begin(), tasks.end(),
                   [](const Task& a, const Task& b) { return a.keys > b.keys; });
  const bf16* kp = k_pool.data_ptr<bf16>();
  const bf16* vp = v_pool.data_ptr<bf16>();
  const int64_t n = static_cast<int64_t>(tasks.size());
  int64_t tiles = 1;  // the scratch's: the largest task's
  for (const Task& t : tasks) {
    tiles = std::max(tiles, t.heads * ((t.nq * s.group + kLanes - 1) / kLanes));
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    configure();
    // Denormal results (a masked row's exp, e^-104) flush to zero: as denormals they take
    // microcode assists on every instruction that meets them. Restored after.
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | kFlushDenormals);
    Scratch w(tiles, s.dim);
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) {
      run_task(tasks[t], segments.data(), s, kp, vp, w);
    }
    _mm_setcsr(csr);
    _tile_release();
  });
}

void check(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
           const torch::Tensor& table) {
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && k_pool.scalar_type() == torch::kBFloat16 &&
                  v_pool.scalar_type() == torch::kBFloat16,
              "the AMX attention kernel takes bfloat16 queries and pools");
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && k_pool.sizes() == v_pool.sizes() &&
                  q.size(2) == k_pool.size(2) && q.size(1) % k_pool.size(1) == 0,
              "q: [T, H, D]; pools: [slots, Hkv, D] with Hkv dividing H");
  TORCH_CHECK(q.size(2) % 64 == 0, "head_dim must be a multiple of 64");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous() &&
                  table.stride(1) == 1 && table.scalar_type() == torch::kInt64,
              "q and the pools contiguous, the table int64 with contiguous rows");
}

// out: [T, H, D] float32 or bfloat16.
Shape shape_of(const torch::Tensor& q, const torch::Tensor& k_pool, double scale,
               torch::Tensor& out, float* lse) {
  const int64_t heads = q.size(1), kv_heads = k_pool.size(1), dim = q.size(2);
  const bool narrow = out.scalar_type() == torch::kBFloat16;
  return {heads, kv_heads, heads / kv_heads, dim, heads * dim, heads * dim, heads,
          static_cast<float>(scale), q.data_ptr<bf16>(),
          narrow ? nullptr : out.data_ptr<float>(), lse,
          narrow ? out.data_ptr<bf16>() : nullptr};
}

// An entry point's inputs checked and its float32 outputs: out [T, H, D] and, with `with_lse`,
// lse [T, H] (else undefined), with the Shape that writes them.
struct Outputs {
  torch::Tensor out, lse;
  Shape shape;
};
Outputs float_outputs(const torch::Tensor& q, const torch::Tensor& k_pool,
                      const torch::Tensor& v_pool, const torch::Tensor& table, double scale,
                      bool with_lse) {
  check(q, k_pool, v_pool, table);
  Outputs o;
  o.out = torch::empty(q.sizes(), q.options().dtype(torch::kFloat32));
  if (with_lse) o.lse = torch::empty({q.size(0), q.size(1)}, q.options().dtype(torch::kFloat32));
  o.shape = shape_of(q, k_pool, scale, o.out, with_lse ? o.lse.data_ptr<float>() : nullptr);
  return o;
}

// Tasks and the segments of keys they read.
struct Plan {
  std::vector<Task> tasks;
  std::vector<Segment> segments;
  // A task of nq consecutive tokens from token0, every KV head, over one segment of keys all
  // its rows see.
  void span_task(int64_t token0, int64_t nq, const int64_t* slots, int64_t n, bool causal,
                 int64_t prefix, const Shape& s) {
    tasks.push_back({token0, nullptr, nq, 0, causal, prefix,
                     static_cast<int64_t>(segments.size()), 1, n * s.kv_heads, s.kv_heads});
    segments.push_back({slots, n, 0, nq * s.group});
  }
};

// The extend tasks: request b's tokens in blocks of kQueryBlock, each with every KV head; token
// i0 + i sees keys key_starts[b] (0 when null) .. prefix_lens[b] + i0 + i.
Plan extend_tasks(const torch::Tensor& q, const torch::Tensor& table, const torch::Tensor& rows,
                  const int64_t* key_starts, const torch::Tensor& prefix_lens,
                  const torch::Tensor& extend_lens, const Shape& s) {
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = prefix_lens.data_ptr<int64_t>();
  const int64_t* ep = extend_lens.data_ptr<int64_t>();
  Plan plan;
  int64_t first = 0;
  for (int64_t b = 0; b < rows.size(0); ++b) {
    const int64_t start = key_starts != nullptr ? key_starts[b] : 0;
    for (int64_t i0 = 0; i0 < ep[b]; i0 += kQueryBlock) {
      const int64_t nq = std::min(kQueryBlock, ep[b] - i0), prefix = pp[b] + i0 - start;
      plan.span_task(first + i0, nq, tp + rp[b] * table.stride(0) + start, prefix + nq, true,
                     prefix, s);
    }
    first += ep[b];
  }
  TORCH_CHECK(first == q.size(0), "extend lengths must add up to the query tokens");
  return plan;
}

}  // namespace

// As attention.cpp's extend_attention (bfloat16 q and pools, head_dim a multiple of 64), but
// returns [T, H, D] bfloat16: each output rounded once, to nearest even, as Tensor.to rounds the
// float32 one (written by the tasks, not converted after them).
torch::Tensor extend_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                               torch::Tensor table, torch::Tensor rows, torch::Tensor prefix_lens,
                               torch::Tensor extend_lens, double scale) {
  check(q, k_pool, v_pool, table);
  auto out = torch::empty(q.sizes(), q.options());
  const Shape s = shape_of(q, k_pool, scale, out, nullptr);
  auto plan = extend_tasks(q, table, rows, nullptr, prefix_lens, extend_lens, s);
  run_tasks(plan.tasks, plan.segments, s, k_pool, v_pool);
  return out;
}

// As attention.cpp's extend_attention_lse. Returns out [T, H, D] and lse [T, H], float32.
std::vector<torch::Tensor> extend_attention_lse(torch::Tensor q, torch::Tensor k_pool,
                                                torch::Tensor v_pool, torch::Tensor table,
                                                torch::Tensor rows, torch::Tensor key_starts,
                                                torch::Tensor prefix_lens,
                                                torch::Tensor extend_lens, double scale) {
  const Outputs o = float_outputs(q, k_pool, v_pool, table, scale, true);
  auto plan = extend_tasks(q, table, rows, key_starts.data_ptr<int64_t>(), prefix_lens,
                           extend_lens, o.shape);
  run_tasks(plan.tasks, plan.segments, o.shape, k_pool, v_pool);
  return {o.out, o.lse};
}

// As attention.cpp's shared_prefix_attention: group g's query tokens tok_offsets[g] ..
// tok_offsets[g + 1] - 1 see keys 0 .. prefix_lens[g] - 1 of table row group_rows[g], each span
// gathered once per (KV head, block of 32 tokens). Returns out [N, H, D] and lse [N, H], float32.
std::vector<torch::Tensor> shared_prefix_attention(torch::Tensor q, torch::Tensor k_pool,
                                                   torch::Tensor v_pool, torch::Tensor table,
                                                   torch::Tensor group_rows,
                                                   torch::Tensor tok_offsets,
                                                   torch::Tensor prefix_lens, double scale) {
  const Outputs o = float_outputs(q, k_pool, v_pool, table, scale, true);
  const Shape& s = o.shape;
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* rp = group_rows.data_ptr<int64_t>();
  const int64_t* op = tok_offsets.data_ptr<int64_t>();
  const int64_t* pp = prefix_lens.data_ptr<int64_t>();
  Plan plan;
  const int64_t groups = group_rows.size(0);
  TORCH_CHECK(op[groups] == q.size(0), "group offsets must end at the query tokens");
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(pp[g] >= 1, "every group's span needs at least one key");
    for (int64_t i0 = 0; i0 < op[g + 1] - op[g]; i0 += kQueryBlock) {
      const int64_t nq = std::min(kQueryBlock, op[g + 1] - op[g] - i0);
      plan.span_task(op[g] + i0, nq, tp + rp[g] * table.stride(0), pp[g], false, 0, s);
    }
  }
  run_tasks(plan.tasks, plan.segments, s, k_pool, v_pool);
  return {o.out, o.lse};
}

// Decode attention with shared prefixes, in one pass: q [B, H, D], one token per request b, which
// sees positions 0 .. seq_lens[b] - 1 of table row rows[b]. The tokens order[offsets[g] ..
// offsets[g + 1]) form group g, whose first spans[g] positions are the same slots in every
// member's row (0: none); each group's span is read once per (KV head, 16 members) for all their
// queries (one task takes every KV head, split_heads), then each member's own keys for its own
// rows (with vector code, own_keys), all in one online softmax per row. Returns [B, H, D]
// bfloat16 (each output rounded once, to nearest even); rows not in `order` ([N], N <= B) are
// left unwritten.
torch::Tensor cascade_decode_attention(torch::Tensor q, torch::Tensor k_pool,
                                       torch::Tensor v_pool, torch::Tensor table,
                                       torch::Tensor rows, torch::Tensor seq_lens,
                                       torch::Tensor order, torch::Tensor offsets,
                                       torch::Tensor spans, double scale) {
  check(q, k_pool, v_pool, table);
  const int64_t batch = q.size(0), groups = spans.size(0);
  for (const auto* t : {&rows, &seq_lens, &order, &offsets, &spans}) {
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->dim() == 1 && t->is_contiguous(),
                "rows, seq_lens, order, offsets and spans: contiguous 1-D int64");
  }
  TORCH_CHECK(rows.size(0) == batch && seq_lens.size(0) == batch && offsets.size(0) == groups + 1,
              "rows, seq_lens: [B]; offsets: [G + 1]; spans: [G]");
  auto out = torch::empty(q.sizes(), q.options());
  const Shape s = shape_of(q, k_pool, scale, out, nullptr);
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  const int64_t* order_p = order.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  const int64_t* sp = spans.data_ptr<int64_t>();
  const int64_t stride = table.stride(0);
  TORCH_CHECK(op[0] == 0 && op[groups] == order.size(0) && order.size(0) <= batch,
              "offsets must run from 0 to the length of order (at most the batch size)");
  Plan plan;
  for (int64_t g = 0; g < groups; ++g) {
    TORCH_CHECK(op[g + 1] > op[g] && sp[g] >= 0, "groups need members and spans >= 0");
    for (int64_t i0 = op[g]; i0 < op[g + 1]; i0 += kMemberBlock) {
      const int64_t nq = std::min(kMemberBlock, op[g + 1] - i0);
      const int64_t* members = order_p + i0;
      int64_t own = 0;
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t b = members[i];
        TORCH_CHECK(b >= 0 && b < batch && lp[b] > sp[g] && lp[b] <= table.size(1),
                    "every member sees at least one key past its group's span, within its row");
        own += lp[b] - sp[g];
      }
      // The span (if any), read once for every member's rows, then each member's own keys for
      // its rows only; every KV head.
      const int64_t segment0 = static_cast<int64_t>(plan.segments.size());
      if (sp[g] > 0) {
        plan.segments.push_back({tp + rp[members[0]] * stride, sp[g], 0, nq * s.group});
      }
      for (int64_t i = 0; i < nq; ++i) {
        plan.segments.push_back({tp + rp[members[i]] * stride + sp[g], lp[members[i]] - sp[g],
                                 i * s.group, (i + 1) * s.group, true});
      }
      plan.tasks.push_back({0, members, nq, 0, false, 0, segment0,
                            static_cast<int64_t>(plan.segments.size()) - segment0,
                            (sp[g] + own) * s.kv_heads, s.kv_heads});
    }
  }
  run_tasks(plan.tasks, plan.segments, s, k_pool, v_pool);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("tiles_available", &tiles_available,
        "whether Linux lets this process use the AMX tiles (asks once)");
  m.def("extend_attention", &extend_attention,
        "causal attention of new tokens over their cached prefix, on AMX tiles (CPU)");
  m.def("extend_attention_lse", &extend_attention_lse,
        "extend attention over each request's keys from a start position, with log-sum-exp, on "
        "AMX tiles");
  m.def("cascade_decode_attention", &cascade_decode_attention,
        "decode attention with each group's shared prefix read once for all its members, on AMX "
        "tiles");
  m.def("shared_prefix_attention", &shared_prefix_attention,
        "attention of groups of query tokens to one shared KV span per group, with log-sum-exp, "
        "on AMX tiles");
}
