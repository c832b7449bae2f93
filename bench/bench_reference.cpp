// The scalar reference's speed on one core: tiny prefill of 300 tokens (target < 2 s), tiny decode
// (target < 20 ms per token), micro decode (target < 1 ms per token).
#include <benchmark/benchmark.h>

#include "reference/generate.h"
#include "reference/model.h"
#include "reference/weights.h"

namespace {

using namespace dsv4;

struct Setup {
  ModelConfig config;
  ref::Weights weights;
  explicit Setup(const char* preset) : config(load_model_config(preset)), weights(ref::Weights::synthetic(config, 1)) {}
};

Setup& setup(const char* preset) {
  static Setup tiny("tiny");
  static Setup micro("micro");
  return std::string(preset) == "tiny" ? tiny : micro;
}

void BM_Prefill(benchmark::State& state, const char* preset, ref::Mode mode) {
  Setup& s = setup(preset);
  const ref::Context ctx{s.config, ref::Numerics{mode}, nullptr, nullptr};
  const auto prompt = ref::synthetic_prompt(s.config, 1, state.range(0));
  ref::Model model(s.config, s.weights);
  for (auto _ : state) {
    model.reset();
    benchmark::DoNotOptimize(model.forward(ctx, prompt, 0).logits.data.data());
  }
  state.SetItemsProcessed(state.iterations() * state.range(0));
}

// Decode steps after a prefill of range(0) tokens; the time per iteration is one token.
void BM_Decode(benchmark::State& state, const char* preset, ref::Mode mode) {
  Setup& s = setup(preset);
  const ref::Context ctx{s.config, ref::Numerics{mode}, nullptr, nullptr};
  const int64_t prefill = state.range(0);
  const auto prompt = ref::synthetic_prompt(s.config, 1, prefill);
  ref::Model model(s.config, s.weights);
  model.forward(ctx, prompt, 0);
  int64_t pos = prefill;
  for (auto _ : state) {
    if (pos + 1 >= s.config.max_seq_len) {
      state.PauseTiming();
      model.reset();
      model.forward(ctx, prompt, 0);
      pos = prefill;
      state.ResumeTiming();
    }
    benchmark::DoNotOptimize(model.forward(ctx, {5}, pos).logits.data.data());
    ++pos;
  }
  state.SetItemsProcessed(state.iterations());
}

BENCHMARK_CAPTURE(BM_Prefill, tiny_exact, "tiny", ref::Mode::exact)->Arg(300)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Prefill, tiny_quant_sim, "tiny", ref::Mode::quant_sim)->Arg(300)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Decode, tiny_exact, "tiny", ref::Mode::exact)->Arg(300)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Decode, tiny_quant_sim, "tiny", ref::Mode::quant_sim)->Arg(300)->Unit(benchmark::kMillisecond);
BENCHMARK_CAPTURE(BM_Decode, micro_exact, "micro", ref::Mode::exact)->Arg(100)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(BM_Decode, micro_quant_sim, "micro", ref::Mode::quant_sim)->Arg(100)->Unit(benchmark::kMicrosecond);

}  // namespace
