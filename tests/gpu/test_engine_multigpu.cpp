// The engine across GPUs on the cuda backend (label multigpu; each test claims 2 GPUs and skips with
// fewer): pipeline stages on their own GPUs exchanging the residual over NCCL send/recv, prefill
// context parallelism all-gathering over NCCL, MTP with PP, and graphs on every rank. One GPU's run
// is the truth: the same kernels on the same architecture, so PP must equal it bit for bit.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "tests/gpu/gpu_test.h"

#include "engine/config/model_config.h"
#include "engine/runtime/backend.h"
#include "tests/unit/engine_fixtures.h"

namespace dsv4::engine::testing {
namespace {

std::string str(const std::vector<int64_t>& v) {
  std::string out;
  for (int64_t x : v) out += (out.empty() ? "" : ",") + std::to_string(x);
  return out;
}

class EngineMultiGpu : public ::testing::TestWithParam<Mode> {};

// Every two-stage split of tiny's 5 layers (the MTP block, head and final norm on the last stage),
// in the test's mode, against one GPU in eager mode; the oracle on one split.
TEST_P(EngineMultiGpu, TwoPipelineStagesEqualOneGpu) {
  DSV4_REQUIRE_GPUS(2);
  const ModelConfig config = load_model_config("tiny");
  const auto mix = standard_workload(config, /*seed=*/1, /*requests=*/4, /*decode=*/6);
  RunConfig one = on_cuda(kModes[0]);
  one.options = options_for(4);
  const RunResult base = run_engine(config, 1, mix, one);
  RunConfig rc = on_cuda(GetParam());
  rc.options = options_for(4);
  for (const std::vector<int64_t>& p : {std::vector<int64_t>{1, 4}, {2, 3}, {3, 2}, {4, 1}}) {
    rc.pp_partition = p;
    const RunResult r = run_engine(config, 1, mix, rc);
    EXPECT_EQ(first_difference(base, r), "") << "partition " << str(p);
    EXPECT_TRUE(r.hazards.empty()) << "partition " << str(p) << ": " << r.hazards.front();
    EXPECT_EQ(r.guard_damage, 0u) << "partition " << str(p);
    if (GetParam().graphs) {
      EXPECT_GT(r.graph_replays, 0) << "partition " << str(p);
    }
    if (p == std::vector<int64_t>{3, 2}) {
      EXPECT_EQ(reference_divergence(config, 1, mix, r), "");
    }
  }
}

// Prefill CP over two GPUs against one: the same tokens, logits within the tolerance the sim test
// uses (the kv goes through an in-place norm + RoPE on a bf16 copy instead of the fused store).
TEST_P(EngineMultiGpu, TwoContextParallelRanksEqualOneGpu) {
  DSV4_REQUIRE_GPUS(2);
  const ModelConfig config = load_model_config("tiny");
  const auto mix = standard_workload(config, /*seed=*/1, /*requests=*/4, /*decode=*/6);
  RunConfig one = on_cuda(kModes[0]);
  one.options = options_for(4);
  one.probes = false;
  const RunResult base = run_engine(config, 1, mix, one);
  RunConfig rc = on_cuda(GetParam());
  rc.options = options_for(4);
  rc.probes = false;
  rc.cp = 2;
  const RunResult r = run_engine(config, 1, mix, rc);
  EXPECT_EQ(r.generated, base.generated);
  EXPECT_LE(max_logit_difference(base, r), 1e-3);
  EXPECT_TRUE(r.hazards.empty()) << r.hazards.front();
  EXPECT_EQ(r.guard_damage, 0u);
}

// Speculative decoding with the MTP block on the last of two stages: the non-speculative tokens,
// the PP=1 speculative run bit for bit, and the reference (the MTP block's logits included).
TEST_P(EngineMultiGpu, MtpWithTwoPipelineStages) {
  DSV4_REQUIRE_GPUS(2);
  const ModelConfig config = load_model_config("tiny");
  const auto mix = standard_workload(config, /*seed=*/4, /*requests=*/4, /*decode=*/10);
  RunConfig plain = on_cuda(GetParam());
  plain.options = options_for(4);
  RunConfig spec = plain;
  spec.mtp = true;
  spec.draft_tokens = 1;
  const RunResult one_gpu = run_engine(config, 1, mix, spec);
  spec.pp_partition = {3, 2};
  const RunResult staged = run_engine(config, 1, mix, spec);
  plain.pp_partition = {3, 2};
  const RunResult non_spec = run_engine(config, 1, mix, plain);
  EXPECT_EQ(first_difference(one_gpu, staged), "");
  EXPECT_EQ(staged.generated, non_spec.generated);
  EXPECT_TRUE(staged.hazards.empty()) << staged.hazards.front();
  EXPECT_EQ(reference_divergence(config, 1, mix, staged), "");
}

INSTANTIATE_TEST_SUITE_P(Modes, EngineMultiGpu, ::testing::ValuesIn(kModes),
                         [](const ::testing::TestParamInfo<Mode>& p) { return std::string(p.param.name); });

}  // namespace
}  // namespace dsv4::engine::testing
