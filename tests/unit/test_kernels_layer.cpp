// The layer's remaining host kernels (kernels/mhc.h, kernels/q_path.h, kernels/attn_output.h) against
// the reference's public helpers in quant-sim numerics on tiny's synthetic weights. The kernels replay
// the reference's arithmetic order, so results must be equal bit for bit; the one exception is
// grouped_wo_a, whose f32 accumulator (the GPU kernel's) differs from the reference's f64 sum, and is
// checked within the f32 accumulation bound plus one bf16 rounding step. Then the launch contracts.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/attn_output.h"
#include "kernels/mhc.h"
#include "kernels/q_path.h"
#include "reference/compressor.h"
#include "reference/context.h"
#include "reference/hadamard.h"
#include "reference/linear.h"
#include "reference/mhc.h"
#include "reference/norm.h"
#include "reference/rope.h"
#include "tests/unit/reference_fixtures.h"

namespace dsv4::kernels {
namespace {

using ref::Mat;
using ref::Mode;

constexpr int64_t kLayer = 1;  // a ratio-4 layer: YaRN table, indexer present
constexpr int64_t kTokens = 5;

const ref::testing::Model& tiny() {
  static const ref::testing::Model model("tiny", 7);
  return model;
}

ref::Context quant_ctx(const ModelConfig& config) { return ref::Context{config, ref::Numerics{Mode::quant_sim}}; }

std::string layer(const std::string& name) { return "layers." + std::to_string(kLayer) + "." + name; }

Tensor bf16_tensor(const Mat& m, const std::string& name) {
  Tensor t = Tensor::empty({m.rows, m.cols}, DType::bf16, name);
  for (int64_t i = 0; i < m.size(); ++i) t.data<uint16_t>()[i] = f32_to_bf16(m.data[static_cast<size_t>(i)]);
  return t;
}

Tensor f32_tensor(const std::vector<float>& v, const Shape& shape, const std::string& name) {
  Tensor t = Tensor::empty(shape, DType::f32, name);
  if (!v.empty()) std::memcpy(t.data<float>(), v.data(), v.size() * sizeof(float));
  return t;
}

Tensor positions_tensor(int64_t rows, int32_t first, const std::string& name = "positions") {
  Tensor t = Tensor::empty({rows}, DType::i32, name);
  // Spread positions so small and large angles (and the YaRN-scaled band) are all exercised.
  for (int64_t i = 0; i < rows; ++i) t.data<int32_t>()[i] = first + static_cast<int32_t>(i * 97);
  return t;
}

Tensor freqs_tensor(const ref::RopeTable& table) {
  return f32_tensor(table.freqs, {static_cast<int64_t>(table.freqs.size())}, "freqs");
}

// Expects every bf16 code of `t` (dense) to equal the reference value rounded to bf16.
void expect_bits(const Tensor& t, const Mat& expected, const std::string& what) {
  ASSERT_EQ(t.numel(), expected.size()) << what;
  int64_t mismatches = 0;
  int64_t first = -1;
  for (int64_t i = 0; i < expected.size(); ++i) {
    if (t.data<uint16_t>()[i] != f32_to_bf16(expected.data[static_cast<size_t>(i)])) {
      if (first < 0) first = i;
      ++mismatches;
    }
  }
  EXPECT_EQ(mismatches, 0) << what << ": first at " << first << " kernel "
                           << (first < 0 ? 0.0f : bf16_to_f32(t.data<uint16_t>()[first])) << " reference "
                           << (first < 0 ? 0.0f : expected.data[static_cast<size_t>(first)]);
}

void expect_f32_bits(const Tensor& t, const Mat& expected, const std::string& what) {
  ASSERT_EQ(t.numel(), expected.size()) << what;
  EXPECT_EQ(std::memcmp(t.data<float>(), expected.data.data(), expected.data.size() * sizeof(float)), 0) << what;
}

void expect_contract(const std::function<void()>& call, const std::string& argument) {
  try {
    call();
    ADD_FAILURE() << "no ContractError; expected one naming '" << argument << "'";
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
  }
}

// The q path input as the reference builds it: qr = q_norm(wq_a(x)), both bf16.
Mat make_qr(const ref::Context& ctx) {
  const auto& w = tiny().weights;
  const Mat x = ref::testing::make_input(kTokens, ctx.config.dim, 11, Mode::quant_sim);
  return ref::rms_norm(ctx, ref::linear(ctx, x, w.get(layer("attn.wq_a.weight")), ref::LinearKind::fp8),
                       w.get(layer("attn.q_norm.weight")));
}

// ---- q_path ----

TEST(KernelsLayerQPath, RmsNormMatchesReferenceBitwise) {
  const auto& c = tiny().config;
  const ref::Context ctx = quant_ctx(c);
  const Mat x = ref::testing::make_input(kTokens, c.dim, 3, Mode::quant_sim);
  const Mat& w = tiny().weights.get(layer("attn_norm.weight"));
  const Tensor xt = bf16_tensor(x, "x");
  const Tensor wt = f32_tensor(w.data, {c.dim}, "weight");
  Tensor out = Tensor::empty({kTokens, c.dim}, DType::bf16, "out");
  rms_norm(xt, wt, c.norm_eps, out);
  expect_bits(out, ref::rms_norm(ctx, x, w), "rms_norm");
}

TEST(KernelsLayerQPath, RmsNormReadsRowStridedInput) {
  // x sliced out of a wider buffer: the kernel must follow the row stride.
  const auto& c = tiny().config;
  const ref::Context ctx = quant_ctx(c);
  const Mat wide = ref::testing::make_input(kTokens, 2 * c.dim, 4, Mode::quant_sim);
  const Mat& w = tiny().weights.get(layer("ffn_norm.weight"));
  const Tensor xt = bf16_tensor(wide, "wide").narrow(1, c.dim, c.dim);
  ASSERT_FALSE(xt.is_contiguous());
  Tensor out = Tensor::empty({kTokens, c.dim}, DType::bf16, "out");
  rms_norm(xt, f32_tensor(w.data, {c.dim}, "weight"), c.norm_eps, out);
  expect_bits(out, ref::rms_norm(ctx, ref::cols_of(wide, c.dim, c.dim), w), "rms_norm strided");
}

TEST(KernelsLayerQPath, QNormRopeMatchesReferenceBitwise) {
  const auto& c = tiny().config;
  const ref::Context ctx = quant_ctx(c);
  const ref::RopeTable rope = ref::make_rope_table(c, c.ratio(kLayer));
  Mat q = ref::linear(ctx, make_qr(ctx), tiny().weights.get(layer("attn.wq_b.weight")), ref::LinearKind::fp8);
  Tensor qt = bf16_tensor(q, "q");
  const Tensor pos = positions_tensor(kTokens, 300);
  q_norm_rope_inplace(qt, c.n_heads, c.head_dim, c.norm_eps, freqs_tensor(rope), pos);

  ref::head_rms_norm_inplace(ctx, q, c.n_heads, c.head_dim);
  for (int64_t t = 0; t < kTokens; ++t) {
    for (int64_t h = 0; h < c.n_heads; ++h) {
      float* part = q.row(t) + h * c.head_dim + c.nope_head_dim();
      ref::apply_rope(part, pos.data<int32_t>()[t], rope, /*inverse=*/false);
      for (int64_t i = 0; i < c.rope_head_dim; ++i) part[i] = ctx.act(part[i]);
    }
  }
  expect_bits(qt, q, "q_norm_rope");
}

// §2.5 items 1-4 as reference/indexer.cpp does them, for one indexer_quant setting.
void check_indexer_q(const std::string& quant) {
  ModelConfig c = tiny().config;
  c.indexer_quant = quant;
  const ref::Context ctx = quant_ctx(c);
  const ref::RopeTable rope = ref::make_rope_table(c, c.ratio(kLayer));
  const int64_t H = c.index_n_heads, D = c.index_head_dim, rd = c.rope_head_dim;
  Mat q = ref::linear(ctx, make_qr(ctx), tiny().weights.get(layer("attn.indexer.wq_b.weight")), ref::LinearKind::fp8);
  Tensor qt = bf16_tensor(q, "q");
  const Tensor pos = positions_tensor(kTokens, 259);
  const bool fp8 = quant == "fp8";
  // fp8 is sglang's one scale per head vector; fp4 the official QAT's blocks.
  indexer_q(qt, H, D, freqs_tensor(rope), pos, fp8 ? IndexerQuant::fp8 : IndexerQuant::fp4,
            fp8 ? D : c.fp4_block_size);
  for (int64_t t = 0; t < kTokens; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      float* qh = q.row(t) + h * D;
      ref::apply_rope(qh + D - rd, pos.data<int32_t>()[t], rope, false);
      for (int64_t i = D - rd; i < D; ++i) qh[i] = ctx.act(qh[i]);
      ref::hadamard_inplace(qh, D);
      for (int64_t i = 0; i < D; ++i) qh[i] = ctx.act(qh[i]);
      ref::simulate_indexer_quant(ctx, qh, D);
    }
  }
  expect_bits(qt, q, "indexer_q " + quant);
}

TEST(KernelsLayerQPath, IndexerQFp4MatchesReferenceBitwise) { check_indexer_q("fp4"); }
TEST(KernelsLayerQPath, IndexerQFp8MatchesReferenceBitwise) { check_indexer_q("fp8"); }

// ---- attn_output ----

TEST(KernelsLayerAttnOutput, InverseRopeMatchesReferenceBitwise) {
  const auto& c = tiny().config;
  const ref::Context ctx = quant_ctx(c);
  const ref::RopeTable rope = ref::make_rope_table(c, c.ratio(kLayer));
  Mat o = ref::testing::make_input(kTokens, c.n_heads * c.head_dim, 5, Mode::quant_sim);
  Tensor ot = bf16_tensor(o, "o");
  const Tensor pos = positions_tensor(kTokens, 17);
  inverse_rope_inplace(ot, c.n_heads, c.head_dim, freqs_tensor(rope), pos);
  for (int64_t t = 0; t < kTokens; ++t) {
    for (int64_t h = 0; h < c.n_heads; ++h) {
      float* part = o.row(t) + h * c.head_dim + c.nope_head_dim();
      ref::apply_rope(part, pos.data<int32_t>()[t], rope, /*inverse=*/true);
      for (int64_t i = 0; i < c.rope_head_dim; ++i) part[i] = ctx.act(part[i]);
    }
  }
  expect_bits(ot, o, "inverse_rope");
}

TEST(KernelsLayerAttnOutput, GroupedWoAWithinF32AccumulationBound) {
  const auto& c = tiny().config;
  const ref::Context ctx = quant_ctx(c);
  const int64_t G = c.o_groups, r = c.o_lora_rank, W = c.n_heads * c.head_dim / G;
  const Mat o = ref::testing::make_input(kTokens, c.n_heads * c.head_dim, 6, Mode::quant_sim);
  const Mat& wo_a = tiny().weights.get(layer("attn.wo_a.weight"));
  ASSERT_EQ(wo_a.rows, G * r);
  ASSERT_EQ(wo_a.cols, W);
  for (float v : wo_a.data) ASSERT_EQ(v, round_bf16(v)) << "wo_a is bf16 in the checkpoint";
  Tensor out = Tensor::empty({kTokens, G * r}, DType::bf16, "out");
  grouped_wo_a(bf16_tensor(o, "o"), bf16_tensor(wo_a, "wo_a"), G, out);

  int64_t exact = 0;
  for (int64_t g = 0; g < G; ++g) {
    const Mat og = ref::cols_of(o, g * W, W);
    const Mat wg = ref::rows_of(wo_a, g * r, r);
    const Mat u = ref::linear(ctx, og, wg, ref::LinearKind::bf16);
    for (int64_t t = 0; t < kTokens; ++t) {
      for (int64_t i = 0; i < r; ++i) {
        const float got = bf16_to_f32(out.data<uint16_t>()[t * G * r + g * r + i]);
        const float want = u.at(t, i);
        // Reason: f32 accumulation (kernel) vs f64 (reference). Bound: W * 2^-24 * Σ|products| for the
        // f32 sum, plus one bf16 step (2^-8 relative) where that error crosses a rounding boundary.
        double abs_sum = 0.0;
        for (int64_t k = 0; k < W; ++k) abs_sum += std::fabs(static_cast<double>(og.at(t, k)) * wg.at(i, k));
        const double tol = static_cast<double>(W) * 0x1.0p-24 * abs_sum + std::ldexp(std::fabs(want), -7);
        EXPECT_LE(std::fabs(static_cast<double>(got) - want), tol) << "t " << t << " g " << g << " i " << i;
        exact += got == want;
      }
    }
  }
  // The bound is loose; in practice nearly every value rounds to the same bf16.
  EXPECT_GE(exact, kTokens * G * r * 9 / 10);
}

// ---- mHC ----

struct HcWeights {
  Tensor fn, base, scale;
};

HcWeights hc_weights(const std::string& prefix) {
  const auto& w = tiny().weights;
  const Mat& fn = w.get(prefix + "_fn");
  const Mat& base = w.get(prefix + "_base");
  const Mat& scale = w.get(prefix + "_scale");
  return {f32_tensor(fn.data, {fn.rows, fn.cols}, "fn"), f32_tensor(base.data, {base.size()}, "base"),
          f32_tensor(scale.data, {scale.size()}, "scale")};
}

TEST(KernelsLayerMhc, HcPreAndPostMatchReferenceBitwise) {
  const auto& c = tiny().config;
  const ref::Context ctx = quant_ctx(c);
  const int64_t hc = c.hc_mult, d = c.dim;
  const Mat R = ref::testing::make_input(kTokens, hc * d, 8, Mode::quant_sim);
  const Mat F = ref::testing::make_input(kTokens, d, 9, Mode::quant_sim);
  for (const char* sub : {"hc_attn", "hc_ffn"}) {
    SCOPED_TRACE(sub);
    const HcWeights hw = hc_weights(layer(sub));
    const Tensor Rt = bf16_tensor(R, "R");
    Tensor x = Tensor::empty({kTokens, d}, DType::bf16, "x");
    Tensor post = Tensor::empty({kTokens, hc}, DType::f32, "post");
    Tensor comb = Tensor::empty({kTokens, hc, hc}, DType::f32, "comb");
    hc_pre(Rt, hw.fn, hw.base, hw.scale, c.hc_eps, c.norm_eps, c.hc_sinkhorn_iters, x, post, comb);

    ref::HcMix mix;
    const Mat x_ref = ref::hc_pre(ctx, R, tiny().weights.get(layer(std::string(sub) + "_fn")),
                                  tiny().weights.get(layer(std::string(sub) + "_base")),
                                  tiny().weights.get(layer(std::string(sub) + "_scale")), &mix);
    expect_bits(x, x_ref, "hc_pre x");
    expect_f32_bits(post, mix.post, "hc_pre post");
    expect_f32_bits(comb, mix.comb, "hc_pre comb");

    Tensor R_out = Tensor::empty({kTokens, hc * d}, DType::bf16, "R_out");
    hc_post(bf16_tensor(F, "F"), Rt, post, comb, R_out);
    expect_bits(R_out, ref::hc_post(ctx, F, R, mix), "hc_post");
  }
}

TEST(KernelsLayerMhc, HcHeadMatchesReferenceBitwise) {
  const auto& c = tiny().config;
  const ref::Context ctx = quant_ctx(c);
  const Mat R = ref::testing::make_input(kTokens, c.hc_mult * c.dim, 10, Mode::quant_sim);
  for (const std::string prefix : {"", "mtp.0."}) {
    SCOPED_TRACE(prefix);
    const HcWeights hw = hc_weights(prefix + "hc_head");
    Tensor y = Tensor::empty({kTokens, c.dim}, DType::bf16, "y");
    hc_head(bf16_tensor(R, "R"), hw.fn, hw.base, hw.scale, c.hc_eps, c.norm_eps, y);
    const auto& w = tiny().weights;
    expect_bits(y, ref::hc_head(ctx, R, w.get(prefix + "hc_head_fn"), w.get(prefix + "hc_head_base"),
                                w.get(prefix + "hc_head_scale")),
                "hc_head");
  }
}

// ---- contracts ----

TEST(KernelsLayerContracts, QNormRopeRefusesStridedQ) {
  const auto& c = tiny().config;
  const ref::RopeTable rope = ref::make_rope_table(c, 0);
  const int64_t width = c.n_heads * c.head_dim;
  const Mat wide = ref::testing::make_input(kTokens, width + 64, 1, Mode::quant_sim);
  Tensor q = bf16_tensor(wide, "qkv").narrow(1, 64, width);
  expect_contract([&] { q_norm_rope_inplace(q, c.n_heads, c.head_dim, c.norm_eps, freqs_tensor(rope),
                                            positions_tensor(kTokens, 0)); },
                  "q");
  expect_contract([&] { indexer_q(q, c.n_heads, c.head_dim, freqs_tensor(rope), positions_tensor(kTokens, 0),
                                  IndexerQuant::fp4, 32); },
                  "q");
}

TEST(KernelsLayerContracts, NegativePositionsRefused) {
  const auto& c = tiny().config;
  const ref::RopeTable rope = ref::make_rope_table(c, 0);
  Tensor q = bf16_tensor(ref::testing::make_input(kTokens, c.n_heads * c.head_dim, 1, Mode::quant_sim), "q");
  const Tensor bad = positions_tensor(kTokens, -1);
  expect_contract([&] { q_norm_rope_inplace(q, c.n_heads, c.head_dim, c.norm_eps, freqs_tensor(rope), bad); },
                  "positions");
  expect_contract([&] { indexer_q(q, c.n_heads, c.head_dim, freqs_tensor(rope), bad, IndexerQuant::fp4, 32); },
                  "positions");
  expect_contract([&] { inverse_rope_inplace(q, c.n_heads, c.head_dim, freqs_tensor(rope), bad); }, "positions");
  // One position per row.
  expect_contract([&] { inverse_rope_inplace(q, c.n_heads, c.head_dim, freqs_tensor(rope),
                                             positions_tensor(kTokens + 1, 0)); },
                  "positions");
}

TEST(KernelsLayerContracts, QPathShapeRulesRefused) {
  const auto& c = tiny().config;
  const ref::RopeTable rope = ref::make_rope_table(c, 0);
  Tensor q = bf16_tensor(ref::testing::make_input(kTokens, c.n_heads * c.head_dim, 1, Mode::quant_sim), "q");
  const Tensor pos = positions_tensor(kTokens, 0);
  expect_contract([&] { indexer_q(q, c.n_heads, c.head_dim, freqs_tensor(rope), pos, IndexerQuant::fp4, 48); }, "block");
  const Tensor big_freqs = f32_tensor(std::vector<float>(static_cast<size_t>(c.head_dim), 1.0f), {c.head_dim}, "freqs");
  expect_contract([&] { q_norm_rope_inplace(q, c.n_heads, c.head_dim, c.norm_eps, big_freqs, pos); }, "freqs");
  const Tensor x = bf16_tensor(ref::testing::make_input(kTokens, c.dim, 1, Mode::quant_sim), "x");
  Tensor out = Tensor::empty({kTokens, c.dim}, DType::bf16, "out");
  expect_contract([&] { rms_norm(x, f32_tensor(std::vector<float>(static_cast<size_t>(c.dim) + 1), {c.dim + 1}, "w"),
                                 c.norm_eps, out); },
                  "weight");
}

TEST(KernelsLayerContracts, GroupedWoAShapesRefused) {
  const auto& c = tiny().config;
  const int64_t G = c.o_groups, r = c.o_lora_rank, W = c.n_heads * c.head_dim / G;
  const Tensor o = bf16_tensor(ref::testing::make_input(kTokens, G * W, 1, Mode::quant_sim), "o");
  Tensor out = Tensor::empty({kTokens, G * r}, DType::bf16, "out");
  const Tensor narrow_w = Tensor::empty({G * r, W / 2}, DType::bf16, "wo_a");
  expect_contract([&] { grouped_wo_a(o, narrow_w, G, out); }, "wo_a");
  const Tensor wo_a = Tensor::empty({G * r, W}, DType::bf16, "wo_a");
  Tensor short_out = Tensor::empty({kTokens, G * r - 1}, DType::bf16, "out");
  expect_contract([&] { grouped_wo_a(o, wo_a, G, short_out); }, "out");
  expect_contract([&] { grouped_wo_a(o, wo_a, 3, out); }, "groups");
}

TEST(KernelsLayerContracts, HcWrongSizedParametersRefused) {
  const auto& c = tiny().config;
  const int64_t hc = c.hc_mult, d = c.dim, n = hc * d, mixes = (2 + hc) * hc;
  const Tensor R = bf16_tensor(ref::testing::make_input(kTokens, n, 2, Mode::quant_sim), "R");
  const HcWeights hw = hc_weights(layer("hc_attn"));
  Tensor x = Tensor::empty({kTokens, d}, DType::bf16, "x");
  Tensor post = Tensor::empty({kTokens, hc}, DType::f32, "post");
  Tensor comb = Tensor::empty({kTokens, hc, hc}, DType::f32, "comb");
  auto pre = [&](const Tensor& fn, const Tensor& base, const Tensor& scale) {
    return [&, fn, base, scale] { hc_pre(R, fn, base, scale, c.hc_eps, c.norm_eps, c.hc_sinkhorn_iters, x, post, comb); };
  };
  expect_contract(pre(hw.fn, hw.base, Tensor::empty({2}, DType::f32, "scale")), "scale");
  expect_contract(pre(hw.fn, Tensor::empty({mixes - 1}, DType::f32, "base"), hw.scale), "base");
  expect_contract(pre(Tensor::empty({mixes, n - 1}, DType::f32, "fn"), hw.base, hw.scale), "fn");
  expect_contract(pre(Tensor::empty({hc, n}, DType::f32, "fn"), hw.base, hw.scale), "fn");
  expect_contract([&] { hc_pre(R, hw.fn, hw.base, hw.scale, c.hc_eps, c.norm_eps, 0, x, post, comb); },
                  "sinkhorn_iters");
  Tensor bad_comb = Tensor::empty({kTokens, hc * hc}, DType::f32, "comb");
  expect_contract([&] { hc_pre(R, hw.fn, hw.base, hw.scale, c.hc_eps, c.norm_eps, 1, x, post, bad_comb); }, "comb");

  Tensor long_post = Tensor::empty({kTokens + 1, hc}, DType::f32, "post");  // one row per token
  expect_contract([&] { hc_pre(R, hw.fn, hw.base, hw.scale, c.hc_eps, c.norm_eps, 1, x, long_post, comb); }, "post");

  Tensor R_out = Tensor::empty({kTokens, n}, DType::bf16, "R_out");
  expect_contract([&] { hc_post(x, R, Tensor::empty({kTokens, hc + 1}, DType::f32, "post"), comb, R_out); }, "post");
  Tensor R_alias = R;
  expect_contract([&] { hc_post(x, R, post, comb, R_alias); }, "R_out");

  const HcWeights head = hc_weights("hc_head");
  Tensor y = Tensor::empty({kTokens, d}, DType::bf16, "y");
  expect_contract([&] { hc_head(R, head.fn, head.base, hw.scale, c.hc_eps, c.norm_eps, y); }, "scale");
  expect_contract([&] { hc_head(R, head.fn, hw.base, head.scale, c.hc_eps, c.norm_eps, y); }, "base");
  expect_contract([&] { hc_head(R, hw.fn, head.base, head.scale, c.hc_eps, c.norm_eps, y); }, "fn");
  Tensor y_odd = Tensor::empty({kTokens, 3 * d / 2 + 1}, DType::bf16, "y");
  expect_contract([&] { hc_head(R, head.fn, head.base, head.scale, c.hc_eps, c.norm_eps, y_odd); }, "R");
}

}  // namespace
}  // namespace dsv4::kernels
