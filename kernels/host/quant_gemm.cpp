#include "kernels/quant_gemm.h"

#include <vector>

#include <algorithm>
#include <array>
#include <cmath>
#include <string>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/device.h"
#include "kernels/host/host_common.h"
#include "kernels/int8_gemm.h"

namespace dsv4::kernels {

using namespace host;  // the shared helpers of kernels/host/host_common.h

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void require_positive_block(const char* op, const char* name, int64_t block) {
  if (block <= 0) throw ContractError(op, name, "must be positive, got " + std::to_string(block));
}

// All 256 e4m3fn codes decoded once: the inner loops then read a table, as the GPU path reads
// hardware-converted values.
const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int c = 0; c < 256; ++c) t[static_cast<size_t>(c)] = e4m3fn_to_f32(static_cast<uint8_t>(c));
    return t;
  }();
  return table;
}

// Element k of row t of an inner-contiguous bf16 or f32 matrix, as f32.
float load_act(const Tensor& x, const uint8_t* base, int64_t t, int64_t k) {
  const int64_t i = t * x.stride(0) + k;
  if (x.dtype() == DType::bf16) return bf16_to_f32(reinterpret_cast<const uint16_t*>(base)[i]);
  return reinterpret_cast<const float*>(base)[i];
}

// The checks shared by both GEMMs for the activation side and the output.
void check_act_and_out(const char* op, const Tensor& q_act, const Tensor& act_scales, const Tensor& out, int64_t N,
                       int64_t act_block) {
  const int64_t T = q_act.dim() == 2 ? q_act.size(0) : 0;
  const int64_t K = q_act.dim() == 2 ? q_act.size(1) : 0;
  Contract(op)
      .arg("q_act").dtype(DType::f8_e4m3fn).rank(2).inner_contiguous().dim_multiple_of(1, act_block)
      .arg("act_scales").dtype(DType::ue8m0).rank(2).contiguous().dim(0, T).dim(1, K / act_block)
      .arg("out").dtype(DType::bf16).rank(2).inner_contiguous().dim(0, T).dim(1, N)
      .check({{"q_act", &q_act}, {"act_scales", &act_scales}, {"out", &out}});
}

// The FP8 weight-scale shape rule, shared by the GEMM and linear_fp8 (which names it "w_scale").
void check_fp8_w_scales(const char* op, const char* name, const Tensor& w_scales, int64_t N, int64_t K,
                        int64_t block) {
  Contract(op)
      .arg(name).dtype(DType::ue8m0).rank(2).contiguous().dim(0, ceil_div(N, block)).dim(1, K / block)
      .check({{name, &w_scales}});
}

void check_fp8_weight(const char* op, const Tensor& w, int64_t K) {
  Contract(op).arg("w").dtype(DType::f8_e4m3fn).rank(2).contiguous().dim(1, K).check({{"w", &w}});
}

}  // namespace

void act_quant_fp8(const Tensor& x, int64_t block, Tensor& q, Tensor& scales) {
  const char* op = "act_quant_fp8";
  require_positive_block(op, "block", block);
  Contract(op)
      .arg("x").dtype_in({DType::bf16, DType::f32}).rank(2).inner_contiguous().dim_multiple_of(1, block)
      .check({{"x", &x}});
  const int64_t T = x.size(0);
  const int64_t K = x.size(1);
  Contract(op)
      .arg("q").dtype(DType::f8_e4m3fn).rank(2).inner_contiguous().dim(0, T).dim(1, K)
      .arg("scales").dtype(DType::ue8m0).rank(2).contiguous().dim(0, T).dim(1, K / block)
      .check({{"q", &q}, {"scales", &scales}});
  if (runs_on_gpu(op, {{"x", &x}, {"q", &q}, {"scales", &scales}})) {
    DSV4_GPU_OR_FAIL(op, cuda::act_quant_fp8(x, block, q, scales, current_stream()));
  }
  if (x.numel() == 0) return;

  const auto* xb = static_cast<const uint8_t*>(x.data_ptr());
  auto* qb = q.data<uint8_t>();
  auto* sb = scales.data<uint8_t>();
  const int64_t nb = K / block;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * block;
      float amax = 0.0f;
      for (int64_t k = k0; k < k0 + block; ++k) amax = std::max(amax, std::fabs(load_act(x, xb, t, k)));
      // A multiply by the fp32 reciprocal, then the smallest power of two at or above it (§2.9).
      const uint8_t code = f32_to_ue8m0_ceil(std::max(amax, 1e-4f) * (1.0f / 448.0f));
      const float s = ue8m0_to_f32(code);
      sb[t * nb + b] = code;
      // x / s with a power-of-two s is exact: the only rounding is the e4m3 one.
      for (int64_t k = k0; k < k0 + block; ++k) {
        qb[t * q.stride(0) + k] = f32_to_e4m3fn(std::clamp(load_act(x, xb, t, k) / s, -448.0f, 448.0f));
      }
    }
  }
}

