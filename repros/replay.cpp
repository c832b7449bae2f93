#include "repros/replay.h"

#include "engine/core/error.h"
#include "engine/faults/faults.h"
#include "properties/suites.h"
#include "repros/shrink.h"

namespace dsv4::repro {

props::CaseFile load_case(const std::string& path) {
  props::CaseFile c = props::read_case_file(path);
  const props::Suite* suite = props::find_suite(c.scenario.suite);
  if (suite == nullptr) {
    throw InputError(path, "$.scenario.suite",
                     "unknown suite '" + c.scenario.suite + "' (known: " + props::suite_names() + ")");
  }
  for (size_t i = 0; i < c.scenario.faults.size(); ++i) {
    faults::parse(c.scenario.faults[i], path, "$.scenario.faults[" + std::to_string(i) + "]");
  }
  const std::string missing = props::missing_section(*suite, c.scenario);
  if (!missing.empty()) {
    throw InputError(path, "$.scenario." + missing, "the " + c.scenario.suite + " suite needs this section");
  }
  return c;
}

ReplayResult replay_case(const props::CaseFile& c, const ReplayOptions& options) {
  props::Scenario s = c.scenario;
  if (options.without_faults) s.faults.clear();
  ReplayResult r;
  for (int64_t i = 0; i < options.repeat; ++i) {
    props::Verdict v = props::run_case(s, options.limits);
    r.reproduced += same_failure(v, c.verdict) ? 1 : 0;
    r.failed += v.passed() ? 0 : 1;
    r.verdicts.push_back(std::move(v));
  }
  return r;
}

std::string first_divergence(const props::CaseFile& c, bool without_faults, const props::RunLimits& limits) {
  if (!c.scenario.engine || !c.scenario.expect_field.empty()) return "";
  props::Scenario s = c.scenario;
  s.suite = "engine-reference";
  if (without_faults) s.faults.clear();
  const props::Verdict v = props::run_case(s, limits);
  if (v.kind == props::VerdictKind::mismatch) return v.detail.substr(0, v.detail.find('\n'));
  if (v.passed()) return "";
  return std::string("(no reference comparison: the probed run ended with ") + props::verdict_kind_name(v.kind) +
         " " + v.signature + ")";
}

std::string describe_scenario(const props::Scenario& s) {
  std::string out;
  if (s.engine) {
    const props::EngineSpec& e = *s.engine;
    int64_t tokens = 0;
    for (const auto& r : e.requests) tokens += static_cast<int64_t>(r.prompt.size());
    out = e.config + ", " + std::to_string(e.requests.size()) + " request" + (e.requests.size() == 1 ? "" : "s") + " (" +
          std::to_string(tokens) + " prompt tokens)";
    if (!e.pp_partition.empty()) {
      out += ", pp ";
      for (size_t i = 0; i < e.pp_partition.size(); ++i) out += (i ? "," : "") + std::to_string(e.pp_partition[i]);
    }
    if (e.cp > 1) out += ", cp " + std::to_string(e.cp);
    if (e.graphs) out += ", graphs";
    if (!e.multi_stream) out += ", single stream";
    if (e.mtp) out += ", mtp";
    if (e.quant != "fp8") out += ", " + e.quant;
    out += ", schedule " + e.schedule;
    if (!s.expect_field.empty()) out += ", invalid " + s.expect_field;
  }
  if (s.view) out = s.view->op + " on a " + s.view->layout + " view, T=" + std::to_string(s.view->tokens);
  if (s.translation) out = std::to_string(s.translation->swa_locs.size()) + " SWA locations";
  if (s.conversion) out = s.conversion->format + ", " + std::to_string(s.conversion->inputs.size()) + " inputs";
  if (s.schedule_case) {
    out = std::to_string(s.schedule_case->rows) + " rows x next_n " + std::to_string(s.schedule_case->next_n) + ", " +
          s.schedule_case->layout + " layout, " + std::to_string(s.schedule_case->num_sms) + " SMs";
  }
  return out;
}

}  // namespace dsv4::repro
