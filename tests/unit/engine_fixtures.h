// Shared by the engine's tests: one engine run over a workload on a fresh runtime (sim unless the
// test asks for cuda), with the hazard detector attached, returning every StepRecord.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "engine/model/serving_engine.h"
#include "engine/model/workload.h"
#include "engine/runtime/hazard_detector.h"
#include "engine/oracle/oracle.h"
#include "engine/runtime/backend.h"
#include "reference/weights.h"

namespace dsv4::engine::testing {

// The four ways a batch can run: eager or graph, multi-stream on or off.
struct Mode {
  bool graphs;
  bool multi_stream;
  const char* name;
};
inline void PrintTo(const Mode& m, std::ostream* os) { *os << m.name; }
inline constexpr Mode kModes[] = {{false, true, "eager_ms_on"}, {true, true, "graph_ms_on"},
                                  {false, false, "eager_ms_off"}, {true, false, "graph_ms_off"}};

struct RunConfig {
  rt::BackendKind backend = rt::BackendKind::sim;
  std::string schedule = "in-order";
  bool graphs = false;
  bool multi_stream = true;
  bool probes = true;
  bool guards = false;
  RuntimeOptions options = {};
  std::vector<int64_t> pp_partition = {};  // empty: one stage
  int64_t cp = 1;
  bool w8a8_int8 = false;
  bool mtp = false;
  int64_t draft_tokens = 0;  // speculative decoding (needs mtp)
  DraftExtend draft_extend = DraftExtend::v2;
  ServingEngine::DraftOverride draft_override = {};
};

struct RunResult {
  std::vector<StepRecord> steps;
  std::vector<std::string> hazards;
  size_t guard_damage = 0;
  int64_t graphs_captured = 0;
  int64_t graph_replays = 0;
  int64_t metadata_upgrades = 0;
  std::vector<std::vector<int32_t>> generated;  // per request, in workload order
};

// A run on the cuda backend in mode `m`, with poisoned fresh memory and guard bytes on device buffers.
inline RunConfig on_cuda(const Mode& m) {
  RunConfig rc;
  rc.backend = rt::BackendKind::cuda;
  rc.graphs = m.graphs;
  rc.multi_stream = m.multi_stream;
  rc.guards = true;
  return rc;
}

// Buckets up to the workload's size so the scheduler accepts max_running_requests = requests.
inline RuntimeOptions options_for(int64_t requests) {
  RuntimeOptions o;
  o.max_running_requests = requests;
  o.batch_buckets.clear();
  for (int64_t b : {1, 2, 4, 8, 16, 32, 64}) {
    if (b < requests) o.batch_buckets.push_back(b);
  }
  o.batch_buckets.push_back(requests);
  return o;
}

inline RunResult run_engine(const ModelConfig& config, uint64_t weight_seed, const std::vector<WorkloadRequest>& workload,
                            const RunConfig& rc) {
  rt::RuntimeOptions ro;
  ro.devices = std::max<int>({1, static_cast<int>(rc.pp_partition.size()), static_cast<int>(rc.cp)});
  if (rc.guards) {
    ro.allocator_mode = AllocatorMode::testing;
    ro.caching_allocator = false;
  }
  rt::SimOptions sim;
  sim.schedule = rt::Schedule::parse(rc.schedule);
  const std::unique_ptr<rt::Runtime> runtime_owner = rt::make_runtime(rc.backend, ro, sim);
  rt::Runtime& runtime = *runtime_owner;
  rt::HazardDetector detector;
  runtime.add_observer(&detector);
  EngineOptions eo;
  eo.graphs = rc.graphs;
  eo.multi_stream = rc.multi_stream;
  eo.probes = rc.probes;
  eo.pp_partition = rc.pp_partition;
  eo.cp = rc.cp;
  eo.w8a8_int8 = rc.w8a8_int8;
  eo.mtp = rc.mtp;
  eo.draft_tokens = rc.draft_tokens;
  eo.draft_extend = rc.draft_extend;
  RuntimeOptions options = rc.options;
  if (rc.draft_tokens > 0) options.speculative = true;
  RunResult out;
  {
    ServingEngine engine(runtime, config, options, CheckpointSource::synthetic(config, weight_seed), eo);
    if (rc.draft_override) engine.set_draft_override(rc.draft_override);
    for (const auto& r : workload) engine.add_request(r.id, r.prompt_ids, r.max_new_tokens, r.arrival_step);
    while (engine.has_unfinished()) out.steps.push_back(engine.step());
    out.graphs_captured = engine.graphs_captured();
    out.graph_replays = engine.graph_replays();
    out.metadata_upgrades = engine.metadata_upgrades();
    for (const auto& r : workload) out.generated.push_back(engine.request(r.id).generated_ids);
    out.guard_damage = runtime.check_guards().size();
  }
  for (const auto& h : detector.hazards()) out.hazards.push_back(h.describe());
  return out;
}

// Every step of a run through the oracle against the reference on the same synthetic weights: ""
// when it matches, else the first divergence and the per-request table.
inline std::string reference_divergence(const ModelConfig& config, uint64_t weight_seed,
                                        const std::vector<WorkloadRequest>& workload, const RunResult& run,
                                        ref::Numerics numerics = ref::Numerics{ref::Mode::quant_sim}) {
  const ref::Weights weights = ref::Weights::synthetic(config, weight_seed);
  ReferenceOracle oracle(config, weights, numerics);
  for (const auto& r : workload) oracle.add_request(r.id, r.prompt_ids);
  for (const StepRecord& s : run.steps) oracle.check(s);
  for (const auto& report : oracle.reports()) {
    for (const std::string& key : report.unchecked_keys) {
      if (key.rfind("mtp", 0) == 0) return "MTP key " + key + " was never compared\n" + oracle.table();
    }
  }
  if (oracle.ok()) return "";
  return oracle.first_divergence()->summary() + "\n" + oracle.table();
}

// The largest |logit difference| over every sampled row of two runs with the same rows (inf when
// the rows differ).
inline double max_logit_difference(const RunResult& a, const RunResult& b) {
  if (a.steps.size() != b.steps.size()) return HUGE_VAL;
  double worst = 0.0;
  for (size_t s = 0; s < a.steps.size(); ++s) {
    if (a.steps[s].rows.size() != b.steps[s].rows.size()) return HUGE_VAL;
    for (size_t r = 0; r < a.steps[s].rows.size(); ++r) {
      const auto& x = a.steps[s].rows[r].logits;
      const auto& y = b.steps[s].rows[r].logits;
      if (x.size() != y.size()) return HUGE_VAL;
      for (size_t i = 0; i < x.size(); ++i) worst = std::max(worst, static_cast<double>(std::fabs(x[i] - y[i])));
    }
  }
  return worst;
}

// The first difference between two runs' records (values bitwise, logits bitwise), or "".
inline std::string first_difference(const RunResult& a, const RunResult& b) {
  if (a.steps.size() != b.steps.size()) {
    return "step count " + std::to_string(a.steps.size()) + " vs " + std::to_string(b.steps.size());
  }
  for (size_t s = 0; s < a.steps.size(); ++s) {
    const StepRecord& x = a.steps[s];
    const StepRecord& y = b.steps[s];
    const std::string at = "step " + std::to_string(x.step) + ": ";
    if (x.rows.size() != y.rows.size()) return at + "row count";
    for (size_t r = 0; r < x.rows.size(); ++r) {
      if (x.rows[r].request_id != y.rows[r].request_id || x.rows[r].sampled_id != y.rows[r].sampled_id) {
        return at + "row " + std::to_string(r) + " request or sampled token";
      }
      if (x.rows[r].logits != y.rows[r].logits) return at + "row " + std::to_string(r) + " logits";
    }
    if (x.values.size() != y.values.size()) return at + "probe key count";
    for (const auto& [key, m] : x.values) {
      auto it = y.values.find(key);
      if (it == y.values.end()) return at + "missing probe " + key;
      if (it->second.rows != m.rows || it->second.cols != m.cols) return at + key + " shape";
      for (size_t i = 0; i < m.data.size(); ++i) {
        const float u = m.data[i], v = it->second.data[i];
        if (!(u == v || (u != u && v != v))) return at + key + " element " + std::to_string(i);
      }
    }
  }
  return "";
}

}  // namespace dsv4::engine::testing
