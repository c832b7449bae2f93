#include "kernels/moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/device.h"
#include "kernels/host/host_common.h"
#include "kernels/int8_gemm.h"
#include "kernels/quant_gemm.h"

namespace dsv4::kernels {

using namespace host;  // the shared helpers of kernels/host/host_common.h

namespace {

// Element (r, c) of a bf16 or f32 matrix with a contiguous last dim, as f32.
float load_rc(const Tensor& m, int64_t r, int64_t c) {
  const int64_t i = r * m.stride(0) + c;
  if (m.dtype() == DType::bf16) return bf16_to_f32(m.data<uint16_t>()[i]);
  return m.data<float>()[i];
}

// sqrt(softplus(z)): softplus as max(z, 0) + log1p(e^-|z|) in double (no overflow, no threshold
// switch), rounded to fp32, then an fp32 sqrt, as the reference does.
float sqrt_softplus(float z) {
  const double zd = z;
  const double softplus = std::max(zd, 0.0) + std::log1p(std::exp(-std::abs(zd)));
  return std::sqrt(static_cast<float>(softplus));
}

}  // namespace

void moe_gate_logits(const Tensor& x, const Tensor& gate_w, Tensor& logits) {
  const char* op = "moe_gate_logits";
  Contract(op)
      .arg("x").dtype_in({DType::bf16, DType::f32}).rank(2).inner_contiguous()
      .arg("gate_w").dtype_in({DType::bf16, DType::f32}).rank(2).contiguous().same_size(1, "x", 1)
      .arg("logits").dtype(DType::f32).rank(2).contiguous().same_size(0, "x", 0).same_size(1, "gate_w", 0)
      .check({{"x", &x}, {"gate_w", &gate_w}, {"logits", &logits}});
  if (runs_on_gpu(op, {{"x", &x}, {"gate_w", &gate_w}, {"logits", &logits}})) {
    DSV4_GPU_OR_FAIL(op, cuda::moe_gate_logits(x, gate_w, logits, current_stream()));
  }
  const int64_t T = x.size(0);
  const int64_t d = x.size(1);
  const int64_t E = gate_w.size(0);
  float* y = logits.data<float>();
  // Both operands widened to f32 once (exact), then plain loops.
  std::vector<float> wf(static_cast<size_t>(E * d)), xf(static_cast<size_t>(d));
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = 0; i < d; ++i) wf[static_cast<size_t>(e * d + i)] = load_rc(gate_w, e, i);
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < d; ++i) xf[static_cast<size_t>(i)] = load_rc(x, t, i);
    for (int64_t e = 0; e < E; ++e) {
      const float* wrow = wf.data() + e * d;
      float acc = 0.0f;  // bf16 x bf16 products are exact in fp32; the sum rounds in ascending d
      for (int64_t i = 0; i < d; ++i) acc += xf[static_cast<size_t>(i)] * wrow[i];
      y[t * E + e] = acc;
    }
  }
}

