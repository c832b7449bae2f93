// Whole-model tests of the reference: decoding one more token equals prefilling the longer prompt,
// across ratio-4 and ratio-128 block boundaries, window eviction and the top-k binding, in both
// numerics modes; determinism; observation and forcing; checkpoint loading.
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <string_view>
#include <memory>

#include <gtest/gtest.h>

#include "engine/checkpoint/synthetic_weights.h"
#include "reference/generate.h"
#include "reference/model.h"
#include "reference/weights.h"

namespace dsv4::ref {

void PrintTo(Mode mode, std::ostream* os) { *os << (mode == Mode::exact ? "exact" : "quant_sim"); }

namespace {

struct Fixture {
  ModelConfig config;
  Weights weights;
};

// By value: GCC 13's -Wdangling-reference would take a temporary string argument for a risk.
const Fixture& fixture(std::string_view preset_name) {
  static std::map<std::string, std::unique_ptr<Fixture>> cache;
  const std::string preset(preset_name);
  auto& slot = cache[preset];
  if (!slot) {
    ModelConfig c = load_model_config(preset);
    Weights w = Weights::synthetic(c, 5);
    slot = std::make_unique<Fixture>(Fixture{std::move(c), std::move(w)});
  }
  return *slot;
}

// Largest |a - b| relative to the largest |b| (at least 1).
double relative_difference(const Mat& a, const Mat& b) {
  EXPECT_EQ(a.size(), b.size());
  double diff = 0, scale = 1;
  for (size_t i = 0; i < a.data.size(); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(a.data[i]) - b.data[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(b.data[i])));
  }
  return diff / scale;
}

std::vector<int64_t> first(const std::vector<int64_t>& v, int64_t n) { return {v.begin(), v.begin() + n}; }

// Prefill N tokens, decode token N; against a prefill of N + 1 tokens. The MTP block is compared the
// same way: its draft for position N from the decode path against the prefill path's last row.
void expect_decode_equals_prefill(const std::string& preset, Mode mode, int64_t n) {
  const Fixture& f = fixture(preset);
  const Context ctx{f.config, Numerics{mode}, nullptr, nullptr};
  const std::vector<int64_t> prompt = synthetic_prompt(f.config, 9, n + 2);

  Model stepped(f.config, f.weights);
  const Model::Output pre = stepped.forward(ctx, first(prompt, n), 0);
  stepped.mtp_forward(ctx, pre.final_residual, {prompt.begin() + 1, prompt.begin() + n + 1}, 0);
  const Model::Output dec = stepped.forward(ctx, {prompt[static_cast<size_t>(n)]}, n);
  const Mat draft_stepped = stepped.mtp_forward(ctx, dec.final_residual, {prompt[static_cast<size_t>(n + 1)]}, n);

  Model whole(f.config, f.weights);
  const Model::Output all = whole.forward(ctx, first(prompt, n + 1), 0);
  const Mat draft_whole = whole.mtp_forward(ctx, all.final_residual, {prompt.begin() + 1, prompt.begin() + n + 2}, 0);

  const double logits_diff = relative_difference(dec.logits, all.logits);
  const double draft_diff = relative_difference(draft_stepped, draft_whole);
  EXPECT_LE(logits_diff, 1e-5) << preset << " prompt " << n;
  EXPECT_LE(draft_diff, 1e-5) << preset << " prompt " << n << " (MTP)";
  EXPECT_EQ(argmax(dec.logits), argmax(all.logits)) << preset << " prompt " << n;
}

class DecodeEqualsPrefill : public ::testing::TestWithParam<std::tuple<std::string, Mode, int64_t>> {};

TEST_P(DecodeEqualsPrefill, AtTheLastPosition) {
  const auto& [preset, mode, n] = GetParam();
  expect_decode_equals_prefill(preset, mode, n);
}

#if defined(DSV4_REFERENCE_TINY_CASES)
// tiny: window 128, ratios 4 and 128, index_topk 64 (binds from position 259 on). Built as its own
// binary with the label `slow` (seconds per case, minutes under ASan).
INSTANTIATE_TEST_SUITE_P(Tiny, DecodeEqualsPrefill,
                         ::testing::Combine(::testing::Values(std::string("tiny")),
                                            ::testing::Values(Mode::exact, Mode::quant_sim),
                                            ::testing::Values(3, 127, 128, 259)));
#else
// micro: window 16, ratios 4 and 16, index_topk 4 (binds once more than 4 ratio-4 entries are
// visible, from position 19 on). Lengths land on and around every boundary.
INSTANTIATE_TEST_SUITE_P(Micro, DecodeEqualsPrefill,
                         ::testing::Combine(::testing::Values(std::string("micro")),
                                            ::testing::Values(Mode::exact, Mode::quant_sim),
                                            ::testing::Values(1, 2, 3, 4, 7, 15, 16, 17, 19, 20, 31, 47, 63, 64, 100)));


TEST(ReferenceModel, ChunkedPrefillEqualsOnePrefill) {
  const Fixture& f = fixture("micro");
  const Context ctx{f.config, Numerics{Mode::quant_sim}, nullptr, nullptr};
  const std::vector<int64_t> prompt = synthetic_prompt(f.config, 4, 40);
  Model chunked(f.config, f.weights);
  chunked.forward(ctx, first(prompt, 13), 0);
  chunked.forward(ctx, {prompt.begin() + 13, prompt.begin() + 30}, 13);
  const Model::Output a = chunked.forward(ctx, {prompt.begin() + 30, prompt.end()}, 30);
  Model whole(f.config, f.weights);
  const Model::Output b = whole.forward(ctx, prompt, 0);
  EXPECT_LE(relative_difference(a.logits, b.logits), 1e-5);
}

TEST(ReferenceModel, GenerationIsBitwiseDeterministic) {
  const Fixture& f = fixture("micro");
  for (Mode mode : {Mode::exact, Mode::quant_sim}) {
    const Context ctx{f.config, Numerics{mode}, nullptr, nullptr};
    Model model(f.config, f.weights);
    const std::vector<int64_t> prompt = synthetic_prompt(f.config, 1, 21);
    const Generation a = generate_greedy(ctx, model, prompt, 12, true);
    const Generation b = generate_greedy(ctx, model, prompt, 12, true);  // reset() reuses the slot
    Model fresh(f.config, f.weights);
    const Generation c = generate_greedy(ctx, fresh, prompt, 12, true);
    EXPECT_EQ(logits_digest(a.logits), logits_digest(b.logits));
    EXPECT_EQ(logits_digest(a.logits), logits_digest(c.logits));
    EXPECT_EQ(logits_digest(a.draft_logits), logits_digest(c.draft_logits));
    EXPECT_EQ(a.tokens, c.tokens);
    EXPECT_EQ(a.tokens.size(), 13u);
  }
}

TEST(ReferenceModel, ShortPromptThenSlotReuseMatchesAFreshModel) {
  // A prompt shorter than 4 tokens builds ratio-4 block 0 across prefill and decode; running a
  // longer sequence first and resetting must not leak its compress state into the next one.
  const Fixture& f = fixture("micro");
  const Context ctx{f.config, Numerics{Mode::quant_sim}, nullptr, nullptr};
  Model reused(f.config, f.weights);
  generate_greedy(ctx, reused, synthetic_prompt(f.config, 2, 37), 3, false);
  const Generation a = generate_greedy(ctx, reused, synthetic_prompt(f.config, 3, 2), 6, false);
  Model fresh(f.config, f.weights);
  const Generation b = generate_greedy(ctx, fresh, synthetic_prompt(f.config, 3, 2), 6, false);
  EXPECT_EQ(logits_digest(a.logits), logits_digest(b.logits));
}

TEST(ReferenceModel, ModesDifferAtQuantizationNoiseLevel) {
  const Fixture& f = fixture("micro");
  const std::vector<int64_t> prompt = synthetic_prompt(f.config, 8, 30);
  Model m(f.config, f.weights);
  const Mat exact = m.forward(Context{f.config, Numerics{Mode::exact}, nullptr, nullptr}, prompt, 0).logits;
  m.reset();
  const Mat quant = m.forward(Context{f.config, Numerics{Mode::quant_sim}, nullptr, nullptr}, prompt, 0).logits;
  const double d = relative_difference(quant, exact);
  EXPECT_GT(d, 0.0) << "quant-sim must change something";
  EXPECT_LT(d, 0.25) << "but only at quantization-noise level";
  double rms = 0;
  for (float v : exact.data) rms += static_cast<double>(v) * v;
  rms = std::sqrt(rms / static_cast<double>(exact.data.size()));
  EXPECT_GT(rms, 0.05) << "activations stay O(1) through the model";
  EXPECT_LT(rms, 50.0);
}

TEST(ReferenceModel, EveryIntermediateIsObservable) {
  const Fixture& f = fixture("micro");
  Trace trace;
  const Context ctx{f.config, Numerics{Mode::quant_sim}, &trace, nullptr};
  Model m(f.config, f.weights);
  const std::vector<int64_t> prompt = synthetic_prompt(f.config, 8, 24);
  m.forward(ctx, prompt, 0);
  for (const char* key : {"layers.0.attn_norm", "layers.0.attn.q", "layers.0.attn.kv", "layers.0.attn.out",
                          "layers.1.attn.indexer.topk", "layers.1.attn.compressor.entries", "layers.2.attn.out",
                          "layers.0.ffn.gate.experts", "layers.4.ffn.gate.experts", "layers.4.residual", "logits"}) {
    EXPECT_EQ(trace.values.count(key), 1u) << key;
  }
  EXPECT_EQ(trace.values.at("layers.0.attn.q").rows, 24);
}

TEST(ReferenceModel, ForcedDecisionsAreObeyed) {
  const Fixture& f = fixture("micro");
  const std::vector<int64_t> prompt = synthetic_prompt(f.config, 8, 40);
  Trace natural_trace;
  Model m(f.config, f.weights);
  const Mat natural = m.forward(Context{f.config, Numerics{Mode::exact}, &natural_trace, nullptr}, prompt, 0).logits;

  Forcing forcing;
  forcing.indexer_topk = [](int64_t layer, int64_t position) -> std::optional<std::vector<int64_t>> {
    if (layer != 1 || position < 8) return std::nullopt;
    return std::vector<int64_t>{0};  // only the first compressed entry
  };
  forcing.experts = [](int64_t layer, int64_t) -> std::optional<std::vector<int64_t>> {
    if (layer != 3) return std::nullopt;
    return std::vector<int64_t>{2, 3};
  };
  Trace forced_trace;
  m.reset();
  const Mat forced = m.forward(Context{f.config, Numerics{Mode::exact}, &forced_trace, &forcing}, prompt, 0).logits;
  EXPECT_GT(relative_difference(forced, natural), 0.0);
  const Mat& experts = forced_trace.values.at("layers.3.ffn.gate.experts");
  for (int64_t t = 0; t < experts.rows; ++t) {
    EXPECT_EQ(experts.at(t, 0), 2.0f);
    EXPECT_EQ(experts.at(t, 1), 3.0f);
  }
  EXPECT_EQ(forced_trace.values.at("layers.1.attn.keys_attended").at(39, 0),
            static_cast<float>(f.config.window_size + 1));
}

TEST(ReferenceModel, WeightsFromACheckpointEqualTheSyntheticOnes) {
  const Fixture& f = fixture("micro");
  const std::string path = ::testing::TempDir() + "/dsv4_ref_micro.safetensors";
  write_synthetic_checkpoint(f.config, 5, path);
  const Weights loaded = Weights::from_file(f.config, path);
  EXPECT_EQ(loaded.size(), f.weights.size());
  for (const char* name : {"embed.weight", "layers.1.attn.wq_b.weight", "layers.3.ffn.experts.1.w2.weight",
                           "layers.0.ffn.gate.tid2eid", "mtp.0.hc_head_fn"}) {
    EXPECT_EQ(loaded.get(name).data, f.weights.get(name).data) << name;
  }
}

#endif  // DSV4_REFERENCE_TINY_CASES

}  // namespace
}  // namespace dsv4::ref
