// dsv4h replay (re-run a recorded case exactly and print its verdict and first divergence) and
// dsv4h shrink (make a recorded case smaller while it fails the same way).
#include <cstdio>
#include <sstream>
#include <string>

#include "engine/core/error.h"
#include "properties/case_file.h"
#include "properties/isolation.h"
#include "repros/replay.h"
#include "repros/shrink.h"
#include "tools/dsv4h/cli.h"
#include "tools/dsv4h/cli_args.h"

namespace dsv4::cli {

namespace {

std::string verdict_line(const props::Verdict& v) {
  if (v.passed()) return "pass";
  return std::string(props::verdict_kind_name(v.kind)) + " (" + v.signature + ")";
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

const std::string& case_path(const Args& args, const std::string& command) {
  if (args.positionals().size() != 1) throw InputError(command, "", "expects one case file (CASE.json)");
  return args.positionals()[0];
}

props::RunLimits limits_from(const Args& args) {
  props::RunLimits limits;
  limits.isolate = !args.has("--in-process");
  return limits;
}

}  // namespace

int cmd_replay(const std::vector<std::string>& argv, std::ostream& out) {
  const std::vector<FlagSpec> flags = {
      {"--without-faults", "", "run the same scenario without its injected faults", false},
      {"--repeat", "N", "run it N times and report how often it fails as recorded (default 1)", false},
      {"--check", "", "both directions (the repro tests): with its faults it fails as recorded, without them it passes", false},
      {"--in-process", "", "run in this process instead of a child (for a debugger: a crash then ends dsv4h)", false},
  };
  const Args args("replay", argv, flags, false);
  if (args.help()) {
    out << usage("replay", "CASE.json [--without-faults] [--repeat N] [--check]", flags, false);
    return kExitOk;
  }
  const std::string path = case_path(args, "replay");
  const props::CaseFile c = repro::load_case(path);
  repro::ReplayOptions options;
  options.limits = limits_from(args);
  options.repeat = args.i64("--repeat", 1);
  if (options.repeat < 1) throw InputError("--repeat", "", "must be >= 1");
  options.without_faults = args.has("--without-faults");
  if (args.has("--check") && options.without_faults) throw InputError("--check", "", "runs both directions itself; drop --without-faults");

  out << "case " << path << "\n  " << c.property << ": " << repro::describe_scenario(c.scenario) << "\n  faults:";
  for (const auto& f : c.scenario.faults) out << " " << f;
  if (c.scenario.faults.empty()) out << " none";
  out << "\n  recorded: " << verdict_line(c.verdict) << " on " << (c.backend.empty() ? "?" : c.backend) << " at "
      << (c.recorded_at.empty() ? "?" : c.recorded_at) << " by engine " << (c.engine_commit.empty() ? "?" : c.engine_commit)
      << "\n";

  const repro::ReplayResult r = repro::replay_case(c, options);
  bool stderr_shown = false;
  for (size_t i = 0; i < r.verdicts.size() && i < 5; ++i) {
    out << "run " << i + 1 << (options.without_faults ? " (without faults)" : "") << ": " << verdict_line(r.verdicts[i])
        << "\n";
    if (r.verdicts[i].passed()) continue;
    out << "  " << first_line(r.verdicts[i].detail) << "\n";
    // A crash's detail goes on with the child's stderr (the sanitizer, CUDA or abort report): print
    // it on the first crashed run, indented, since that is where the cause is.
    const std::string& detail = r.verdicts[i].detail;
    const size_t rest = detail.find('\n');
    if (r.verdicts[i].kind == props::VerdictKind::crash && rest != std::string::npos && !stderr_shown) {
      stderr_shown = true;
      out << "  child stderr (its last " << props::kStderrTailBytes << " bytes at most):\n";
      std::istringstream lines(detail.substr(rest + 1));
      for (std::string line; std::getline(lines, line);) out << "    " << line << "\n";
    }
  }
  if (options.repeat > 1) {
    char rate[128];
    std::snprintf(rate, sizeof rate, "failed %lld of %lld runs (%.1f%%), %lld as recorded\n",
                  static_cast<long long>(r.failed), static_cast<long long>(options.repeat),
                  100.0 * static_cast<double>(r.failed) / static_cast<double>(options.repeat),
                  static_cast<long long>(r.reproduced));
    out << rate;
  }
  const std::string divergence = repro::first_divergence(c, options.without_faults, options.limits);
  if (!divergence.empty()) out << "first divergence from the reference: " << divergence << "\n";

  if (args.has("--check")) {
    bool ok = r.reproduced == options.repeat;
    out << "with faults: " << (ok ? "reproduces the recorded verdict" : "does NOT reproduce the recorded verdict") << "\n";
    if (!c.scenario.faults.empty()) {
      repro::ReplayOptions clean = options;
      clean.without_faults = true;
      const repro::ReplayResult w = repro::replay_case(c, clean);
      const bool clean_ok = w.failed == 0;
      out << "without faults: " << (clean_ok ? "passes" : "FAILS: " + verdict_line(w.verdicts.front())) << "\n";
      ok = ok && clean_ok;
    }
    out << "verdict: " << (ok ? "PASS" : "FAIL") << "\n";
    return ok ? kExitOk : kExitFinding;
  }
  out << "reproduce: dsv4h replay " << path << (options.without_faults ? " --without-faults" : "") << "\n";
  return r.failed > 0 ? kExitFinding : kExitOk;
}

int cmd_shrink(const std::vector<std::string>& argv, std::ostream& out) {
  const std::vector<FlagSpec> flags = {
      {"--out", "MIN.json", "where the smallest case is written", true},
      {"--budget", "SECONDS", "time to search for smaller cases (default 120)", false},
      {"--in-process", "", "run the cases in this process instead of a child each", false},
  };
  const Args args("shrink", argv, flags, false);
  if (args.help()) {
    out << usage("shrink", "CASE.json --out MIN.json [--budget SECONDS]", flags, false);
    return kExitOk;
  }
  const std::string path = case_path(args, "shrink");
  const std::string out_path = args.str("--out");
  const double budget = positive_seconds(args, "--budget", 120);
  props::CaseFile c = repro::load_case(path);
  const props::RunLimits limits = limits_from(args);
  const props::Verdict now = props::run_case(c.scenario, limits);
  out << "case " << path << ": recorded " << verdict_line(c.verdict) << ", replayed " << verdict_line(now) << "\n";
  if (!repro::same_failure(now, c.verdict)) {
    out << "the case does not fail as recorded, so there is nothing to shrink it towards\n";
    return kExitFinding;
  }
  const int64_t size0 = props::scenario_size(c.scenario);
  const repro::ShrinkResult r =
      repro::shrink_scenario(c.scenario, c.verdict, limits, budget, [&](const repro::ShrinkResult& step) {
        out << "  step " << step.steps << ": size " << props::scenario_size(step.scenario) << " ("
            << repro::describe_scenario(step.scenario) << ")\n"
            << std::flush;
      });
  c.scenario = r.scenario;
  c.verdict = r.verdict;
  c.shrink_steps += r.steps;
  c.recorded_at = props::utc_now_iso8601();
  props::write_case_file_at(out_path, c);
  char line[160];
  std::snprintf(line, sizeof line, "size %lld -> %lld in %lld steps (%lld candidates tried, %.1f s)\n",
                static_cast<long long>(size0), static_cast<long long>(props::scenario_size(r.scenario)),
                static_cast<long long>(r.steps), static_cast<long long>(r.tried), r.seconds);
  out << line << "wrote " << out_path << "\n";
  return kExitOk;
}

}  // namespace dsv4::cli
