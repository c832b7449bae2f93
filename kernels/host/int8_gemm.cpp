#include "kernels/int8_gemm.h"

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

constexpr float kQMax = 127.0f;

// The row rule of int8_gemm.h on v[0, n) (already f32): writes the codes, returns the scale.
float quantize_row(const float* v, int64_t n, int8_t* q) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < n; ++k) {
    finite = finite && std::isfinite(v[k]);
    amax = std::max(amax, std::fabs(v[k]));
  }
  if (!finite) {  // the row's outputs become NaN through its scale
    std::fill(q, q + n, int8_t{0});
    return std::numeric_limits<float>::quiet_NaN();
  }
  amax = std::max(amax, kInt8AmaxFloor);
  const float inv = kQMax / amax;
  for (int64_t k = 0; k < n; ++k) {
    const float scaled = v[k] * inv;
    q[k] = static_cast<int8_t>(std::clamp(std::nearbyint(scaled), -kQMax, kQMax));
  }
  return amax / kQMax;
}

}  // namespace

void act_quant_int8(const Tensor& x, Tensor& q, Tensor& scales) {
  const char* op = "act_quant_int8";
  Contract(op).arg("x").dtype_in({DType::bf16, DType::f32}).rank(2).inner_contiguous().check({{"x", &x}});
  const int64_t T = x.size(0);
  const int64_t K = x.size(1);
  Contract(op)
      .arg("q").dtype(DType::i8).rank(2).inner_contiguous().dim(0, T).dim(1, K)
      .arg("scales").dtype(DType::f32).rank(1).contiguous().dim(0, T)
      .check({{"q", &q}, {"scales", &scales}});
  if (runs_on_gpu(op, {{"x", &x}, {"q", &q}, {"scales", &scales}})) {
    DSV4_GPU_OR_FAIL(op, cuda::act_quant_int8(x, q, scales, current_stream()));
  }
  if (T == 0) return;

  std::vector<float> row(static_cast<size_t>(K));
  auto* qb = q.data<int8_t>();
  auto* sb = scales.data<float>();
  for (int64_t t = 0; t < T; ++t) {
    if (x.dtype() == DType::bf16) {
      const auto* xr = x.data<uint16_t>() + t * x.stride(0);
      for (int64_t k = 0; k < K; ++k) row[static_cast<size_t>(k)] = bf16_to_f32(xr[k]);
    } else {
      const float* xr = x.data<float>() + t * x.stride(0);
      std::copy(xr, xr + K, row.begin());
    }
    sb[t] = quantize_row(row.data(), K, qb + t * q.stride(0));
  }
}

Int8Weight quantize_weight_int8(const Tensor& w_dequantized) {
  const char* op = "quantize_weight_int8";
  const Tensor& w = w_dequantized;
  Contract(op).arg("w_dequantized").dtype(DType::f32).rank(2).inner_contiguous().check({{"w_dequantized", &w}});
  require_host(op, "w_dequantized", w);
  const int64_t N = w.size(0);
  const int64_t K = w.size(1);
  Int8Weight r{Tensor::empty({N, K}, DType::i8, w.name() + ".q_int8"),
               Tensor::empty({N}, DType::f32, w.name() + ".scale_int8")};
  auto* qb = r.q.data<int8_t>();
  auto* sb = r.scales.data<float>();
  for (int64_t n = 0; n < N; ++n) {
    const float* wr = w.data<float>() + n * w.stride(0);
    for (int64_t k = 0; k < K; ++k) {
      if (!std::isfinite(wr[k])) {
        throw ContractError(op, "w_dequantized", "element [" + std::to_string(n) + ", " + std::to_string(k) +
                                                      "] is not finite; a weight must quantize to a finite scale");
      }
    }
    sb[n] = quantize_row(wr, K, qb + n * K);
  }
  return r;
}

void gemm_int8_per_channel(const Tensor& q_act, const Tensor& act_scales, const Tensor& w, const Tensor& w_scales,
                           Tensor& out) {
  const char* op = "gemm_int8_per_channel";
  Contract(op).arg("q_act").dtype(DType::i8).rank(2).inner_contiguous().check({{"q_act", &q_act}});
  const int64_t T = q_act.size(0);
  const int64_t K = q_act.size(1);
  if (K > kInt8MaxK) {
    throw ContractError(op, "q_act", "K = " + std::to_string(K) + " exceeds " + std::to_string(kInt8MaxK) +
                                         ", the largest K whose int32 accumulation is exact");
  }
  Contract(op)
      .arg("act_scales").dtype(DType::f32).rank(1).contiguous().dim(0, T)
      .arg("w").dtype(DType::i8).rank(2).contiguous().dim(1, K)
      .arg("w_scales").dtype(DType::f32).rank(1).contiguous().same_size(0, "w", 0)
      .arg("out").dtype(DType::bf16).rank(2).inner_contiguous().dim(0, T).same_size(1, "w", 0)
      .check({{"act_scales", &act_scales}, {"w", &w}, {"w_scales", &w_scales}, {"out", &out}});
  if (runs_on_gpu(op, {{"q_act", &q_act}, {"act_scales", &act_scales}, {"w", &w}, {"w_scales", &w_scales}, {"out", &out}})) {
    DSV4_GPU_OR_FAIL(op, cuda::gemm_int8_per_channel(q_act, act_scales, w, w_scales, out, current_stream()));
  }
  const int64_t N = w.size(0);
  if (T == 0 || N == 0) return;

  const auto* qa = q_act.data<int8_t>();
  const auto* qw = w.data<int8_t>();
  const float* sa = act_scales.data<float>();
  const float* sw = w_scales.data<float>();
  auto* y = out.data<uint16_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int8_t* arow = qa + t * q_act.stride(0);
    for (int64_t n = 0; n < N; ++n) {
      const int8_t* wrow = qw + n * K;
      int32_t acc = 0;  // exact: K <= kInt8MaxK bounds |acc| by 2^31 - 1
      for (int64_t k = 0; k < K; ++k) acc += static_cast<int32_t>(arow[k]) * static_cast<int32_t>(wrow[k]);
      const float scaled = static_cast<float>(acc) * sa[t];
      y[t * out.stride(0) + n] = f32_to_bf16(scaled * sw[n]);
    }
  }
}

}  // namespace dsv4::kernels
