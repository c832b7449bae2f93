// The engine on the cuda backend (label gpu; skipped without a GPU): the engine issues' acceptance
// scenarios that fit one GPU, judged by the same oracle as on sim. Every launch runs its CUDA
// kernel; probes are device copies read after each step.
#include <gtest/gtest.h>

#include "tests/gpu/gpu_test.h"

#include "engine/config/model_config.h"
#include "engine/runtime/backend.h"
#include "tests/unit/engine_fixtures.h"

namespace dsv4::engine::testing {
namespace {

class EngineCuda : public ::testing::TestWithParam<Mode> {};

TEST_P(EngineCuda, TinyMixMatchesTheReferenceWithTheDetectorSilent) {
  DSV4_REQUIRE_GPU();
  const ModelConfig config = load_model_config("tiny");
  const auto workload = standard_workload(config, /*seed=*/3, /*requests=*/6, /*decode=*/12);
  RunConfig rc = on_cuda(GetParam());
  rc.options = options_for(6);
  const RunResult run = run_engine(config, 1, workload, rc);
  EXPECT_TRUE(run.hazards.empty()) << run.hazards.front();
  EXPECT_EQ(run.guard_damage, 0u);
  EXPECT_EQ(reference_divergence(config, 1, workload, run), "");
  if (GetParam().graphs) {
    EXPECT_GT(run.graph_replays, 0);
  }
}

TEST_P(EngineCuda, MicroMixMatchesTheReference) {
  DSV4_REQUIRE_GPU();
  const ModelConfig config = load_model_config("micro");
  const auto workload = standard_workload(config, /*seed=*/5, /*requests=*/8, /*decode=*/16);
  RunConfig rc = on_cuda(GetParam());
  rc.options = options_for(8);
  const RunResult run = run_engine(config, 2, workload, rc);
  EXPECT_TRUE(run.hazards.empty());
  EXPECT_EQ(reference_divergence(config, 2, workload, run), "");
}

TEST_P(EngineCuda, SpeculativeDecodingGivesTheNonSpeculativeTokens) {
  DSV4_REQUIRE_GPU();
  const ModelConfig config = load_model_config("tiny");
  const auto workload = standard_workload(config, /*seed=*/4, /*requests=*/4, /*decode=*/10);
  RunConfig plain = on_cuda(GetParam());
  plain.options = options_for(4);
  RunConfig spec = plain;
  spec.mtp = true;
  spec.draft_tokens = 1;
  const RunResult a = run_engine(config, 1, workload, plain);
  const RunResult b = run_engine(config, 1, workload, spec);
  EXPECT_EQ(a.generated, b.generated);
  EXPECT_EQ(reference_divergence(config, 1, workload, b), "");
  EXPECT_TRUE(b.hazards.empty());
}

TEST_P(EngineCuda, W8a8Int8MatchesTheReferencesInt8Simulation) {
  DSV4_REQUIRE_GPU();
  const ModelConfig config = load_model_config("tiny");
  const auto workload = standard_workload(config, /*seed=*/6, /*requests=*/4, /*decode=*/8);
  RunConfig rc = on_cuda(GetParam());
  rc.options = options_for(4);
  rc.w8a8_int8 = true;
  const RunResult run = run_engine(config, 1, workload, rc);
  ref::Numerics numerics{ref::Mode::quant_sim};
  numerics.linear = ref::LinearQuant::w8a8_int8;
  EXPECT_EQ(reference_divergence(config, 1, workload, run, numerics), "");
}

INSTANTIATE_TEST_SUITE_P(Modes, EngineCuda, ::testing::ValuesIn(kModes),
                         [](const ::testing::TestParamInfo<Mode>& p) { return std::string(p.param.name); });

TEST(EngineCudaDeterminism, TenRunsAreBitwiseIdenticalAndGraphsEqualEager) {
  DSV4_REQUIRE_GPU();
  const ModelConfig config = load_model_config("tiny");
  const auto workload = standard_workload(config, /*seed=*/7, /*requests=*/5, /*decode=*/8);
  RunConfig eager = on_cuda(kModes[0]);
  eager.options = options_for(5);
  eager.probes = false;
  const RunResult first = run_engine(config, 1, workload, eager);
  for (int i = 0; i < 9; ++i) {
    const RunResult again = run_engine(config, 1, workload, eager);
    ASSERT_EQ(again.generated, first.generated) << "rerun " << i;
    ASSERT_EQ(max_logit_difference(first, again), 0.0) << "rerun " << i;
  }
  for (const Mode& m : kModes) {
    RunConfig rc = on_cuda(m);
    rc.options = options_for(5);
    rc.probes = false;
    const RunResult other = run_engine(config, 1, workload, rc);
    EXPECT_EQ(other.generated, first.generated) << m.name;
    EXPECT_EQ(max_logit_difference(first, other), 0.0) << m.name;
  }
}

TEST(EngineCudaVsSim, SameTokensAsTheSimBackend) {
  DSV4_REQUIRE_GPU();
  const ModelConfig config = load_model_config("tiny");
  const auto workload = standard_workload(config, /*seed=*/8, /*requests=*/4, /*decode=*/8);
  RunConfig gpu = on_cuda(kModes[0]);
  gpu.options = options_for(4);
  RunConfig sim = gpu;
  sim.backend = rt::BackendKind::sim;
  const RunResult a = run_engine(config, 1, workload, gpu);
  const RunResult b = run_engine(config, 1, workload, sim);
  // The GPU kernels may sum in another order than the host ones; the tokens agree on this mix, and
  // the logits within the oracle's tolerance (each run passes the oracle on its own).
  EXPECT_EQ(a.generated, b.generated);
  EXPECT_LT(max_logit_difference(a, b), 0.05);
}

}  // namespace
}  // namespace dsv4::engine::testing
