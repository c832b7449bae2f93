// The property suites (docs/properties.md): each a generator of Scenarios and a property that
// judges one Scenario into a Verdict. `dsv4h check`, `dsv4h mutants` and the `property` ctest tests
// all run these through properties/runner.h.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <rapidcheck.h>

#include "properties/scenario.h"
#include "properties/verdict.h"

namespace dsv4::props {

struct Suite {
  std::string name;       // "engine-reference", "pp-equivalence", ...
  std::string property;   // what must hold, one line
  std::function<rc::Gen<Scenario>()> generator;
  std::function<Verdict(const Scenario&)> evaluate;
  int64_t ci_cases = 20;  // the bounded case count of its ctest test
  bool runs_engine = true;  // its cases run the engine (~0.1-1 s each) rather than one op (~1 ms)
  std::string section = "engine";  // the Scenario section its cases fill
};

// Every suite, cheapest first.
const std::vector<Suite>& suites();
const Suite* find_suite(const std::string& name);
// The names, comma-separated (for messages).
std::string suite_names();

// The section `scenario`'s suite needs and it lacks ("engine", "view", ...), or "" when it has it.
std::string missing_section(const Suite& suite, const Scenario& scenario);

// Runs `scenario` through its suite's property with its faults enabled (in this process).
// InputError naming "suite" for an unknown suite and "faults[i]" for an unknown fault.
Verdict evaluate_scenario(const Scenario& scenario);

// A rough size of a scenario, for reports of shrunk cases: requests, prompt and decode tokens,
// stages, ranks, inputs.
int64_t scenario_size(const Scenario& scenario);

}  // namespace dsv4::props
