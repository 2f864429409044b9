// Applies a grammar's token bitmask to logits on the CPU: logits[i, t] = -inf wherever bit t of
// bitmask[i] is 0. The bitmask is xgrammar's packed format (int32 words, token t at bit t % 32 of
// word t / 32, 1 = allowed), so the result equals xgrammar's apply_token_bitmask_inplace; this
// pass is one read of each word and one write of the disallowed logits, rows in parallel.
//
// A grammar usually allows few tokens, so most words are 0: those are 32 stores of -inf, which the
// compiler vectorises; words of all ones are skipped.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <limits>

namespace {

void mask_row(float* row, const int32_t* words, int64_t vocab) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t full = vocab / 32;
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t word = static_cast<uint32_t>(words[w]);
    float* out = row + w * 32;
    if (word == 0xFFFFFFFFu) continue;
    if (word == 0u) {
#pragma omp simd
      for (int j = 0; j < 32; ++j) out[j] = kNegInf;
      continue;
    }
#pragma omp simd
    for (int j = 0; j < 32; ++j) {
      if (((word >> j) & 1u) == 0u) out[j] = kNegInf;
    }
  }
  const int64_t rest = vocab - full * 32;
  if (rest > 0) {
    const uint32_t word = static_cast<uint32_t>(words[full]);
    float* out = row + full * 32;
    for (int64_t j = 0; j < rest; ++j) {
      if (((word >> j) & 1u) == 0u) out[j] = kNegInf;
    }
  }
}

// logits: [S, >= vocab] float32, rows contiguous; bitmask: [>= S, >= ceil(vocab / 32)] int32;
// indices: the rows of logits (and of bitmask) to mask.
void apply_token_bitmask(torch::Tensor logits, torch::Tensor bitmask, torch::Tensor indices,
                         int64_t vocab) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat32, "logits: [S, V] float32");
  TORCH_CHECK(logits.stride(1) == 1, "logits rows must be contiguous");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == torch::kInt32 && bitmask.is_contiguous(),
              "bitmask: [B, W] contiguous int32");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == torch::kInt64, "indices: [n] int64");
  TORCH_CHECK(vocab <= logits.size(1) && (vocab + 31) / 32 <= bitmask.size(1), "vocab too large");
  auto idx = indices.contiguous();
  const int64_t* rows = idx.data_ptr<int64_t>();
  const int64_t n = idx.numel();
  for (int64_t k = 0; k < n; ++k) {
    TORCH_CHECK(rows[k] >= 0 && rows[k] < logits.size(0) && rows[k] < bitmask.size(0), "row out of range");
  }
  float* base = logits.data_ptr<float>();
  const int32_t* bits = bitmask.data_ptr<int32_t>();
  const int64_t lstride = logits.stride(0), bstride = bitmask.size(1);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      mask_row(base + rows[k] * lstride, bits + rows[k] * bstride, vocab);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("apply_token_bitmask", &apply_token_bitmask,
        "logits[i, t] = -inf where bit t of bitmask[i] is 0, for the rows i in indices");
}