void gemm_fp8_block_scaled(const Tensor& q_act, const Tensor& act_scales, const Tensor& w, const Tensor& w_scales,
                           Tensor& out, int64_t block) {
  const char* op = "gemm_fp8_block_scaled";
  require_positive_block(op, "block", block);
  if (!w.defined()) throw ContractError(op, "w", "required but missing");
  if (w.dim() != 2) throw ContractError(op, "w", "rank 2 expected, got shape " + shape_str(w.shape()));
  const int64_t N = w.size(0);
  check_act_and_out(op, q_act, act_scales, out, N, block);
  const int64_t T = q_act.size(0);
  const int64_t K = q_act.size(1);
  check_fp8_weight(op, w, K);
  check_fp8_w_scales(op, "w_scales", w_scales, N, K, block);
  if (runs_on_gpu(op, {{"q_act", &q_act}, {"act_scales", &act_scales}, {"w", &w}, {"w_scales", &w_scales}, {"out", &out}})) {
    DSV4_GPU_OR_FAIL(op, cuda::gemm_fp8_block_scaled(q_act, act_scales, w, w_scales, out, block, current_stream()));
  }
  if (T == 0 || N == 0) return;

  const auto& lut = e4m3_table();
  const auto* qa = q_act.data<uint8_t>();
  const auto* qw = w.data<uint8_t>();
  const auto* sa = act_scales.data<uint8_t>();
  const auto* sw = w_scales.data<uint8_t>();
  auto* y = out.data<uint16_t>();
  const int64_t nb = K / block;
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* arow = qa + t * q_act.stride(0);
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* wrow = qw + n * K;
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        // The block's partial product in fp32, ascending k; e4m3 x e4m3 products are exact in fp32.
        float partial = 0.0f;
        for (int64_t k = b * block; k < (b + 1) * block; ++k) partial += lut[arow[k]] * lut[wrow[k]];
        // Scale then accumulate, per block (§2.9): the two scales are powers of two, so their
        // product and the scaling are exact; only the accumulator add rounds.
        const float scale = ue8m0_to_f32(sa[t * nb + b]) * ue8m0_to_f32(sw[(n / block) * nb + b]);
        acc += partial * scale;
      }
      y[t * out.stride(0) + n] = f32_to_bf16(acc);
    }
  }
}

void gemm_fp4_weights(const Tensor& q_act, const Tensor& act_scales, const Tensor& w, const Tensor& w_scales,
                      Tensor& out, int64_t act_block, int64_t w_block) {
  const char* op = "gemm_fp4_weights";
  require_positive_block(op, "act_block", act_block);
  require_positive_block(op, "w_block", w_block);
  if (act_block % w_block != 0 || w_block % 2 != 0) {
    throw ContractError(op, "w_block", "must be even and divide act_block " + std::to_string(act_block) + ", got " +
                                           std::to_string(w_block));
  }
  if (!w.defined()) throw ContractError(op, "w", "required but missing");
  if (w.dim() != 2) throw ContractError(op, "w", "rank 2 expected, got shape " + shape_str(w.shape()));
  const int64_t N = w.size(0);
  check_act_and_out(op, q_act, act_scales, out, N, act_block);
  const int64_t T = q_act.size(0);
  const int64_t K = q_act.size(1);
  Contract(op)
      .arg("w").dtype_in({DType::i8, DType::u8}).rank(2).contiguous().dim(1, K / 2)
      .arg("w_scales").dtype(DType::ue8m0).rank(2).contiguous().dim(0, N).dim(1, K / w_block)
      .check({{"w", &w}, {"w_scales", &w_scales}});
  if (runs_on_gpu(op, {{"q_act", &q_act}, {"act_scales", &act_scales}, {"w", &w}, {"w_scales", &w_scales}, {"out", &out}})) {
    DSV4_GPU_OR_FAIL(op, cuda::gemm_fp4_weights(q_act, act_scales, w, w_scales, out, act_block, w_block, current_stream()));
  }
  if (T == 0 || N == 0) return;

  const auto& lut = e4m3_table();
  const auto* qa = q_act.data<uint8_t>();
  const auto* qw = w.data<uint8_t>();
  const auto* sa = act_scales.data<uint8_t>();
  const auto* sw = w_scales.data<uint8_t>();
  auto* y = out.data<uint16_t>();
  const int64_t na = K / act_block;
  const int64_t nw = K / w_block;
  // Both operands decoded once (the same values and products as decoding per use).
  std::vector<float> wf(static_cast<size_t>(N * K)), af(static_cast<size_t>(K));
  float nibble[16];
  for (uint8_t c = 0; c < 16; ++c) nibble[c] = e2m1_to_f32(c);
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* packed = qw + n * (K / 2);
    float* dst = wf.data() + n * K;
    for (int64_t k = 0; k < K; k += 2) {  // low nibble = even k
      dst[k] = nibble[packed[k / 2] & 0xF];
      dst[k + 1] = nibble[packed[k / 2] >> 4];
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    const uint8_t* arow = qa + t * q_act.stride(0);
    for (int64_t k = 0; k < K; ++k) af[static_cast<size_t>(k)] = lut[arow[k]];
    for (int64_t n = 0; n < N; ++n) {
      const float* wrow = wf.data() + n * K;
      float acc = 0.0f;
      for (int64_t b = 0; b < nw; ++b) {
        // e4m3 x e2m1 products are exact in fp32; the block sum rounds in ascending k.
        float partial = 0.0f;
        for (int64_t k = b * w_block; k < (b + 1) * w_block; ++k) partial += af[static_cast<size_t>(k)] * wrow[k];
        const int64_t ka = (b * w_block) / act_block;  // the activation block holding this weight block
        const float scale = ue8m0_to_f32(sa[t * na + ka]) * ue8m0_to_f32(sw[n * nw + b]);
        acc += partial * scale;
      }
      y[t * out.stride(0) + n] = f32_to_bf16(acc);
    }
  }
}

