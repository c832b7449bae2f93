// Host implementations of the attention output's inverse RoPE and grouped wo_a (dsv4-model §2.7).
#include "kernels/attn_output.h"

#include <cmath>
#include <limits>
#include <string>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/device.h"
#include "kernels/host/host_common.h"

namespace dsv4::kernels {

using namespace host;  // the shared helpers of kernels/host/host_common.h
namespace {

}  // namespace

void inverse_rope_inplace(Tensor& o, int64_t heads, int64_t head_dim, const Tensor& freqs, const Tensor& positions) {
  if (heads < 1) throw ContractError(kInverseRopeOp, "heads", "must be >= 1, got " + std::to_string(heads));
  if (head_dim < 1) throw ContractError(kInverseRopeOp, "head_dim", "must be >= 1, got " + std::to_string(head_dim));
  // One device; the positions range reads host tensors only.
  const bool gpu = runs_on_gpu(kInverseRopeOp, {{"o", &o}, {"freqs", &freqs}, {"positions", &positions}});
  Contract(kInverseRopeOp)
      .arg("o").dtype(DType::bf16).rank(2).contiguous().dim(1, heads * head_dim)
      .arg("freqs").dtype(DType::f32).rank(1).contiguous()
      .arg("positions").dtype(DType::i32).rank(1).contiguous().same_size(0, "o", 0).values_in(0, kInt32Max)
      .check({{"o", &o}, {"freqs", &freqs}, {"positions", &positions}},
             gpu ? Contract::Values::skip : Contract::Values::check);
  const int64_t pairs = freqs.size(0);
  if (pairs < 1 || 2 * pairs > head_dim) {
    throw ContractError(kInverseRopeOp, "freqs", "needs 0 < 2 * shape[0] <= head_dim " + std::to_string(head_dim) +
                                                     ", got shape " + shape_str(freqs.shape()));
  }
  if (gpu) {
    DSV4_GPU_OR_FAIL(kInverseRopeOp, cuda::inverse_rope_inplace(o, heads, head_dim, freqs, positions, current_stream()));
  }
  auto* base = o.data<uint16_t>();
  const float* f = freqs.data<float>();
  const int32_t* pos = positions.data<int32_t>();
  for (int64_t t = 0; t < o.size(0); ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      uint16_t* rope = base + (t * heads + h + 1) * head_dim - 2 * pairs;  // the head's last rope dims
      for (int64_t j = 0; j < pairs; ++j) {
        const float angle = static_cast<float>(pos[t]) * f[j];
        const float c = std::cos(angle);
        const float s = -std::sin(angle);  // the conjugate rotation undoes the forward one
        const float a = bf16_to_f32(rope[2 * j]);
        const float b = bf16_to_f32(rope[2 * j + 1]);
        rope[2 * j] = f32_to_bf16(a * c - b * s);
        rope[2 * j + 1] = f32_to_bf16(a * s + b * c);
      }
    }
  }
}

void grouped_wo_a(const Tensor& o, const Tensor& wo_a, int64_t groups, Tensor& out) {
  Contract(kGroupedWoAOp).arg("o").dtype(DType::bf16).rank(2).inner_contiguous().check({{"o", &o}});
  if (groups < 1 || o.size(1) % groups != 0) {
    throw ContractError(kGroupedWoAOp, "groups",
                        "must be >= 1 and divide o.shape[1] " + std::to_string(o.size(1)) + ", got " + std::to_string(groups));
  }
  const int64_t width = o.size(1) / groups;
  Contract(kGroupedWoAOp)
      .arg("o").rank(2)
      .arg("wo_a").dtype(DType::bf16).rank(2).contiguous().dim(1, width).dim_multiple_of(0, groups)
      .arg("out").dtype(DType::bf16).rank(2).contiguous().same_size(0, "o", 0).same_size(1, "wo_a", 0)
      .check({{"o", &o}, {"wo_a", &wo_a}, {"out", &out}});
  if (runs_on_gpu(kGroupedWoAOp, {{"o", &o}, {"wo_a", &wo_a}, {"out", &out}})) {
    DSV4_GPU_OR_FAIL(kGroupedWoAOp, cuda::grouped_wo_a(o, wo_a, groups, out, current_stream()));
  }
  const int64_t rank = wo_a.size(0) / groups;
  const auto* x = o.data<const uint16_t>();
  const auto* w = wo_a.data<const uint16_t>();
  auto* u = out.data<uint16_t>();
  const int64_t n_out = wo_a.size(0);
  for (int64_t t = 0; t < o.size(0); ++t) {
    for (int64_t g = 0; g < groups; ++g) {
      const uint16_t* xg = x + t * o.stride(0) + g * width;  // group g's heads, contiguous in the row
      for (int64_t i = 0; i < rank; ++i) {
        const uint16_t* wr = w + (g * rank + i) * width;
        // bf16 x bf16 products are exact in f32; the sum is the GPU kernel's f32 accumulator.
        float acc = 0.0f;
        for (int64_t k = 0; k < width; ++k) acc += bf16_to_f32(xg[k]) * bf16_to_f32(wr[k]);
        u[t * n_out + g * rank + i] = f32_to_bf16(acc);
      }
    }
  }
}

}  // namespace dsv4::kernels
