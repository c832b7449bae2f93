// The quantized linear path and the MoE pieces on the host (kernels/quant_gemm.h, kernels/moe.h)
// against the scalar reference (dsv4-model §2.9, §3), fed the tiny config's synthetic checkpoint
// bytes exactly as stored (e4m3 / packed e2m1 / ue8m0); the w8a8-int8 path (kernels/int8_gemm.h)
// bit for bit against the reference's int8 linear; their contracts; and the A5 check that neither a
// scalar nor an untyped tensor can stand where a weight scale is expected.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "engine/checkpoint/checkpoint_layout.h"
#include "engine/checkpoint/synthetic_weights.h"
#include "engine/config/model_config.h"
#include "engine/core/error.h"
#include "engine/core/formats.h"
#include "kernels/int8_gemm.h"
#include "kernels/moe.h"
#include "kernels/quant_gemm.h"
#include "reference/context.h"
#include "reference/linear.h"
#include "reference/moe.h"
#include "reference/quant.h"
#include "reference/weights.h"

namespace dsv4::kernels {
namespace {

using ref::Mat;

constexpr uint64_t kSeed = 3;

// ---- A5: the weight-scale argument only takes a tensor or the explicit "none" -----------------

template <class S>
concept LinearTakesScale = requires(const Tensor& x, const Tensor& w, S s, Tensor& out) { linear_fp8(x, w, s, out); };

static_assert(LinearTakesScale<const Tensor&>, "a scale tensor is the FP8 spelling");
static_assert(LinearTakesScale<NoWeightScale>, "kNoWeightScale is the bf16 spelling");
static_assert(!LinearTakesScale<float>, "A5: a float must not stand for a per-block scale tensor");
static_assert(!LinearTakesScale<double>, "A5: nor a double");
static_assert(!LinearTakesScale<int>, "A5: nor an integer (0 for 'no scale')");
static_assert(!std::is_convertible_v<float, Tensor>, "no implicit Tensor from a number");
static_assert(!std::is_convertible_v<float, NoWeightScale>, "no implicit 'none' from a number");

// linear_projection's WeightScale: BlockScales{t}, ChannelScales{t} or kNoWeightScale, nothing else.
template <class S>
concept ProjectionTakesScale = requires(const Tensor& x, const Tensor& w, S s, Tensor& out) {
  linear_projection(x, w, s, out);
};
static_assert(ProjectionTakesScale<BlockScales>, "FP8 block scales");
static_assert(ProjectionTakesScale<ChannelScales>, "int8 channel scales");
static_assert(ProjectionTakesScale<NoWeightScale>, "bf16 weights");
static_assert(ProjectionTakesScale<const WeightScale&>, "an already-typed scale passes through");
static_assert(!ProjectionTakesScale<float>, "A5: linear_projection(x, w, 0.5f, out) does not compile");
static_assert(!ProjectionTakesScale<double>, "A5: nor a double");
static_assert(!ProjectionTakesScale<int>, "A5: nor an integer");
static_assert(!ProjectionTakesScale<bool>, "A5: nor a bool");
static_assert(!ProjectionTakesScale<Tensor>, "a bare tensor does not say which layout it is");
static_assert(!ProjectionTakesScale<const Tensor&>, "nor a bare tensor by reference");
static_assert(!ProjectionTakesScale<std::nullptr_t>, "None is spelled kNoWeightScale");
// The literal spellings of the mistake (templated on the tensor type so that the requires-expression
// is checked in a SFINAE context instead of being a hard error).
template <class T>
concept ProjectionTakesBraces = requires(const T& x, const T& w, T& out) { linear_projection(x, w, {}, out); };
template <class T>
concept ProjectionTakesHalf = requires(const T& x, const T& w, T& out) { linear_projection(x, w, 0.5f, out); };
template <class T>
concept ProjectionTakesTensor = requires(const T& x, const T& w, const T& some_tensor, T& out) {
  linear_projection(x, w, some_tensor, out);
};
template <class T>
concept ProjectionTakesTypedTensor = requires(const T& x, const T& w, const T& some_tensor, T& out) {
  linear_projection(x, w, ChannelScales{some_tensor}, out);
};
static_assert(!ProjectionTakesBraces<Tensor>, "`{}` does not stand for 'no scale'");
static_assert(!ProjectionTakesHalf<Tensor>, "A5: linear_projection(x, w, 0.5f, out)");
static_assert(!ProjectionTakesTensor<Tensor>, "linear_projection(x, w, some_tensor, out)");
static_assert(ProjectionTakesTypedTensor<Tensor>, "linear_projection(x, w, ChannelScales{some_tensor}, out)");
static_assert(!std::is_convertible_v<Tensor, BlockScales> && !std::is_convertible_v<Tensor, ChannelScales>,
              "a scale tensor becomes typed only explicitly");
static_assert(std::is_constructible_v<BlockScales, Tensor> && std::is_constructible_v<ChannelScales, Tensor>);
static_assert(!std::is_constructible_v<WeightScale, float> && !std::is_constructible_v<WeightScale, int>);
static_assert(!std::is_constructible_v<WeightScale, Tensor> && !std::is_constructible_v<WeightScale, const Tensor&>);
static_assert(!std::is_convertible_v<double, WeightScale> && !std::is_convertible_v<Tensor, WeightScale>);
static_assert(!std::is_default_constructible_v<WeightScale>, "no scale is spelled, never defaulted");
static_assert(!std::is_convertible_v<float, BlockScales> && !std::is_convertible_v<float, ChannelScales>);

// ---- fixtures ---------------------------------------------------------------------------------

const ModelConfig& tiny() {
  static const ModelConfig c = load_model_config("tiny");
  return c;
}
const ref::Weights& tiny_weights() {
  static const ref::Weights w = ref::Weights::synthetic(tiny(), kSeed);
  return w;
}

// A checkpoint tensor as stored (the bytes synthetic_tensor_bytes gives, in the stored dtype/shape).
const Tensor& raw(const std::string& name) {
  static std::map<std::string, Tensor> cache;
  static const std::vector<TensorSpec> layout = checkpoint_layout(tiny());
  if (auto it = cache.find(name); it != cache.end()) return it->second;
  for (const TensorSpec& spec : layout) {
    if (spec.name != name) continue;
    const std::vector<uint8_t> bytes = synthetic_tensor_bytes(tiny(), spec, kSeed);
    Tensor t = Tensor::empty(spec.shape, spec.dtype, name);
    EXPECT_EQ(static_cast<int64_t>(bytes.size()), dtype_storage_bytes(spec.dtype, t.numel()));
    std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
    return cache.emplace(name, t).first->second;
  }
  ADD_FAILURE() << "no tensor " << name << " in the tiny layout";
  static const Tensor none;
  return none;
}

// bf16-representable N(0, sigma) values.
Mat random_mat(int64_t rows, int64_t cols, unsigned seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, sigma);
  Mat m(rows, cols);
  for (float& v : m.data) v = round_bf16(normal(rng));
  return m;
}

Tensor to_tensor(const Mat& m, DType dtype, const std::string& name) {
  return Tensor::from_values({m.rows, m.cols}, dtype, std::vector<double>(m.data.begin(), m.data.end()), name);
}

Mat to_mat(const Tensor& t) {
  Mat m(t.size(0), t.numel() / std::max<int64_t>(t.size(0), 1));
  const std::vector<double> v = t.values();
  for (size_t i = 0; i < v.size(); ++i) m.data[i] = static_cast<float>(v[i]);
  return m;
}

ref::Context quant_ctx(const ModelConfig& c, ref::Observer* observer = nullptr) {
  return ref::Context{c, ref::Numerics{ref::Mode::quant_sim}, observer, nullptr};
}

// q [T, K] e4m3 and s [T, K / 128] ue8m0 of x.
struct Quantized {
  Tensor q;
  Tensor s;
};
Quantized quantize(const Tensor& x, int64_t block = kFp8Block) {
  Quantized r{Tensor::empty({x.size(0), x.size(1)}, DType::f8_e4m3fn, "q"),
              Tensor::empty({x.size(0), x.size(1) / block}, DType::ue8m0, "s")};
  act_quant_fp8(x, block, r.q, r.s);
  return r;
}

// The GEMM tolerance. Both sides round to bf16 at the end; before that they differ only in how the
// exact products x̂_k·ŵ_k (power-of-two scales make every product exact in fp32) are summed: the
// reference in fp64 rounded once to fp32, the kernel in fp32 per block plus an fp32 accumulator, so
// |a - b| <= (block + K/block + 1)·2^-24·Σ|x̂ŵ| (recursive-summation bound). Rounding two values that
// close to bf16 can still land on neighbouring bf16 values: one bf16 ulp (<= 2^-7·|r|) more.
struct GemmCompare {
  int64_t elements = 0;
  int64_t exact = 0;
};
GemmCompare expect_gemm_close(const Mat& got, const Mat& want, const Mat& x_hat, const Mat& w_hat, int64_t block) {
  GemmCompare c;
  const double gamma = static_cast<double>(block + x_hat.cols / block + 1) * 0x1.0p-24;
  for (int64_t t = 0; t < want.rows; ++t) {
    for (int64_t n = 0; n < want.cols; ++n) {
      double abs_sum = 0.0;
      for (int64_t k = 0; k < x_hat.cols; ++k) abs_sum += std::abs(static_cast<double>(x_hat.at(t, k)) * w_hat.at(n, k));
      const double r = want.at(t, n);
      const double tol = gamma * abs_sum + 0x1.0p-7 * std::abs(r) + 1e-30;
      EXPECT_LE(std::abs(got.at(t, n) - r), tol) << "t " << t << " n " << n;
      ++c.elements;
      if (got.at(t, n) == want.at(t, n)) ++c.exact;
    }
  }
  return c;
}

// ---- activation quantization --------------------------------------------------------------------

TEST(ActQuantFp8, DequantizedEqualsReferenceBitForBit) {
  // Blocks at very different magnitudes: all zeros (the 1e-4 amax clamp), tiny, O(1), and large
  // values that land near the e4m3 maximum, plus a value straddling a rounding tie.
  Mat x = random_mat(6, 512, 11);
  for (int64_t k = 0; k < 128; ++k) x.at(1, k) = 0.0f;
  for (int64_t k = 128; k < 256; ++k) x.at(2, k) = round_bf16(x.at(2, k) * 1e-6f);
  for (int64_t k = 256; k < 384; ++k) x.at(3, k) = round_bf16(x.at(3, k) * 3e4f);
  x.at(4, 0) = 448.0f;
  x.at(4, 1) = -17.0f;  // an e4m3 tie (17 / 1 or 17 / 2) whichever power of two the block gets
  for (DType dtype : {DType::bf16, DType::f32}) {
    SCOPED_TRACE(std::string(dtype_name(dtype)));
    const Quantized qs = quantize(to_tensor(x, dtype, "x"));
    Mat want = x;
    ref::fp8_quant_dequant_rows(want, 128);
    const Mat q = to_mat(qs.q);
    const Mat s = to_mat(qs.s);
    for (int64_t t = 0; t < x.rows; ++t) {
      float amax[4] = {0, 0, 0, 0};
      for (int64_t k = 0; k < x.cols; ++k) amax[k / 128] = std::max(amax[k / 128], std::fabs(x.at(t, k)));
      for (int64_t b = 0; b < 4; ++b) EXPECT_EQ(s.at(t, b), ref::fp8_block_scale(amax[b])) << "t " << t << " b " << b;
      for (int64_t k = 0; k < x.cols; ++k) {
        const float got = q.at(t, k) * s.at(t, k / 128);
        EXPECT_EQ(f32_bits(got), f32_bits(want.at(t, k))) << "t " << t << " k " << k;
      }
    }
  }
}

TEST(ActQuantFp8, RowPaddedInputAndSmallBlock) {
  // A view with padded rows (stride 256 for 128 columns) and the KV path's block of 64.
  const Mat wide = random_mat(3, 256, 12);
  const Tensor padded = to_tensor(wide, DType::bf16, "wide").narrow(1, 0, 128);
  ASSERT_FALSE(padded.is_contiguous());
  const Quantized qs = quantize(padded, 64);
  Mat want = ref::cols_of(wide, 0, 128);
  ref::fp8_quant_dequant_rows(want, 64);
  const Mat q = to_mat(qs.q);
  const Mat s = to_mat(qs.s);
  for (int64_t t = 0; t < 3; ++t) {
    for (int64_t k = 0; k < 128; ++k) EXPECT_EQ(q.at(t, k) * s.at(t, k / 64), want.at(t, k));
  }
}

// ---- the GEMMs against ref::linear(quant-sim) ---------------------------------------------------

TEST(GemmFp8, CheckpointWeightsMatchReferenceLinear) {
  const ref::Context ctx = quant_ctx(tiny());
  GemmCompare total;
  for (const std::string w : {"layers.0.ffn.shared_experts.w1", "layers.3.ffn.shared_experts.w2", "layers.1.attn.wq_b"}) {
    SCOPED_TRACE(w);
    const Tensor& wt = raw(w + ".weight");
    const Mat& w_hat = tiny_weights().get(w + ".weight");
    const Mat x = random_mat(5, w_hat.cols, 21);
    const Tensor xt = to_tensor(x, DType::bf16, "x");
    const Quantized qs = quantize(xt);
    Tensor out = Tensor::empty({x.rows, w_hat.rows}, DType::bf16, "out");
    gemm_fp8_block_scaled(qs.q, qs.s, wt, raw(w + ".scale"), out);
    Mat x_hat = x;
    ref::fp8_quant_dequant_rows(x_hat, 128);
    const GemmCompare c = expect_gemm_close(to_mat(out), ref::linear(ctx, x, w_hat, ref::LinearKind::fp8), x_hat, w_hat, 128);
    total.elements += c.elements;
    total.exact += c.exact;
    // The fused entry point gives the same bytes as the two steps.
    Tensor fused = Tensor::empty({x.rows, w_hat.rows}, DType::bf16, "fused");
    linear_fp8(xt, wt, raw(w + ".scale"), fused);
    EXPECT_EQ(fused.values(), out.values());
  }
  // The accumulation-order noise is far below a bf16 ulp: nearly every element is identical.
  EXPECT_GE(total.exact * 100, total.elements * 99) << total.exact << " of " << total.elements;
}

TEST(GemmFp8, RaggedNAndSeveralKBlocks) {
  // N = 200 (a partial last 128-row weight block) and K = 384 (three accumulated K-blocks), with
  // random e4m3 codes and scale codes across 2^-10 .. 2^3.
  const int64_t N = 200, K = 384;
  std::mt19937 rng(31);
  Tensor w = Tensor::empty({N, K}, DType::f8_e4m3fn, "w");
  Tensor ws = Tensor::empty({2, 3}, DType::ue8m0, "ws");
  auto* wb = w.data<uint8_t>();
  for (int64_t i = 0; i < N * K; ++i) {
    uint8_t c = static_cast<uint8_t>(rng());
    if ((c & 0x7F) == 0x7F) c = 0x7E;  // not NaN
    wb[i] = c;
  }
  for (int64_t i = 0; i < 6; ++i) ws.data<uint8_t>()[i] = static_cast<uint8_t>(117 + rng() % 14);
  Mat w_hat(N, K);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) {
      w_hat.at(n, k) = e4m3fn_to_f32(wb[n * K + k]) * ue8m0_to_f32(ws.data<uint8_t>()[(n / 128) * 3 + k / 128]);
    }
  }
  const Mat x = random_mat(7, K, 32, 3.0f);
  const Quantized qs = quantize(to_tensor(x, DType::f32, "x"));
  Tensor out = Tensor::empty({7, N}, DType::bf16, "out");
  gemm_fp8_block_scaled(qs.q, qs.s, w, ws, out);
  Mat x_hat = x;
  ref::fp8_quant_dequant_rows(x_hat, 128);
  const GemmCompare c = expect_gemm_close(to_mat(out), ref::linear(quant_ctx(tiny()), x, w_hat, ref::LinearKind::fp8),
                                          x_hat, w_hat, 128);
  EXPECT_GE(c.exact * 100, c.elements * 99) << c.exact << " of " << c.elements;
}

