// Attention over the paged KV pool, for the CPU: keys and values are read straight from the pool
// through the request→KV-slot table (no gather copy).
//
// Decode (one query token per request): a task is one request (all its heads, so each slot's K/V
// row is read as one contiguous run) or, when there are too few requests to keep every thread
// busy, one (request, kv head) pair. The G query heads that share a kv head are computed together,
// so each K/V row is read once.
//
// Extend (a request's new tokens after its cached prefix, causal): a task is one (request, kv head,
// block of up to 16 new tokens). Its G x 16 query rows are multiplied against blocks of 16 keys
// converted to float and transposed, so the inner loops are plain vector FMAs with no horizontal
// sums; query j of the request sees keys 0 .. prefix + j.
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

// s[0 .. n) ← softmax(s[0 .. n)), with exp vectorized (libmvec) through the simd reduction.
inline void softmax_in_place(float* s, int64_t n) {
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
  for (int64_t h = 0; h < nh; ++h) softmax_in_place(scores + h * len, len);
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


constexpr int64_t kQueryBlock = 16;  // new tokens per extend task
constexpr int64_t kKeyBlock = 16;    // keys per inner block (one 512-bit vector of floats)

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

// Queries i0 .. i0 + nq - 1 of one request (at positions prefix + i), the G heads of kv head hk.
// Row r = j * G + g of qf / out is query i0 + j, head hk * G + g.
template <typename T>
void extend_block(const T* q, int64_t q_stride, const T* k_pool, const T* v_pool,
                  const int64_t* slots, int64_t prefix, int64_t i0, int64_t nq, int64_t hk,
                  int64_t kv_heads, int64_t group, int64_t dim, float scale, float* qf,
                  float* scores, float* kt, float* vb, float* row, float* acc, float* out,
                  int64_t out_stride) {
  const int64_t nr = nq * group;
  const int64_t n_keys = prefix + i0 + nq;  // the last query sees keys 0 .. n_keys - 1
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
    const int64_t visible = prefix + i0 + r / group + 1;
    softmax_in_place(sr, visible);
    std::fill(sr + visible, sr + n_keys, 0.f);
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

template <typename T>
void run_extend(const torch::Tensor& q, const torch::Tensor& k_pool, const torch::Tensor& v_pool,
                const torch::Tensor& table, const torch::Tensor& rows,
                const torch::Tensor& prefix_lens, const torch::Tensor& extend_lens,
                double scale, torch::Tensor& out) {
  const int64_t heads = q.size(1), dim = q.size(2);
  const int64_t kv_heads = k_pool.size(1), group = heads / kv_heads;
  const int64_t batch = rows.size(0), table_stride = table.stride(0);
  const T* qp = q.data_ptr<T>();
  const T* kp = k_pool.data_ptr<T>();
  const T* vp = v_pool.data_ptr<T>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  const int64_t* pp = prefix_lens.data_ptr<int64_t>();
  const int64_t* ep = extend_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  // Tasks (request, kv head, query block), largest key range first for a balanced split.
  struct Task { int64_t b, hk, i0, first_token; };
  std::vector<Task> tasks;
  int64_t first = 0, max_keys = 1;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i0 = 0; i0 < ep[b]; i0 += kQueryBlock) {
      for (int64_t hk = 0; hk < kv_heads; ++hk) tasks.push_back({b, hk, i0, first});
    }
    max_keys = std::max(max_keys, pp[b] + ep[b]);
    first += ep[b];
  }
  TORCH_CHECK(first == q.size(0), "extend lengths must add up to the query tokens");
  const int64_t rows_max = kQueryBlock * group;
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(rows_max * dim), scores(rows_max * max_keys), kt(dim * kKeyBlock),
        vb(kKeyBlock * dim), row(dim), acc(rows_max * dim);
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      const int64_t nq = std::min(kQueryBlock, ep[task.b] - task.i0);
      extend_block<T>(qp + task.first_token * heads * dim, heads * dim, kp, vp,
                      tp + rp[task.b] * table_stride, pp[task.b], task.i0, nq, task.hk, kv_heads,
                      group, dim, static_cast<float>(scale), qf.data(), scores.data(), kt.data(),
                      vb.data(), row.data(), acc.data(), op + task.first_token * heads * dim,
                      heads * dim);
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

// q: [T, H, D], the new tokens of every request back to back; k_pool, v_pool: [num_slots, Hkv, D]
// (same dtype as q, already holding the new tokens' K/V); table: [rows, context] int64; rows,
// prefix_lens, extend_lens: [B] int64. Returns [T, H, D] float32.
torch::Tensor extend_attention(torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                               torch::Tensor table, torch::Tensor rows, torch::Tensor prefix_lens,
                               torch::Tensor extend_lens, double scale) {
  auto out = torch::empty(q.sizes(), q.options().dtype(torch::kFloat32));
  if (q.scalar_type() == torch::kBFloat16) {
    run_extend<at::BFloat16>(q, k_pool, v_pool, table, rows, prefix_lens, extend_lens, scale, out);
  } else {
    run_extend<float>(q, k_pool, v_pool, table, rows, prefix_lens, extend_lens, scale, out);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("extend_attention", &extend_attention,
        "causal attention of new tokens over their cached prefix in the paged KV pool (CPU)");
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over the paged KV pool (CPU)");
}
