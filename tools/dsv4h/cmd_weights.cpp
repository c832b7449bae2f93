#include <cstdio>
#include <filesystem>

#include "engine/checkpoint/checkpoint_layout.h"
#include "engine/checkpoint/synthetic_weights.h"
#include "engine/config/model_config.h"
#include "tools/dsv4h/cli.h"
#include "engine/core/error.h"
#include "tools/dsv4h/cli_args.h"

namespace dsv4::cli {

int cmd_weights(const std::vector<std::string>& argv, std::ostream& out) {
  const std::vector<FlagSpec> flags = {
      {"--config", "NAME|PATH", "config preset or config.json", true},
      {"--seed", "S", "weight seed (unsigned 64-bit)", true},
      {"--out", "F.safetensors", "output file (written atomically)", true},
  };
  const Args args("weights", argv, flags, /*runtime=*/false);
  if (args.help()) {
    out << usage("weights", "--config C --seed S --out F.safetensors", flags, false);
    return kExitOk;
  }
  if (!args.positionals().empty()) throw InputError(args.positionals()[0], "", "unexpected argument");
  const ModelConfig config = load_model_config(args.str("--config"));
  const uint64_t seed = args.u64("--seed");
  const std::string path = args.str("--out");
  const ParameterCount count = count_parameters(config);
  write_synthetic_checkpoint(config, seed, path);
  char line[256];
  std::snprintf(line, sizeof line, "wrote %s: %zu tensors, %lld parameters, %lld bytes (config %s, seed %llu)\n",
                path.c_str(), checkpoint_layout(config).size(), static_cast<long long>(count.total),
                static_cast<long long>(std::filesystem::file_size(path)), config.source.c_str(),
                static_cast<unsigned long long>(seed));
  out << line;
  return kExitOk;
}

}  // namespace dsv4::cli
