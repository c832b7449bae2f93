// What every reference module receives: the config, the numerics mode, and the hooks through which
// the engine comparison reads every intermediate and forces the discrete decisions (design.md,
// Oracles: a near-tie decided differently by the engine continues with the engine's choice).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "engine/config/model_config.h"
#include "reference/tensor.h"

namespace dsv4::ref {

enum class Mode {
  exact,      // weights dequantized to f32, f32 activations, no activation quantization
  quant_sim,  // the official code's numerics: bf16 activations, FP8/FP4 quantize-dequantize points
};

// How quant-sim runs the LinearKind::fp8 and LinearKind::fp4 linears (reference/linear.h).
enum class LinearQuant {
  fp8_block,  // the official code: FP8 activations per 1 x act_block_size, the checkpoint's FP8/FP4 weights
  w8a8_int8,  // sglang's `--quantization w8a8_int8`: int8 weights per output channel (requantized
              // from the dequantized checkpoint weight), int8 activations per token, exact integer
              // accumulation, one bf16 rounding (docs/numerics.md, "The w8a8-int8 linear path")
};
// "fp8_block" / "w8a8_int8".
const char* linear_quant_name(LinearQuant q);

struct Numerics {
  Mode mode = Mode::exact;
  // quant-sim only: the KV nope dims go through e4m3 (the current official code); false keeps the
  // initial release's behaviour, a clamp without FP8 rounding.
  bool kv_fp8_rounding = true;
  // quant-sim only: the quantization of the FP8/FP4 linears. bf16 and f32 linears, and exact mode,
  // do not depend on it.
  LinearQuant linear = LinearQuant::fp8_block;

  bool quant() const { return mode == Mode::quant_sim; }
};

// Receives every intermediate, keyed "<layer prefix>.<op>", e.g. "layers.3.attn.q" or
// "mtp.0.ffn.gate.experts"; one row per token of the current forward call.
class Observer {
 public:
  virtual ~Observer() = default;
  virtual void record(const std::string& key, const Mat& value) = 0;
};

// Keeps the latest value of every key.
class Trace final : public Observer {
 public:
  void record(const std::string& key, const Mat& value) override { values[key] = value; }
  std::map<std::string, Mat> values;
};

// Decisions imposed from outside. Each returns nullopt to let the reference decide.
struct Forcing {
  // The compressed-entry indices the indexer selects for the query at `position` of layer `layer`.
  std::function<std::optional<std::vector<int64_t>>(int64_t layer, int64_t position)> indexer_topk;
  // The routed experts chosen for the token at `position` of layer `layer` (MTP: layer n_layers).
  std::function<std::optional<std::vector<int64_t>>(int64_t layer, int64_t position)> experts;
};

struct Context {
  const ModelConfig& config;
  Numerics numerics;
  Observer* observer = nullptr;
  const Forcing* forcing = nullptr;

  void record(const std::string& key, const Mat& value) const {
    if (observer != nullptr) observer->record(key, value);
  }
  // Rounds to the activation dtype: bf16 in quant-sim, unchanged in exact mode.
  float act(float x) const;
  void act_inplace(Mat& m) const;
};

}  // namespace dsv4::ref