void moe_gate(const Tensor& logits, const Tensor& bias, const Tensor& tid2eid, const Tensor& token_ids, int64_t k,
              float route_scale, Tensor& experts, Tensor& weights) {
  const char* op = "moe_gate";
  const bool gpu = runs_on_gpu(op, {{"logits", &logits}, {"bias", &bias}, {"tid2eid", &tid2eid},
                                    {"token_ids", &token_ids}, {"experts", &experts}, {"weights", &weights}});
  Contract(op).arg("logits").dtype(DType::f32).rank(2).contiguous().check({{"logits", &logits}});
  const int64_t T = logits.size(0);
  const int64_t E = logits.size(1);
  if (k < 1 || k > E) throw ContractError(op, "k", std::to_string(k) + " outside [1, " + std::to_string(E) + "]");
  const bool hash = tid2eid.defined();
  if (hash && bias.defined()) throw ContractError(op, "bias", "hash-routed layers have no bias");
  Contract(op)
      .arg("bias").optional().dtype(DType::f32).rank(1).contiguous().dim(0, E)
      .arg("tid2eid").optional().dtype(DType::i32).rank(2).contiguous().dim(1, k).values_in(0, E - 1)
      .arg("token_ids").optional().dtype_in({DType::i32, DType::i64}).rank(1).dim(0, T)
          .values_index_into(0, "tid2eid", 0)
      .arg("experts").dtype(DType::i32).rank(2).contiguous().dim(0, T).dim(1, k)
      .arg("weights").dtype(DType::f32).rank(2).contiguous().dim(0, T).dim(1, k)
      .check({{"bias", &bias}, {"tid2eid", &tid2eid}, {"token_ids", &token_ids}, {"experts", &experts},
              {"weights", &weights}},
             gpu ? Contract::Values::skip : Contract::Values::check);  // the value rules read host memory
  if (hash && !token_ids.defined()) throw ContractError(op, "token_ids", "required by hash routing (tid2eid)");
  if (gpu) {
    DSV4_GPU_OR_FAIL(op, cuda::moe_gate(logits, bias, tid2eid, token_ids, k, route_scale, experts, weights, current_stream()));
  }

  const float* z = logits.data<float>();
  const float* b = bias.defined() ? bias.data<float>() : nullptr;
  const int32_t* table = hash ? tid2eid.data<int32_t>() : nullptr;
  int32_t* ex = experts.data<int32_t>();
  float* wt = weights.data<float>();
  std::vector<float> s(static_cast<size_t>(E));
  std::vector<float> key(static_cast<size_t>(E));
  std::vector<int32_t> order(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t e = 0; e < E; ++e) s[static_cast<size_t>(e)] = sqrt_softplus(z[t * E + e]);
    int32_t* chosen = ex + t * k;
    if (hash) {
      // The row of the current token's id; nothing is hashed at runtime. A repeated expert would be
      // summed twice by the combine but scatter-added once by the official code: refuse it.
      const auto id = static_cast<int64_t>(token_ids.get({t}));
      for (int64_t j = 0; j < k; ++j) {
        chosen[j] = table[id * k + j];
        for (int64_t i = 0; i < j; ++i) {
          if (chosen[i] == chosen[j]) {
            throw ContractError(op, "tid2eid", "row " + std::to_string(id) + " repeats expert " + std::to_string(chosen[j]));
          }
        }
      }
    } else {
      // The bias only selects; a stable sort puts the lower index first on equal keys.
      for (int64_t e = 0; e < E; ++e) key[static_cast<size_t>(e)] = s[static_cast<size_t>(e)] + (b != nullptr ? b[e] : 0.0f);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t c) { return key[static_cast<size_t>(a)] > key[static_cast<size_t>(c)]; });
      std::copy(order.begin(), order.begin() + k, chosen);
    }
    // The weights come from s alone, summed in routing order, in fp32.
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += s[static_cast<size_t>(chosen[j])];
    for (int64_t j = 0; j < k; ++j) wt[t * k + j] = s[static_cast<size_t>(chosen[j])] / sum * route_scale;
  }
}

