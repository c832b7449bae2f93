// Runs property suites: RapidCheck generates and shrinks the Scenarios, each case runs in a child
// process (properties/isolation.h) so that a case that kills its process becomes a `crash` verdict
// and the run goes on, and every run is bounded in cases and seconds.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "properties/scenario.h"
#include "properties/suites.h"
#include "properties/verdict.h"

namespace dsv4::props {

struct RunLimits {
  int64_t max_cases = 100;
  double budget_s = 10;          // for generating and running cases (shrinking has its own)
  double shrink_budget_s = 30;   // once a case failed: time for smaller failing cases
  double case_timeout_s = 120;   // a child past this is killed: a `hang` verdict
  uint64_t seed = 1;
  bool isolate = true;           // run each case in a child process
  std::vector<std::string> faults;  // injected into every generated scenario
  std::string backend = "sim";      // where generated engine scenarios run ("sim" | "cuda")
  // cuda: the GPUs present. An engine scenario needing more ranks (PP stages, CP ranks; one GPU
  // each) than this is skipped and counted, not run.
  int gpus = 0;
};

// Why `spec` cannot run on the cuda backend with `gpus` GPUs, or nullopt when it can.
std::optional<std::string> cuda_unsupported(const EngineSpec& spec, int gpus);

struct CaseFailure {
  Scenario original;        // the first failing case
  Scenario scenario;        // the smallest failing case the shrinker reached (same verdict kind)
  Verdict verdict;          // its verdict
  int64_t shrink_steps = 0; // smaller failing cases adopted on the way
};

struct SuiteResult {
  std::string suite;
  int64_t cases = 0;        // generated cases run (shrink attempts not counted)
  int64_t skipped = 0;      // generated cases the backend cannot run (RunLimits::gpus)
  std::string skip_reason;  // the last one's reason
  double seconds = 0;
  std::optional<CaseFailure> failure;
  bool shrinking = false;   // set while the progress callback sees a shrink in flight
};

using Progress = std::function<void(const SuiteResult&)>;

// One case under `limits` (in a child process when isolated).
Verdict run_case(const Scenario& scenario, const RunLimits& limits);
// Cases of `suite` until one fails (then shrunk), max_cases pass, or the budget is spent.
SuiteResult run_suite(const Suite& suite, const RunLimits& limits, const Progress& progress = {});

// One fault against the suites (dsv4h mutants): the suites run in rounds with the fault injected,
// each a short slice (op suites 1 s, engine suites 3 s, growing each round, new cases each round),
// until one fails or `budget_s` is spent.
struct FaultHunt {
  std::string fault;
  bool detected = false;
  std::string suite;       // the detecting suite
  double seconds = 0;      // to detection (or the budget spent)
  int64_t cases = 0;       // generated cases run over every suite
  std::optional<CaseFailure> failure;
  std::string not_applicable;  // why the backend cannot reach the fault's site (then nothing ran)
};

// Why `fault`'s site cannot be reached on `backend` with `gpus` GPUs (its runs need more engine
// ranks than the cuda backend has devices; sim runs any number of ranks), or nothing.
std::optional<std::string> fault_unreachable(const std::string& fault, const std::string& backend, int gpus);
FaultHunt hunt_fault(const std::string& fault, const std::vector<const Suite*>& suites, double budget_s, uint64_t seed,
                     const Progress& progress = {}, const std::string& backend = "sim");

}  // namespace dsv4::props
