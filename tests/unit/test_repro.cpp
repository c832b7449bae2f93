// repros/: shrinking keeps the failure and makes the case smaller; replay reproduces recorded cases
// exactly (100 of 100 on sim) and passes them without their faults.
#include <gtest/gtest.h>

#include <bit>

#include "properties/case_file.h"
#include "properties/suites.h"
#include "repros/replay.h"
#include "repros/shrink.h"

namespace dsv4::repro {
namespace {

using props::CaseFile;
using props::Scenario;
using props::Verdict;
using props::VerdictKind;

const std::string kCases = std::string(DSV4_SOURCE_DIR) + "/repros/cases/";

props::RunLimits in_process() {
  props::RunLimits l;
  l.isolate = false;
  return l;
}

// 40 inputs of which one is an e4m3 tie (1.0625 lies halfway between 1.0 and 1.125).
Scenario conversion_case() {
  Scenario s;
  s.suite = "fp8-conversion";
  s.conversion = props::ConversionSpec{};
  s.conversion->format = "e4m3fn";
  for (int i = 0; i < 40; ++i) s.conversion->inputs.push_back(std::bit_cast<uint32_t>(0.5f + 0.25f * static_cast<float>(i % 8)));
  s.conversion->inputs[17] = std::bit_cast<uint32_t>(1.0625f);
  s.faults = {"fp8-round-half-up"};
  return s;
}

TEST(Shrink, KeepsTheFailureAndReachesTheOneInputThatMatters) {
  const Scenario start = conversion_case();
  const Verdict target = props::evaluate_scenario(start);
  ASSERT_EQ(target.kind, VerdictKind::mismatch) << target.detail;
  const ShrinkResult r = shrink_scenario(start, target, in_process(), 60);
  EXPECT_TRUE(same_failure(r.verdict, target));
  ASSERT_EQ(r.scenario.conversion->inputs.size(), 1u);
  EXPECT_EQ(r.scenario.conversion->inputs[0], std::bit_cast<uint32_t>(1.0625f));
  EXPECT_GT(r.steps, 0);
}

TEST(Shrink, CandidatesOfAnEngineCaseAreSmallerOrSimpler) {
  const CaseFile c = props::read_case_file(kCases + "quant-scale-scalar.json");
  Scenario big = c.scenario;
  big.engine->requests.push_back(big.engine->requests.front());
  big.engine->requests.back().id = 99;
  big.engine->requests.back().prompt.resize(40, 7);
  big.engine->pp_partition = {1, 2, 2};
  big.engine->schedule = "random:3";
  big.engine->graphs = true;
  const std::vector<Scenario> candidates = shrink_candidates(big);
  EXPECT_GE(candidates.size(), 8u);
  for (const Scenario& s : candidates) EXPECT_LE(props::scenario_size(s), props::scenario_size(big));
}

TEST(Shrink, LeavesACaseThatNoLongerFailsAlone) {
  Scenario s = conversion_case();
  s.faults.clear();  // passes: no candidate fails like the (made-up) target
  const Verdict target = Verdict::fail(VerdictKind::mismatch, "f32_to_e4m3fn", "made up");
  const ShrinkResult r = shrink_scenario(s, target, in_process(), 10);
  EXPECT_EQ(r.steps, 0);
  EXPECT_EQ(r.scenario.conversion->inputs.size(), 40u);
}

TEST(Replay, ASimCaseReplaysToTheSameVerdict100TimesOutOf100) {
  const CaseFile c = props::read_case_file(kCases + "lazy-upgrade-on-alt-stream.json");
  ReplayOptions o;
  o.limits = in_process();
#ifdef DSV4_SANITIZED_BUILD
  o.repeat = 10;  // a replay costs ~0.5 s under the sanitizers; the plain build runs all 100
#else
  o.repeat = 100;
#endif
  const ReplayResult r = replay_case(c, o);
  EXPECT_EQ(r.reproduced, o.repeat);
  for (const Verdict& v : r.verdicts) EXPECT_EQ(v.detail, r.verdicts.front().detail);
}

TEST(Replay, EveryCheckedInCaseFailsAsRecordedAndPassesWithoutItsFaults) {
  for (const char* name : {"fp8-round-half-up", "quant-scale-scalar", "swa-page-size-default-zero"}) {
    const CaseFile c = props::read_case_file(kCases + name + ".json");
    ReplayOptions o;
    o.limits = in_process();
    EXPECT_EQ(replay_case(c, o).reproduced, 1) << name;
    o.without_faults = true;
    EXPECT_EQ(replay_case(c, o).failed, 0) << name;
  }
}

TEST(Replay, DescribesTheScenario) {
  const CaseFile c = props::read_case_file(kCases + "lazy-upgrade-on-alt-stream.json");
  const std::string d = describe_scenario(c.scenario);
  EXPECT_NE(d.find("micro"), std::string::npos) << d;
  EXPECT_NE(d.find("pp "), std::string::npos) << d;
}

}  // namespace
}  // namespace dsv4::repro