void swiglu_clamp(const Tensor& g, const Tensor& u, float limit, const Tensor& row_weight, Tensor& h) {
  const char* op = "swiglu_clamp";
  const bool gpu = runs_on_gpu(op, {{"g", &g}, {"u", &u}, {"row_weight", &row_weight}, {"h", &h}});
  Contract(op)
      .arg("g").dtype_in({DType::bf16, DType::f32}).rank(2).inner_contiguous()
      .arg("u").dtype_in({DType::bf16, DType::f32}).rank(2).inner_contiguous().same_size(0, "g", 0).same_size(1, "g", 1)
      .arg("row_weight").optional().dtype(DType::f32).rank(1).contiguous().same_size(0, "g", 0)
      .arg("h").dtype(DType::bf16).rank(2).inner_contiguous().same_size(0, "g", 0).same_size(1, "g", 1)
      .check({{"g", &g}, {"u", &u}, {"row_weight", &row_weight}, {"h", &h}});
  if (std::isnan(limit)) throw ContractError(op, "limit", "is NaN");
  if (gpu) {
    DSV4_GPU_OR_FAIL(op, cuda::swiglu_clamp(g, u, limit, row_weight, h, current_stream()));
  }
  const bool clamp = limit > 0.0f;
  const float* w = row_weight.defined() ? row_weight.data<float>() : nullptr;
  auto* out = h.data<uint16_t>();
  for (int64_t r = 0; r < g.size(0); ++r) {
    for (int64_t i = 0; i < g.size(1); ++i) {
      float gi = load_rc(g, r, i);
      float ui = load_rc(u, r, i);
      if (clamp) {
        ui = std::clamp(ui, -limit, limit);  // up: both sides
        gi = std::min(gi, limit);            // gate: from above only
      }
      float hi = gi / (1.0f + std::exp(-gi)) * ui;
      if (w != nullptr) hi *= w[r];  // the routing weight goes in before w2's input quantization
      out[r * h.stride(0) + i] = f32_to_bf16(hi);
    }
  }
}

void moe_combine(const Tensor& routed, const Tensor& shared, Tensor& out) {
  const char* op = "moe_combine";
  const bool gpu = runs_on_gpu(op, {{"routed", &routed}, {"shared", &shared}, {"out", &out}});
  Contract(op)
      .arg("routed").dtype_in({DType::bf16, DType::f32}).rank(3).contiguous()
      .arg("shared").optional().dtype_in({DType::bf16, DType::f32}).rank(2).inner_contiguous()
          .same_size(0, "routed", 0).same_size(1, "routed", 2)
      .arg("out").dtype(DType::bf16).rank(2).inner_contiguous().same_size(0, "routed", 0).same_size(1, "routed", 2)
      .check({{"routed", &routed}, {"shared", &shared}, {"out", &out}});
  if (gpu) {
    DSV4_GPU_OR_FAIL(op, cuda::moe_combine(routed, shared, out, current_stream()));
  }
  const int64_t T = routed.size(0);
  const int64_t k = routed.size(1);
  const int64_t d = routed.size(2);
  const Tensor flat = routed.view({T * k, d});  // row t * k + j is expert j of token t
  auto* y = out.data<uint16_t>();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < d; ++i) {
      float acc = 0.0f;  // fixed order: routed in routing order, the shared expert last
      for (int64_t j = 0; j < k; ++j) acc += load_rc(flat, t * k + j, i);
      if (shared.defined()) acc += load_rc(shared, t, i);
      y[t * out.stride(0) + i] = f32_to_bf16(acc);  // the one bf16 rounding
    }
  }
}


// ---- the routed experts --------------------------------------------------------------------------

