// dsv4h check (every property suite within a budget, failures shrunk and saved as case files) and
// dsv4h mutants (every registered fault against the suites: which property catches it, how fast).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <optional>
#include <set>

#include "engine/core/error.h"
#include "engine/faults/faults.h"
#include "engine/runtime/backend.h"
#include "properties/case_file.h"
#include "properties/runner.h"
#include "properties/suites.h"
#include "tools/dsv4h/cli.h"
#include "tools/dsv4h/cli_args.h"

#ifndef DSV4_ENGINE_COMMIT
#define DSV4_ENGINE_COMMIT "unknown"
#endif

namespace dsv4::cli {

namespace {

using props::Suite;
using props::SuiteResult;

std::string fixed(double v, int digits) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string pad(std::string s, size_t width) {
  if (s.size() < width) s += std::string(width - s.size(), ' ');
  return s;
}

std::string one_line(const std::string& s, size_t limit) {
  std::string out = s.substr(0, s.find('\n'));
  if (out.size() > limit) out = out.substr(0, limit - 3) + "...";
  return out;
}

// The backend the engine scenarios run on (auto: cuda when a GPU is present).
std::string check_backend(const Args& args) {
  return rt::backend_name(rt::parse_backend(args.optional_str("--backend").value_or("sim"), "--backend"));
}

std::vector<const Suite*> selected_suites(const Args& args) {
  std::vector<const Suite*> out;
  if (!args.has("--suites")) {
    for (const Suite& s : props::suites()) out.push_back(&s);
    return out;
  }
  for (const std::string& name : split_list(args.str("--suites"), "--suites")) {
    const Suite* s = props::find_suite(name);
    if (s == nullptr) throw InputError("--suites", "", "unknown suite '" + name + "' (known: " + props::suite_names() + ")");
    out.push_back(s);
  }
  return out;
}

// A live progress line on a terminal (stderr), nothing in logs.
class ProgressLine {
 public:
  ProgressLine() : tty_(isatty(STDERR_FILENO) == 1) {}
  void show(const std::string& prefix, const SuiteResult& r) {
    if (!tty_) return;
    std::string line = prefix + r.suite + ": " + std::to_string(r.cases) + " cases, " + fixed(r.seconds, 1) + " s";
    if (r.failure) line += ", FAILED (" + std::string(props::verdict_kind_name(r.failure->verdict.kind)) +
                           "), shrinking: " + std::to_string(r.failure->shrink_steps) + " smaller";
    std::cerr << "\r\033[K" << line << std::flush;
  }
  void clear() {
    if (tty_) std::cerr << "\r\033[K" << std::flush;
  }

