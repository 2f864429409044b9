// Decode attention over the paged KV pool, for the CPU: one query token per request, keys and
// values read straight from the pool through the request→KV-slot table (no gather copy).
// A task is one request (all its heads, so each slot's K/V row is read as one contiguous run) or,
// when there are too few requests to keep every thread busy, one (request, kv head) pair. The G
// query heads that share a kv head are computed together, so each K/V row is read once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline void load_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, sizeof(float) * n); }
inline void load_row(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

// Attends the query heads of kv heads [h0, h1) of one request.
template <typename T>
void attend(const T* q, const T* k_pool, const T* v_pool, const int64_t* slots, int64_t len,
            int64_t h0, int64_t h1, int64_t kv_heads, int64_t group, int64_t dim, float scale,
            float* qf, float* row, float* scores, float* out) {
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
    float* sh = scores + h * len;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < len; ++l) m = std::max(m, sh[l]);
    float sum = 0.f;
    for (int64_t l = 0; l < len; ++l) {
      sh[l] = std::exp(sh[l] - m);
      sum += sh[l];
    }
    const float inv = 1.f / sum;
    for (int64_t l = 0; l < len; ++l) sh[l] *= inv;
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

template <typename T>
void run(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
         const torch::Tensor& table, const torch::Tensor& rows, const torch::Tensor& seq_lens,
         double scale, torch::Tensor& out) {
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_pool.size(1), group = heads / kv_heads;
  const int64_t table_stride = table.stride(0);
  const T* qp = q.data_ptr<T>();
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
      const int64_t* slots = tp + rp[b] * table_stride;
      const int64_t offset = (b * heads + h0 * group) * dim;
      attend<T>(qp + (b * heads) * dim, kp, vp, slots, lp[b], h0, h0 + span, kv_heads, group,
                dim, static_cast<float>(scale), qf.data(), row.data(), scores.data(), op + offset);
    }
  });
}

}  // namespace

// q: [B, H, D]; k_pool, v_pool: [num_slots, Hkv, D] (same dtype as q); table: [rows, context]
// int64; rows, seq_lens: [B] int64 (keys are positions 0 .. seq_len-1). Returns [B, H, D] float32.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                                     torch::Tensor table, torch::Tensor rows,
                                     torch::Tensor seq_lens, double scale) {
  auto out = torch::empty(q.sizes(), q.options().dtype(torch::kFloat32));
  if (q.scalar_type() == torch::kBFloat16) {
    run<at::BFloat16>(q, k_pool, v_pool, table, rows, seq_lens, scale, out);
  } else {
    run<float>(q, k_pool, v_pool, table, rows, seq_lens, scale, out);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over the paged KV pool (CPU)");
}