namespace {

// linear_fp8's and linear_projection's FP8 path; `op` names the caller in the errors.
void project_fp8(const char* op, const Tensor& x, const Tensor& w, const Tensor& w_scale, Tensor& out,
                 int64_t block = kFp8Block) {
  if (!w_scale.defined()) {
    throw ContractError(op, "w_scale", "undefined; pass kNoWeightScale for bf16 weights");
  }
  if (w.defined() && w.dtype() != DType::f8_e4m3fn) {
    throw ContractError(op, "w_scale", "a block-scale tensor needs f8_e4m3fn weights, w is " + std::string(dtype_name(w.dtype())));
  }
  if (!w.defined() || w.dim() != 2) throw ContractError(op, "w", "must be a defined rank-2 tensor");
  require_positive_block(op, "w_scale", block);  // BlockScales{t, b} carries the block
  const int64_t K = x.size(1);
  if (K % block != 0) {
    throw ContractError(op, "x", "K = " + std::to_string(K) + " is not a multiple of " + std::to_string(block));
  }
  check_fp8_weight(op, w, K);
  // The A5 rule at run time: the scale must be the weight's per-block tensor, nothing smaller.
  check_fp8_w_scales(op, "w_scale", w_scale, w.size(0), K, block);
  const int64_t T = x.size(0);
  // The output's rule here too (the host path's GEMM would check it again), so both devices refuse
  // a wrong output before anything runs.
  Contract(op).arg("out").dtype(DType::bf16).rank(2).inner_contiguous().dim(0, T).dim(1, w.size(0)).check({{"out", &out}});
  if (runs_on_gpu(op, {{"x", &x}, {"w", &w}, {"w_scale", &w_scale}, {"out", &out}})) {
    DSV4_GPU_OR_FAIL(op, cuda::linear_fp8(x, w, w_scale, out, block, current_stream()));
  }

  Tensor q = Tensor::empty({T, K}, DType::f8_e4m3fn, std::string(op) + ".q");
  Tensor s = Tensor::empty({T, K / block}, DType::ue8m0, std::string(op) + ".s");
  act_quant_fp8(x, block, q, s);
  gemm_fp8_block_scaled(q, s, w, w_scale, out, block);
}

// linear_fp8's and linear_projection's bf16 path.
void project_bf16(const char* op, const Tensor& x, const Tensor& w, Tensor& out) {
  const int64_t T = x.size(0);
  const int64_t K = x.size(1);
  Contract(op)
      .arg("w").dtype(DType::bf16).rank(2).contiguous().dim(1, K)
      .arg("out").dtype(DType::bf16).rank(2).inner_contiguous().dim(0, T).same_size(1, "w", 0)
      .check({{"w", &w}, {"out", &out}});
  if (runs_on_gpu(op, {{"x", &x}, {"w", &w}, {"out", &out}})) {
    DSV4_GPU_OR_FAIL(op, cuda::linear_bf16(x, w, out, current_stream()));
  }
  const int64_t N = w.size(0);
  const auto* xb = static_cast<const uint8_t*>(x.data_ptr());
  const auto* wb = w.data<uint16_t>();
  auto* y = out.data<uint16_t>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = 0; n < N; ++n) {
      float acc = 0.0f;  // bf16 x bf16 products are exact in fp32; one fp32 accumulator
      for (int64_t k = 0; k < K; ++k) acc += load_act(x, xb, t, k) * bf16_to_f32(wb[n * K + k]);
      y[t * out.stride(0) + n] = f32_to_bf16(acc);
    }
  }
}