TEST(GemmFp4, CheckpointExpertsMatchReferenceLinear) {
  const ref::Context ctx = quant_ctx(tiny());
  GemmCompare total;
  for (const std::string w : {"layers.0.ffn.experts.0.w1", "layers.3.ffn.experts.5.w3", "layers.3.ffn.experts.7.w2"}) {
    SCOPED_TRACE(w);
    const Mat& w_hat = tiny_weights().get(w + ".weight");
    const Mat x = random_mat(5, w_hat.cols, 41);
    const Quantized qs = quantize(to_tensor(x, DType::bf16, "x"));
    Tensor out = Tensor::empty({x.rows, w_hat.rows}, DType::bf16, "out");
    gemm_fp4_weights(qs.q, qs.s, raw(w + ".weight"), raw(w + ".scale"), out);
    Mat x_hat = x;
    ref::fp8_quant_dequant_rows(x_hat, 128);
    const GemmCompare c = expect_gemm_close(to_mat(out), ref::linear(ctx, x, w_hat, ref::LinearKind::fp4), x_hat, w_hat, 32);
    total.elements += c.elements;
    total.exact += c.exact;
  }
  EXPECT_GE(total.exact * 100, total.elements * 99) << total.exact << " of " << total.elements;
}

TEST(LinearFp8, Bf16WeightsWithExplicitNoScale) {
  // The bf16 spelling (wo_a-like): no activation quantization, fp32 accumulation, bf16 output.
  const Mat& w_hat = tiny_weights().get("layers.3.ffn.gate.weight");
  const Mat x = random_mat(4, w_hat.cols, 51);
  Tensor out = Tensor::empty({4, w_hat.rows}, DType::bf16, "out");
  linear_fp8(to_tensor(x, DType::bf16, "x"), raw("layers.3.ffn.gate.weight"), kNoWeightScale, out);
  const GemmCompare c = expect_gemm_close(to_mat(out), ref::linear(quant_ctx(tiny()), x, w_hat, ref::LinearKind::bf16),
                                          x, w_hat, 128);
  EXPECT_GE(c.exact * 100, c.elements * 95) << c.exact << " of " << c.elements;
}

