// Every property suite as a ctest test (label `property`): a bounded number of generated cases, each
// in a child process, from a fixed seed. A failure prints the shrunk scenario's verdict; run
// `dsv4h check --suites NAME` to search longer and save it as a case file.
#include <gtest/gtest.h>

#include <cstdlib>

#include <rapidcheck.h>
#include <rapidcheck/gtest.h>

#include "properties/case_file.h"
#include "properties/engine_run.h"
#include "properties/generators.h"
#include "properties/runner.h"
#include "tests/property/param_names.h"
#include "properties/suites.h"

namespace dsv4::props {
namespace {

class PropertySuite : public ::testing::TestWithParam<std::string> {};

TEST_P(PropertySuite, Holds) {
  const Suite* suite = find_suite(GetParam());
  ASSERT_NE(suite, nullptr);
  RunLimits limits;
  limits.max_cases = suite->ci_cases;
#ifdef DSV4_SANITIZED_BUILD
  // A case costs ~20x more under the sanitizers: the engine suites run one case each there, the
  // op suites a fifth of theirs.
  limits.max_cases = suite->runs_engine ? 1 : limits.max_cases / 5;
#endif
  limits.budget_s = 600;
  limits.seed = 20261123;
  const SuiteResult r = run_suite(*suite, limits);
  EXPECT_EQ(r.cases, limits.max_cases);
  if (!r.failure) return;
  // Recorded like check's failures (DSV4_CORPUS, else .dsv4h/corpus under the test's directory).
  CaseFile c;
  c.property = suite->name;
  c.scenario = r.failure->scenario;
  c.verdict = r.failure->verdict;
  c.engine_commit = "ctest";
  c.backend = "sim";
  c.recorded_at = utc_now_iso8601();
  c.shrink_steps = r.failure->shrink_steps;
  const char* corpus = std::getenv("DSV4_CORPUS");
  const WrittenCase w = write_case_file(corpus != nullptr ? corpus : ".dsv4h/corpus", c);
  FAIL() << suite->name << ": " << verdict_kind_name(r.failure->verdict.kind) << " (" << r.failure->verdict.signature
         << ")\n"
         << r.failure->verdict.detail << "\ncase: " << w.path << " (dsv4h replay " << w.path << ")";
}

std::vector<std::string> names() {
  std::vector<std::string> out;
  for (const Suite& s : suites()) out.push_back(s.name);
  return out;
}

INSTANTIATE_TEST_SUITE_P(Suites, PropertySuite, ::testing::ValuesIn(names()), param_test_name);

// On cuda the runner limits the devices a scenario may ask for to the GPUs present: every drawn
// engine scenario fits (PP stages and CP ranks), and with one GPU none asks for PP or CP.
RC_GTEST_PROP(EngineGenerator, ScenariosFitTheDeviceLimit, ()) {
  const int limit = *rc::gen::inRange(1, 5);
  const gen::DeviceLimit devices(limit);
  gen::EngineMix mix;
  mix.pp_percent = 50;
  mix.cp_percent = 100;
  const EngineSpec s = *gen::engine_spec(mix);
  RC_ASSERT(spec_devices(s) <= limit);
  RC_ASSERT(gen::device_limit() == limit);
}

TEST(EngineGenerator, DeviceLimitIsRestored) {
  EXPECT_EQ(gen::device_limit(), 0);
  {
    const gen::DeviceLimit two(2);
    EXPECT_EQ(gen::device_limit(), 2);
  }
  EXPECT_EQ(gen::device_limit(), 0);
}

}  // namespace
}  // namespace dsv4::props