namespace {

const char* format_name(ExpertFormat f) {
  switch (f) {
    case ExpertFormat::fp4: return "fp4";
    case ExpertFormat::fp8: return "fp8";
    case ExpertFormat::int8: return "int8";
  }
  return "?";
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One weight tensor of expert e: defined, on `device`, one of the dtypes, this shape, contiguous.
// Plain comparisons (no Contract objects): the engine passes every expert of a layer per call.
void check_expert_tensor(const char* op, int64_t e, const char* field, const Tensor& t, DType dtype, DType alt,
                         const Shape& shape, const Device& device) {
  auto fail = [&](const std::string& rule) {
    throw ContractError(op, "experts_w[" + std::to_string(e) + "]." + field, rule);
  };
  if (!t.defined()) fail("is undefined");
  if (t.dtype() != dtype && t.dtype() != alt) {
    fail("dtype " + std::string(dtype_name(dtype)) + (alt != dtype ? " or " + std::string(dtype_name(alt)) : "") +
         " expected for this expert format, got " + std::string(dtype_name(t.dtype())));
  }
  if (t.shape() != shape) fail("shape " + shape_str(shape) + " expected, got " + shape_str(t.shape()));
  if (!t.is_contiguous()) fail("must be contiguous, strides " + shape_str(t.strides()));
  if (t.device() != device) fail("is on " + t.device().str() + " but 'xn' is on " + device.str());
}

void check_experts_w(const char* op, const std::vector<ExpertWeights>& ws, const MoeExpertsConfig& c, int64_t d,
                     int64_t I, const Device& device) {
  for (size_t i = 0; i < ws.size(); ++i) {
    const auto e = static_cast<int64_t>(i);
    const ExpertWeights& w = ws[i];
    switch (c.format) {
      case ExpertFormat::fp4: {
        const int64_t fb = c.fp4_block;
        for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"w1", &w.w1}, {"w3", &w.w3}}) {
          check_expert_tensor(op, e, name, *t, DType::i8, DType::u8, {I, d / 2}, device);
        }
        check_expert_tensor(op, e, "s1", w.s1, DType::ue8m0, DType::ue8m0, {I, d / fb}, device);
        check_expert_tensor(op, e, "s3", w.s3, DType::ue8m0, DType::ue8m0, {I, d / fb}, device);
        check_expert_tensor(op, e, "w2", w.w2, DType::i8, DType::u8, {d, I / 2}, device);
        check_expert_tensor(op, e, "s2", w.s2, DType::ue8m0, DType::ue8m0, {d, I / fb}, device);
        break;
      }
      case ExpertFormat::fp8: {
        const int64_t wb = c.weight_block;
        for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"w1", &w.w1}, {"w3", &w.w3}}) {
          check_expert_tensor(op, e, name, *t, DType::f8_e4m3fn, DType::f8_e4m3fn, {I, d}, device);
        }
        check_expert_tensor(op, e, "s1", w.s1, DType::ue8m0, DType::ue8m0, {ceil_div(I, wb), d / wb}, device);
        check_expert_tensor(op, e, "s3", w.s3, DType::ue8m0, DType::ue8m0, {ceil_div(I, wb), d / wb}, device);
        check_expert_tensor(op, e, "w2", w.w2, DType::f8_e4m3fn, DType::f8_e4m3fn, {d, I}, device);
        check_expert_tensor(op, e, "s2", w.s2, DType::ue8m0, DType::ue8m0, {ceil_div(d, wb), I / wb}, device);
        break;
      }
      case ExpertFormat::int8: {
        for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"w1", &w.w1}, {"w3", &w.w3}}) {
          check_expert_tensor(op, e, name, *t, DType::i8, DType::i8, {I, d}, device);
        }
        check_expert_tensor(op, e, "s1", w.s1, DType::f32, DType::f32, {I}, device);
        check_expert_tensor(op, e, "s3", w.s3, DType::f32, DType::f32, {I}, device);
        check_expert_tensor(op, e, "w2", w.w2, DType::i8, DType::i8, {d, I}, device);
        check_expert_tensor(op, e, "s2", w.s2, DType::f32, DType::f32, {d}, device);
        break;
      }
    }
  }
}

}  // namespace

std::vector<uint64_t> expert_pointer_table(const std::vector<ExpertWeights>& experts) {
  std::vector<uint64_t> table;
  table.reserve(experts.size() * 6);
  for (const ExpertWeights& w : experts) {
    for (const Tensor* t : {&w.w1, &w.s1, &w.w2, &w.s2, &w.w3, &w.s3}) {
      table.push_back(t->defined() ? static_cast<uint64_t>(reinterpret_cast<uintptr_t>(t->data_ptr())) : 0);
    }
  }
  return table;
}

