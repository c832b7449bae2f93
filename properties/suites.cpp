#include "properties/suites.h"

#include <algorithm>

#include "engine/config/runtime_options.h"
#include "engine/core/error.h"
#include "engine/faults/faults.h"
#include "engine/serving/compress_state_pool.h"
#include "properties/conversion.h"
#include "properties/engine_run.h"
#include "properties/generators.h"
#include "properties/schedule_case.h"
#include "properties/view_ops.h"

namespace dsv4::props {

namespace {

Scenario engine_scenario(const std::string& suite, EngineSpec spec) {
  Scenario s;
  s.suite = suite;
  s.engine = std::move(spec);
  return s;
}

// A suite's scenarios from a generator of one section (member `section` of Scenario).
template <class Spec>
rc::Gen<Scenario> section_gen(const std::string& suite, rc::Gen<Spec> spec, std::optional<Spec> Scenario::*section) {
  return rc::gen::map(std::move(spec), [suite, section](Spec value) {
    Scenario s;
    s.suite = suite;
    s.*section = std::move(value);
    return s;
  });
}

rc::Gen<Scenario> engine_suite_gen(const std::string& suite, gen::EngineMix mix) {
  return rc::gen::map(gen::engine_spec(mix), [suite](EngineSpec spec) { return engine_scenario(suite, std::move(spec)); });
}

// ---- engine suites -----------------------------------------------------------------------------

// The engine's steps against the scalar reference (with every detector on).
Verdict engine_reference(const Scenario& s) {
  const EngineRunResult run = run_engine_spec(*s.engine, {.probes = true});
  if (!run.verdict.passed()) return run.verdict;
  return reference_verdict(*s.engine, run);
}

// Two runs of variants of one scenario must agree bitwise; each must also be clean on its own.
Verdict equal_runs(const EngineSpec& a, const EngineSpec& b, const std::string& what) {
  const EngineRunResult x = run_engine_spec(a);
  if (!x.verdict.passed()) return x.verdict;
  const EngineRunResult y = run_engine_spec(b);
  if (!y.verdict.passed()) return y.verdict;
  const std::string d = first_difference(x, y);
  if (d.empty()) return Verdict::pass();
  return Verdict::fail(VerdictKind::mismatch, what, what + ": " + d);
}

Verdict pp_equivalence(const Scenario& s) {
  EngineSpec one = *s.engine;
  one.pp_partition.clear();
  return equal_runs(*s.engine, one, "pp-vs-single-stage");
}

Verdict graph_equivalence(const Scenario& s) {
  EngineSpec graph = *s.engine, eager = *s.engine;
  graph.graphs = true;
  eager.graphs = false;
  return equal_runs(graph, eager, "graph-vs-eager");
}

Verdict determinism(const Scenario& s) {
  // The same scenario twice, then under the in-order schedule: bitwise equal every time.
  Verdict v = equal_runs(*s.engine, *s.engine, "rerun");
  if (!v.passed()) return v;
  EngineSpec in_order = *s.engine;
  in_order.schedule = "in-order";
  return equal_runs(*s.engine, in_order, "schedule-vs-in-order");
}

Verdict batch_invariance(const Scenario& s) {
  // Request 0's tokens and logits alone equal those it gets among its batch neighbours.
  const EngineRunResult batch = run_engine_spec(*s.engine);
  if (!batch.verdict.passed()) return batch.verdict;
  EngineSpec alone = *s.engine;
  alone.requests = {s.engine->requests.front()};
  alone.requests.front().arrival_step = 0;
  const EngineRunResult solo = run_engine_spec(alone);
  if (!solo.verdict.passed()) return solo.verdict;
  const std::string d = request_difference(batch, solo, s.engine->requests.front().id);
  if (d.empty()) return Verdict::pass();
  return Verdict::fail(VerdictKind::mismatch, "batch-vs-alone", "batch vs alone: " + d);
}

// The detectors alone (the run's own verdict): hazards, contract errors, hangs, guard bytes.
Verdict clean_run(const Scenario& s) { return run_engine_spec(*s.engine, {.guards = true}).verdict; }

Verdict invalid_config(const Scenario& s) {
  const EngineSpec& spec = *s.engine;
  const EngineRunResult run = run_engine_spec(spec);
  if (s.expect_field.empty()) return run.verdict;
  if (run.verdict.kind != VerdictKind::bad_input) {
    return Verdict::fail(VerdictKind::mismatch, "accepted:" + s.expect_field,
                         "an invalid " + s.expect_field + " was not refused at construction (verdict " +
                             verdict_kind_name(run.verdict.kind) + ": " + run.verdict.detail + ")");
  }
  if (run.verdict.signature != s.expect_field) {
    return Verdict::fail(VerdictKind::mismatch, "wrong-field:" + s.expect_field,
                         "refused naming '" + run.verdict.signature + "' instead of '" + s.expect_field +
                             "': " + run.verdict.detail);
  }
  return Verdict::pass();
}

// ---- index translation -------------------------------------------------------------------------

Verdict index_translation(const Scenario& s) {
  const TranslationSpec& t = *s.translation;
  const ModelConfig config = load_model_config("micro");
  int64_t layer = -1;
  for (int64_t l = 0; l < config.n_layers; ++l) {
    if (config.ratio(l) == t.ratio && layer < 0) layer = l;
  }
  if (layer < 0) return Verdict::fail(VerdictKind::bad_input, "translation.ratio", "micro has no layer of this ratio");
  RuntimeOptions o;
  o.swa_page_size = t.swa_page_size;
  o.page_size = t.swa_page_size > 0 ? 2 * t.swa_page_size : 256;
  if (t.ratio == 4) o.c4_ring_size = t.ring_size;
  else o.c128_ring_size = t.ring_size;
  bool valid = true;
  try {
    validate_runtime_options(o, config);
  } catch (const InputError&) {
    valid = false;
  }
  std::unique_ptr<serving::CompressStatePool> pool;
  try {
    pool = std::make_unique<serving::CompressStatePool>(config, o, layer, serving::CompressStateOwner::attention,
                                                        t.swa_page_count);
  } catch (const InputError& e) {
    if (valid) return Verdict::fail(VerdictKind::bad_input, e.field(), std::string("valid geometry refused: ") + e.what());
    return Verdict::pass();  // refused, naming a field, before anything divided by it
  }
  if (!valid) {
    return Verdict::fail(VerdictKind::mismatch, "accepted-invalid-geometry",
                         "the pool accepted swa_page_size " + std::to_string(t.swa_page_size) + " with ring " +
                             std::to_string(t.ring_size));
  }
  const int64_t used = pool->used_row_count(), ring = pool->ring_size();
  for (int64_t loc : t.swa_locs) {
    const int64_t row = pool->translate_swa_loc_to_state_row(loc);
    const bool in_pool = loc >= 0 && loc < t.swa_page_count * t.swa_page_size;
    const int64_t expected = in_pool ? (loc / t.swa_page_size) * ring + loc % ring : serving::CompressStatePool::kNoRow;
    if (row != expected || (row != -1 && (row < 0 || row >= used))) {
      return Verdict::fail(VerdictKind::mismatch, "translate_swa_loc_to_state_row",
                           "swa_loc " + std::to_string(loc) + " -> " + std::to_string(row) + ", expected " +
                               std::to_string(expected) + " (rows [0, " + std::to_string(used) + "))");
    }
  }
  return Verdict::pass();
}

std::vector<Suite> make_suites() {
  std::vector<Suite> out;
  out.push_back({"fp8-conversion", "every portable f32 encoder gives the reference converter's code",
                 [] {
                   // Mostly small generated cases; one in ten is a format's whole corner sweep
                   // (every code, every tie and +-1 ulp around each: the bounded exhaustive pass).
                   const rc::Gen<ConversionSpec> sweep =
                       rc::gen::map(rc::gen::elementOf(conversion_formats()), corner_sweep);
                   return section_gen("fp8-conversion",
                                      rc::gen::weightedOneOf<ConversionSpec>({{9, gen_conversion_spec()}, {1, sweep}}),
                                      &Scenario::conversion);
                 },
                 [](const Scenario& s) { return check_conversion_case(*s.conversion); }, 300, false, "conversion"});
  out.push_back({"index-translation",
                 "SWA location -> compress-state row is total (a row in range or -1); bad geometry is refused",
                 [] { return section_gen("index-translation", gen::translation_spec(), &Scenario::translation); },
                 index_translation, 300, false, "translation"});
  out.push_back({"strided-input", "a kernel on a strided view equals it on the contiguous copy, or refuses it",
                 [] { return section_gen("strided-input", gen_view_spec(), &Scenario::view); },
                 [](const Scenario& s) { return check_view_case(*s.view); }, 200, false, "view"});
  out.push_back({"indexer-schedule",
                 "the persistent indexer kernel's schedule partitions its work in either layout, and the kernel "
                 "finishes with the right logits",
                 [] { return section_gen("indexer-schedule", gen_schedule_spec(), &Scenario::schedule_case); },
                 [](const Scenario& s) { return check_schedule_case(*s.schedule_case); }, 200, false, "schedule_case"});
  out.push_back({"invalid-config", "an invalid runtime option is refused at construction, naming its field",
                 [] {
                   return rc::gen::map(gen::invalid_engine_spec(), [](std::pair<EngineSpec, std::string> p) {
                     Scenario s = engine_scenario("invalid-config", std::move(p.first));
                     s.expect_field = std::move(p.second);
                     return s;
                   });
                 },
                 invalid_config, 30});
  gen::EngineMix hazards;
  hazards.multi_stream_percent = 100;
  hazards.shuffled_schedule_percent = 90;
  hazards.pp_percent = 40;
  hazards.cp_percent = 25;
  out.push_back({"hazard-free", "the hazard detector, the launch contracts and the guard bytes stay silent",
                 [hazards] { return engine_suite_gen("hazard-free", hazards); }, clean_run, 16});
  gen::EngineMix hangs;
  hangs.mtp_percent = 50;
  hangs.graphs_percent = 75;
  hangs.max_requests = 4;
  hangs.cp_percent = 20;
  out.push_back({"no-hang", "every run finishes: no persistent kernel waits forever, no request starves",
                 [hangs] { return engine_suite_gen("no-hang", hangs); }, clean_run, 16});
  gen::EngineMix reference;
  reference.mtp_percent = 35;
  out.push_back({"engine-reference", "the engine's steps match the scalar reference within tolerance",
                 [reference] { return engine_suite_gen("engine-reference", reference); }, engine_reference, 10});
  gen::EngineMix pp;
  pp.pp_percent = 100;
  out.push_back({"pp-equivalence", "PP=p over any partition equals PP=1 bitwise",
                 [pp] { return engine_suite_gen("pp-equivalence", pp); }, pp_equivalence, 10});
  gen::EngineMix graphs;
  graphs.pp_percent = 20;
  out.push_back({"graph-equivalence", "graph capture and replay equal eager execution bitwise",
                 [graphs] { return engine_suite_gen("graph-equivalence", graphs); }, graph_equivalence, 10});
  out.push_back({"determinism", "the same scenario twice, and under the in-order schedule, is bitwise equal",
                 [] { return engine_suite_gen("determinism", gen::EngineMix{}); }, determinism, 6});
  gen::EngineMix batch;
  batch.max_requests = 4;
  out.push_back({"batch-invariance", "a request's tokens and logits do not depend on its batch neighbours",
                 [batch] {
                   return rc::gen::suchThat(engine_suite_gen("batch-invariance", batch),
                                            [](const Scenario& s) { return s.engine->requests.size() >= 2; });
                 },
                 batch_invariance, 8});
  return out;
}

}  // namespace

const std::vector<Suite>& suites() {
  static const std::vector<Suite> table = make_suites();
  return table;
}

const Suite* find_suite(const std::string& name) {
  for (const Suite& s : suites()) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

std::string suite_names() {
  std::string out;
  for (const Suite& s : suites()) out += (out.empty() ? "" : ", ") + s.name;
  return out;
}

std::string missing_section(const Suite& suite, const Scenario& s) {
  const bool present = suite.section == "engine"        ? s.engine.has_value()
                       : suite.section == "view"        ? s.view.has_value()
                       : suite.section == "translation" ? s.translation.has_value()
                       : suite.section == "conversion"  ? s.conversion.has_value()
                                                        : s.schedule_case.has_value();
  return present ? "" : suite.section;
}

Verdict evaluate_scenario(const Scenario& scenario) {
  const Suite* suite = find_suite(scenario.suite);
  if (suite == nullptr) {
    throw InputError("scenario", "suite", "unknown suite '" + scenario.suite + "' (known: " + suite_names() + ")");
  }
  std::vector<faults::Fault> injected;
  for (size_t i = 0; i < scenario.faults.size(); ++i) {
    injected.push_back(faults::parse(scenario.faults[i], "scenario", "faults[" + std::to_string(i) + "]"));
  }
  const std::string missing = missing_section(*suite, scenario);
  if (!missing.empty()) throw InputError("scenario", missing, "the " + scenario.suite + " suite needs this section");
  const faults::ScopedFaults scope(injected);
  return suite->evaluate(scenario);
}

int64_t scenario_size(const Scenario& s) {
  int64_t size = 0;
  if (s.engine) {
    for (const RequestSpec& r : s.engine->requests) size += 1 + static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens;
    size += static_cast<int64_t>(s.engine->pp_partition.size()) + s.engine->cp - 1;
  }
  if (s.view) size += s.view->tokens + s.view->pad;
  if (s.translation) size += static_cast<int64_t>(s.translation->swa_locs.size());
  if (s.conversion) size += static_cast<int64_t>(s.conversion->inputs.size());
  if (s.schedule_case) size += static_cast<int64_t>(s.schedule_case->context_lens.size());
  return size;
}

}  // namespace dsv4::props
