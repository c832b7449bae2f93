// One engine run of an EngineSpec on a fresh sim runtime with the hazard detector attached, and the
// verdicts the engine suites draw from it: what stopped the run (a contract error, a hang, an
// option refused), what the detectors saw, and the comparisons (against the reference, or bitwise
// against another run).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "engine/config/model_config.h"
#include "engine/config/runtime_options.h"
#include "engine/model/model_runner.h"
#include "engine/model/step_record.h"
#include "properties/scenario.h"
#include "properties/verdict.h"

namespace dsv4::props {

struct EngineRunOptions {
  bool probes = false;  // record every intermediate (the reference comparison needs them)
  bool guards = false;  // the testing allocator's guard bytes and poison
};

struct EngineRunResult {
  std::vector<engine::StepRecord> steps;
  std::vector<std::vector<int32_t>> generated;  // per request, in spec order
  std::vector<std::string> hazards;             // the detector's reports, described
  // pass when the run finished and the detectors stayed silent; otherwise the first finding:
  // bad-input (an option the engine refused), contract-error, hang, crash (any other exception),
  // race (a hazard), mismatch (guard bytes damaged).
  Verdict verdict;
};

ModelConfig spec_model_config(const EngineSpec& spec);
RuntimeOptions spec_runtime_options(const EngineSpec& spec);
engine::EngineOptions spec_engine_options(const EngineSpec& spec);
// The simulated devices the run needs (PP stages or CP ranks).
int spec_devices(const EngineSpec& spec);

EngineRunResult run_engine_spec(const EngineSpec& spec, const EngineRunOptions& options = {});

// Every step through the reference oracle (quant-sim numerics, w8a8-int8 when the spec says so):
// pass, or a mismatch whose signature is the first divergent key ("layers.2.attn.o", "mtp.logits").
Verdict reference_verdict(const EngineSpec& spec, const EngineRunResult& run);

// The first difference between two runs' generated tokens, sampled tokens and logits (and draft
// logits), bitwise, step by step; "" when equal.
std::string first_difference(const EngineRunResult& a, const EngineRunResult& b);
// The first difference between one request's sampled rows in two runs (whose batches may differ),
// bitwise; "" when equal.
std::string request_difference(const EngineRunResult& a, const EngineRunResult& b, int64_t request_id);

}  // namespace dsv4::props