// ---- contracts ------------------------------------------------------------------------------------

// Runs f, expecting a ContractError that names `argument`.
template <class F>
void expect_contract_error(F&& f, const std::string& argument) {
  try {
    f();
    ADD_FAILURE() << "no ContractError for " << argument;
  } catch (const ContractError& e) {
    EXPECT_EQ(e.argument(), argument) << e.what();
  }
}

struct GemmArgs {
  Mat x = random_mat(2, 256, 61);
  Quantized qs = quantize(to_tensor(x, DType::bf16, "x"));
  Tensor w = Tensor::empty({128, 256}, DType::f8_e4m3fn, "w");
  Tensor ws = Tensor::empty({1, 2}, DType::ue8m0, "ws");
  Tensor out = Tensor::empty({2, 128}, DType::bf16, "out");
  GemmArgs() {
    w.fill(0.5);
    ws.fill(1.0);
  }
};

TEST(QuantGemmContract, WrongWeightScaleBlockShape) {
  GemmArgs a;
  Tensor per_row = Tensor::empty({128, 2}, DType::ue8m0, "per_row");  // 1 x 128 blocks, not 128 x 128
  per_row.fill(1.0);
  expect_contract_error([&] { gemm_fp8_block_scaled(a.qs.q, a.qs.s, a.w, per_row, a.out); }, "w_scales");
  Tensor fp4_like = Tensor::empty({128, 8}, DType::ue8m0, "fp4_like");  // the FP4 [N, K/32] layout
  expect_contract_error([&] { gemm_fp8_block_scaled(a.qs.q, a.qs.s, a.w, fp4_like, a.out); }, "w_scales");
  Tensor f32_scales = Tensor::empty({1, 2}, DType::f32, "f32_scales");  // right shape, wrong format
  expect_contract_error([&] { gemm_fp8_block_scaled(a.qs.q, a.qs.s, a.w, f32_scales, a.out); }, "w_scales");
  Tensor act_per_tensor = Tensor::empty({2, 1}, DType::ue8m0, "act_per_tensor");
  expect_contract_error([&] { gemm_fp8_block_scaled(a.qs.q, act_per_tensor, a.w, a.ws, a.out); }, "act_scales");
}

TEST(QuantGemmContract, Fp4WeightScaleShape) {
  GemmArgs a;
  Tensor w4 = Tensor::empty({128, 128}, DType::i8, "w4");
  Tensor fp8_like = Tensor::empty({1, 2}, DType::ue8m0, "fp8_like");  // 128 x 128 blocks, not 1 x 32
  expect_contract_error([&] { gemm_fp4_weights(a.qs.q, a.qs.s, w4, fp8_like, a.out); }, "w_scales");
  Tensor unpacked = Tensor::empty({128, 256}, DType::i8, "unpacked");  // K columns, not K / 2
  Tensor s4 = Tensor::empty({128, 8}, DType::ue8m0, "s4");
  expect_contract_error([&] { gemm_fp4_weights(a.qs.q, a.qs.s, unpacked, s4, a.out); }, "w");
}

TEST(QuantGemmContract, NonContiguousWeight) {
  GemmArgs a;
  const Tensor wt = Tensor::empty({256, 128}, DType::f8_e4m3fn, "wt").transpose(0, 1);  // [128, 256], column-major
  ASSERT_EQ(wt.shape(), a.w.shape());
  expect_contract_error([&] { gemm_fp8_block_scaled(a.qs.q, a.qs.s, wt, a.ws, a.out); }, "w");
  const Tensor w4t = Tensor::empty({256, 128}, DType::i8, "w4t").slice(0, 0, 256, 2);  // every other row
  Tensor s4 = Tensor::empty({128, 8}, DType::ue8m0, "s4");
  expect_contract_error([&] { gemm_fp4_weights(a.qs.q, a.qs.s, w4t, s4, a.out); }, "w");
}

TEST(QuantGemmContract, KNotAMultipleOfTheBlock) {
  const Tensor x = to_tensor(random_mat(2, 200, 71), DType::bf16, "x");
  Tensor q = Tensor::empty({2, 200}, DType::f8_e4m3fn, "q");
  Tensor s = Tensor::empty({2, 1}, DType::ue8m0, "s");
  expect_contract_error([&] { act_quant_fp8(x, 128, q, s); }, "x");
  Tensor w = Tensor::empty({128, 200}, DType::f8_e4m3fn, "w");
  Tensor ws = Tensor::empty({1, 1}, DType::ue8m0, "ws");
  Tensor out = Tensor::empty({2, 128}, DType::bf16, "out");
  expect_contract_error([&] { gemm_fp8_block_scaled(q, s, w, ws, out); }, "q_act");
  expect_contract_error([&] { linear_fp8(x, w, ws, out); }, "x");
  expect_contract_error([&] { act_quant_fp8(x, 0, q, s); }, "block");
}

TEST(QuantGemmContract, LinearWeightScaleA5) {
  // The run-time half of A5: a tensor that is really one number, or has the wrong block shape, is
  // refused by name; so are the two mismatched spellings.
  GemmArgs a;
  const Tensor x = to_tensor(a.x, DType::bf16, "x");
  Tensor w = Tensor::empty({256, 256}, DType::f8_e4m3fn, "w");  // needs [2, 2] scales
  Tensor out = Tensor::empty({2, 256}, DType::bf16, "out");
  Tensor scalar = Tensor::empty({}, DType::ue8m0, "scalar");
  expect_contract_error([&] { linear_fp8(x, w, scalar, out); }, "w_scale");
  Tensor one_block = Tensor::empty({1, 1}, DType::ue8m0, "one_block");
  expect_contract_error([&] { linear_fp8(x, w, one_block, out); }, "w_scale");
  expect_contract_error([&] { linear_fp8(x, w, Tensor(), out); }, "w_scale");
  expect_contract_error([&] { linear_fp8(x, w, kNoWeightScale, out); }, "w_scale");
  const Tensor wb = Tensor::empty({256, 256}, DType::bf16, "wb");
  Tensor s22 = Tensor::empty({2, 2}, DType::ue8m0, "s22");
  expect_contract_error([&] { linear_fp8(x, wb, s22, out); }, "w_scale");
}

