#include "properties/runner.h"

#include <algorithm>
#include <chrono>
#include <iostream>

#include <rapidcheck/detail/Configuration.h>
#include <rapidcheck/detail/TestListener.h>

#include "engine/core/error.h"
#include "engine/faults/faults.h"
#include "engine/runtime/backend.h"
#include "properties/engine_run.h"
#include "properties/generators.h"
#include "properties/isolation.h"

namespace dsv4::props {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// A verdict through the child's pipe: kind, signature and detail separated by unit separators.
constexpr char kSep = '\x1f';

std::string encode(const Verdict& v) {
  return std::string(verdict_kind_name(v.kind)) + kSep + v.signature + kSep + v.detail;
}

Verdict decode(const std::string& payload) {
  const size_t a = payload.find(kSep), b = a == std::string::npos ? a : payload.find(kSep, a + 1);
  Verdict v;
  if (b == std::string::npos || !parse_verdict_kind(payload.substr(0, a), v.kind)) {
    return Verdict::fail(VerdictKind::crash, "protocol", "the case's process returned an unreadable result");
  }
  v.signature = payload.substr(a + 1, b - a - 1);
  v.detail = payload.substr(b + 1);
  return v;
}

Verdict evaluate_guarded(const Scenario& scenario) {
  try {
    return evaluate_scenario(scenario);
  } catch (const InputError& e) {
    return Verdict::fail(VerdictKind::bad_input, e.field(), e.what());
  } catch (const std::exception& e) {
    return Verdict::fail(VerdictKind::crash, "exception", e.what());
  }
}

// RapidCheck announces its configuration (from RC_PARAMS) on std::cerr the first time it is read;
// the runner prints its own seed, so that announcement is read once with std::cerr silenced.
void load_rapidcheck_configuration_quietly() {
  static const bool loaded = [] {
    std::streambuf* saved = std::cerr.rdbuf(nullptr);
    rc::detail::configuration();
    std::cerr.rdbuf(saved);
    return true;
  }();
  (void)loaded;
}

class SilentListener : public rc::detail::TestListener {
 public:
  void onTestCaseFinished(const rc::detail::CaseDescription&) override {}
  void onShrinkTried(const rc::detail::CaseDescription&, bool) override {}
  void onTestFinished(const rc::detail::TestMetadata&, const rc::detail::TestResult&) override {}
};

}  // namespace

Verdict run_case(const Scenario& scenario, const RunLimits& limits) {
  if (!limits.isolate) return evaluate_guarded(scenario);
  const IsolatedRun run = run_isolated([&] { return encode(evaluate_guarded(scenario)); }, limits.case_timeout_s);
  switch (run.status) {
    case IsolatedRun::Status::completed:
      return decode(run.payload);
    case IsolatedRun::Status::timed_out:
      return Verdict::fail(VerdictKind::hang, "timeout", run.describe());
    case IsolatedRun::Status::crashed:
      break;
  }
  const std::string signature = run.signal != 0 ? signal_name(run.signal) : "exit " + std::to_string(run.exit_code);
  std::string detail = run.describe();
  if (!run.stderr_tail.empty()) detail += "\n" + run.stderr_tail;
  return Verdict::fail(VerdictKind::crash, signature, detail);
}

