#include "properties/engine_run.h"

#include <algorithm>
#include <map>

#include "engine/checkpoint/checkpoint_source.h"
#include "engine/core/error.h"
#include "engine/model/serving_engine.h"
#include "engine/oracle/oracle.h"
#include "engine/runtime/hazard_detector.h"
#include "engine/runtime/backend.h"
#include "reference/weights.h"

namespace dsv4::props {

ModelConfig spec_model_config(const EngineSpec& spec) { return load_model_config(spec.config); }

RuntimeOptions spec_runtime_options(const EngineSpec& spec) {
  RuntimeOptions o;
  o.page_size = spec.page_size;
  o.swa_page_size = spec.swa_page_size;
  o.c4_ring_size = spec.c4_ring_size;
  o.c128_ring_size = spec.c128_ring_size;
  o.batch_buckets = spec.batch_buckets;
  o.max_running_requests = spec.max_running_requests;
  o.chunked_prefill_tokens = spec.chunked_prefill_tokens;
  o.speculative = spec.mtp && spec.draft_tokens > 0;
  return o;
}

engine::EngineOptions spec_engine_options(const EngineSpec& spec) {
  engine::EngineOptions eo;
  eo.graphs = spec.graphs;
  eo.multi_stream = spec.multi_stream;
  eo.pp_partition = spec.pp_partition;
  eo.cp = spec.cp;
  eo.w8a8_int8 = spec.quant == "w8a8-int8";
  eo.mtp = spec.mtp;
  eo.draft_tokens = spec.mtp ? spec.draft_tokens : 0;
  eo.indexer_sms = spec.indexer_sms;
  return eo;
}

int spec_devices(const EngineSpec& spec) {
  return std::max<int>({1, static_cast<int>(spec.pp_partition.size()), static_cast<int>(spec.cp)});
}

namespace {

Verdict exception_verdict(const std::exception_ptr& error) {
  try {
    std::rethrow_exception(error);
  } catch (const InputError& e) {
    return Verdict::fail(VerdictKind::bad_input, e.field().empty() ? e.source() : e.field(), e.what());
  } catch (const ContractError& e) {
    return Verdict::fail(VerdictKind::contract_error, e.op() + ":" + e.argument(), e.what());
  } catch (const rt::HangError& e) {
    return Verdict::fail(VerdictKind::hang, e.kernel(), e.what());
  } catch (const std::exception& e) {
    return Verdict::fail(VerdictKind::crash, "exception", e.what());
  }
}

}  // namespace

EngineRunResult run_engine_spec(const EngineSpec& spec, const EngineRunOptions& options) {
  EngineRunResult out;
  rt::BackendKind backend = rt::BackendKind::sim;
  try {
    backend = rt::parse_backend(spec.backend, "engine.backend");
  } catch (const InputError& e) {
    out.verdict = Verdict::fail(VerdictKind::bad_input, "engine.backend", e.what());
    return out;
  }
  rt::RuntimeOptions ro;
  ro.devices = spec_devices(spec);
  if (options.guards) {
    ro.allocator_mode = AllocatorMode::testing;
    ro.caching_allocator = false;
  }
  std::exception_ptr error;
  rt::HazardDetector detector;
  size_t guard_damage = 0;
  try {
    const ModelConfig config = spec_model_config(spec);
    rt::SimOptions sim;
    sim.schedule = rt::Schedule::parse(spec.schedule);
    const std::unique_ptr<rt::Runtime> runtime_owner = rt::make_runtime(backend, ro, sim);
    rt::Runtime& runtime = *runtime_owner;
    runtime.add_observer(&detector);
    engine::EngineOptions eo = spec_engine_options(spec);
    eo.probes = options.probes;
    {
      engine::ServingEngine engine(runtime, config, spec_runtime_options(spec),
                                   CheckpointSource::synthetic(config, spec.weight_seed), eo);
      int64_t budget = 64;  // steps: every token of every request once, twice over, plus slack
      for (const RequestSpec& r : spec.requests) {
        engine.add_request(r.id, r.prompt, r.max_new_tokens, r.arrival_step);
        budget += 2 * (static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens + r.arrival_step);
      }
      try {
        while (engine.has_unfinished()) {
          if (engine.steps() >= budget) {
            throw rt::HangError("scheduler", {}, "no request finished after " + std::to_string(budget) + " steps");
          }
          out.steps.push_back(engine.step());
        }
      } catch (...) {
        error = std::current_exception();
        rt::discard_after_failure(runtime);  // the failed step's queued launches must not run at teardown
      }
      for (const RequestSpec& r : spec.requests) out.generated.push_back(engine.request(r.id).generated_ids);
    }
    guard_damage = runtime.check_guards().size();
  } catch (...) {
    if (!error) error = std::current_exception();
  }
  for (const auto& h : detector.hazards()) out.hazards.push_back(h.describe());
  if (error) {
    out.verdict = exception_verdict(error);
  } else if (!detector.hazards().empty()) {
    out.verdict = Verdict::fail(VerdictKind::race, detector.hazards().front().buffer, out.hazards.front());
  } else if (guard_damage > 0) {
    out.verdict = Verdict::fail(VerdictKind::mismatch, "guard-bytes",
                                std::to_string(guard_damage) + " buffer(s) with damaged guard bytes");
  }
  return out;
}

Verdict reference_verdict(const EngineSpec& spec, const EngineRunResult& run) {
  const ModelConfig config = spec_model_config(spec);
  const ref::Weights weights = ref::Weights::synthetic(config, spec.weight_seed);
  ref::Numerics numerics{ref::Mode::quant_sim};
  if (spec.quant == "w8a8-int8") numerics.linear = ref::LinearQuant::w8a8_int8;
  engine::ReferenceOracle oracle(config, weights, numerics);
  for (const RequestSpec& r : spec.requests) oracle.add_request(r.id, r.prompt);
  for (const engine::StepRecord& s : run.steps) oracle.check(s);
  if (auto d = oracle.first_divergence()) {
    return Verdict::fail(VerdictKind::mismatch, d->key, d->summary());
  }
  if (!oracle.ok()) return Verdict::fail(VerdictKind::mismatch, "oracle", oracle.table());
  return Verdict::pass();
}

namespace {

std::string row_difference(const engine::StepRow& x, const engine::StepRow& y) {
  if (x.sampled_id != y.sampled_id || x.new_tokens != y.new_tokens) return "sampled tokens";
  if (x.logits != y.logits) return "logits";
  if (x.draft_logits != y.draft_logits) return "draft logits";
  return "";
}

}  // namespace

std::string first_difference(const EngineRunResult& a, const EngineRunResult& b) {
  if (a.generated != b.generated) {
    for (size_t r = 0; r < a.generated.size() && r < b.generated.size(); ++r) {
      if (a.generated[r] != b.generated[r]) return "request #" + std::to_string(r) + " generated different tokens";
    }
    return "different request count";
  }
  if (a.steps.size() != b.steps.size()) {
    return "step count " + std::to_string(a.steps.size()) + " vs " + std::to_string(b.steps.size());
  }
  for (size_t s = 0; s < a.steps.size(); ++s) {
    const engine::StepRecord& x = a.steps[s];
    const engine::StepRecord& y = b.steps[s];
    const std::string at = "step " + std::to_string(x.step) + ": ";
    if (x.rows.size() != y.rows.size()) return at + "row count";
    for (size_t r = 0; r < x.rows.size(); ++r) {
      if (x.rows[r].request_id != y.rows[r].request_id) return at + "row " + std::to_string(r) + " request";
      const std::string d = row_difference(x.rows[r], y.rows[r]);
      if (!d.empty()) return at + "request " + std::to_string(x.rows[r].request_id) + " " + d;
    }
  }
  return "";
}

std::string request_difference(const EngineRunResult& a, const EngineRunResult& b, int64_t request_id) {
  auto sampled_rows = [request_id](const EngineRunResult& run) {
    std::vector<const engine::StepRow*> rows;
    for (const auto& s : run.steps) {
      for (const auto& r : s.rows) {
        if (r.request_id == request_id && r.samples) rows.push_back(&r);
      }
    }
    return rows;
  };
  const auto x = sampled_rows(a), y = sampled_rows(b);
  if (x.size() != y.size()) {
    return "request " + std::to_string(request_id) + " sampled " + std::to_string(x.size()) + " vs " +
           std::to_string(y.size()) + " times";
  }
  for (size_t i = 0; i < x.size(); ++i) {
    const std::string d = row_difference(*x[i], *y[i]);
    if (!d.empty()) {
      return "request " + std::to_string(request_id) + " sample #" + std::to_string(i) + " (position " +
             std::to_string(x[i]->start_pos + x[i]->num_tokens - 1) + "): " + d;
    }
  }
  return "";
}

}  // namespace dsv4::props