// ---- the w8a8-int8 path against ref::linear(quant-sim, LinearQuant::w8a8_int8) --------------------

ref::Context int8_ctx(const ModelConfig& c) {
  ref::Numerics n{ref::Mode::quant_sim};
  n.linear = ref::LinearQuant::w8a8_int8;
  return ref::Context{c, n, nullptr, nullptr};
}

// Rows that exercise every branch of the row rule (values bf16-representable, so a bf16 and an f32
// copy of the matrix are the same numbers): random O(1) rows, an all-zero row, a row whose amax is
// 127/64 (inv = 64 exactly, so (j + 0.5) / 64 lands on a rounding tie, both ways, and ±amax on ±127),
// a row below the 1e-7 amax floor, a row where the largest magnitude is negative, and a large-scale
// row. Row r uses case r % 6.
Mat int8_cases(int64_t rows, int64_t cols, unsigned seed) {
  Mat m = random_mat(rows, cols, seed);
  for (int64_t r = 0; r < rows; ++r) {
    float* v = m.row(r);
    switch (r % 6) {
      case 1: std::fill(v, v + cols, 0.0f); break;
      case 2:
        for (int64_t k = 0; k < cols; ++k) {
          const int64_t j = (k * 37) % 127;  // (j + 0.5) / 64: ties at 0.5, 1.5, ..., 126.5
          v[k] = static_cast<float>((2 * j + 1) * ((k % 2) ? -1 : 1)) / 128.0f;
        }
        v[0] = 127.0f / 64.0f;
        if (cols > 1) v[cols - 1] = -127.0f / 64.0f;
        break;
      case 3:
        for (int64_t k = 0; k < cols; ++k) v[k] = round_bf16(v[k] * 1e-8f);
        break;
      case 4:
        v[cols / 2] = -40.0f;
        break;
      case 5:
        for (int64_t k = 0; k < cols; ++k) v[k] = round_bf16(v[k] * 3e4f);
        break;
      default: break;
    }
  }
  return m;
}

Tensor f32_tensor(const Mat& m, const std::string& name) { return to_tensor(m, DType::f32, name); }

// got and want equal bit for bit (as f32 values; NaN compared as NaN).
void expect_bits_equal(const Mat& got, const Mat& want) {
  ASSERT_EQ(got.rows, want.rows);
  ASSERT_EQ(got.cols, want.cols);
  int64_t bad = 0;
  for (int64_t t = 0; t < want.rows; ++t) {
    for (int64_t n = 0; n < want.cols; ++n) {
      const float g = got.at(t, n), w = want.at(t, n);
      const bool same = (std::isnan(g) && std::isnan(w)) || f32_bits(g) == f32_bits(w);
      if (!same && ++bad <= 10) ADD_FAILURE() << "t " << t << " n " << n << ": " << g << " vs " << w;
    }
  }
  EXPECT_EQ(bad, 0);
}

// The kernels' codes and scales equal reference/quant.h's int8_quantize_rows bit for bit.
void expect_codes_equal(const Tensor& q, const Tensor& scales, const Mat& m) {
  const ref::Int8Rows want = ref::int8_quantize_rows(m);
  ASSERT_EQ(q.size(0), m.rows);
  for (int64_t r = 0; r < m.rows; ++r) {
    const float s = scales.data<float>()[r];
    EXPECT_EQ(f32_bits(s), f32_bits(want.scales[static_cast<size_t>(r)])) << "row " << r;
    const int8_t* qr = q.data<int8_t>() + r * q.stride(0);
    for (int64_t k = 0; k < m.cols; ++k) ASSERT_EQ(qr[k], want.at(r, k)) << "row " << r << " k " << k;
  }
}

struct Int8Act {
  Tensor q;
  Tensor s;
};
Int8Act quantize_int8(const Tensor& x) {
  Int8Act r{Tensor::empty({x.size(0), x.size(1)}, DType::i8, "q"), Tensor::empty({x.size(0)}, DType::f32, "s")};
  act_quant_int8(x, r.q, r.s);
  return r;
}

TEST(ActQuantInt8, CodesAndScalesEqualReferenceBitForBit) {
  const Mat x = int8_cases(12, 200, 111);
  for (DType dtype : {DType::bf16, DType::f32}) {
    SCOPED_TRACE(std::string(dtype_name(dtype)));
    const Int8Act a = quantize_int8(to_tensor(x, dtype, "x"));
    expect_codes_equal(a.q, a.s, x);
  }
  // The rule itself, by hand: amax 127/64 gives s = 1/64 and inv = 64; the ties round to even.
  const Int8Act a = quantize_int8(to_tensor(x, DType::f32, "x"));
  EXPECT_EQ(a.s.data<float>()[2], 1.0f / 64.0f);
  EXPECT_EQ(a.q.data<int8_t>()[2 * 200 + 0], 127);
  EXPECT_EQ(a.q.data<int8_t>()[2 * 200 + 199], -127);
  EXPECT_EQ(a.s.data<float>()[1], 1e-7f / 127.0f) << "an all-zero token gets the floor's scale";
  EXPECT_EQ(a.s.data<float>()[3], 1e-7f / 127.0f) << "a token below the floor too";
  int64_t ties = 0;
  for (int64_t k = 0; k < 200; ++k) {
    const float v = x.at(2, k) * 64.0f;  // exact
    const int8_t q = a.q.data<int8_t>()[2 * 200 + k];
    if (v - std::floor(v) == 0.5f) {
      ++ties;
      EXPECT_EQ(q % 2, 0) << "k " << k << ": " << v << " -> " << int(q) << ", not the even neighbour";
    }
  }
  EXPECT_GT(ties, 100);
  // A row above the floor reaches ±127 at its amax; the zero and below-floor rows (cases 1, 3) do not.
  for (int64_t r = 0; r < 12; ++r) {
    int max_code = 0;
    for (int64_t k = 0; k < 200; ++k) max_code = std::max(max_code, std::abs(int{a.q.data<int8_t>()[r * 200 + k]}));
    EXPECT_EQ(max_code == 127, r % 6 != 1 && r % 6 != 3) << "row " << r << " max code " << max_code;
  }
}

TEST(ActQuantInt8, NonBf16F32InputPaddedRowsAndNonFiniteTokens) {
  // f32 values that are not bf16 values, read through a row-padded view.
  Mat wide = random_mat(4, 96, 112);
  for (float& v : wide.data) v *= 1.0001f;
  const Tensor view = f32_tensor(wide, "wide").narrow(1, 0, 80);
  ASSERT_FALSE(view.is_contiguous());
  const Int8Act a = quantize_int8(view);
  expect_codes_equal(a.q, a.s, ref::cols_of(wide, 0, 80));
  // A token holding inf or NaN: scale NaN, codes 0; the other tokens are untouched.
  Mat x = random_mat(3, 16, 113);
  x.at(0, 5) = std::numeric_limits<float>::infinity();
  x.at(2, 0) = std::numeric_limits<float>::quiet_NaN();
  const Int8Act b = quantize_int8(f32_tensor(x, "x"));
  EXPECT_TRUE(std::isnan(b.s.data<float>()[0]));
  EXPECT_TRUE(std::isnan(b.s.data<float>()[2]));
  EXPECT_FALSE(std::isnan(b.s.data<float>()[1]));
  for (int64_t k = 0; k < 16; ++k) EXPECT_EQ(b.q.data<int8_t>()[k], 0);
  const ref::Int8Rows want = ref::int8_quantize_rows(x);
  for (int64_t k = 0; k < 16; ++k) EXPECT_EQ(b.q.data<int8_t>()[16 + k], want.at(1, k));
  // T = 0 is a no-op.
  const Int8Act none = quantize_int8(Tensor::empty({0, 16}, DType::bf16, "none"));
  EXPECT_EQ(none.q.numel(), 0);
}

