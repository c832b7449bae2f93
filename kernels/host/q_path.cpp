// Host implementations of the query path's element-wise kernels. One "thread block" per row (and per
// head), replaying the reference's arithmetic order so quant-sim results are equal bit for bit.
#include "kernels/q_path.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/device.h"
#include "kernels/host/host_common.h"

namespace dsv4::kernels {

using namespace host;  // the shared helpers of kernels/host/host_common.h
namespace {

// Forward (or conjugate) rotation of the `pairs` interleaved pairs at x, each result rounded to bf16.
void rope_bf16(float* x, int64_t pairs, const float* freqs, int32_t pos) {
  for (int64_t j = 0; j < pairs; ++j) {
    const float angle = static_cast<float>(pos) * freqs[j];
    const float c = std::cos(angle);
    const float s = std::sin(angle);
    const float a = x[2 * j];
    const float b = x[2 * j + 1];
    x[2 * j] = round_bf16(a * c - b * s);
    x[2 * j + 1] = round_bf16(a * s + b * c);
  }
}

// Block quant-dequant with power-of-two (ue8m0) scales (§2.9), each result rounded to bf16.
void quant_dequant(float* x, int64_t n, int64_t block, IndexerQuant quant) {
  if (quant == IndexerQuant::fp4) {
    fp4_quant_dequant_blocks(x, n, block);
  } else {
    fp8_quant_dequant_blocks(x, n, block, /*round_to_e4m3=*/true);
  }
  for (int64_t i = 0; i < n; ++i) x[i] = round_bf16(x[i]);
}

// The shared contract of the per-head in-place kernels: dense q, a rope table that fits a head, and
// one valid position per row (checked for host tensors: the values live there). Returns rope_dim;
// *gpu tells whether the tensors live on a GPU.
int64_t check_heads_contract(const char* op, const Tensor& q, int64_t heads, int64_t head_dim, const Tensor& freqs,
                             const Tensor& positions, bool* gpu) {
  if (heads < 1) throw ContractError(op, "heads", "must be >= 1, got " + std::to_string(heads));
  if (head_dim < 1) throw ContractError(op, "head_dim", "must be >= 1, got " + std::to_string(head_dim));
  *gpu = runs_on_gpu(op, {{"q", &q}, {"freqs", &freqs}, {"positions", &positions}});
  Contract(op)
      .arg("q").dtype(DType::bf16).rank(2).contiguous().dim(1, heads * head_dim)
      .arg("freqs").dtype(DType::f32).rank(1).contiguous()
      .arg("positions").dtype(DType::i32).rank(1).contiguous().same_size(0, "q", 0).values_in(0, kInt32Max)
      .check({{"q", &q}, {"freqs", &freqs}, {"positions", &positions}},
             *gpu ? Contract::Values::skip : Contract::Values::check);
  const int64_t rope_dim = 2 * freqs.size(0);
  if (rope_dim < 1 || rope_dim > head_dim) {
    throw ContractError(op, "freqs", "needs 0 < 2 * shape[0] <= head_dim " + std::to_string(head_dim) + ", got shape " +
                                         shape_str(freqs.shape()));
  }
  return rope_dim;
}

}  // namespace

void rms_norm(const Tensor& x, const Tensor& weight, double eps, Tensor& out) {
  static const Contract contract = Contract(kRmsNormOp)
                                       .arg("x").dtype(DType::bf16).rank(2).inner_contiguous()
                                       .arg("weight").dtype(DType::f32).rank(1).contiguous().same_size(0, "x", 1)
                                       .arg("out").dtype(DType::bf16).rank(2).contiguous().same_size(0, "x", 0)
                                       .same_size(1, "x", 1);
  contract.check({{"x", &x}, {"weight", &weight}, {"out", &out}});
  if (runs_on_gpu(kRmsNormOp, {{"x", &x}, {"weight", &weight}, {"out", &out}})) {
    DSV4_GPU_OR_FAIL(kRmsNormOp, cuda::rms_norm(x, weight, eps, out, current_stream()));
  }
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  const auto* in = x.data<const uint16_t>();
  const float* w = weight.data<float>();
  auto* y = out.data<uint16_t>();
  std::vector<float> row(static_cast<size_t>(n));
  for (int64_t t = 0; t < rows; ++t) {
    const uint16_t* xr = in + t * x.stride(0);  // rows may be padded: the view's stride
    for (int64_t i = 0; i < n; ++i) row[static_cast<size_t>(i)] = bf16_to_f32(xr[i]);
    const float r = inverse_rms(row.data(), n, eps);
    for (int64_t i = 0; i < n; ++i) y[t * n + i] = f32_to_bf16(row[static_cast<size_t>(i)] * r * w[i]);
  }
}

void q_norm_rope_inplace(Tensor& q, int64_t heads, int64_t head_dim, double eps, const Tensor& freqs,
                         const Tensor& positions) {
  bool gpu = false;
  const int64_t rope_dim = check_heads_contract(kQNormRopeOp, q, heads, head_dim, freqs, positions, &gpu);
  if (gpu) {
    DSV4_GPU_OR_FAIL(kQNormRopeOp, cuda::q_norm_rope_inplace(q, heads, head_dim, eps, freqs, positions, current_stream()));
  }
  auto* base = q.data<uint16_t>();
  const int32_t* pos = positions.data<int32_t>();
  std::vector<float> v(static_cast<size_t>(head_dim));
  for (int64_t t = 0; t < q.size(0); ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      uint16_t* qh = base + (t * heads + h) * head_dim;  // dense by contract
      for (int64_t i = 0; i < head_dim; ++i) v[static_cast<size_t>(i)] = bf16_to_f32(qh[i]);
      // Over all head dims, rope dims included, before the rotation (§2.1 step 3).
      const float r = inverse_rms(v.data(), head_dim, eps);
      for (int64_t i = 0; i < head_dim; ++i) v[static_cast<size_t>(i)] = round_bf16(v[static_cast<size_t>(i)] * r);
      // RoPE reads the bf16 normed values, as the unfused reference does.
      rope_bf16(v.data() + head_dim - rope_dim, rope_dim / 2, freqs.data<float>(), pos[t]);
      for (int64_t i = 0; i < head_dim; ++i) qh[i] = f32_to_bf16(v[static_cast<size_t>(i)]);
    }
  }
}