void moe_experts(const Tensor& xn, const Tensor& experts, const Tensor& weights,
                 const std::vector<ExpertWeights>& experts_w, const Tensor& table, const MoeExpertsConfig& config,
                 Tensor& routed) {
  const char* op = "moe_experts";
  const bool gpu = runs_on_gpu(op, {{"xn", &xn}, {"experts", &experts}, {"weights", &weights}, {"table", &table},
                                    {"routed", &routed}});
  Contract(op)
      .arg("xn").dtype(DType::bf16).rank(2).inner_contiguous()
      .arg("experts").dtype(DType::i32).rank(2).contiguous().same_size(0, "xn", 0)
      .arg("weights").dtype(DType::f32).rank(2).contiguous().same_size(0, "experts", 0).same_size(1, "experts", 1)
      .check({{"xn", &xn}, {"experts", &experts}, {"weights", &weights}});
  const int64_t T = xn.size(0);
  const int64_t d = xn.size(1);
  const int64_t k = experts.size(1);
  const auto E = static_cast<int64_t>(experts_w.size());
  if (!routed.defined()) throw ContractError(op, "routed", "is undefined");
  if (routed.dtype() != DType::bf16) {
    throw ContractError(op, "routed", "dtype bf16 expected, got " + std::string(dtype_name(routed.dtype())));
  }
  if (routed.shape() != Shape{T, k, d} && routed.shape() != Shape{T * k, d}) {
    throw ContractError(op, "routed", "shape " + shape_str({T, k, d}) + " or " + shape_str({T * k, d}) +
                                          " expected, got " + shape_str(routed.shape()));
  }
  if (!routed.is_contiguous()) throw ContractError(op, "routed", "must be contiguous, strides " + shape_str(routed.strides()));
  if (E < 1) throw ContractError(op, "experts_w", "holds no expert");
  if (std::isnan(config.swiglu_limit)) throw ContractError(op, "swiglu_limit", "is NaN");
  auto positive = [&](const char* name, int64_t v) {
    if (v <= 0) throw ContractError(op, name, "must be positive, got " + std::to_string(v));
  };
  const ExpertWeights& w0 = experts_w[0];
  if (!w0.w1.defined() || w0.w1.dim() != 2) throw ContractError(op, "experts_w[0].w1", "must be a defined rank-2 tensor");
  const int64_t I = w0.w1.size(0);
  positive("moe_inter_dim (experts_w[0].w1 rows)", I);
  auto multiple = [&](const char* name, int64_t v, int64_t of, const char* of_name) {
    if (v % of != 0) {
      throw ContractError(op, name, std::to_string(v) + " is not a multiple of " + of_name + " " + std::to_string(of));
    }
  };
  switch (config.format) {
    case ExpertFormat::fp4:
      positive("act_block", config.act_block);
      positive("fp4_block", config.fp4_block);
      if (config.fp4_block % 2 != 0 || config.act_block % config.fp4_block != 0) {
        throw ContractError(op, "fp4_block", "must be even and divide act_block " + std::to_string(config.act_block) +
                                                 ", got " + std::to_string(config.fp4_block));
      }
      multiple("xn", d, config.act_block, "act_block");
      multiple("moe_inter_dim", I, config.act_block, "act_block");
      break;
    case ExpertFormat::fp8:
      positive("weight_block", config.weight_block);
      multiple("xn", d, config.weight_block, "weight_block");
      multiple("moe_inter_dim", I, config.weight_block, "weight_block");
      break;
    case ExpertFormat::int8:
      if (d > kInt8MaxK || I > kInt8MaxK) {
        throw ContractError(op, "xn", "K = " + std::to_string(std::max(d, I)) + " exceeds " + std::to_string(kInt8MaxK) +
                                          ", the largest K whose int32 accumulation is exact");
      }
      break;
  }
  check_experts_w(op, experts_w, config, d, I, xn.device());
  if (gpu) {
    if (!table.defined()) throw ContractError(op, "table", "required on a GPU (expert_pointer_table, uploaded)");
    Contract(op).arg("table").dtype(DType::i64).rank(2).contiguous().dim(0, E).dim(1, 6).check({{"table", &table}});
    DSV4_GPU_OR_FAIL(op, cuda::moe_experts(xn, experts, weights, E, I, table, config, routed, current_stream()));
  }
  const int32_t* ex = experts.data<int32_t>();
  for (int64_t i = 0; i < T * k; ++i) {
    if (ex[i] < 0 || ex[i] >= E) {
      throw ContractError(op, "experts", "element " + std::to_string(i) + " is " + std::to_string(ex[i]) +
                                             ", outside [0, " + std::to_string(E) + ")");
    }
  }
  if (T == 0 || k == 0 || d == 0) return;

  // The engine's loop: per expert, its slots (t * k + j) in ascending order, gathered, the format's
  // GEMMs through the public entry points, SwiGLU with the slot's weight, scattered back.
  const float* wt = weights.data<float>();
  auto* out = routed.data<uint16_t>();  // row t * k + j, contiguous
  const auto* x = xn.data<uint16_t>();
  auto gemm = [&](const Tensor& a, const Tensor& w, const Tensor& s, Tensor& y) {
    switch (config.format) {
      case ExpertFormat::fp4: {
        const int64_t R = a.size(0), K = a.size(1);
        Tensor q = Tensor::empty({R, K}, DType::f8_e4m3fn, "moe_experts.act_q");
        Tensor qs = Tensor::empty({R, K / config.act_block}, DType::ue8m0, "moe_experts.act_scales");
        act_quant_fp8(a, config.act_block, q, qs);
        gemm_fp4_weights(q, qs, w, s, y, config.act_block, config.fp4_block);
        return;
      }
      case ExpertFormat::fp8: linear_projection(a, w, BlockScales{s, config.weight_block}, y); return;
      case ExpertFormat::int8: linear_projection(a, w, ChannelScales{s}, y); return;
    }
    throw ContractError(op, "format", std::string("unknown expert format ") + format_name(config.format));
  };
  std::vector<int64_t> sel;
  for (int64_t e = 0; e < E; ++e) {
    sel.clear();
    for (int64_t i = 0; i < T * k; ++i) {
      if (ex[i] == e) sel.push_back(i);
    }
    if (sel.empty()) continue;
    const auto R = static_cast<int64_t>(sel.size());
    const ExpertWeights& W = experts_w[static_cast<size_t>(e)];
    Tensor xe = Tensor::empty({R, d}, DType::bf16, "moe_experts.x");
    Tensor rw = Tensor::empty({R}, DType::f32, "moe_experts.row_weight");
    for (int64_t r = 0; r < R; ++r) {
      const int64_t slot = sel[static_cast<size_t>(r)];
      std::memcpy(xe.data<uint16_t>() + r * d, x + (slot / k) * xn.stride(0), static_cast<size_t>(d) * 2);
      rw.data<float>()[r] = wt[slot];
    }
    Tensor g = Tensor::empty({R, I}, DType::bf16, "moe_experts.g");
    Tensor u = Tensor::empty({R, I}, DType::bf16, "moe_experts.u");
    Tensor h = Tensor::empty({R, I}, DType::bf16, "moe_experts.h");
    Tensor y = Tensor::empty({R, d}, DType::bf16, "moe_experts.y");
    gemm(xe, W.w1, W.s1, g);
    gemm(xe, W.w3, W.s3, u);
    swiglu_clamp(g, u, config.swiglu_limit, rw, h);
    gemm(h, W.w2, W.s2, y);
    for (int64_t r = 0; r < R; ++r) {
      std::memcpy(out + sel[static_cast<size_t>(r)] * d, y.data<uint16_t>() + r * d, static_cast<size_t>(d) * 2);
    }
  }
}

}  // namespace dsv4::kernels