TEST(QuantizeWeightInt8, PerChannelEqualsReference) {
  const Mat w = int8_cases(18, 130, 121);
  const Int8Weight q = quantize_weight_int8(f32_tensor(w, "w"));
  EXPECT_EQ(q.q.dtype(), DType::i8);
  EXPECT_EQ(q.q.shape(), (Shape{18, 130}));
  EXPECT_EQ(q.scales.dtype(), DType::f32);
  EXPECT_EQ(q.scales.shape(), (Shape{18}));
  expect_codes_equal(q.q, q.scales, w);
  EXPECT_EQ(q.scales.data<float>()[1], 1e-7f / 127.0f) << "an all-zero channel: codes 0, the floor's scale";
}

// Runs the three int8 steps on x and the dequantized weight; the output as a Mat.
Mat kernel_int8_linear(const Mat& x, const Mat& w, DType x_dtype = DType::bf16) {
  const Int8Act a = quantize_int8(to_tensor(x, x_dtype, "x"));
  const Int8Weight q = quantize_weight_int8(f32_tensor(w, "w"));
  Tensor out = Tensor::empty({x.rows, w.rows}, DType::bf16, "out");
  gemm_int8_per_channel(a.q, a.s, q.q, q.scales, out);
  // The fused entry point gives the same bytes.
  Tensor fused = Tensor::empty({x.rows, w.rows}, DType::bf16, "fused");
  linear_projection(to_tensor(x, x_dtype, "x"), q.q, ChannelScales{q.scales}, fused);
  EXPECT_EQ(std::memcmp(fused.data_ptr(), out.data_ptr(), static_cast<size_t>(out.numel()) * 2), 0);
  Mat y(x.rows, w.rows);  // (to_mat cannot tell the width of an empty [0, N] tensor)
  const std::vector<double> v = out.values();
  for (size_t i = 0; i < v.size(); ++i) y.data[i] = static_cast<float>(v[i]);
  return y;
}

TEST(GemmInt8, EqualsReferenceLinearBitForBitAcrossShapes) {
  const ref::Context ctx = int8_ctx(tiny());
  struct Shape3 {
    int64_t T, N, K;
  };
  // K not a multiple of 128 (1, 7, 100, 200), T = 0 and 1, N not a multiple of anything.
  for (const Shape3 sh : {Shape3{0, 8, 100}, Shape3{1, 16, 128}, Shape3{1, 1, 1}, Shape3{5, 33, 200},
                          Shape3{7, 64, 384}, Shape3{4, 24, 7}, Shape3{13, 19, 1000}}) {
    SCOPED_TRACE("T " + std::to_string(sh.T) + " N " + std::to_string(sh.N) + " K " + std::to_string(sh.K));
    const Mat x = int8_cases(sh.T, sh.K, 131 + static_cast<unsigned>(sh.K));
    const Mat w = int8_cases(sh.N, sh.K, 137 + static_cast<unsigned>(sh.N));
    const Mat want = ref::linear(ctx, x, w, ref::LinearKind::fp8);
    expect_bits_equal(kernel_int8_linear(x, w), want);
    expect_bits_equal(kernel_int8_linear(x, w, DType::f32), want);
    // fp4 linears take the same int8 path.
    expect_bits_equal(ref::linear(ctx, x, w, ref::LinearKind::fp4), want);
  }
}

TEST(GemmInt8, CheckpointWeightsEqualReferenceBitForBit) {
  // The dequantized FP8 and FP4 checkpoint weights, requantized per channel offline.
  const ref::Context ctx = int8_ctx(tiny());
  for (const std::string w : {"layers.0.ffn.shared_experts.w1", "layers.1.attn.wq_b", "layers.3.ffn.experts.5.w3",
                              "layers.3.ffn.experts.7.w2"}) {
    SCOPED_TRACE(w);
    const Mat& w_hat = tiny_weights().get(w + ".weight");
    const Mat x = random_mat(6, w_hat.cols, 141);
    const ref::LinearKind kind = w.find("experts.") != std::string::npos && w.find("shared") == std::string::npos
                                     ? ref::LinearKind::fp4
                                     : ref::LinearKind::fp8;
    const Mat want = ref::linear(ctx, x, w_hat, kind);
    expect_bits_equal(kernel_int8_linear(x, w_hat), want);
    // And the int8 path is a different numerics from the FP8 one (while close to it).
    const Mat fp8 = ref::linear(quant_ctx(tiny()), x, w_hat, kind);
    EXPECT_NE(fp8.data, want.data);
  }
}

TEST(GemmInt8, ExactIntegerAccumulationAtTheInt32Limit) {
  // K = kInt8MaxK with every code -128: acc = K · 16384 = 2147467264 <= 2^31 - 1, exact in int32;
  // the f32 conversion rounds once (to nearest even), then the scales and the bf16 rounding.
  const int64_t K = kInt8MaxK;
  ASSERT_LE(K * 128 * 128, int64_t{std::numeric_limits<int32_t>::max()});
  ASSERT_GT((K + 1) * 128 * 128, int64_t{std::numeric_limits<int32_t>::max()});
  Tensor q = Tensor::empty({1, K}, DType::i8, "q");
  Tensor w = Tensor::empty({2, K}, DType::i8, "w");
  std::fill(q.data<int8_t>(), q.data<int8_t>() + K, int8_t{-128});
  std::fill(w.data<int8_t>(), w.data<int8_t>() + K, int8_t{-128});
  std::fill(w.data<int8_t>() + K, w.data<int8_t>() + 2 * K, int8_t{127});
  const Tensor sa = Tensor::from_values({1}, DType::f32, {0.5}, "sa");
  const Tensor sw = Tensor::from_values({2}, DType::f32, {0x1.0p-20, 3.0}, "sw");
  Tensor out = Tensor::empty({1, 2}, DType::bf16, "out");
  gemm_int8_per_channel(q, sa, w, sw, out);
  const int64_t acc0 = K * 128 * 128, acc1 = -K * 128 * 127;
  EXPECT_EQ(out.get({0, 0}), round_bf16((static_cast<float>(acc0) * 0.5f) * 0x1.0p-20f));
  EXPECT_EQ(out.get({0, 1}), round_bf16((static_cast<float>(acc1) * 0.5f) * 3.0f));
  // One more column is refused: the accumulation could overflow.
  Tensor q2 = Tensor::empty({1, K + 1}, DType::i8, "q2");
  Tensor w2 = Tensor::empty({2, K + 1}, DType::i8, "w2");
  expect_contract_error([&] { gemm_int8_per_channel(q2, sa, w2, sw, out); }, "q_act");
}

TEST(GemmInt8, ScalingOrderIsActivationThenWeight) {
  // out = bf16((f32(acc) * s_a) * s_w). The other association, acc * (s_a * s_w), differs after the
  // bf16 rounding only rarely: search random inputs for such cases, then check the kernel gives the
  // documented order's value on each; and one case where only the order decides overflow.
  struct Case {
    int a0, a1;
    float sa, sw;
  };
  std::vector<Case> cases = {{127, 127, 0x1.0p+120f, 0x1.0p-120f}};  // 16129 · 2^120 overflows first
  std::mt19937 rng(151);
  std::uniform_real_distribution<float> u(1.0f, 2.0f);
  for (int i = 0; i < 50'000'000 && cases.size() < 40; ++i) {
    const Case c{static_cast<int>(rng() % 255) - 127, static_cast<int>(rng() % 255) - 127, u(rng), u(rng)};
    const float acc = static_cast<float>(c.a0 + c.a1);
    if (round_bf16((acc * c.sa) * c.sw) != round_bf16(acc * (c.sa * c.sw))) cases.push_back(c);
  }
  ASSERT_GE(cases.size(), 20u) << "the search must find inputs that tell the two orders apart";
  const Tensor w = Tensor::from_values({1, 2}, DType::i8, {1, 1}, "w");
  Tensor out = Tensor::empty({1, 1}, DType::bf16, "out");
  for (const Case& c : cases) {
    const Tensor q = Tensor::from_values({1, 2}, DType::i8, {double(c.a0), double(c.a1)}, "q");
    const Tensor sa = Tensor::from_values({1}, DType::f32, {c.sa}, "sa");
    const Tensor sw = Tensor::from_values({1}, DType::f32, {c.sw}, "sw");
    gemm_int8_per_channel(q, sa, w, sw, out);
    const float acc = static_cast<float>(c.a0 + c.a1);
    EXPECT_EQ(out.get({0, 0}), round_bf16((acc * c.sa) * c.sw)) << "acc " << acc << " sa " << c.sa << " sw " << c.sw;
  }
  EXPECT_TRUE(std::isinf(round_bf16((16129.0f * 0x1.0p+120f) * 0x1.0p-120f)));
}