 private:
  bool tty_;
};

std::optional<props::WrittenCase> record(const std::string& corpus, const SuiteResult& r) {
  if (!r.failure || corpus.empty()) return std::nullopt;
  props::CaseFile c;
  c.property = r.suite;
  c.scenario = r.failure->scenario;
  c.verdict = r.failure->verdict;
  c.engine_commit = DSV4_ENGINE_COMMIT;
  c.backend = r.failure->scenario.engine ? r.failure->scenario.engine->backend : "host";
  c.recorded_at = props::utc_now_iso8601();
  c.shrink_steps = r.failure->shrink_steps;
  return props::write_case_file(corpus, c);
}

}  // namespace

int cmd_check(const std::vector<std::string>& argv, std::ostream& out) {
  const std::vector<FlagSpec> flags = {
      {"--backend", "sim|cuda|auto", "where the engine scenarios run: sim, cuda, or auto (cuda if a GPU is present; default sim)", false},
      {"--budget", "SECONDS", "time for all suites together (default 120); a failure's shrinking comes on top", false},
      {"--corpus", "DIR", "where failures are written as case files (default .dsv4h/corpus)", false},
      {"--suites", "a,b,...", "run only these suites (default: all; --list names them)", false},
      {"--seed", "S", "the generators' seed (default 1); the same seed generates the same cases", false},
      {"--faults", "a,b,...", "inject registered faults into every case (dsv4h mutants --list names them)", false},
      {"--in-process", "", "run cases in this process instead of a child each (a crash then ends the run)", false},
      {"--list", "", "list the suites and what each checks", false},
  };
  const Args args("check", argv, flags, false);
  if (args.help()) {
    out << usage("check", "[--backend sim|cuda|auto] [--budget SECONDS] [--corpus DIR] [--suites a,b] [--seed S]", flags, false);
    return kExitOk;
  }
  if (!args.positionals().empty()) throw InputError(args.positionals()[0], "", "unexpected argument");
  if (args.has("--list")) {
    for (const Suite& s : props::suites()) out << pad(s.name, 20) << s.property << "\n";
    return kExitOk;
  }
  const std::string backend = check_backend(args);
  const double budget = positive_seconds(args, "--budget", 120);
  const std::string corpus = args.optional_str("--corpus").value_or(".dsv4h/corpus");
  const std::vector<const Suite*> suites = selected_suites(args);
  props::RunLimits limits;
  limits.seed = args.has("--seed") ? args.u64("--seed") : 1;
  limits.isolate = !args.has("--in-process");
  limits.max_cases = 100000;
  limits.backend = backend;
  limits.gpus = backend == "cuda" ? rt::cuda_gpu_count() : 0;
  if (args.has("--faults")) {
    for (const std::string& f : split_list(args.str("--faults"), "--faults")) {
      faults::parse(f, "--faults", "");
      limits.faults.push_back(f);
    }
  }
  out << "dsv4h check: " << suites.size() << " suites, budget " << fixed(budget, 0) << " s, backend " << backend << ", seed "
      << limits.seed;
  if (!limits.faults.empty()) {
    out << ", faults";
    for (const auto& f : limits.faults) out << " " << f;
  }
  out << "\n" << std::flush;

  const auto start = std::chrono::steady_clock::now();
  ProgressLine line;
  std::vector<SuiteResult> results;
  std::vector<std::string> paths;
  // The budget left is shared by the suites still to run, an engine suite weighing three op suites
  // (an op case costs about a millisecond, an engine case a tenth of a second or more).
  auto weight = [](const Suite* s) { return s->runs_engine ? 3.0 : 1.0; };
  for (size_t i = 0; i < suites.size(); ++i) {
    const double used = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    double weights_left = 0;
    for (size_t j = i; j < suites.size(); ++j) weights_left += weight(suites[j]);
    // A suite stops drawing cases at its share but finishes the case in flight: keep 2 s for those.
    limits.budget_s = std::max(0.2, (budget - std::min(2.0, budget / 10) - used) * weight(suites[i]) / weights_left);
    const SuiteResult r = props::run_suite(*suites[i], limits, [&](const SuiteResult& p) { line.show("", p); });
    line.clear();
    std::string status = r.cases == 0 && r.skipped > 0 ? "skip: " + r.skip_reason : "pass";
    if (r.cases > 0 && r.skipped > 0) status += " (" + std::to_string(r.skipped) + " cases skipped: " + r.skip_reason + ")";
    std::string path;
    if (r.failure) {
      status = std::string(props::verdict_kind_name(r.failure->verdict.kind)) + ": " + r.failure->verdict.signature;
      const auto written = record(corpus, r);
      if (written) path = written->path;
    }
    out << "  " << pad(r.suite, 20) << pad(std::to_string(r.cases) + " cases", 12) << pad(fixed(r.seconds, 1) + " s", 9)
        << status << "\n"
        << std::flush;
    results.push_back(r);
    paths.push_back(path);
  }
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  out << "\nsuite                cases  failures   time s  result\n";
  int64_t failures = 0;
  for (size_t i = 0; i < results.size(); ++i) {
    const SuiteResult& r = results[i];
    failures += r.failure ? 1 : 0;
    char row[128];
    std::snprintf(row, sizeof row, "%-20s %6lld  %8d  %7.1f  ", r.suite.c_str(), static_cast<long long>(r.cases),
                  r.failure ? 1 : 0, r.seconds);
    out << row << (r.failure ? "FAIL" : r.cases == 0 && r.skipped > 0 ? "skip" : "pass") << "\n";
  }
  for (size_t i = 0; i < results.size(); ++i) {
    const SuiteResult& r = results[i];
    if (!r.failure) continue;
    out << "\n" << r.suite << ": " << props::verdict_kind_name(r.failure->verdict.kind) << " ("
        << r.failure->verdict.signature << ") after " << r.failure->shrink_steps << " shrink steps, case size "
        << props::scenario_size(r.failure->original) << " -> " << props::scenario_size(r.failure->scenario) << "\n  "
        << one_line(r.failure->verdict.detail, 300) << "\n";
    if (!paths[i].empty()) out << "  case: " << paths[i] << "\n";
  }
  out << "\n" << failures << " of " << results.size() << " suites failed in " << fixed(total, 1) << " s\n";
  return failures > 0 ? kExitFinding : kExitOk;
}

int cmd_mutants(const std::vector<std::string>& argv, std::ostream& out) {
  const std::vector<FlagSpec> flags = {
      {"--backend", "sim|cuda|auto", "where the engine scenarios run: sim, cuda, or auto (cuda if a GPU is present; default sim)", false},
      {"--budget-per-fault", "SECONDS", "time to detect each fault (default 60)", false},
      {"--faults", "a,b,...", "only these faults (default: every registered one)", false},
      {"--suites", "a,b,...", "only these suites (default: all)", false},
      {"--corpus", "DIR", "where each detecting case is written (default .dsv4h/mutants)", false},
      {"--seed", "S", "the generators' seed (default 1)", false},
      {"--list", "", "list the registered faults and where each lives", false},
  };
  const Args args("mutants", argv, flags, false);
  if (args.help()) {
    out << usage("mutants", "[--backend sim|cuda|auto] [--budget-per-fault SECONDS] [--faults a,b] [--corpus DIR]", flags, false);
    return kExitOk;
  }
  if (!args.positionals().empty()) throw InputError(args.positionals()[0], "", "unexpected argument");
  if (args.has("--list")) {
    for (const faults::FaultInfo& f : faults::registry()) {
      out << f.name << "\n  " << f.summary << "\n  at " << f.where << "\n  from " << f.origin << "\n";
    }
    return kExitOk;
  }
  const std::string backend = check_backend(args);
  const double budget = positive_seconds(args, "--budget-per-fault", 60);
  const std::string corpus = args.optional_str("--corpus").value_or(".dsv4h/mutants");
  const std::vector<const Suite*> suites = selected_suites(args);
  std::vector<std::string> fault_names;
  if (args.has("--faults")) {
    for (const std::string& f : split_list(args.str("--faults"), "--faults")) {
      fault_names.push_back(faults::info(faults::parse(f, "--faults", "")).name);
    }
  } else {
    for (const faults::FaultInfo& f : faults::registry()) fault_names.push_back(f.name);
  }
  const uint64_t seed = args.has("--seed") ? args.u64("--seed") : 1;
  out << "dsv4h mutants: " << fault_names.size() << " faults, " << suites.size() << " suites, " << fixed(budget, 0)
      << " s per fault, backend " << backend << ", seed " << seed << "\n"
      << std::flush;

  std::vector<props::FaultHunt> hunts;
  std::vector<std::string> paths;
  ProgressLine line;
  for (const std::string& fault : fault_names) {
    props::FaultHunt hunt =
        props::hunt_fault(fault, suites, budget, seed, [&](const SuiteResult& p) { line.show(fault + " / ", p); }, backend);
    line.clear();
    std::string path;
    if (hunt.detected) {
      SuiteResult r;
      r.suite = hunt.suite;
      r.failure = hunt.failure;
      if (auto w = record(corpus, r)) path = w->path;
    }
    out << "  " << pad(fault, 34)
        << (!hunt.not_applicable.empty() ? "n/a on " + backend + ": " + hunt.not_applicable
            : hunt.detected              ? "detected by " + hunt.suite + " in " + fixed(hunt.seconds, 1) + " s"
                                         : "ESCAPED after " + fixed(hunt.seconds, 1) + " s")
        << "\n"
        << std::flush;
    hunts.push_back(std::move(hunt));
    paths.push_back(path);
  }

  out << "\nfault                              property            time s  cases  size  verdict\n";
  int64_t escaped = 0, not_applicable = 0;
  for (size_t i = 0; i < hunts.size(); ++i) {
    const props::FaultHunt& h = hunts[i];
    const bool na = !h.not_applicable.empty();
    not_applicable += na ? 1 : 0;
    escaped += h.detected || na ? 0 : 1;
    const std::string verdict =
        h.detected ? std::string(props::verdict_kind_name(h.failure->verdict.kind)) + ": " + h.failure->verdict.signature
        : na       ? h.not_applicable
                   : "";
    char buf[256];
    std::snprintf(buf, sizeof buf, "%-34s %-18s %7.1f %6lld %5lld  ", h.fault.c_str(),
                  h.detected ? h.suite.c_str() : na ? "n/a" : "ESCAPED",
                  h.seconds, static_cast<long long>(h.cases),
                  static_cast<long long>(h.detected ? props::scenario_size(h.failure->scenario) : 0));
    out << buf << one_line(verdict, 70) << "\n";
    if (!paths[i].empty()) out << "  " << paths[i] << "\n";
  }
  const int64_t applicable = static_cast<int64_t>(hunts.size()) - not_applicable;
  out << "\n" << applicable - escaped << " of " << applicable << " faults detected";
  if (not_applicable > 0) out << " (" << not_applicable << " not applicable on " << backend << ")";
  out << "\n";
  return escaped > 0 ? kExitFinding : kExitOk;
}

}  // namespace dsv4::cli
