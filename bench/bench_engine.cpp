// The engine on `sim` against the scalar reference on the same workload (issue #5's speed target:
// the engine at most 3x the reference's time). The workload is `dsv4h generate`'s standard mix: 8
// requests of 1 to 700 prompt tokens on the tiny config (1 to 84 on micro), 32 decode steps each.
// The reference runs each request alone (prefill in one call, then one call per token); the engine
// runs them as the scheduler batches them, in-order, without probes or detectors. The ratio
// engine / reference is reported as the counter `vs_reference` of the engine benchmarks.
#include <benchmark/benchmark.h>

#include <chrono>
#include <map>

#include "engine/model/serving_engine.h"
#include "engine/model/workload.h"
#include "engine/runtime/sim_runtime.h"
#include "reference/generate.h"
#include "reference/model.h"
#include "reference/weights.h"

namespace {

using namespace dsv4;

struct Setup {
  ModelConfig config;
  ref::Weights weights;
  std::vector<engine::WorkloadRequest> workload;
  explicit Setup(const std::string& preset)
      : config(load_model_config(preset)),
        weights(ref::Weights::synthetic(config, 1)),
        workload(engine::standard_workload(config, 1, 8, 32)) {}
};

Setup& setup(const std::string& preset) {
  static std::map<std::string, std::unique_ptr<Setup>> setups;
  auto& s = setups[preset];
  if (!s) s = std::make_unique<Setup>(preset);
  return *s;
}

// Seconds of one reference pass over the workload, measured once per preset for the ratio.
std::map<std::string, double>& reference_seconds() {
  static std::map<std::string, double> m;
  return m;
}

double run_reference(Setup& s) {
  const ref::Context ctx{s.config, ref::Numerics{ref::Mode::quant_sim}, nullptr, nullptr};
  ref::Model model(s.config, s.weights);
  const auto t0 = std::chrono::steady_clock::now();
  for (const auto& r : s.workload) {
    const std::vector<int64_t> prompt(r.prompt_ids.begin(), r.prompt_ids.end());
    benchmark::DoNotOptimize(ref::generate_greedy(ctx, model, prompt, r.max_new_tokens - 1, false).tokens.data());
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void BM_Reference(benchmark::State& state, const char* preset) {
  Setup& s = setup(preset);
  double total = 0;
  for (auto _ : state) total += run_reference(s);
  reference_seconds()[preset] = total / static_cast<double>(state.iterations());
}

void BM_Engine(benchmark::State& state, const char* preset, bool graphs, bool multi_stream) {
  Setup& s = setup(preset);
  if (reference_seconds().count(preset) == 0) reference_seconds()[preset] = run_reference(s);
  RuntimeOptions options;
  options.max_running_requests = 8;
  options.batch_buckets = {1, 2, 4, 8};
  engine::EngineOptions eo;
  eo.graphs = graphs;
  eo.multi_stream = multi_stream;
  double total = 0;
  for (auto _ : state) {
    state.PauseTiming();
    auto runtime = std::make_unique<rt::SimRuntime>(rt::RuntimeOptions{}, rt::SimOptions{});
    auto eng = std::make_unique<engine::ServingEngine>(*runtime, s.config, options,
                                                       CheckpointSource::synthetic(s.config, 1), eo);
    for (const auto& r : s.workload) eng->add_request(r.id, r.prompt_ids, r.max_new_tokens, r.arrival_step);
    state.ResumeTiming();
    const auto t0 = std::chrono::steady_clock::now();
    while (eng->has_unfinished()) benchmark::DoNotOptimize(eng->step().rows.data());
    total += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.PauseTiming();
    eng.reset();
    runtime.reset();
    state.ResumeTiming();
  }
  state.counters["vs_reference"] = total / static_cast<double>(state.iterations()) / reference_seconds()[preset];
}

BENCHMARK_CAPTURE(BM_Reference, tiny, "tiny")->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK_CAPTURE(BM_Engine, tiny_eager, "tiny", false, true)->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK_CAPTURE(BM_Engine, tiny_graph, "tiny", true, true)->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK_CAPTURE(BM_Reference, micro, "micro")->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Engine, micro_eager, "micro", false, true)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Engine, micro_graph_single_stream, "micro", true, false)->Unit(benchmark::kMillisecond);

}  // namespace
