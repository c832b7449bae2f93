#include <chrono>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <optional>

#include "engine/config/model_config.h"
#include "engine/core/error.h"
#include "reference/generate.h"
#include "reference/model.h"
#include "reference/weights.h"
#include "tools/dsv4h/cli.h"
#include "tools/dsv4h/cli_args.h"

namespace dsv4::cli {

namespace {

std::string join(const std::vector<int64_t>& ids, size_t limit = SIZE_MAX) {
  std::string out;
  for (size_t i = 0; i < ids.size() && i < limit; ++i) out += (out.empty() ? "" : " ") + std::to_string(ids[i]);
  if (ids.size() > limit) out += " ... (" + std::to_string(ids.size() - limit) + " more)";
  return out;
}

}  // namespace

int cmd_reference(const std::vector<std::string>& argv, std::ostream& out) {
  const std::vector<FlagSpec> flags = {
      {"--config", "NAME|PATH", "config preset or config.json", true},
      {"--seed", "S", "weight seed (synthetic weights; also the prompt seed unless --prompt-seed)", true},
      {"--prompt-len", "N", "prompt length in tokens", true},
      {"--decode", "K", "tokens to decode after the prefill (default 8)", false},
      {"--mode", "exact|quant-sim", "numerics: f32 everywhere, or the official code's quantization points", false},
      {"--indexer", "fp4|fp8", "indexer q/k simulation: fp4 (official QAT) or fp8 (sglang); default: the config's", false},
      {"--weights", "F.safetensors", "read the weights from a checkpoint instead of generating them", false},
      {"--prompt-seed", "S", "seed of the synthetic prompt (default: --seed)", false},
      {"--mtp", "", "also run the MTP block and print its draft tokens", false},
  };
  const Args args("reference", argv, flags, /*runtime=*/false);
  if (args.help()) {
    out << usage("reference", "--config C --seed S --prompt-len N [--decode K] [--mode exact|quant-sim] [--mtp]",
                 flags, false);
    return kExitOk;
  }
  if (!args.positionals().empty()) throw InputError(args.positionals()[0], "", "unexpected argument");
  ModelConfig config = load_model_config(args.str("--config"));
  const uint64_t seed = args.u64("--seed");
  const uint64_t prompt_seed = args.has("--prompt-seed") ? args.u64("--prompt-seed") : seed;
  const int64_t prompt_len = args.i64("--prompt-len", 0);
  const int64_t decode = args.i64("--decode", 8);
  if (prompt_len < 1) throw InputError("--prompt-len", "", "must be >= 1");
  if (decode < 0) throw InputError("--decode", "", "must be >= 0");
  if (prompt_len + decode > config.max_seq_len) {
    throw InputError("--prompt-len", "", "prompt + decode = " + std::to_string(prompt_len + decode) +
                                             " tokens exceeds the config's max_seq_len " +
                                             std::to_string(config.max_seq_len));
  }
  ref::Numerics numerics;
  const std::string mode = args.optional_str("--mode").value_or("exact");
  if (mode == "quant-sim") {
    numerics.mode = ref::Mode::quant_sim;
  } else if (mode != "exact") {
    throw InputError("--mode", "", "expects exact or quant-sim, got '" + mode + "'");
  }
  if (auto indexer = args.optional_str("--indexer")) {
    if (*indexer != "fp4" && *indexer != "fp8") throw InputError("--indexer", "", "expects fp4 or fp8");
    config.indexer_quant = *indexer;
  }
  const bool mtp = args.has("--mtp");
  if (mtp && config.n_mtp_layers == 0) throw InputError("--mtp", "", "the config has no MTP block");

  const auto t0 = std::chrono::steady_clock::now();
  const ref::Weights weights = args.has("--weights") ? ref::Weights::from_file(config, args.str("--weights"))
                                                     : ref::Weights::synthetic(config, seed);
  ref::Model model(config, weights);
  const ref::Context ctx{config, numerics, nullptr, nullptr};
  const std::vector<int64_t> prompt = ref::synthetic_prompt(config, prompt_seed, prompt_len);
  const auto t1 = std::chrono::steady_clock::now();
  const ref::Generation g = ref::generate_greedy(ctx, model, prompt, decode, mtp);
  const auto t2 = std::chrono::steady_clock::now();

  char digest[32];
  std::snprintf(digest, sizeof digest, "%016llx", static_cast<unsigned long long>(ref::logits_digest(g.logits)));
  out << "config " << config.source << ", weights " << (args.has("--weights") ? args.str("--weights") : "synthetic seed " + std::to_string(seed))
      << ", mode " << mode << ", indexer " << config.indexer_quant << "\n";
  out << "prompt (" << prompt_len << " tokens, seed " << prompt_seed << "): " << join(prompt, 24) << "\n";
  out << "tokens: " << join(g.tokens) << "\n";
  if (mtp) {
    std::snprintf(digest, sizeof digest, "%016llx",
                  static_cast<unsigned long long>(ref::logits_digest(g.draft_logits)));
    out << "mtp drafts: " << join(g.draft_tokens) << " (draft logits digest " << digest << ")\n";
    std::snprintf(digest, sizeof digest, "%016llx", static_cast<unsigned long long>(ref::logits_digest(g.logits)));
  }
  out << "logits digest: " << digest << " (" << g.logits.size() << " steps)\n";
  // Timings vary between runs, so they go to stderr and stdout stays reproducible.
  const double load_s = std::chrono::duration<double>(t1 - t0).count();
  const double run_s = std::chrono::duration<double>(t2 - t1).count();
  std::fprintf(stderr, "reference: weights %.2f s, generation %.2f s\n", load_s, run_s);
  return kExitOk;
}

}  // namespace dsv4::cli
