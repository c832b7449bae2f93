// Pipeline and context parallelism and the w8a8-int8 path on sim. Pipeline parallelism: every partition of the tiny config's 5 layers into 1..5 non-empty
// stages (one simulated device per stage, the head on the last) gives StepRecords bitwise equal to
// one stage, in eager and graph mode, multi-stream on and off, with the hazard detector silent.
#include <gtest/gtest.h>

#include "engine/core/error.h"
#include "tests/unit/engine_fixtures.h"

namespace dsv4::engine {
namespace {

using testing::first_difference;
using testing::options_for;
using testing::run_engine;
using testing::RunConfig;
using testing::RunResult;

// Every composition of n into parts >= 1.
void compositions(int64_t n, std::vector<int64_t>& prefix, std::vector<std::vector<int64_t>>& out) {
  if (n == 0) {
    out.push_back(prefix);
    return;
  }
  for (int64_t first = 1; first <= n; ++first) {
    prefix.push_back(first);
    compositions(n - first, prefix, out);
    prefix.pop_back();
  }
}

std::string str(const std::vector<int64_t>& p) {
  std::string s;
  for (int64_t v : p) s += (s.empty() ? "" : ",") + std::to_string(v);
  return s;
}

TEST(PipelineParallel, DefaultSplitIsVllms) {
  EXPECT_EQ(default_pp_partition(5, 1), (std::vector<int64_t>{5}));
  EXPECT_EQ(default_pp_partition(5, 2), (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(default_pp_partition(5, 3), (std::vector<int64_t>{2, 2, 1}));
  EXPECT_EQ(default_pp_partition(5, 4), (std::vector<int64_t>{1, 1, 2, 1}));
  EXPECT_EQ(default_pp_partition(8, 3), (std::vector<int64_t>{3, 3, 2}));
  EXPECT_THROW(default_pp_partition(5, 6), InputError);
  EXPECT_THROW(default_pp_partition(5, 0), InputError);
}

TEST(PipelineParallel, ExplicitPartitionsAreValidated) {
  try {
    validate_pp_partition({2, 0, 3}, 5, "--pp-partition");
    FAIL();
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "stage 1");
  }
  EXPECT_THROW(validate_pp_partition({2, 2}, 5, "--pp-partition"), InputError);
  EXPECT_NO_THROW(validate_pp_partition({1, 4}, 5, "--pp-partition"));
}

TEST(PipelineParallel, StagesHoldOnlyTheirWeights) {
  const ModelConfig config = load_model_config("tiny");
  EXPECT_TRUE(stage_holds_weight(config, 0, 2, "embed.weight"));
  EXPECT_FALSE(stage_holds_weight(config, 1, 3, "embed.weight"));
  EXPECT_TRUE(stage_holds_weight(config, 2, 5, "embed.weight"));  // the MTP block shares it
  EXPECT_TRUE(stage_holds_weight(config, 2, 5, "head.weight"));
  EXPECT_TRUE(stage_holds_weight(config, 2, 5, "mtp.0.e_proj.weight"));
  EXPECT_FALSE(stage_holds_weight(config, 0, 2, "hc_head_fn"));
  EXPECT_TRUE(stage_holds_weight(config, 0, 2, "layers.1.attn.wq_a.weight"));
  EXPECT_FALSE(stage_holds_weight(config, 0, 2, "layers.2.attn.wq_a.weight"));
}

TEST(PipelineParallel, TooFewDevicesIsAnInputError) {
  const ModelConfig config = load_model_config("micro");
  rt::SimRuntime runtime(rt::RuntimeOptions{}, rt::SimOptions{});
  EngineOptions eo;
  eo.pp_partition = {2, 3};
  EXPECT_THROW(ServingEngine(runtime, config, options_for(2), CheckpointSource::synthetic(config, 1), eo), InputError);
}

using testing::kModes;
using testing::Mode;

class PipelineParallelTiny : public ::testing::TestWithParam<Mode> {};

// All 16 partitions of 5 layers (PP 1..5) against PP=1, on a short tiny mix.
TEST_P(PipelineParallelTiny, EveryPartitionEqualsOneStage) {
  static const ModelConfig config = load_model_config("tiny");
  const auto mix = standard_workload(config, 1, 4, 6);
  RunConfig rc;
  rc.options = options_for(4);
  const RunResult base = run_engine(config, 1, mix, rc);
  rc.graphs = GetParam().graphs;
  rc.multi_stream = GetParam().multi_stream;
  std::vector<int64_t> prefix;
  std::vector<std::vector<int64_t>> partitions;
  compositions(config.n_layers, prefix, partitions);
  ASSERT_EQ(partitions.size(), 16u);
  for (const auto& p : partitions) {
    rc.pp_partition = p;
    rc.schedule = "random:" + std::to_string(p.size());
    const RunResult r = run_engine(config, 1, mix, rc);
    EXPECT_EQ(first_difference(base, r), "") << "partition " << str(p);
    EXPECT_TRUE(r.hazards.empty()) << "partition " << str(p) << ": " << r.hazards.front();
  }
}
INSTANTIATE_TEST_SUITE_P(Modes, PipelineParallelTiny, ::testing::ValuesIn(kModes));

TEST(ContextParallel, NeedsItsDevicesAndNoPp) {
  const ModelConfig config = load_model_config("micro");
  rt::SimRuntime runtime(rt::RuntimeOptions{}, rt::SimOptions{});
  EngineOptions eo;
  eo.cp = 2;
  EXPECT_THROW(ServingEngine(runtime, config, options_for(2), CheckpointSource::synthetic(config, 1), eo), InputError);
  rt::RuntimeOptions two;
  two.devices = 2;
  rt::SimRuntime runtime2(two, rt::SimOptions{});
  eo.pp_partition = {2, 3};
  EXPECT_THROW(ServingEngine(runtime2, config, options_for(2), CheckpointSource::synthetic(config, 1), eo), InputError);
}

// CP 2 and 4 prefill against CP 1 on the tiny mix: the same tokens, logits within a tolerance (the
// kv goes through an in-place norm + RoPE on a bf16 copy instead of the fused store), the detector
// silent; in the four modes (graphs and streams apply to the decode, which runs on rank 0).
class ContextParallelTiny : public ::testing::TestWithParam<Mode> {};
TEST_P(ContextParallelTiny, EqualsOneRank) {
  static const ModelConfig config = load_model_config("tiny");
  const auto mix = standard_workload(config, 1, 4, 6);
  RunConfig rc;
  rc.options = options_for(4);
  rc.probes = false;
  const RunResult base = run_engine(config, 1, mix, rc);
  rc.graphs = GetParam().graphs;
  rc.multi_stream = GetParam().multi_stream;
  for (int64_t cp : {2, 4}) {
    rc.cp = cp;
    rc.schedule = "random:" + std::to_string(cp);
    const RunResult r = run_engine(config, 1, mix, rc);
    EXPECT_EQ(r.generated, base.generated) << "cp " << cp;
    EXPECT_LE(testing::max_logit_difference(base, r), 1e-3) << "cp " << cp;
    EXPECT_TRUE(r.hazards.empty()) << "cp " << cp << ": " << r.hazards.front();
  }
}
INSTANTIATE_TEST_SUITE_P(Modes, ContextParallelTiny, ::testing::ValuesIn(kModes));


// w8a8-int8: the in-order eager run through the oracle against the reference's int8 simulation,
// and the other modes and schedules bitwise equal to it.
TEST(W8a8Int8, MicroMixMatchesReferenceInEveryMode) {
  const ModelConfig config = load_model_config("micro");
  const auto mix = standard_workload(config, 1, 8, 12);
  RunConfig rc;
  rc.options = options_for(8);
  rc.w8a8_int8 = true;
  const RunResult base = run_engine(config, 1, mix, rc);
  ref::Numerics numerics{ref::Mode::quant_sim};
  numerics.linear = ref::LinearQuant::w8a8_int8;
  ASSERT_EQ(testing::reference_divergence(config, 1, mix, base, numerics), "");
  for (const Mode& m : kModes) {
    rc.graphs = m.graphs;
    rc.multi_stream = m.multi_stream;
    rc.schedule = "pct:9:3";
    const RunResult r = run_engine(config, 1, mix, rc);
    EXPECT_EQ(first_difference(base, r), "") << m.name;
    EXPECT_TRUE(r.hazards.empty()) << m.name << ": " << r.hazards.front();
  }
  // And it is a different path from FP8.
  rc.w8a8_int8 = false;
  EXPECT_NE(first_difference(base, run_engine(config, 1, mix, rc)), "");
}


// The MTP block after every batch: its draft logits and intermediates through the oracle (with
// the reference's MTP block) on the in-order eager run; the four modes and PP 2 bitwise equal; the
// main model's tokens unchanged by drafting.
TEST(Mtp, MicroMixDraftsMatchReferenceInEveryMode) {
  const ModelConfig config = load_model_config("micro");
  const auto mix = standard_workload(config, 1, 8, 12);
  RunConfig rc;
  rc.options = options_for(8);
  rc.mtp = true;
  const RunResult base = run_engine(config, 1, mix, rc);
  ASSERT_EQ(testing::reference_divergence(config, 1, mix, base), "");
  int64_t drafts = 0;
  for (const StepRecord& s : base.steps) {
    for (const StepRow& row : s.rows) drafts += row.draft_id >= 0;
    if (!s.rows.empty()) {
      EXPECT_EQ(s.values.count("mtp.logits"), 1u);
    }
  }
  EXPECT_GT(drafts, 0);
  rc.mtp = false;
  EXPECT_EQ(run_engine(config, 1, mix, rc).generated, base.generated);
  rc.mtp = true;
  for (const Mode& m : kModes) {
    rc.graphs = m.graphs;
    rc.multi_stream = m.multi_stream;
    rc.schedule = "random:7";
    for (const std::vector<int64_t>& pp : {std::vector<int64_t>{}, std::vector<int64_t>{3, 2}}) {
      rc.pp_partition = pp;
      const RunResult r = run_engine(config, 1, mix, rc);
      EXPECT_EQ(first_difference(base, r), "") << m.name << " pp " << pp.size();
      EXPECT_TRUE(r.hazards.empty()) << m.name << ": " << r.hazards.front();
    }
  }
}

// Speculative decoding (EAGLE with the MTP block's drafts, greedy acceptance, the MTP block over
// every verified position): the greedy tokens equal those without speculation, and every step
// matches the reference (accepted prefixes only), with the MTP block's own drafts (untrained
// synthetic weights: almost none accepted), perfect drafts (from the non-speculative run: all
// accepted) and alternating right and wrong drafts; in the four modes.
TEST(Speculative, GreedyTokensEqualNonSpeculativeAndReferenceForAnyDrafts) {
  const ModelConfig config = load_model_config("micro");
  const auto mix = standard_workload(config, 1, 8, 12);
  RunConfig rc;
  rc.options = options_for(8);
  const RunResult plain = run_engine(config, 1, mix, rc);
  // The right token at `position` of request `id` (its prompt, then its greedy tokens).
  auto right = [&](int64_t id, int64_t position) -> int32_t {
    const auto& prompt = mix[static_cast<size_t>(id)].prompt_ids;
    const auto& gen = plain.generated[static_cast<size_t>(id)];
    const int64_t i = position - static_cast<int64_t>(prompt.size());
    return i < static_cast<int64_t>(gen.size()) ? gen[static_cast<size_t>(i)] : 0;
  };
  struct Drafts {
    const char* name;
    ServingEngine::DraftOverride fn;
  };
  const std::vector<Drafts> kinds = {
      {"mtp", {}},
      {"perfect", [&](int64_t id, int64_t pos, int32_t) { return right(id, pos); }},
      {"alternating", [&](int64_t id, int64_t pos, int32_t) {
         return pos % 2 == 0 ? right(id, pos) : (right(id, pos) + 1) % static_cast<int32_t>(config.vocab_size);
       }},
  };
  rc.mtp = true;
  rc.draft_tokens = 1;
  for (const Drafts& kind : kinds) {
    rc.draft_override = kind.fn;
    RunConfig eager = rc;
    const RunResult spec = run_engine(config, 1, mix, eager);
    EXPECT_EQ(spec.generated, plain.generated) << kind.name;
    EXPECT_EQ(testing::reference_divergence(config, 1, mix, spec), "") << kind.name;
    int64_t verified = 0, accepted = 0;
    for (const StepRecord& s : spec.steps) {
      for (const StepRow& row : s.rows) {
        if (row.accepted_tokens < 0) continue;
        verified += row.num_tokens - 1;
        accepted += row.accepted_tokens - 1;
      }
    }
    EXPECT_GT(verified, 0) << kind.name;
    if (std::string(kind.name) == "perfect") {
      EXPECT_EQ(accepted, verified);
    }
    if (std::string(kind.name) == "alternating") {
      EXPECT_GT(accepted, 0);
      EXPECT_LT(accepted, verified);
    }
    for (const Mode& m : kModes) {
      RunConfig other = rc;
      other.graphs = m.graphs;
      other.multi_stream = m.multi_stream;
      other.schedule = "pct:4:3";
      const RunResult r = run_engine(config, 1, mix, other);
      EXPECT_EQ(first_difference(spec, r), "") << kind.name << " " << m.name;
      EXPECT_TRUE(r.hazards.empty()) << kind.name << " " << m.name << ": " << r.hazards.front();
    }
  }
}

TEST(Speculative, OptionsAreChecked) {
  const ModelConfig config = load_model_config("micro");
  rt::SimRuntime runtime(rt::RuntimeOptions{}, rt::SimOptions{});
  EngineOptions eo;
  eo.draft_tokens = 1;  // without the MTP block
  EXPECT_THROW(ServingEngine(runtime, config, options_for(2), CheckpointSource::synthetic(config, 1), eo), InputError);
  eo.mtp = true;  // without the speculative rings
  EXPECT_THROW(ServingEngine(runtime, config, options_for(2), CheckpointSource::synthetic(config, 1), eo), InputError);
  RuntimeOptions spec = options_for(2);
  spec.speculative = true;
  eo.draft_tokens = 2;  // chained drafting is not built
  EXPECT_THROW(ServingEngine(runtime, config, spec, CheckpointSource::synthetic(config, 1), eo), InputError);
  eo.draft_tokens = 1;
  EXPECT_NO_THROW(ServingEngine(runtime, config, spec, CheckpointSource::synthetic(config, 1), eo));
}

TEST(Mtp, RefusedWithContextParallelism) {
  const ModelConfig config = load_model_config("micro");
  rt::RuntimeOptions two;
  two.devices = 2;
  rt::SimRuntime runtime(two, rt::SimOptions{});
  EngineOptions eo;
  eo.cp = 2;
  eo.mtp = true;
  EXPECT_THROW(ServingEngine(runtime, config, options_for(2), CheckpointSource::synthetic(config, 1), eo), InputError);
}

}  // namespace
}  // namespace dsv4::engine