TEST(LinearProjection, DispatchesOnTheWeightDtypeLikeTheDirectCalls) {
  // FP8 weights with BlockScales: linear_fp8's bytes; bf16 weights with kNoWeightScale: likewise.
  const std::string name = "layers.0.ffn.shared_experts.w1";
  const Tensor& wt = raw(name + ".weight");
  const Mat x = random_mat(3, wt.size(1), 161);
  const Tensor xt = to_tensor(x, DType::bf16, "x");
  Tensor direct = Tensor::empty({3, wt.size(0)}, DType::bf16, "direct");
  Tensor projected = Tensor::empty({3, wt.size(0)}, DType::bf16, "projected");
  linear_fp8(xt, wt, raw(name + ".scale"), direct);
  linear_projection(xt, wt, BlockScales{raw(name + ".scale")}, projected);
  EXPECT_EQ(projected.values(), direct.values());
  const Tensor& wb = raw("layers.3.ffn.gate.weight");
  const Mat xb = random_mat(2, wb.size(1), 162);
  Tensor d2 = Tensor::empty({2, wb.size(0)}, DType::bf16, "d2");
  Tensor p2 = Tensor::empty({2, wb.size(0)}, DType::bf16, "p2");
  linear_fp8(to_tensor(xb, DType::bf16, "xb"), wb, kNoWeightScale, d2);
  linear_projection(to_tensor(xb, DType::bf16, "xb"), wb, kNoWeightScale, p2);
  EXPECT_EQ(p2.values(), d2.values());
  // int8 weights with ChannelScales: the reference's w8a8-int8 linear (kernel_int8_linear checks
  // linear_projection against the three steps).
  const Mat& w_hat = tiny_weights().get(name + ".weight");
  expect_bits_equal(kernel_int8_linear(x, w_hat), ref::linear(int8_ctx(tiny()), x, w_hat, ref::LinearKind::fp8));
}

TEST(Int8Contract, ArgumentsAreNamed) {
  const Mat x = random_mat(2, 64, 171);
  const Tensor xt = to_tensor(x, DType::bf16, "x");
  Tensor q = Tensor::empty({2, 64}, DType::i8, "q");
  Tensor s = Tensor::empty({2}, DType::f32, "s");
  Tensor q_u8 = Tensor::empty({2, 64}, DType::u8, "q_u8");
  Tensor s_2d = Tensor::empty({2, 1}, DType::f32, "s_2d");
  Tensor s_bf16 = Tensor::empty({2}, DType::bf16, "s_bf16");
  expect_contract_error([&] { act_quant_int8(xt, q_u8, s); }, "q");
  expect_contract_error([&] { act_quant_int8(xt, q, s_2d); }, "scales");
  expect_contract_error([&] { act_quant_int8(xt, q, s_bf16); }, "scales");
  expect_contract_error([&] { act_quant_int8(Tensor::empty({2, 64}, DType::i8, "xi8"), q, s); }, "x");
  const Tensor xt_t = to_tensor(random_mat(64, 2, 172), DType::bf16, "xt").transpose(0, 1);  // inner stride 2
  expect_contract_error([&] { act_quant_int8(xt_t, q, s); }, "x");

  expect_contract_error([&] { quantize_weight_int8(to_tensor(x, DType::bf16, "wb")); }, "w_dequantized");
  Mat bad = x;
  bad.at(1, 3) = std::numeric_limits<float>::quiet_NaN();
  expect_contract_error([&] { quantize_weight_int8(f32_tensor(bad, "w")); }, "w_dequantized");
  bad.at(1, 3) = -std::numeric_limits<float>::infinity();
  expect_contract_error([&] { quantize_weight_int8(f32_tensor(bad, "w")); }, "w_dequantized");

  act_quant_int8(xt, q, s);
  const Int8Weight w = quantize_weight_int8(f32_tensor(random_mat(8, 64, 173), "w"));
  Tensor out = Tensor::empty({2, 8}, DType::bf16, "out");
  expect_contract_error([&] { gemm_int8_per_channel(q, s_2d, w.q, w.scales, out); }, "act_scales");
  expect_contract_error([&] { gemm_int8_per_channel(q, Tensor::empty({3}, DType::f32, "s3"), w.q, w.scales, out); },
                           "act_scales");
  Tensor ws_short = Tensor::empty({7}, DType::f32, "ws_short");
  expect_contract_error([&] { gemm_int8_per_channel(q, s, w.q, ws_short, out); }, "w_scales");
  Tensor ws_ue8m0 = Tensor::empty({8}, DType::ue8m0, "ws_ue8m0");
  expect_contract_error([&] { gemm_int8_per_channel(q, s, w.q, ws_ue8m0, out); }, "w_scales");
  Tensor ws_blocks = Tensor::empty({1, 1}, DType::f32, "ws_blocks");  // a block layout, not per channel
  expect_contract_error([&] { gemm_int8_per_channel(q, s, w.q, ws_blocks, out); }, "w_scales");
  expect_contract_error([&] { gemm_int8_per_channel(q, s, Tensor::empty({8, 64}, DType::f8_e4m3fn, "w8"), w.scales, out); },
                           "w");
  expect_contract_error([&] { gemm_int8_per_channel(q, s, Tensor::empty({8, 63}, DType::i8, "w63"), w.scales, out); },
                           "w");
  const Tensor w_t = Tensor::empty({64, 8}, DType::i8, "w_t").transpose(0, 1);
  expect_contract_error([&] { gemm_int8_per_channel(q, s, w_t, w.scales, out); }, "w");
  Tensor out_f32 = Tensor::empty({2, 8}, DType::f32, "out_f32");
  expect_contract_error([&] { gemm_int8_per_channel(q, s, w.q, w.scales, out_f32); }, "out");
  Tensor out_wide = Tensor::empty({2, 9}, DType::bf16, "out_wide");
  expect_contract_error([&] { gemm_int8_per_channel(q, s, w.q, w.scales, out_wide); }, "out");
  expect_contract_error([&] { gemm_int8_per_channel(Tensor::empty({2, 64}, DType::u8, "qu"), s, w.q, w.scales, out); },
                           "q_act");
}

