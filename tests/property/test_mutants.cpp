// The fault registry's evidence (label `property`): with each registered fault injected, some suite
// fails from generated scenarios within the budget (dsv4h mutants runs the same search and prints
// the table). A fault no property catches is a property without teeth.
#include <gtest/gtest.h>

#include <cstdio>

#include "engine/faults/faults.h"
#include "properties/runner.h"
#include "tests/property/param_names.h"
#include "properties/suites.h"

namespace dsv4::props {
namespace {

class Mutant : public ::testing::TestWithParam<std::string> {};

TEST_P(Mutant, IsDetected) {
  std::vector<const Suite*> all;
  for (const Suite& s : suites()) all.push_back(&s);
  const FaultHunt hunt = hunt_fault(GetParam(), all, /*budget_s=*/60, /*seed=*/7);
  ASSERT_TRUE(hunt.detected) << GetParam() << " escaped every suite for " << hunt.seconds << " s (" << hunt.cases
                             << " cases)";
  std::printf("%s detected by %s after %.1f s (%lld cases): %s (%s)\n", GetParam().c_str(), hunt.suite.c_str(),
              hunt.seconds, static_cast<long long>(hunt.cases), verdict_kind_name(hunt.failure->verdict.kind),
              hunt.failure->verdict.signature.c_str());
}

// On cuda a fault whose site needs more ranks than there are GPUs is not applicable (mutants prints
// n/a and does not count it as escaped); sim runs every fault.
TEST(MutantReach, PrefillCpFaultNeedsTwoGpusOnCudaAndRunsOnSim) {
  const auto one_gpu = fault_unreachable("kv-slice-noncontiguous", "cuda", 1);
  ASSERT_TRUE(one_gpu.has_value());
  EXPECT_NE(one_gpu->find("needs 2 ranks"), std::string::npos) << *one_gpu;
  EXPECT_FALSE(fault_unreachable("kv-slice-noncontiguous", "cuda", 2).has_value());
  EXPECT_FALSE(fault_unreachable("kv-slice-noncontiguous", "sim", 0).has_value());
  for (const faults::FaultInfo& f : faults::registry()) {
    if (f.ranks <= 1) {
      EXPECT_FALSE(fault_unreachable(f.name, "cuda", 1).has_value()) << f.name;
    }
  }
}

std::vector<std::string> names() {
  std::vector<std::string> out;
  for (const faults::FaultInfo& f : faults::registry()) out.push_back(f.name);
  return out;
}

INSTANTIATE_TEST_SUITE_P(Faults, Mutant, ::testing::ValuesIn(names()), param_test_name);

}  // namespace
}  // namespace dsv4::props