// linear_projection's int8 path: the [N] f32 channel scales, then act_quant_int8 + the GEMM.
void project_int8(const char* op, const Tensor& x, const Tensor& w, const Tensor& w_scale, Tensor& out) {
  if (!w_scale.defined()) throw ContractError(op, "w_scale", "ChannelScales holds an undefined tensor");
  Contract(op)
      .arg("w").dtype(DType::i8).rank(2).contiguous().dim(1, x.size(1))
      .arg("w_scale").dtype(DType::f32).rank(1).contiguous().same_size(0, "w", 0)
      .check({{"w", &w}, {"w_scale", &w_scale}});
  const int64_t T = x.size(0);
  // The GEMM's rules on K and the output here too (the host path's GEMM would check them again), so
  // both devices refuse them before anything runs.
  if (x.size(1) > kInt8MaxK) {
    throw ContractError(op, "x", "K = " + std::to_string(x.size(1)) + " exceeds " + std::to_string(kInt8MaxK) +
                                     ", the largest K whose int32 accumulation is exact");
  }
  Contract(op).arg("out").dtype(DType::bf16).rank(2).inner_contiguous().dim(0, T).dim(1, w.size(0)).check({{"out", &out}});
  if (runs_on_gpu(op, {{"x", &x}, {"w", &w}, {"w_scale", &w_scale}, {"out", &out}})) {
    DSV4_GPU_OR_FAIL(op, cuda::linear_int8(x, w, w_scale, out, current_stream()));
  }
  Tensor q = Tensor::empty({T, x.size(1)}, DType::i8, std::string(op) + ".q");
  Tensor s = Tensor::empty({T}, DType::f32, std::string(op) + ".s");
  act_quant_int8(x, q, s);
  gemm_int8_per_channel(q, s, w, w_scale, out);
}

}  // namespace

void linear_fp8(const Tensor& x, const Tensor& w, const Tensor& w_scale, Tensor& out) {
  const char* op = "linear_fp8";
  Contract(op).arg("x").dtype_in({DType::bf16, DType::f32}).rank(2).inner_contiguous().check({{"x", &x}});
  project_fp8(op, x, w, w_scale, out);
}

void linear_fp8(const Tensor& x, const Tensor& w, NoWeightScale, Tensor& out) {
  const char* op = "linear_fp8";
  Contract(op)
      .arg("x").dtype_in({DType::bf16, DType::f32}).rank(2).inner_contiguous()
      .check({{"x", &x}});
  if (w.defined() && w.dtype() == DType::f8_e4m3fn) {
    throw ContractError(op, "w_scale", "f8_e4m3fn weights need their block-scale tensor, got kNoWeightScale");
  }
  project_bf16(op, x, w, out);
}

const char* WeightScale::spelling() const {
  switch (kind_) {
    case Kind::block: return "BlockScales";
    case Kind::channel: return "ChannelScales";
    case Kind::none: break;
  }
  return "kNoWeightScale";
}

void linear_projection(const Tensor& x, const Tensor& w, const WeightScale& w_scale, Tensor& out) {
  const char* op = "linear_projection";
  Contract(op).arg("x").dtype_in({DType::bf16, DType::f32}).rank(2).inner_contiguous().check({{"x", &x}});
  if (!w.defined() || w.dim() != 2) throw ContractError(op, "w", "must be a defined rank-2 tensor");
  // The weight's dtype picks the format; the scale's spelling must be that format's.
  WeightScale::Kind wanted = WeightScale::Kind::none;
  switch (w.dtype()) {
    case DType::f8_e4m3fn: wanted = WeightScale::Kind::block; break;
    case DType::i8: wanted = WeightScale::Kind::channel; break;
    case DType::bf16: wanted = WeightScale::Kind::none; break;
    default:
      throw ContractError(op, "w", "dtype must be f8_e4m3fn, i8 or bf16, got " + std::string(dtype_name(w.dtype())));
  }
  if (w_scale.kind() != wanted) {
    static const char* const needs[] = {"kNoWeightScale", "BlockScales", "ChannelScales"};
    throw ContractError(op, "w_scale", std::string(dtype_name(w.dtype())) + " weights need " +
                                           needs[static_cast<int>(wanted)] + ", got " + w_scale.spelling());
  }
  switch (wanted) {
    case WeightScale::Kind::block: project_fp8(op, x, w, w_scale.tensor(), out, w_scale.block()); return;
    case WeightScale::Kind::channel: project_int8(op, x, w, w_scale.tensor(), out); return;
    case WeightScale::Kind::none: project_bf16(op, x, w, out); return;
  }
}

}  // namespace dsv4::kernels