void indexer_q(Tensor& q, int64_t heads, int64_t head_dim, const Tensor& freqs, const Tensor& positions,
               IndexerQuant quant, int64_t block) {
  bool gpu = false;
  const int64_t rope_dim = check_heads_contract(kIndexerQOp, q, heads, head_dim, freqs, positions, &gpu);
  if ((head_dim & (head_dim - 1)) != 0) {
    throw ContractError(kIndexerQOp, "head_dim", "must be a power of two (Hadamard), got " + std::to_string(head_dim));
  }
  if (block < 1 || head_dim % block != 0) {
    throw ContractError(kIndexerQOp, "block",
                        "must be >= 1 and divide head_dim " + std::to_string(head_dim) + ", got " + std::to_string(block));
  }
  if (gpu) {
    DSV4_GPU_OR_FAIL(kIndexerQOp, cuda::indexer_q(q, heads, head_dim, freqs, positions, quant, block, current_stream()));
  }
  auto* base = q.data<uint16_t>();
  const int32_t* pos = positions.data<int32_t>();
  std::vector<float> v(static_cast<size_t>(head_dim));
  for (int64_t t = 0; t < q.size(0); ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      uint16_t* qh = base + (t * heads + h) * head_dim;
      for (int64_t i = 0; i < head_dim; ++i) v[static_cast<size_t>(i)] = bf16_to_f32(qh[i]);
      rope_bf16(v.data() + head_dim - rope_dim, rope_dim / 2, freqs.data<float>(), pos[t]);
      hadamard_inplace(v.data(), head_dim);
      // Each op of the reference ends in a bf16 tensor, so the quantiser sees bf16 inputs.
      for (float& e : v) e = round_bf16(e);
      quant_dequant(v.data(), head_dim, block, quant);
      for (int64_t i = 0; i < head_dim; ++i) qh[i] = f32_to_bf16(v[static_cast<size_t>(i)]);
    }
  }
}

}  // namespace dsv4::kernels
