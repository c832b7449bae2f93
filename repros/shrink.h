// Shrinking a recorded case (dsv4h shrink): smaller Scenarios are tried one at a time, and one is
// kept when it fails with the same verdict kind and signature, until no smaller one does or the
// budget is spent. Unlike RapidCheck's shrinking (which works on the generator's choices), this
// starts from the values in a case file, so any recorded case can be shrunk, whoever wrote it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "properties/runner.h"
#include "properties/scenario.h"
#include "properties/verdict.h"

namespace dsv4::repro {

// The smaller variants of `s`, most reducing first: fewer requests, shorter prompts, fewer decode
// steps, later arrivals moved to 0, fewer PP stages, a smaller CP, features off (graphs, MTP,
// multi-stream, int8), the in-order schedule, fewer faults, and the op-level sections' inputs cut.
std::vector<props::Scenario> shrink_candidates(const props::Scenario& s);

struct ShrinkResult {
  props::Scenario scenario;  // the smallest failing scenario reached
  props::Verdict verdict;    // its verdict (same kind and signature as the target)
  int64_t steps = 0;         // candidates kept
  int64_t tried = 0;         // candidates run
  double seconds = 0;
};

// Shrinks `start`, which must fail as `target` does (same kind and signature). `on_step` sees every
// kept candidate.
ShrinkResult shrink_scenario(const props::Scenario& start, const props::Verdict& target,
                             const props::RunLimits& limits, double budget_s,
                             const std::function<void(const ShrinkResult&)>& on_step = {});

// Same failure: kind and signature equal.
bool same_failure(const props::Verdict& a, const props::Verdict& b);

}  // namespace dsv4::repro
