// Replaying a recorded case (dsv4h replay, the `repro` ctest tests): the case's Scenario runs again
// through its suite's property, with its faults or without them, once or N times, and the verdicts
// are compared with the recorded one. On sim a case replays exactly (the schedule is part of the
// Scenario); --repeat gives a failure rate where it does not (cuda).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "properties/case_file.h"
#include "properties/runner.h"
#include "properties/verdict.h"

namespace dsv4::repro {

struct ReplayOptions {
  bool without_faults = false;  // run the same scenario clean
  int64_t repeat = 1;
  props::RunLimits limits;      // isolation and the case deadline
};

struct ReplayResult {
  std::vector<props::Verdict> verdicts;  // one per run
  int64_t reproduced = 0;                // runs with the recorded kind and signature
  int64_t failed = 0;                    // runs that did not pass
};

ReplayResult replay_case(const props::CaseFile& c, const ReplayOptions& options);

// Reads a case file and checks what the format alone cannot: the suite exists and has its section,
// and every fault is registered. InputError naming `path` and the JSON path otherwise.
props::CaseFile load_case(const std::string& path);

// For a case with an engine section: the first (step, request, layer, op) where the engine leaves
// the reference's tolerance (max abs, max rel, calc_diff), from a probed run of the same scenario
// (faults included unless `without_faults`); "" when it matches, or no engine runs.
std::string first_divergence(const props::CaseFile& c, bool without_faults, const props::RunLimits& limits);

// One line that names what the scenario runs, e.g. "micro, 3 requests (41 prompt tokens), pp 1,4,
// graphs, mtp, schedule random:7".
std::string describe_scenario(const props::Scenario& s);

}  // namespace dsv4::repro