TEST(Int8Contract, LinearProjectionRefusesMismatchedScaleSpellings) {
  const Tensor x = to_tensor(random_mat(2, 256, 181), DType::bf16, "x");
  Tensor out = Tensor::empty({2, 128}, DType::bf16, "out");
  const Tensor w8 = Tensor::empty({128, 256}, DType::f8_e4m3fn, "w8");
  const Tensor wi = Tensor::empty({128, 256}, DType::i8, "wi");
  const Tensor wb = Tensor::empty({128, 256}, DType::bf16, "wb");
  Tensor blocks = Tensor::empty({1, 2}, DType::ue8m0, "blocks");
  blocks.fill(1.0);
  Tensor channels = Tensor::empty({128}, DType::f32, "channels");
  channels.fill(1.0);
  // Each weight dtype with each wrong spelling.
  expect_contract_error([&] { linear_projection(x, wi, BlockScales{blocks}, out); }, "w_scale");
  expect_contract_error([&] { linear_projection(x, wi, kNoWeightScale, out); }, "w_scale");
  expect_contract_error([&] { linear_projection(x, w8, ChannelScales{channels}, out); }, "w_scale");
  expect_contract_error([&] { linear_projection(x, w8, kNoWeightScale, out); }, "w_scale");
  expect_contract_error([&] { linear_projection(x, wb, BlockScales{blocks}, out); }, "w_scale");
  expect_contract_error([&] { linear_projection(x, wb, ChannelScales{channels}, out); }, "w_scale");
  // The right spelling with the wrong tensor.
  expect_contract_error([&] { linear_projection(x, wi, ChannelScales{Tensor()}, out); }, "w_scale");
  expect_contract_error([&] { linear_projection(x, wi, ChannelScales{Tensor::empty({127}, DType::f32, "c")}, out); },
                           "w_scale");
  expect_contract_error([&] { linear_projection(x, wi, ChannelScales{blocks}, out); }, "w_scale");
  expect_contract_error([&] { linear_projection(x, w8, BlockScales{channels}, out); }, "w_scale");
  expect_contract_error([&] { linear_projection(x, w8, BlockScales{Tensor()}, out); }, "w_scale");
  expect_contract_error([&] { linear_projection(x, w8, BlockScales{Tensor::empty({}, DType::ue8m0, "one")}, out); },
                           "w_scale");
  // Formats linear_projection does not take, and a missing weight.
  expect_contract_error([&] { linear_projection(x, Tensor::empty({128, 256}, DType::f32, "wf"), kNoWeightScale, out); },
                           "w");
  expect_contract_error([&] { linear_projection(x, Tensor(), kNoWeightScale, out); }, "w");
  // The int8 path takes any K (no block), and its other arguments are still named.
  const Tensor x_odd = to_tensor(random_mat(2, 200, 182), DType::bf16, "x_odd");
  const Int8Weight q = quantize_weight_int8(f32_tensor(random_mat(128, 200, 183), "w200"));
  linear_projection(x_odd, q.q, ChannelScales{q.scales}, out);
  expect_contract_error([&] { linear_projection(x_odd, wi, ChannelScales{channels}, out); }, "w");
  Tensor out_bad = Tensor::empty({2, 127}, DType::bf16, "out_bad");
  expect_contract_error([&] { linear_projection(x_odd, q.q, ChannelScales{q.scales}, out_bad); }, "out");
}

// ---- the gate against the reference MoE's recorded routing -----------------------------------------

struct GateRun {
  Mat experts;
  Mat weights;
};

// Runs moe_gate for layer `layer` of tiny on logits [T, E].
GateRun run_gate(const Tensor& logits, int64_t layer, const std::vector<int64_t>& ids) {
  const std::string p = "layers." + std::to_string(layer) + ".ffn.gate.";
  const bool hash = tiny().is_hash_layer(layer);
  const int64_t T = logits.size(0);
  const int64_t k = tiny().n_activated_experts;
  std::vector<double> id_values(ids.begin(), ids.end());
  const Tensor token_ids = Tensor::from_values({T}, DType::i64, id_values, "token_ids");
  Tensor experts = Tensor::empty({T, k}, DType::i32, "experts");
  Tensor weights = Tensor::empty({T, k}, DType::f32, "weights");
  moe_gate(logits, hash ? Tensor() : raw(p + "bias"), hash ? raw(p + "tid2eid") : Tensor(), token_ids, k,
           static_cast<float>(tiny().route_scale), experts, weights);
  return {to_mat(experts), to_mat(weights)};
}

std::vector<int64_t> some_ids(int64_t T) {
  std::vector<int64_t> ids;
  for (int64_t t = 0; t < T; ++t) ids.push_back((37 + t * 101) % tiny().vocab_size);
  return ids;
}

TEST(MoeGate, HashAndScoreLayersMatchReferenceTrace) {
  const int64_t T = 16;
  for (int64_t layer : {int64_t{0}, int64_t{3}}) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    const std::string p = "layers." + std::to_string(layer) + ".ffn";
    ASSERT_EQ(tiny().is_hash_layer(layer), layer == 0);
    const Mat x = random_mat(T, tiny().dim, 81 + static_cast<unsigned>(layer));
    const std::vector<int64_t> ids = some_ids(T);
    ref::Trace trace;
    const ref::Context ctx = quant_ctx(tiny(), &trace);
    ref::MoE(tiny(), tiny_weights(), p, layer).forward(ctx, x, ids, 0);
    const Mat& want_experts = trace.values.at(p + ".gate.experts");
    const Mat& want_weights = trace.values.at(p + ".gate.weights");

    // 1. From the reference's own logits: routing and weights are bit for bit the reference's.
    const Mat ref_logits = ref::linear(ctx, x, tiny_weights().get(p + ".gate.weight"), ref::LinearKind::f32);
    const GateRun exact = run_gate(to_tensor(ref_logits, DType::f32, "logits"), layer, ids);
    EXPECT_EQ(exact.experts.data, want_experts.data);
    EXPECT_EQ(exact.weights.data, want_weights.data);

    // 2. Through the kernel's fp32 gate GEMM: the same experts (no near-ties on this input) and
    // weights within fp32 noise (the logits differ by summation order only: a few fp32 ulps).
    Tensor logits = Tensor::empty({T, tiny().n_routed_experts}, DType::f32, "logits");
    moe_gate_logits(to_tensor(x, DType::bf16, "x"), raw(p + ".gate.weight"), logits);
    const GateRun run = run_gate(logits, layer, ids);
    EXPECT_EQ(run.experts.data, want_experts.data);
    for (size_t i = 0; i < want_weights.data.size(); ++i) {
      EXPECT_NEAR(run.weights.data[i], want_weights.data[i], 1e-5 * std::abs(want_weights.data[i])) << i;
    }
  }
}

TEST(MoeGate, Contract) {
  const int64_t T = 2;
  Tensor logits = Tensor::empty({T, 8}, DType::f32, "logits");
  logits.fill(0.0);
  Tensor experts = Tensor::empty({T, 2}, DType::i32, "experts");
  Tensor weights = Tensor::empty({T, 2}, DType::f32, "weights");
  const Tensor& table = raw("layers.0.ffn.gate.tid2eid");
  const Tensor bad_ids = Tensor::from_values({T}, DType::i32, {1, 1024}, "ids");
  expect_contract_error([&] { moe_gate(logits, Tensor(), table, bad_ids, 2, 1.5f, experts, weights); }, "token_ids");
  const Tensor ids = Tensor::from_values({T}, DType::i32, {1, 2}, "ids");
  expect_contract_error([&] { moe_gate(logits, raw("layers.3.ffn.gate.bias"), table, ids, 2, 1.5f, experts, weights); },
                        "bias");
  Tensor repeated = Tensor::from_values({4, 2}, DType::i32, {0, 1, 3, 3, 2, 4, 5, 6}, "repeated");
  expect_contract_error([&] { moe_gate(logits, Tensor(), repeated, ids, 2, 1.5f, experts, weights); }, "tid2eid");
  expect_contract_error([&] { moe_gate(logits, Tensor(), Tensor(), ids, 9, 1.5f, experts, weights); }, "k");
  // Equal scores and no bias: the lower indices win, weights 1/k · route_scale.
  moe_gate(logits, Tensor(), Tensor(), Tensor(), 2, 1.5f, experts, weights);
  EXPECT_EQ(experts.values(), (std::vector<double>{0, 1, 0, 1}));
  EXPECT_EQ(weights.values(), (std::vector<double>{0.75, 0.75, 0.75, 0.75}));
}

// ---- SwiGLU clamp --------------------------------------------------------------------------------

TEST(SwigluClamp, UpBothSidesGateFromAboveOnly) {
  const float L = 0.5f;
  // g: above L (clamped), far below -L (not clamped), inside; u: above, below, inside.
  const Tensor g = Tensor::from_values({1, 4}, DType::f32, {5.0, -7.0, 0.25, 2.0}, "g");
  const Tensor u = Tensor::from_values({1, 4}, DType::f32, {-3.0, 4.0, 0.125, -0.75}, "u");
  const Tensor w = Tensor::from_values({1}, DType::f32, {0.375}, "w");
  Tensor h = Tensor::empty({1, 4}, DType::bf16, "h");
  swiglu_clamp(g, u, L, w, h);
  auto silu = [](float v) { return v / (1.0f + std::exp(-v)); };
  const std::vector<double> want = {round_bf16(silu(0.5f) * -0.5f * 0.375f), round_bf16(silu(-7.0f) * 0.5f * 0.375f),
                                    round_bf16(silu(0.25f) * 0.125f * 0.375f), round_bf16(silu(0.5f) * -0.5f * 0.375f)};
  EXPECT_EQ(h.values(), want);
  // limit <= 0: no clamp, and no weight for the shared expert.
  swiglu_clamp(g, u, 0.0f, Tensor(), h);
  EXPECT_EQ(h.get({0, 0}), round_bf16(silu(5.0f) * -3.0f));
  EXPECT_EQ(h.get({0, 1}), round_bf16(silu(-7.0f) * 4.0f));
}