SuiteResult run_suite(const Suite& suite, const RunLimits& limits, const Progress& progress) {
  load_rapidcheck_configuration_quietly();
  const gen::DeviceLimit devices(limits.backend == "cuda" ? std::max(limits.gpus, 1) : 0);
  const Clock::time_point start = Clock::now();
  SuiteResult result;
  result.suite = suite.name;
  Clock::time_point failed_at;
  auto report = [&] {
    result.seconds = seconds_since(start);
    if (progress) progress(result);
  };
  // Small RapidCheck runs, each with its own seed: the budget is checked before every case, and a
  // run ends after a few cases, so the suite stops soon after its budget whatever a case costs.
  constexpr int kBatch = 4;
  for (uint64_t batch = 0; !result.failure && result.cases < limits.max_cases && seconds_since(start) < limits.budget_s;
       ++batch) {
    rc::detail::TestParams params;
    params.seed = limits.seed * 1000003u + batch;
    params.maxSuccess = static_cast<int>(std::min<int64_t>(kBatch, limits.max_cases - result.cases));
    params.maxSize = 100;
    bool out_of_budget = false;
    auto property = [&] {
      Scenario scenario = *suite.generator();
      scenario.faults = limits.faults;
      if (scenario.engine) scenario.engine->backend = limits.backend;
      if (scenario.engine && limits.backend == "cuda") {
        if (auto why = cuda_unsupported(*scenario.engine, limits.gpus)) {
          if (!result.failure) {
            ++result.skipped;
            result.skip_reason = *why;
          }
          return;
        }
      }
      if (result.failure) {
        // Shrinking: a candidate counts as failing only with the same verdict kind.
        if (std::chrono::duration<double>(Clock::now() - failed_at).count() > limits.shrink_budget_s) return;
        const Verdict v = run_case(scenario, limits);
        if (v.passed() || v.kind != result.failure->verdict.kind) return;
        result.failure->scenario = scenario;
        result.failure->verdict = v;
        ++result.failure->shrink_steps;
        report();
        RC_FAIL("smaller failing case");
      }
      if (out_of_budget || seconds_since(start) >= limits.budget_s) {
        out_of_budget = true;
        return;
      }
      const Verdict v = run_case(scenario, limits);
      ++result.cases;
      if (!v.passed()) {
        result.failure = CaseFailure{scenario, scenario, v, 0};
        result.shrinking = true;
        failed_at = Clock::now();
        report();
        RC_FAIL(v.detail);
      }
      report();
    };
    SilentListener listener;
    rc::detail::TestMetadata metadata;
    metadata.id = suite.name;
    rc::detail::checkTestable(property, metadata, params, listener);
  }
  result.shrinking = false;
  report();
  return result;
}

std::optional<std::string> cuda_unsupported(const EngineSpec& spec, int gpus) {
  const int needed = spec_devices(spec);
  if (needed > gpus) return std::to_string(needed) + " GPUs needed, " + std::to_string(gpus) + " present";
  return std::nullopt;
}

std::optional<std::string> fault_unreachable(const std::string& fault, const std::string& backend, int gpus) {
  const faults::FaultInfo& f = faults::info(faults::parse(fault, "fault_unreachable", "fault"));
  if (backend != "cuda" || gpus >= f.ranks) return std::nullopt;
  return "its site needs " + std::to_string(f.ranks) + " ranks, one per GPU; " + std::to_string(gpus) + " present";
}

FaultHunt hunt_fault(const std::string& fault, const std::vector<const Suite*>& suites, double budget_s, uint64_t seed,
                     const Progress& progress, const std::string& backend) {
  const Clock::time_point start = Clock::now();
  FaultHunt hunt;
  hunt.fault = fault;
  if (auto why = fault_unreachable(fault, backend, backend == "cuda" ? rt::cuda_gpu_count() : 0)) {
    hunt.not_applicable = *why;
    return hunt;
  }
  for (uint64_t round = 0; !hunt.detected && seconds_since(start) < budget_s; ++round) {
    for (const Suite* suite : suites) {
      if (hunt.detected || seconds_since(start) >= budget_s) break;
      RunLimits limits;
      limits.faults = {fault};
      limits.backend = backend;
      limits.gpus = backend == "cuda" ? rt::cuda_gpu_count() : 0;
      limits.seed = seed + 7919 * round;
      limits.max_cases = 100000;
      const double slice = (suite->runs_engine ? 3.0 : 1.0) * static_cast<double>(round + 1);
      limits.budget_s = std::min(slice, budget_s - seconds_since(start));
      limits.shrink_budget_s = 10;
      SuiteResult r = run_suite(*suite, limits, progress);
      hunt.cases += r.cases;
      if (!r.failure) continue;
      hunt.detected = true;
      hunt.suite = suite->name;
      hunt.failure = std::move(r.failure);
    }
  }
  hunt.seconds = seconds_since(start);
  return hunt;
}

}  // namespace dsv4::props
