// Decode attention over the paged KV pool, for the CPU: one query token per request, keys and
// values read straight from the pool through the request→KV-slot table (no gather copy).
// One task per (request, kv head); the G query heads sharing that kv head are computed together,
// so each K/V row is read from memory once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) {
  uint16_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

template <typename T>
void attend_one(const T* q, const T* k_pool, const T* v_pool, const int64_t* slots, int64_t len,
                int64_t hk, int64_t kv_heads, int64_t group, int64_t dim, float scale,
                float* qf, float* scores, float* acc, float* out) {
  // qf: [group, dim]; scores: [group, len]; acc: [group, dim]; out: [group, dim]
  for (int64_t i = 0; i < group * dim; ++i) qf[i] = to_float(q[i]) * scale;
  for (int64_t l = 0; l < len; ++l) {
    const T* kr = k_pool + (slots[l] * kv_heads + hk) * dim;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = qf + g * dim;
      float s = 0.f;
      for (int64_t d = 0; d < dim; ++d) s += qg[d] * to_float(kr[d]);
      scores[g * len + l] = s;
    }
  }
  std::fill(acc, acc + group * dim, 0.f);
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * len;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < len; ++l) m = std::max(m, sg[l]);
    float sum = 0.f;
    for (int64_t l = 0; l < len; ++l) {
      sg[l] = std::exp(sg[l] - m);
      sum += sg[l];
    }
    const float inv = 1.f / sum;
    for (int64_t l = 0; l < len; ++l) sg[l] *= inv;
  }
  for (int64_t l = 0; l < len; ++l) {
    const T* vr = v_pool + (slots[l] * kv_heads + hk) * dim;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * len + l];
      float* ag = acc + g * dim;
      for (int64_t d = 0; d < dim; ++d) ag[d] += p * to_float(vr[d]);
    }
  }
  std::memcpy(out, acc, sizeof(float) * group * dim);
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
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), scores(group * max_len);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, hk = task % kv_heads;
      const int64_t* slots = tp + rp[b] * table_stride;
      const int64_t offset = (b * heads + hk * group) * dim;
      attend_one<T>(qp + offset, kp, vp, slots, lp[b], hk, kv_heads, group, dim,
                    static_cast<float>(scale), qf.data(), scores.data(), acc.data(), op + offset);
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
