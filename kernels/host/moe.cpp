#include "kernels/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "engine/core/contract.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/host/host_common.h"

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
  require_host(op, "x", x);
  require_host(op, "gate_w", gate_w);
  require_host(op, "logits", logits);
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
              {"weights", &weights}});
  if (hash && !token_ids.defined()) throw ContractError(op, "token_ids", "required by hash routing (tid2eid)");
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"logits", &logits}, {"bias", &bias},
                                {"tid2eid", &tid2eid}, {"token_ids", &token_ids}, {"experts", &experts},
                                {"weights", &weights}}) {
    require_host(op, name, *t);
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
  Contract(op)
      .arg("g").dtype_in({DType::bf16, DType::f32}).rank(2).inner_contiguous()
      .arg("u").dtype_in({DType::bf16, DType::f32}).rank(2).inner_contiguous().same_size(0, "g", 0).same_size(1, "g", 1)
      .arg("row_weight").optional().dtype(DType::f32).rank(1).contiguous().same_size(0, "g", 0)
      .arg("h").dtype(DType::bf16).rank(2).inner_contiguous().same_size(0, "g", 0).same_size(1, "g", 1)
      .check({{"g", &g}, {"u", &u}, {"row_weight", &row_weight}, {"h", &h}});
  if (std::isnan(limit)) throw ContractError(op, "limit", "is NaN");
  require_host(op, "g", g);
  require_host(op, "u", u);
  require_host(op, "row_weight", row_weight);
  require_host(op, "h", h);
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
  Contract(op)
      .arg("routed").dtype_in({DType::bf16, DType::f32}).rank(3).contiguous()
      .arg("shared").optional().dtype_in({DType::bf16, DType::f32}).rank(2).inner_contiguous()
          .same_size(0, "routed", 0).same_size(1, "routed", 2)
      .arg("out").dtype(DType::bf16).rank(2).inner_contiguous().same_size(0, "routed", 0).same_size(1, "routed", 2)
      .check({{"routed", &routed}, {"shared", &shared}, {"out", &out}});
  require_host(op, "routed", routed);
  require_host(op, "shared", shared);
  require_host(op, "out", out);
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

}  // namespace dsv4::kernels