// ---- one MoE layer end to end: gate, FP4 routed experts, FP8 shared expert, combine ----------------

// The kernel pipeline for layer `layer` (expert outputs laid out [T, k, dim] in routing order).
Mat kernel_moe(const ModelConfig& c, int64_t layer, const Mat& x, const std::vector<int64_t>& ids, int64_t* clamped) {
  const std::string p = "layers." + std::to_string(layer) + ".ffn.";
  const int64_t T = x.rows, k = c.n_activated_experts, I = c.moe_inter_dim, d = c.dim;
  const float L = static_cast<float>(c.swiglu_limit);
  const Tensor xt = to_tensor(x, DType::bf16, "x");
  Tensor logits = Tensor::empty({T, c.n_routed_experts}, DType::f32, "logits");
  moe_gate_logits(xt, raw(p + "gate.weight"), logits);
  const GateRun gate = run_gate(logits, layer, ids);
  const Quantized xq = quantize(xt);

  // g, u and the clamp count (|u| > L or g > L) for one projection pair.
  auto count_clamped = [&](const Tensor& g, const Tensor& u) {
    for (int64_t r = 0; r < g.size(0); ++r) {
      for (int64_t i = 0; i < I; ++i) *clamped += (g.get({r, i}) > L || std::abs(u.get({r, i})) > L) ? 1 : 0;
    }
  };

  Tensor routed = Tensor::empty({T, k, d}, DType::bf16, "routed");
  for (int64_t t = 0; t < T; ++t) {
    const Tensor q = xq.q.narrow(0, t, 1);
    const Tensor s = xq.s.narrow(0, t, 1);
    for (int64_t j = 0; j < k; ++j) {
      const std::string e = p + "experts." + std::to_string(static_cast<int64_t>(gate.experts.at(t, j))) + ".";
      Tensor g = Tensor::empty({1, I}, DType::bf16, "g");
      Tensor u = Tensor::empty({1, I}, DType::bf16, "u");
      gemm_fp4_weights(q, s, raw(e + "w1.weight"), raw(e + "w1.scale"), g);
      gemm_fp4_weights(q, s, raw(e + "w3.weight"), raw(e + "w3.scale"), u);
      count_clamped(g, u);
      const Tensor w = Tensor::from_values({1}, DType::f32, {gate.weights.at(t, j)}, "w");
      Tensor h = Tensor::empty({1, I}, DType::bf16, "h");
      swiglu_clamp(g, u, L, w, h);
      const Quantized hq = quantize(h);
      Tensor y = routed.select(0, t).narrow(0, j, 1);
      gemm_fp4_weights(hq.q, hq.s, raw(e + "w2.weight"), raw(e + "w2.scale"), y);
    }
  }
  // The shared expert: FP8, all rows at once, no routing weight.
  const std::string sh = p + "shared_experts.";
  Tensor g = Tensor::empty({T, I}, DType::bf16, "g");
  Tensor u = Tensor::empty({T, I}, DType::bf16, "u");
  gemm_fp8_block_scaled(xq.q, xq.s, raw(sh + "w1.weight"), raw(sh + "w1.scale"), g);
  gemm_fp8_block_scaled(xq.q, xq.s, raw(sh + "w3.weight"), raw(sh + "w3.scale"), u);
  Tensor h = Tensor::empty({T, I}, DType::bf16, "h");
  swiglu_clamp(g, u, c.clamp_shared_expert ? L : 0.0f, Tensor(), h);
  const Quantized hq = quantize(h);
  Tensor shared = Tensor::empty({T, d}, DType::bf16, "shared");
  gemm_fp8_block_scaled(hq.q, hq.s, raw(sh + "w2.weight"), raw(sh + "w2.scale"), shared);

  Tensor out = Tensor::empty({T, d}, DType::bf16, "out");
  moe_combine(routed, shared, out);
  return to_mat(out);
}

// The end-to-end tolerance. Every step is bit-faithful except the fp32 summation order of the
// GEMMs, which (GemmCompare) leaves nearly every bf16 intermediate identical; an intermediate that
// lands on the neighbouring bf16 value moves the output by about one bf16 ulp of that expert's
// contribution. So: at most 2 bf16 ulps of the element plus 2^-8 of the row's largest magnitude,
// and the large majority of elements identical.
void expect_moe_close(const Mat& got, const Mat& want) {
  int64_t exact = 0;
  for (int64_t t = 0; t < want.rows; ++t) {
    float row_max = 0.0f;
    for (int64_t i = 0; i < want.cols; ++i) row_max = std::max(row_max, std::fabs(want.at(t, i)));
    for (int64_t i = 0; i < want.cols; ++i) {
      const double tol = 0x1.0p-6 * std::abs(want.at(t, i)) + 0x1.0p-8 * row_max;
      EXPECT_LE(std::abs(got.at(t, i) - want.at(t, i)), tol) << "t " << t << " i " << i;
      exact += got.at(t, i) == want.at(t, i) ? 1 : 0;
    }
  }
  EXPECT_GE(exact * 10, want.size() * 9) << exact << " of " << want.size() << " identical";
}

TEST(MoeCombine, OneLayerEndToEndMatchesReference) {
  const int64_t T = 4;
  for (int64_t layer : {int64_t{0}, int64_t{3}}) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    const Mat x = random_mat(T, tiny().dim, 91 + static_cast<unsigned>(layer));
    const std::vector<int64_t> ids = some_ids(T);
    const std::string p = "layers." + std::to_string(layer) + ".ffn";
    const Mat want = ref::MoE(tiny(), tiny_weights(), p, layer).forward(quant_ctx(tiny()), x, ids, 0);
    int64_t clamped = 0;
    expect_moe_close(kernel_moe(tiny(), layer, x, ids, &clamped), want);
  }
}

TEST(MoeCombine, SmallLimitClampFiresAsInTheReference) {
  // The tiny variant with swiglu_limit 0.5: the clamp fires on many elements of both the routed
  // and the shared experts, and the layer still matches the reference (which clamps the same way).
  ModelConfig c = tiny();
  c.swiglu_limit = 0.5;
  const int64_t T = 4, layer = 3;
  const Mat x = random_mat(T, c.dim, 101);
  const std::vector<int64_t> ids = some_ids(T);
  const Mat want = ref::MoE(c, tiny_weights(), "layers.3.ffn", layer).forward(quant_ctx(c), x, ids, 0);
  int64_t clamped = 0;
  const Mat got = kernel_moe(c, layer, x, ids, &clamped);
  EXPECT_GT(clamped, 0);
  expect_moe_close(got, want);
  // And it matters: the unclamped layer differs.
  const Mat unclamped = ref::MoE(tiny(), tiny_weights(), "layers.3.ffn", layer).forward(quant_ctx(tiny()), x, ids, 0);
  EXPECT_NE(unclamped.data, want.data);
}

TEST(MoeCombine, Fp32OrderAndOneRounding) {
  // 1 + 3·2^-10 + 3·2^-10 = 1 + 0.75·2^-7 rounds once, up to 1 + 2^-7; a bf16 accumulator would
  // round after each add and stay at 1.
  const Tensor routed = Tensor::from_values({1, 2, 1}, DType::f32, {1.0, 3 * 0x1.0p-10}, "routed");
  const Tensor shared = Tensor::from_values({1, 1}, DType::f32, {3 * 0x1.0p-10}, "shared");
  Tensor out = Tensor::empty({1, 1}, DType::bf16, "out");
  moe_combine(routed, shared, out);
  EXPECT_EQ(out.get({0, 0}), 1.0 + 0x1.0p-7);
  Tensor wrong = Tensor::empty({1, 2}, DType::bf16, "wrong");
  expect_contract_error([&] { moe_combine(routed, shared, wrong); }, "out");
}

}  // namespace
}  // namespace dsv4::kernels
