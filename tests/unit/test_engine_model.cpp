// The engine on one rank, on sim: construction checks, the metamorphic relations (graph replay ==
// eager, multi-stream off == on, any schedule == in-order, a request's tokens do not depend on its
// batch neighbours), the metadata and graph bookkeeping, and the reference comparison of the
// standard mix through the oracle.
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

const ModelConfig& micro() {
  static const ModelConfig c = load_model_config("micro");
  return c;
}

std::vector<WorkloadRequest> micro_mix(int64_t count = 8, int64_t decode = 6) {
  return standard_workload(micro(), 1, count, decode);
}

RunConfig config_for(int64_t requests) {
  RunConfig rc;
  rc.options = options_for(requests);
  return rc;
}

TEST(EngineModel, RefusesPageSizeThatSplitsTheIndexerKeyPages) {
  rt::SimRuntime runtime(rt::RuntimeOptions{}, rt::SimOptions{});
  RuntimeOptions o = options_for(2);
  o.page_size = 128;
  o.swa_page_size = 128;
  try {
    ServingEngine engine(runtime, micro(), o, CheckpointSource::synthetic(micro(), 1), EngineOptions{});
    FAIL() << "page_size 128 accepted";
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "page_size") << e.what();
  }
}

TEST(EngineModel, RefusesZeroIndexerBlocks) {
  rt::SimRuntime runtime(rt::RuntimeOptions{}, rt::SimOptions{});
  EngineOptions eo;
  eo.indexer_sms = 0;
  try {
    ServingEngine engine(runtime, micro(), options_for(2), CheckpointSource::synthetic(micro(), 1), eo);
    FAIL() << "indexer_sms 0 accepted";
  } catch (const InputError& e) {
    EXPECT_EQ(e.field(), "indexer_sms") << e.what();
  }
}

TEST(EngineModel, GraphReplayEqualsEagerBitwise) {
  const auto mix = micro_mix();
  RunConfig rc = config_for(8);
  const RunResult eager = run_engine(micro(), 1, mix, rc);
  rc.graphs = true;
  const RunResult graph = run_engine(micro(), 1, mix, rc);
  EXPECT_EQ(first_difference(eager, graph), "");
  EXPECT_GT(graph.graph_replays, 0);
  EXPECT_TRUE(graph.hazards.empty()) << graph.hazards.front();
}

TEST(EngineModel, MultiStreamOffEqualsOnBitwise) {
  const auto mix = micro_mix();
  RunConfig rc = config_for(8);
  const RunResult on = run_engine(micro(), 1, mix, rc);
  rc.multi_stream = false;
  const RunResult off = run_engine(micro(), 1, mix, rc);
  EXPECT_EQ(first_difference(on, off), "");
}

TEST(EngineModel, ScheduleDoesNotChangeValuesAndDetectorStaysSilent) {
  const auto mix = micro_mix();
  RunConfig rc = config_for(8);
  rc.graphs = true;
  const RunResult base = run_engine(micro(), 1, mix, rc);
  for (const char* s : {"random:11", "pct:12:3", "delay:1:40"}) {
    rc.schedule = s;
    const RunResult r = run_engine(micro(), 1, mix, rc);
    EXPECT_EQ(first_difference(base, r), "") << s;
    EXPECT_TRUE(r.hazards.empty()) << s << ": " << r.hazards.front();
  }
}

TEST(EngineModel, MetadataUpgradedOncePerBatchAndOneGraphPerBucket) {
  const auto mix = micro_mix();
  RunConfig rc = config_for(8);
  rc.graphs = true;
  const RunResult r = run_engine(micro(), 1, mix, rc);
  int64_t real_steps = 0, decode_steps = 0;
  std::set<size_t> buckets;
  for (const StepRecord& s : r.steps) {
    real_steps += !s.rows.empty();
    if (s.mode == serving::ForwardMode::decode) {
      ++decode_steps;
      EXPECT_TRUE(s.graph_replay);
    } else {
      EXPECT_FALSE(s.graph_replay);
    }
  }
  EXPECT_EQ(r.metadata_upgrades, real_steps);
  EXPECT_EQ(r.graph_replays, decode_steps);
  // Decode batches of 1..8 requests fall into the buckets 1, 2, 4, 8: at most four graphs.
  EXPECT_GE(r.graphs_captured, 1);
  EXPECT_LE(r.graphs_captured, 4);
}

TEST(EngineModel, GuardsAndPoisonStayIntact) {
  const auto mix = micro_mix(4, 3);
  RunConfig rc = config_for(4);
  rc.guards = true;
  rc.graphs = true;
  const RunResult r = run_engine(micro(), 1, mix, rc);
  EXPECT_EQ(r.guard_damage, 0u);
  const RunResult plain = run_engine(micro(), 1, mix, config_for(4));
  EXPECT_EQ(r.generated, plain.generated);
}

TEST(EngineModel, IdleStepsRunNothing) {
  auto mix = micro_mix(2, 2);
  mix[1].arrival_step = 40;  // the first request is done long before
  const RunResult r = run_engine(micro(), 1, mix, config_for(2));
  int64_t idle = 0;
  for (const StepRecord& s : r.steps) {
    if (s.mode == serving::ForwardMode::idle) {
      ++idle;
      EXPECT_TRUE(s.rows.empty());
      EXPECT_TRUE(s.values.empty());
    }
  }
  EXPECT_GT(idle, 0);
  EXPECT_EQ(r.generated[1].size(), 3u);
}

// A request's tokens do not depend on its batch neighbours: each request run alone gives the
// tokens it gets in the mix (every kernel computes rows independently).
TEST(EngineModel, TokensIndependentOfBatchNeighbours) {
  const auto mix = micro_mix(6, 5);
  RunConfig rc = config_for(6);
  rc.probes = false;
  const RunResult together = run_engine(micro(), 1, mix, rc);
  for (size_t i = 0; i < mix.size(); ++i) {
    WorkloadRequest alone = mix[i];
    alone.arrival_step = 0;
    RunConfig one = config_for(1);
    one.probes = false;
    const RunResult r = run_engine(micro(), 1, {alone}, one);
    EXPECT_EQ(r.generated[0], together.generated[i]) << "request " << i;
  }
}

TEST(EngineModel, AbortFreesTheRequestAndOthersFinish) {
  rt::SimRuntime runtime(rt::RuntimeOptions{}, rt::SimOptions{});
  const auto mix = micro_mix(3, 8);
  ServingEngine engine(runtime, micro(), options_for(3), CheckpointSource::synthetic(micro(), 1), EngineOptions{});
  for (const auto& r : mix) engine.add_request(r.id, r.prompt_ids, r.max_new_tokens, r.arrival_step);
  for (int i = 0; i < 4; ++i) engine.step();
  EXPECT_TRUE(engine.abort(1));
  while (engine.has_unfinished()) engine.step();
  EXPECT_EQ(engine.request(1).state, serving::RequestState::aborted);
  EXPECT_EQ(engine.request(0).generated_ids.size(), 9u);
  EXPECT_EQ(engine.request(2).generated_ids.size(), 9u);
}

TEST(EngineModel, MicroMixMatchesReference) {
  const auto mix = standard_workload(micro(), 1, 8, 32);
  const RunResult r = run_engine(micro(), 1, mix, config_for(8));
  EXPECT_EQ(testing::reference_divergence(micro(), 1, mix, r), "");
}

}  // namespace
}  // namespace dsv4::engine
